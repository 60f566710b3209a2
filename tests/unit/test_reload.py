"""SIGHUP reload: the pure plan (what changes how), and the real agent reloading against real brokers."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from agent.config import CommandSpec, HostPort, parse_config
from agent.service.reload import fingerprint, plan_reload, secret_files

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


def test_effective_config_is_a_config():
    plan = plan_reload(cfg(), cfg(agent={"log_level": "debug"}))
    assert dataclasses.is_dataclass(plan.effective)

