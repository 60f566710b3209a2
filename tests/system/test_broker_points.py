"""Issue 17's numbered points that need a broker other than Debian 12's mosquitto 2.0.11.

Each test first checks the broker behaviour the point is about (so a broker upgrade that changes it
is noticed), then the agent's answer to it. Brokers are started once per module.
"""

from __future__ import annotations

import json
import socket
import ssl
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import paho.mqtt.client as paho
import pytest

from agent.config import load_config
from agent.errors import AgentError
from agent.tools.doctor import render_text, run_doctor
from agent.tools.send import send_command
from tests.conftest import PKI
from tests.support.agentproc import AgentProcess
from tests.support.brokers import Broker
from tests.support.brokers.kinds import UNAVAILABLE, make
from tests.support.mqttclient import TestClient
from tests.support.outcomes import info

pytestmark = [pytest.mark.timeout(180), pytest.mark.roots("trixie")]  # Debian 13's brokers

MakeConfig = Callable[..., Path]
RunAgent = Callable[..., AgentProcess]


@pytest.fixture(scope="module")
def start_broker(tmp_path_factory: pytest.TempPathFactory, pki: PKI) -> Iterator[Callable[..., Broker]]:
    """start_broker(kind, **options) -> a started broker, the same one for the same arguments."""
    started: dict[str, Broker] = {}

    def start(kind: str, **opts: Any) -> Broker:
        key = f"{kind} {sorted(opts.items())}"
        if key not in started:
            why = UNAVAILABLE[kind]()
            if why:
                pytest.fail(f"{kind}: {why}")
            broker = make(kind, tmp_path_factory.mktemp(kind), ca=pki.ca.cert_path, cert=pki.broker.cert,
                          key=pki.broker.key, **opts)
            started[key] = broker.start()
        return started[key]

    yield start
    for broker in started.values():
        getattr(broker, "close", broker.stop)()


def tls_context(pki: PKI) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca.cert_path))
    ctx.load_cert_chain(str(pki.device.cert), str(pki.device.key))
    return ctx


def raw_connect(broker: Broker, pki: PKI, packet: bytes) -> bytes:
    """Send one CONNECT packet over TLS and return what the broker answers before closing (b"" if nothing)."""
    with socket.create_connection((broker.host, broker.port), timeout=10) as raw, \
            tls_context(pki).wrap_socket(raw, server_hostname="localhost") as s:
        s.sendall(packet)
        try:
            return s.recv(64)
        except (ConnectionResetError, ssl.SSLError, socket.timeout):  # socket.timeout: 3.9 has no alias
            return b""


def connect_packet(version: int, client_id: str, keepalive: int) -> bytes:
    cid = client_id.encode()
    props = b"\x00" if version == 5 else b""
    body = b"\x00\x04MQTT" + bytes([version, 0x02]) + keepalive.to_bytes(2, "big") + props
    body += len(cid).to_bytes(2, "big") + cid
    return bytes([0x10, len(body)]) + body


# --- point 1: the broker's announced Maximum Packet Size -------------------------------------------


@pytest.mark.parametrize(("kind", "limit"), [
    ("mosquitto-2.0.21", ["max_packet_size 16384"]),
    ("rabbitmq-4.0", ["mqtt.max_packet_size_authenticated = 16384"]),
])
def test_point1_announced_maximum_packet_size_turns_a_big_response_into_a_500(
        kind: str, limit: list[str], start_broker: Callable[..., Broker], make_config: MakeConfig,
        run_agent: RunAgent) -> None:
    """No mqtt.max_message_bytes set: the limit comes from the broker's MQTT 5 CONNACK."""
    broker = start_broker(kind, extra=limit)
    big = {"argv": [sys.executable, "-c", "print('x' * 49152)"]}
    cfg = make_config(broker, {"mqtt": {"protocol": "5"}, "commands.big": big})
    run_agent(cfg)
    result = send_command(load_config(cfg), "big", timeout=15)
    assert result.status == 500
    assert len(result.body) < 16384
    assert send_command(load_config(cfg), "ping", timeout=15).status == 200  # the channel is not blocked
    facts = info(cfg)
    assert (facts["connects"], facts["last_disconnect"]) == (1, None)  # the broker never had to drop it


# --- point 2: MQTT 5 against a 3.1.1-only broker ------------------------------------------------------


def test_point2_rabbitmq_310_closes_a_v5_connect_and_run_doctor_send_name_the_fix(
        start_broker: Callable[..., Broker], pki: PKI, make_config: MakeConfig, run_agent: RunAgent) -> None:
    broker = start_broker("rabbitmq-3.10")
    assert raw_connect(broker, pki, connect_packet(5, "probe-v5", 30)) == b""  # closed, no CONNACK
    assert raw_connect(broker, pki, connect_packet(4, "probe-v311", 30))[:4] == b"\x20\x02\x00\x00"
    cfg = make_config(broker, {"mqtt": {"protocol": "5"}})
    agent = run_agent(cfg, wait_subscribed=False)
    # Operator interface: the explanation names the fix (mqtt.protocol).
    agent.wait_for(r'closed.*mqtt\.protocol = "3\.1\.1"|mqtt\.protocol = "3\.1\.1".*closed', timeout=30)
    assert 'mqtt.protocol = "3.1.1"' in render_text(run_doctor(cfg, timeout=10.0, service_user=None))
    with pytest.raises(AgentError, match=r'mqtt\.protocol = "3\.1\.1"') as err:
        send_command(load_config(cfg), "ping", timeout=10)
    assert "is the agent running" not in str(err.value)  # a connection failure, not a missing response


