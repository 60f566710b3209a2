"""The parts of a reload that left the composition root, pure or on a temp dir: which secrets come from
systemd credentials, when a rejected reload names them, the commands summary, and the verdict file that
answers `mqtt-agent reload`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from agent.config import credentials_in_use, parse_config
from agent.service.reload import ReloadOutcome, credentials_hint, plan_reload
from agent.service.reload_verdict import REQUEST_FILE, VERDICT_FILE, answer_request

CREDS = "/run/credentials/mqtt-agent.service"


def cfg(tmp_path: Path, **sections: dict[str, Any]):
    data: dict[str, Any] = {"agent": {"device_id": "dev-1", "state_dir": str(tmp_path)},
                            "mqtt": {"hosts": ["broker-a:8883"], "username": "dev-1"}, "tls": {}}
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return parse_config(data, tmp_path / "agent.toml")


def test_only_secrets_under_the_credentials_directory_are_in_use(tmp_path: Path) -> None:
    base = cfg(tmp_path)  # paths set after parsing: none of these files exists here
    password = Path(f"{CREDS}/mqtt.password_file")
    c = dataclasses.replace(base, mqtt=dataclasses.replace(base.mqtt, password_file=password),
                            tls=dataclasses.replace(base.tls, key_file=Path("/etc/mqtt-agent/device.key")))
    assert credentials_in_use(c, CREDS) == {"mqtt.password_file": Path(f"{CREDS}/mqtt.password_file")}
    assert credentials_in_use(c, CREDS + "/") == credentials_in_use(c, CREDS)
    assert credentials_in_use(c, None) == {} and credentials_in_use(c, "") == {}
    assert credentials_in_use(c, "/run/credentials/mqtt") == {}  # a prefix of the name is not the directory


def test_the_credentials_hint_appears_only_where_it_explains_the_rejection() -> None:
    keys = ["tls.key_file", "mqtt.password_file"]
    assert credentials_hint(["mqtt.keepalive: must be 5..65535, got 1"], False, keys) == ""
    hint = credentials_hint(["mqtt.password_file: cannot read it"], False, keys)
    assert hint.startswith(" (mqtt.password_file come(s) from systemd credentials") and "systemctl restart" in hint
    assert "tls.key_file" in credentials_hint(["the key does not match the certificate"], True, keys)
    assert credentials_hint(["the key does not match the certificate"], True, ["mqtt.password_file"]) == ""


def test_the_commands_summary_names_each_change(tmp_path: Path) -> None:
    old = cfg(tmp_path, commands={"a": {"argv": ["/bin/true"]}, "b": {"argv": ["/bin/true"]}})
    new = cfg(tmp_path, commands={"b": {"argv": ["/bin/false"]}, "c": {"argv": ["/bin/true"]}})
    assert plan_reload(old, new).commands_summary() == "added c; removed a; changed b"


def test_the_verdict_carries_the_token_of_the_request_it_answers(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("RUNTIME_DIRECTORY", raising=False)
    (tmp_path / REQUEST_FILE).write_text("token-1\n")
    outcome = answer_request(tmp_path, lambda: ReloadOutcome(False, "rejected: mqtt.keepalive"))
    assert not outcome.ok
    verdict = json.loads((tmp_path / VERDICT_FILE).read_text())
    assert (verdict["token"], verdict["ok"], verdict["message"]) == ("token-1", False, "rejected: mqtt.keepalive")
    assert (tmp_path / VERDICT_FILE).stat().st_mode & 0o777 == 0o600


def test_a_verdict_that_cannot_be_written_does_not_fail_the_reload(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(tmp_path / "missing"))
    assert answer_request(tmp_path, lambda: ReloadOutcome(True, "nothing changed")).ok
