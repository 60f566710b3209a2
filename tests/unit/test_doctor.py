"""`mqtt-agent doctor` against real mosquitto brokers and certificates generated at test time.

One test per failure the issue names, each asserting the cause and the remedy the operator reads,
plus the all-fine run (exit 0) and the --json schema documented in docs/doctor.md.
"""

from __future__ import annotations

import datetime
import socket

import pytest

from agent.cli import main
from agent.tools.doctor import run_doctor
from tests.support.doctor import UTC, _schema, _validate, checks, doctor, finding, one
from tests.support.mosquitto import free_port


def test_clock_in_1970_is_named_as_the_cause(make_config):
    """A board without RTC before NTP: injected wall clock, real files; the handshake is not needed."""
    wall = datetime.datetime(1970, 1, 1, 0, 5, tzinfo=UTC).timestamp()
    report = run_doctor(make_config(None, {"mqtt": {"hosts": [f"127.0.0.1:{free_port()}"]}}), timeout=2,
                        service_user=None, wall=lambda: wall)
    early = finding(one(report, 3, "client certificate"), "cert_not_yet_valid")
    assert "local clock 1970-01-01 00:05 UTC" in early.cause
    assert "a board without RTC boots in 1970 until NTP syncs" in early.remedy
    clock = finding(one(report, 10, "clock"), "clock_wrong")
    assert "the system clock says 1970-01-01" in clock.cause


def test_nothing_listening_on_the_port(make_config):
    port = free_port()
    report = doctor(make_config(None, {"mqtt": {"hosts": [f"127.0.0.1:{port}"]}}))
    assert report.exit_code == 1
    assert one(report, 4).status == "ok"
    refused = finding(one(report, 5), "connection_refused")
    assert refused.cause == (f"connection refused by 127.0.0.1 port {port}: nothing listens on that port "
                             "(or a firewall rejects it)")
    assert f"check the port in mqtt.hosts (127.0.0.1:{port})" in refused.remedy
    assert "8883 for MQTT over TLS" in refused.remedy
    for number in (6, 7, 8):
        assert one(report, number).summary == "not run: the TCP connection failed"
    assert one(report, 3, "broker").status == "skip"
    assert one(report, 9).status == "ok" and checks(report, 10), "local checks still run"


def test_tcp_timeout_is_told_apart_from_refused(make_config):
    # A listener with a full accept queue: Linux drops further SYNs, which looks like a firewall.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    filler = socket.create_connection(("127.0.0.1", port))
    try:
        report = doctor(make_config(None, {"mqtt": {"hosts": [f"127.0.0.1:{port}"]}}), timeout=1)
    finally:
        filler.close()
        listener.close()
    timed_out = finding(one(report, 5), "timed_out")
    assert timed_out.cause.startswith(f"no answer from 127.0.0.1 port {port} within 1 s: a firewall drops")
    assert "nc -vz 127.0.0.1" in timed_out.remedy


def test_invalid_config_fails_check_1_and_skips_the_rest(tmp_path, capsys):
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[agent]\ndevice_id = "dev-1"\n[mqtt]\nhosts = ["127.0.0.1:1"]\nkeepalive = 0\n'
                   '[tls]\nsecurity_levle = 1\n')
    rc = main(["doctor", "--config", str(cfg)])
    out = capsys.readouterr().out
    assert rc == 1
    assert "FAIL  1  config" in out
    assert "cause:  mqtt.keepalive: must be 1..65535, got 0" in out
    assert f"remedy: fix mqtt.keepalive in {cfg}" in out
    assert "did you mean 'tls.security_level'?" in out
    assert out.count("not run: the configuration is invalid") == 10


def test_validator_rejects_what_the_schema_forbids():
    schema = _schema()
    assert _validate({"schema_version": 1}, schema), "missing keys must be reported"
    good = {"number": 6, "id": "tls", "target": "", "status": "bad", "summary": "", "findings": [], "details": {}}
    assert any("not in" in e for e in _validate(good, schema["properties"]["checks"]["items"]))


def test_timeout_must_be_positive(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["doctor", "--timeout", "0"])
    assert exc.value.code == 2
    assert "must be more than 0" in capsys.readouterr().err


def test_help_names_every_check(capsys):
    with pytest.raises(SystemExit):
        main(["doctor", "--help"])
    text = capsys.readouterr().out
    for words in ("--json", "--timeout", "CLIENT_ID-doctor-RANDOM", "never changes config or files",
                  "0  nothing failed", "1  at least one check failed"):
        assert words in text

