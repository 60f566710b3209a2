"""SIGHUP reload: the pure plan (what changes how), and the real agent reloading against real brokers."""

from __future__ import annotations

import dataclasses
import json
import re
import signal
from pathlib import Path
from typing import Any

import pytest

from agent.config import CommandSpec, HostPort, load_config, parse_config
from agent.service.reload import fingerprint, plan_reload, secret_files
from agent.tools.send import send_command
from tests.support.notify import NotifySocket

BASE: dict[str, Any] = {
    "agent": {"device_id": "dev-1", "state_dir": "/tmp/x"},
    "mqtt": {"hosts": ["broker-a:8883"], "keepalive": 60},
    "tls": {},  # TLS with the system trust store: no files needed
    "metrics": {"listen": ""},
}


def cfg(**sections: dict[str, Any]):
    data = {k: dict(v) for k, v in BASE.items()}
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return parse_config(data, Path("/etc/mqtt-agent/mqtt-agent.toml"))


def test_identical_configs_change_nothing():
    plan = plan_reload(cfg(), cfg())
    assert not plan.changed
    assert plan.effective == cfg()


def test_commands_apply_live_without_reconnect():
    old = cfg(commands={"a": {"argv": ["/bin/true"]}, "b": {"argv": ["/bin/true"]}})
    new = cfg(commands={"b": {"argv": ["/bin/false"]}, "c": {"argv": ["/bin/true"]}})
    plan = plan_reload(old, new)
    assert (plan.commands_added, plan.commands_removed, plan.commands_changed) == (("c",), ("a",), ("b",))
    assert plan.reconnect == () and plan.restart_needed == ()
    assert plan.effective.commands["b"] == CommandSpec("b", ("/bin/false",), 30.0)


def test_hosts_and_credentials_reconnect():
    plan = plan_reload(cfg(), cfg(mqtt={"hosts": ["broker-b:8883"], "username": "dev@tenant",
                                        "password": "secret"}))
    assert plan.reconnect == ("mqtt.hosts changed", "mqtt.username changed", "mqtt.password changed")
    assert plan.effective.mqtt.hosts == (HostPort("broker-b", 8883),)
    assert "secret" not in " ".join(plan.reconnect)


def test_changed_file_content_reconnects_even_with_the_same_paths():
    plan = plan_reload(cfg(), cfg(), old_files="aaa", new_files="bbb")
    assert plan.reconnect == ("the content of the TLS or password files changed",)


def test_live_and_restart_only_changes():
    old = cfg(limits={"max_concurrent_commands": 4})
    new = cfg(agent={"log_level": "debug", "device_id": "dev-2"}, limits={"command_timeout": 5.0,
              "max_concurrent_commands": 8}, mqtt={"keepalive": 20}, reconnect={"max_delay": 10.0},
              metrics={"listen": "127.0.0.1:9999"})
    plan = plan_reload(old, new)
    assert set(plan.live) == {"agent.log_level", "limits.command_timeout"}
    # (mqtt.client_id defaults to agent.device_id, so it changes with it)
    assert set(plan.restart_needed) == {"agent.device_id", "mqtt.client_id", "limits.max_concurrent_commands",
                                        "mqtt.keepalive", "reconnect.max_delay", "metrics.listen"}
    eff = plan.effective
    # What cannot change live keeps its running value, so `effective` is what actually runs...
    assert (eff.agent.device_id, eff.limits.max_concurrent_commands, eff.mqtt.keepalive) == ("dev-1", 4, 60)
    assert (eff.reconnect, eff.metrics) == (old.reconnect, old.metrics)
    # ...and what can, takes the new value.
    assert (eff.agent.log_level, eff.limits.command_timeout) == ("debug", 5.0)
    # Reloading the same file again reports the same pending restart, not a new change.
    again = plan_reload(eff, new)
    assert set(again.restart_needed) == set(plan.restart_needed) and not again.live


def test_fingerprint_follows_file_content(tmp_path: Path):
    key = tmp_path / "device.key"
    key.write_text("one")
    before = fingerprint((key,))
    key.write_text("two")
    assert fingerprint((key,)) != before
    assert fingerprint((tmp_path / "missing",)) == fingerprint((tmp_path / "missing",))


def test_secret_files_lists_tls_and_password_files(tmp_path: Path):
    files = {n: tmp_path / n for n in ("ca.pem", "dev.pem", "dev.key", "pw")}
    for f in files.values():
        f.write_text("x")
    c = cfg(tls={"ca_file": str(files["ca.pem"]), "cert_file": str(files["dev.pem"]),
                 "key_file": str(files["dev.key"])},
            mqtt={"username": "u", "password_file": str(files["pw"]), "hosts": ["a:8883"]})
    assert secret_files(c) == (files["ca.pem"], files["dev.pem"], files["dev.key"], files["pw"])


# --- the real agent ------------------------------------------------------------------------------


@pytest.fixture
def notify(tmp_path: Path):
    sock = NotifySocket(tmp_path)
    yield sock
    sock.close()


def reload(agent, notify: NotifySocket, outcome: str):
    """SIGHUP, then RELOADING=1 and READY=1 in that order, and the outcome in the log."""
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
    assert agent.count(r"connected to ") == 1


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
    assert agent.count(r"connected to ") == 1
    assert agent.stop() == 0


def load_config_text(path: Path, text: str):
    copy = path.with_name(path.stem + "-copy.toml")
    copy.write_text(text)
    return load_config(copy)


@pytest.mark.integration
def test_new_host_reconnects_cleanly(make_broker, make_config, run_agent, notify):
    first, second = make_broker(), make_broker()
    path = make_config(first, name="move")
    agent = run_agent(path, env={"NOTIFY_SOCKET": notify.env_value})
    make_config(second, name="move")
    mark = agent.mark()
    reload(agent, notify, r"configuration reloaded: reconnecting: mqtt.hosts changed")
    agent.wait_for(rf"connected to {re.escape(second.address)} as dev-1", since=mark)
    agent.wait_for(r"subscribed to ", since=mark)
    notify.wait_for("STATUS", rf"^connected to {re.escape(second.address)} ")
    agent.wait_for(rf"disconnected from {re.escape(first.address)} to reconnect: configuration reloaded")
    assert agent.count(r"connection to .* ended") == 0  # a clean DISCONNECT, not a drop
    assert send_command(load_config(path), "ping", timeout=10).status == 200
    info = json.loads(send_command(load_config(path), "info", timeout=10).body)
    assert (info["broker"], info["connects"]) == (second.address, 2)


@pytest.mark.integration
def test_renewed_certificate_reconnects(pki, broker, make_config, run_agent, notify, tmp_path):
    device = pki.ca.issue("dev-1", filename=f"device-renew-{tmp_path.name}")
    path = make_config(broker, {"tls": {"cert_file": str(device.cert), "key_file": str(device.key)}}, name="renew")
    agent = run_agent(path, env={"NOTIFY_SOCKET": notify.env_value})
    renewed = pki.ca.issue("dev-1", filename=f"device-renew-{tmp_path.name}")  # same paths, new key and cert
    assert renewed.cert == device.cert
    mark = agent.mark()
    reload(agent, notify, r"reconnecting: the content of the TLS or password files changed")
    agent.wait_for(r"subscribed to ", since=mark)
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
    assert agent.count(r"connected to ") == 1


def test_effective_config_is_a_config():
    plan = plan_reload(cfg(), cfg(agent={"log_level": "debug"}))
    assert dataclasses.is_dataclass(plan.effective)
