"""[renewal]: on once a signer is set, every problem with its key path."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import parse_config
from agent.errors import ConfigError


def data(tmp_path: Path, renewal: dict, tls: bool = True) -> dict:
    files = {}
    if tls:
        for name in ("ca_file", "cert_file", "key_file"):
            path = tmp_path / f"{name}.pem"
            path.write_text("x")
            files[name] = str(path)
    return {"agent": {"device_id": "dev-1", "state_dir": str(tmp_path / "state")},
            "mqtt": {"hosts": ["broker.example:8883"]}, "tls": files, "renewal": renewal}


def problems(tmp_path: Path, renewal: dict, tls: bool = True) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data(tmp_path, renewal, tls), tmp_path / "agent.toml")
    return list(info.value.problems)


def test_off_without_a_signer_and_on_once_one_is_set(tmp_path: Path) -> None:
    assert parse_config(data(tmp_path, {})).renewal.enabled is False
    cfg = parse_config(data(tmp_path, {"signer": "exec", "command": ["/bin/cat"]}))
    assert cfg.renewal.enabled is True and cfg.renewal.command == ("/bin/cat",) and cfg.renewal.at == 0.66
    assert parse_config(data(tmp_path, {"signer": "command", "enabled": False})).renewal.enabled is False


def test_every_problem_is_named_with_its_key(tmp_path: Path) -> None:
    found = problems(tmp_path, {"signer": "exec", "command": ["/nonexistent/sign"], "at": 1.5,
                                "retry_min": 600.0, "retry_max": 60.0, "keep_prev": 1})
    assert "renewal.command: /nonexistent/sign does not exist or is not executable" in found
    assert "renewal.at: must be 0.05..0.99, got 1.5" in found
    assert any(p.startswith("renewal.keep_prev: unknown key in [renewal]; did you mean 'renewal.keep_previous'?")
               for p in found)
    assert problems(tmp_path, {"enabled": True}) == [
        'renewal.enabled: is true but renewal.signer is not set: set signer = "exec" (with renewal.command) or '
        '"command" (cert.csr / cert.install over MQTT)']
    assert problems(tmp_path, {"signer": "ssh"})[0].startswith("renewal.signer: must be one of")
    assert problems(tmp_path, {"signer": "exec"})[0].startswith("renewal.command: must name a program")


def test_renewal_needs_mutual_tls_with_a_ca(tmp_path: Path) -> None:
    found = problems(tmp_path, {"signer": "command"}, tls=False)
    assert found[0].startswith("renewal.enabled: renewal needs mutual TLS with a CA")
