"""The same scenarios against every broker a fleet runs (issue 17): the real agent process, real
brokers on loopback with mutual TLS, outcomes checked on the wire. Expectations per broker live in
matrix.py; brokers are started once per module (RabbitMQ takes seconds to boot)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from agent.config import load_config
from agent.errors import AgentError
from agent.tools.doctor import render_text, run_doctor
from agent.tools.send import send_command
from tests.conftest import PKI
from tests.support.agentproc import AgentProcess
from tests.support.brokers import Broker
from tests.support.mqttclient import TestClient

pytestmark = [pytest.mark.timeout(180), pytest.mark.roots("trixie")]  # Debian 13's brokers

MakeConfig = Callable[..., Path]
RunAgent = Callable[..., AgentProcess]


def send(cfg: Path, command: str, payload: bytes = b"", **kw: Any) -> Any:
    return send_command(load_config(cfg), command, payload, timeout=kw.pop("timeout", 15), **kw)


def counting(tmp_path: Path, name: str = "count") -> tuple[Path, dict[str, dict[str, Any]]]:
    counter = tmp_path / f"{name}.log"
    argv = ["/bin/sh", "-c", f'echo "$MQTT_AGENT_REQ_ID" >> {counter}; echo ok']
    return counter, {f"commands.{name}": {"argv": argv}}


def runs(counter: Path) -> list[str]:
    return counter.read_text().split() if counter.exists() else []


def config(make_config: MakeConfig, broker: Broker, name: str, **sections: dict[str, Any]) -> Path:
    """A config with its own client id, so each scenario has its own broker session."""
    mqtt = {"client_id": f"dev-1-{name}", **sections.pop("mqtt", {})}
    return make_config(broker, {"mqtt": mqtt, **sections}, name=name)


def test_ping(interop_broker: Broker, make_config: MakeConfig, run_agent: RunAgent) -> None:
    cfg = config(make_config, interop_broker, "ping")
    run_agent(cfg)
    result = send(cfg, "ping", b'{"echo": "hi"}')
    assert result.status == 200
    assert json.loads(result.body)["echo"] == "hi"


def test_offline_qos1(interop_broker: Broker, make_config: MakeConfig, run_agent: RunAgent, tmp_path: Path) -> None:
    counter, commands = counting(tmp_path)
    cfg = config(make_config, interop_broker, "offline", **commands)
    assert run_agent(cfg).stop() == 0  # leaves a persistent session with the subscription
    watcher = TestClient(cfg, subscribe="command///res/#")
    sender = TestClient(cfg)
    sender.publish("command///req/offline-1/count")  # QoS 1: the broker queues it for the stopped agent
    sender.close()
    agent = run_agent(cfg)
    assert [m.topic for m in watcher.wait(1, timeout=20)] == ["command///res/offline-1/200"]
    assert agent.stop() == 0
    run_agent(cfg).stop()  # a further start must not run it again
    assert runs(counter) == ["offline-1"]
    assert len(watcher.messages) == 1
    watcher.close()


def test_duplicate_req_id(interop_broker: Broker, make_config: MakeConfig, run_agent: RunAgent,
                          tmp_path: Path) -> None:
    counter, commands = counting(tmp_path)
    cfg = config(make_config, interop_broker, "dupreq", **commands)
    run_agent(cfg)
    a = send(cfg, "count", req_id="dup-1")
    b = send(cfg, "count", req_id="dup-1")
    assert (a.status, a.body) == (b.status, b.body) == (200, b"ok\n")
    assert runs(counter) == ["dup-1"]


def test_duplicate_client_id(interop_broker: Broker, make_config: MakeConfig, run_agent: RunAgent) -> None:
    sections = {"mqtt": {"client_id": "dup-client", "keepalive": 5},
                "reconnect": {"min_delay": 0.5, "max_delay": 8.0}}
    first = run_agent(config(make_config, interop_broker, "first", **sections))
    time.sleep(1.0)
    run_agent(config(make_config, interop_broker, "clone", **sections), wait_subscribed=False)
    # Operator interface: the report names the client id and the key to change.
    line = first.wait_for(r"another client is connecting with client id 'dup-client'", timeout=60).string
    assert "mqtt.client_id" in line


def test_broker_restart(interop_broker: Broker, make_config: MakeConfig, run_agent: RunAgent,
                        tmp_path: Path) -> None:
    counter, commands = counting(tmp_path)
    cfg = config(make_config, interop_broker, "restart", **commands)
    agent = run_agent(cfg)
    assert send(cfg, "count", req_id="before").status == 200
    mark = agent.mark()
    interop_broker.restart()
    agent.wait_for(r"subscribed to ", since=mark, timeout=60)  # synchronisation: no other signal
    assert send(cfg, "count", req_id="after").status == 200
    assert runs(counter) == ["before", "after"]


def test_doctor(interop_broker: Broker, make_config: MakeConfig) -> None:
    cfg = config(make_config, interop_broker, "doctor",
                 mqtt={"protocol": "5" if interop_broker.mqtt5 else "3.1.1"})
    report = run_doctor(cfg, timeout=10.0, service_user=None)
    text = render_text(report)
    assert report.exit_code == 0, text
    if interop_broker.mqtt5:
        assert "commands can arrive" in text, text  # the delivery probe round trip (it needs MQTT 5)
    else:
        assert "granted QoS 1" in text and "delivery not tested" in text, text


def test_v5_response_topic(interop_broker: Broker, make_config: MakeConfig, run_agent: RunAgent, pki: PKI) -> None:
    cfg = config(make_config, interop_broker, "rr", mqtt={"protocol": "5"})
    run_agent(cfg)
    proc = subprocess.run(
        ["mosquitto_rr", "-h", "127.0.0.1", "-p", str(interop_broker.port), "-V", "5", "--cafile",
         str(pki.ca.cert_path), "--cert", str(pki.device.cert), "--key", str(pki.device.key),
         "-t", "command///req/rr-1/ping", "-e", "replies/rr-1", "-m", '{"echo": "via rr"}', "-W", "10"],
        capture_output=True, text=True, timeout=20,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["echo"] == "via rr"


def test_oversized_response(interop_broker: Broker, make_config: MakeConfig, run_agent: RunAgent) -> None:
    """48 KB of exec output with mqtt.max_message_bytes = 8192: a 500 that says so, and the channel lives on."""
    big = [sys.executable, "-c", "print('x' * 49152)"]
    cfg = config(make_config, interop_broker, "big", mqtt={"max_message_bytes": 8192},
                 **{"commands.big": {"argv": big}})
    agent = run_agent(cfg)
    result = send(cfg, "big")
    assert result.status == 500
    assert len(result.body) <= 8192
    assert "mqtt.max_message_bytes" in json.loads(result.body)["error"]
    assert send(cfg, "ping").status == 200
    assert agent.proc is not None and agent.proc.poll() is None


def test_wrong_protocol(interop_broker: Broker, make_config: MakeConfig, run_agent: RunAgent) -> None:
    """An MQTT 5 config against a 3.1.1-only broker: run, doctor and send name mqtt.protocol = "3.1.1"."""
    cfg = config(make_config, interop_broker, "v5", mqtt={"protocol": "5"})
    agent = run_agent(cfg, wait_subscribed=False)
    agent.wait_for(r'mqtt\.protocol = "3\.1\.1"', timeout=30)  # operator interface: names the fix
    report = run_doctor(cfg, timeout=10.0, service_user=None)
    assert report.exit_code != 0
    assert 'mqtt.protocol = "3.1.1"' in render_text(report)
    with pytest.raises(AgentError, match=r'mqtt\.protocol = "3\.1\.1"'):
        send(cfg, "ping", timeout=10)
