"""The command line as operators and scripts use it: help, version, exit codes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agent import __version__


def cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True, text=True, timeout=timeout)


def test_version() -> None:
    proc = cli("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"mqtt-agent {__version__}"


@pytest.mark.parametrize(
    ("sub", "mentions"),
    [
        ("run", ["--config", "--log-level", "SIGTERM", "78"]),
        ("check-config", ["--config", "redacted", "78"]),
        ("send", ["--device", "--payload", "@FILE", "--timeout", "no response within --timeout", "--one-way"]),
    ],
)
def test_every_subcommand_explains_itself(sub: str, mentions: list[str]) -> None:
    proc = cli(sub, "--help")
    assert proc.returncode == 0
    for word in mentions:
        assert word in proc.stdout, f"{sub} --help does not mention {word}"


def test_no_subcommand_is_a_usage_error() -> None:
    proc = cli()
    assert proc.returncode == 2 and "COMMAND" in proc.stderr


def test_check_config_prints_effective_config_redacted(tmp_path: Path, make_config) -> None:
    secret = tmp_path / "pw"
    secret.write_text("hunter2\n")
    cfg = make_config(None, {"mqtt": {"username": "u", "password_file": str(secret)}})
    proc = cli("check-config", "--config", str(cfg))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"# {cfg}: valid")
    assert f'password_file = "{secret}"' in proc.stdout
    assert "hunter2" not in proc.stdout
    assert "keepalive = 30" in proc.stdout and "qos = 1" in proc.stdout


def test_check_config_exits_78_with_every_problem(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[agent]\n[mqtt]\nhosts = ["x:0"]\nkeepalive = -5\n[tls]\nsecurity_level = 9\n')
    proc = cli("check-config", "--config", str(bad))
    assert proc.returncode == 78
    for expected in ("agent.device_id: is required", "mqtt.hosts[0]: port must be 1..65535, got '0'",
                     "mqtt.keepalive: must be 1..65535, got -5", "tls.security_level: must be 0..5, got 9"):
        assert expected in proc.stderr
    assert proc.stdout == ""


def test_run_with_invalid_config_exits_78_without_starting(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[agent]\ndevice_id = 'x'\n")
    proc = cli("run", "--config", str(bad))
    assert proc.returncode == 78
    assert "mqtt.hosts: is required" in proc.stderr
    assert "started" not in proc.stderr


def test_check_config_loads_tls_like_the_agent(pki, make_config) -> None:
    """A key that does not belong to the certificate is caught by check-config, not at 3 a.m."""
    other = pki.ca.issue("other", filename="other")
    cfg = make_config(None, {"tls": {"key_file": str(other.key)}})
    proc = cli("check-config", "--config", str(cfg))
    assert proc.returncode == 78
    assert "is not the private key of tls.cert_file" in proc.stderr


def test_send_exit_codes(broker, make_config, run_agent) -> None:
    cfg = make_config(broker)
    no_agent = cli("send", "--config", str(cfg), "--timeout", "1", "ping")
    assert no_agent.returncode == 2
    assert "no response to command///req/" in no_agent.stderr
    run_agent(cfg)
    ok = cli("send", "--config", str(cfg), "--payload", '{"echo": 5}', "ping")
    assert ok.returncode == 0, ok.stderr
    status, body = ok.stdout.split("\n", 1)
    assert status == "200" and '"echo":5' in body
    missing = cli("send", "--config", str(cfg), "nope")
    assert missing.returncode == 1 and missing.stdout.startswith("404\n")


def test_send_payload_from_file(broker, make_config, run_agent, tmp_path: Path) -> None:
    cfg = make_config(broker)
    run_agent(cfg)
    payload = tmp_path / "p.json"
    payload.write_text('{"echo": "from file"}')
    proc = cli("send", "--config", str(cfg), "--payload", f"@{payload}", "ping")
    assert proc.returncode == 0 and '"echo":"from file"' in proc.stdout
    proc = cli("send", "--config", str(cfg), "--payload", f"@{tmp_path}/none", "ping")
    assert proc.returncode == 1 and "cannot read payload file" in proc.stderr


def test_send_to_unreachable_broker_exits_1(make_config) -> None:
    from tests.support.mosquitto import free_port

    cfg = make_config(None, {"mqtt": {"hosts": [f"127.0.0.1:{free_port()}"]}})
    proc = cli("send", "--config", str(cfg), "--timeout", "2", "ping")
    assert proc.returncode == 1
    assert "cannot connect to 127.0.0.1:" in proc.stderr and "Connection refused" in proc.stderr
