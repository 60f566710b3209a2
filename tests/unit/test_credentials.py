"""Secrets handed over by systemd (LoadCredential=): `run` and `check-config` both use
$CREDENTIALS_DIRECTORY/<config key> in place of the path the config names."""

from __future__ import annotations

from pathlib import Path

from agent.config import CREDENTIAL_UNSET, apply_credentials, credential_overrides


def test_overrides_pick_only_provided_credentials(tmp_path: Path):
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "tls.key_file").write_text("-----BEGIN PRIVATE KEY-----\n...")
    (creds / "tls.key_password_file").write_bytes(CREDENTIAL_UNSET + b"\n")  # the unit's fallback
    (creds / "mqtt.password_file").write_text("")  # empty: not provided either
    (creds / "unrelated").write_text("x")
    assert credential_overrides(creds) == {"tls.key_file": creds / "tls.key_file"}
    assert credential_overrides(None) == {}
    assert credential_overrides(tmp_path / "missing") == {}


def test_credentials_replace_only_configured_keys():
    data = {"tls": {"cert_file": "/etc/mqtt-agent/device.pem", "key_file": "/etc/mqtt-agent/device.key"},
            "mqtt": {"hosts": ["b:8883"]}}
    out = apply_credentials(data, {"tls.key_file": Path("/run/credentials/x/tls.key_file"),
                                   "mqtt.password_file": Path("/run/credentials/x/mqtt.password_file")})
    assert out["tls"]["key_file"] == "/run/credentials/x/tls.key_file"
    assert "password_file" not in out["mqtt"]  # the config does not use a password: nothing to replace
    assert data["tls"]["key_file"] == "/etc/mqtt-agent/device.key"  # the input is not modified