# --- point 3: a broker's keepalive limit ----------------------------------------------------------


def test_point3_aedes_keepalive_limit_is_named(start_broker: Callable[..., Broker], pki: PKI,
                                               make_config: MakeConfig, run_agent: RunAgent) -> None:
    broker = start_broker("aedes-1.2", keepalive_limit=30)
    assert raw_connect(broker, pki, connect_packet(4, "probe-60", 60))[:4] == b"\x20\x02\x00\x06"  # non-standard 6
    assert raw_connect(broker, pki, connect_packet(4, "probe-30", 30))[:4] == b"\x20\x02\x00\x00"
    agent = run_agent(make_config(broker, {"mqtt": {"keepalive": 60}}), wait_subscribed=False)
    # Operator interface: the refusal names the key and the broker's limit.
    line = agent.wait_for(r"mqtt\.keepalive", timeout=30).string
    assert "limit" in line and "60" in line, line


# --- point 5: RabbitMQ maps "." in topics to "/" ----------------------------------------------------


@pytest.mark.parametrize("kind", ["rabbitmq-3.10", "rabbitmq-4.0"])
def test_point5_rabbitmq_splits_dotted_names_and_doctor_warns(
        kind: str, start_broker: Callable[..., Broker], make_config: MakeConfig) -> None:
    broker = start_broker(kind)
    cfg = make_config(broker, {"commands": {"fw.update": {"argv": ["/bin/true"]}}})
    watcher = TestClient(cfg, subscribe="command///req/#")
    sender = TestClient(cfg)
    sender.publish("command///req/r.1/fw.update")
    assert [m.topic for m in watcher.wait(1)] == ["command///req/r/1/fw/update"]  # the broker's mapping
    watcher.close()
    sender.close()
    report = run_doctor(cfg, timeout=10.0, service_user=None)
    text = render_text(report)
    warnings = [line for line in text.splitlines() if "RabbitMQ" in line and "fw.update" in line]
    assert warnings, text
    assert report.exit_code == 0, text  # a warning, not a failure: the agent can still serve other commands


# --- point 7: a real MQTT 5 takeover (DISCONNECT 0x8E) -----------------------------------------------


def takeover_reason(broker: Broker, pki: PKI) -> int | None:
    """Connect client id X over MQTT 5, connect a second X: the reason code the first one receives."""
    got: list[int] = []
    done = threading.Event()

    def client() -> paho.Client:
        c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="takeover-probe", protocol=paho.MQTTv5)
        c.tls_set_context(tls_context(pki))
        return c

    first = client()
    first.on_disconnect = lambda c, u, flags, rc, props: (got.append(rc.value), done.set())
    first.connect(broker.host, broker.port, keepalive=30)
    first.loop_start()
    second = client()
    try:
        connected = threading.Event()
        first.on_connect = lambda *a: connected.set()
        assert connected.wait(10) or first.is_connected()
        second.connect(broker.host, broker.port, keepalive=30)
        second.loop_start()
        done.wait(10)
    finally:
        second.disconnect()
        second.loop_stop()
        first.loop_stop()
    return got[0] if got else None


@pytest.mark.parametrize("kind", ["mosquitto-2.0.21", "rabbitmq-4.0"])
def test_point7_mqtt5_takeover_reaches_the_agent_as_session_taken_over(
        kind: str, start_broker: Callable[..., Broker], pki: PKI, make_config: MakeConfig, run_agent: RunAgent,
        tmp_path: Path) -> None:
    broker = start_broker(kind)
    assert takeover_reason(broker, pki) == 0x8E
    overrides = {"mqtt": {"protocol": "5", "client_id": "dup-v5"}, "reconnect": {"min_delay": 0.5, "max_delay": 8.0}}
    first = run_agent(make_config(broker, overrides, name="first"))
    run_agent(make_config(broker, overrides, name="clone"), wait_subscribed=False)
    # Operator interface: the report names the duplicate client id (and mqtt.client_id).
    first.wait_for(r"another client is connecting with client id 'dup-v5'", timeout=30)
    assert first.stop() == 0
    saved = json.loads((tmp_path / "state-first" / "connection-state.json").read_text())
    # Classified from the broker's DISCONNECT with reason code 0x8E (Session taken over), not guessed.
    assert ("session_taken_over", 0x8E) in [(d["reason"], d.get("reason_code")) for d in saved["disconnects"]]


def test_point7_debian12_mosquitto_sends_no_disconnect_on_takeover(start_broker: Callable[..., Broker],
                                                                    pki: PKI) -> None:
    """Why point 7 needs Debian 13: 2.0.11 closes the old connection without DISCONNECT 0x8E."""
    assert takeover_reason(start_broker("mosquitto-2.0.11"), pki) != 0x8E
