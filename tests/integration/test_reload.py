"""SIGHUP reload: the pure plan (what changes how), and the real agent reloading against real brokers."""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path

import pytest

from agent.config import load_config
from agent.tools.send import send_command
from tests.support.notify import NotifySocket
from tests.support.outcomes import metrics_on, scrape


@pytest.fixture
def notify(tmp_path: Path):
    sock = NotifySocket(tmp_path)
    yield sock
    sock.close()


def reload(agent, notify: NotifySocket, outcome: str):
    """SIGHUP, then RELOADING=1 and READY=1 in that order, and the outcome in the log.

    Operator interface: the outcome line is the verdict `mqtt-agent reload` and `systemctl reload` print
    (what was applied, what needs a restart, which key is wrong), so its stable parts are asserted."""
    mark, log_mark = notify.mark(), agent.mark()
    agent.proc.send_signal(signal.SIGHUP)
    reloading = notify.wait_for("RELOADING", "^1$", since=mark)
    ready = notify.wait_for("READY", "^1$", since=notify.index_of(reloading) + 1)
    assert reloading.get("STATUS") == "reloading the configuration"
    assert int(reloading.get("MONOTONIC_USEC")) > 0
    line = agent.wait_for(outcome, since=log_mark)
    return ready, line


@pytest.mark.integration
def test_new_command_applies_without_reconnect(broker, make_config, run_agent, notify):
    path = make_config(broker, name="live")
    agent = run_agent(path, env={"NOTIFY_SOCKET": notify.env_value})
    assert send_command(load_config(path), "hello", timeout=10).status == 404
    make_config(broker, {"commands.hello": {"argv": ["/bin/echo", "hello"]}, "mqtt": {"keepalive": 20}},
                name="live")
    ready, _ = reload(agent, notify, r"configuration reloaded: commands added hello \(no reconnect\)")
    assert ready.get("STATUS") == f"connected to {broker.address} (MQTT 3.1.1, keepalive 30 s)"
    agent.wait_for(r"mqtt.keepalive changed but take\(s\) effect only after a restart")
    result = send_command(load_config(path), "hello", timeout=10)
    assert (result.status, result.body) == (200, b"hello\n")
    info = json.loads(send_command(load_config(path), "info", timeout=10).body)
    assert (info["connects"], info["connect_attempts"]) == (1, 1)  # no reconnect happened
    assert "hello" in info["available_commands"]
    assert info["keepalive_s"] == 30  # the restart-only change did not apply


@pytest.mark.integration
def test_invalid_config_is_rejected_and_the_old_one_keeps_running(broker, make_config, run_agent, notify):
    path = make_config(broker, name="bad")
    agent = run_agent(path, env={"NOTIFY_SOCKET": notify.env_value})
    good = path.read_text()
    path.write_text(good.replace("keepalive = 30", "keepalive = \"soon\"\nkeep_alive = 5"))
    ready, _ = reload(agent, notify, r"configuration reload rejected, the running configuration stays in effect")
    agent.wait_for(r"mqtt.keepalive: must be an integer, got string 'soon'")
    agent.wait_for(r"mqtt.keep_alive: unknown key in \[mqtt\]; did you mean 'mqtt.keepalive'\?")
    assert ready.get("STATUS").startswith(f"connected to {broker.address}")
    assert send_command(load_config_text(path, good), "ping", timeout=10).status == 200
    path.write_text("[agent\n")  # not even TOML
    reload(agent, notify, r"^  not valid TOML: ")
    path.write_text(good)
    reload(agent, notify, r"configuration reloaded: nothing that applies live changed")
    assert json.loads(send_command(load_config(path), "info", timeout=10).body)["connects"] == 1
    assert agent.stop() == 0


def load_config_text(path: Path, text: str):
    copy = path.with_name(path.stem + "-copy.toml")
    copy.write_text(text)
    return load_config(copy)


@pytest.mark.integration
def test_new_host_reconnects_cleanly(make_broker, make_config, run_agent, notify):
    first, second = make_broker(), make_broker()
    port, metrics = metrics_on()
    path = make_config(first, metrics, name="move")
    agent = run_agent(path, env={"NOTIFY_SOCKET": notify.env_value})
    make_config(second, metrics, name="move")
    mark = agent.mark()
    reload(agent, notify, r"configuration reloaded: reconnecting: mqtt.hosts changed")
    agent.wait_for(r"subscribed to ", since=mark)  # synchronisation: nothing else tells "subscribed"
    notify.wait_for("STATUS", rf"^connected to {re.escape(second.address)} ")
    assert send_command(load_config(path), "ping", timeout=10).status == 200
    info = json.loads(send_command(load_config(path), "info", timeout=10).body)
    assert (info["broker"], info["connects"]) == (second.address, 2)
    # A clean DISCONNECT from the first broker (counted as shutdown), not a drop of any kind.
    ended = {dict(labels)["reason"]: v for (name, labels), v in scrape(port).items()
             if name == "mqtt_agent_disconnects_total"}
    assert ended["shutdown"] == 1 and sum(ended.values()) == 1, ended
    assert info["last_disconnect"] == "shutdown"


@pytest.mark.integration
def test_renewed_certificate_reconnects(pki, broker, make_config, run_agent, notify, tmp_path):
    device = pki.ca.issue("dev-1", filename=f"device-renew-{tmp_path.name}")
    path = make_config(broker, {"tls": {"cert_file": str(device.cert), "key_file": str(device.key)}}, name="renew")
    agent = run_agent(path, env={"NOTIFY_SOCKET": notify.env_value})
    renewed = pki.ca.issue("dev-1", filename=f"device-renew-{tmp_path.name}")  # same paths, new key and cert
    assert renewed.cert == device.cert
    mark = agent.mark()
    reload(agent, notify, r"reconnecting: the content of the TLS or password files changed")
    agent.wait_for(r"subscribed to ", since=mark)  # synchronisation: nothing else tells "subscribed"
    assert send_command(load_config(path), "ping", timeout=10).status == 200
    info = json.loads(send_command(load_config(path), "info", timeout=10).body)
    assert info["connects"] == 2


@pytest.mark.integration
def test_broken_new_key_is_rejected_before_anything_changes(pki, broker, make_config, run_agent, notify, tmp_path):
    path = make_config(broker, name="badkey")
    agent = run_agent(path, env={"NOTIFY_SOCKET": notify.env_value})
    other = pki.ca.issue("someone-else", filename=f"other-{tmp_path.name}")
    make_config(broker, {"tls": {"key_file": str(other.key)}}, name="badkey")  # key of another certificate
    reload(agent, notify, r"configuration reload rejected.*is not the private key of tls.cert_file")
    assert send_command(load_config_text(path, path.read_text().replace(str(other.key), str(pki.device.key))),
                        "ping", timeout=10).status == 200
    assert json.loads(send_command(load_config_text(path, path.read_text().replace(str(other.key), str(
        pki.device.key))), "info", timeout=10).body)["connects"] == 1  # never reconnected

