"""The doctor's pure core (assessments over plain facts) and its local edges (files, sockets, HTTP).

No broker here: certificates come from the test PKI, the clock is a parameter.
"""

from __future__ import annotations

import datetime
import json
import os
import pwd
import shutil
import ssl
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Gauge, start_http_server

from agent.config import HostPort, MqttConfig, load_config
from agent.tls.certs import CertInfo
from agent.tools.doctor import probe_client_id, run_doctor
from agent.tools.doctor.certs import assess_certificate, key_security_bits, name_matches, sha1_rejected_from
from agent.tools.doctor.files import check_files, readable_by
from agent.tools.doctor.history import assess_history, check_history
from agent.tools.doctor.local import assess_clock, assess_state_dir, check_metrics_port
from agent.tools.doctor.mqtt_check import connack_finding, delivery_topic
from agent.tools.doctor.report import CheckResult, Report, render_text, result, skipped, warn
from agent.tools.doctor.runner import _guarded
from agent.tools.doctor.tls_check import handshake_code
from agent.topics import parse_request
from tests.conftest import PKI
from tests.support.mosquitto import free_port

UTC = datetime.timezone.utc
NOW = datetime.datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


def info(signature: str = "sha256WithRSAEncryption", key: str = "RSA 2048", days_left: float = 200,
         names: tuple[str, ...] = ("DNS:broker.example.com",), started_days_ago: float = 10) -> CertInfo:
    return CertInfo(subject="CN=x", issuer="CN=ca", names=names, signature=signature,
                    not_before=NOW - datetime.timedelta(days=started_days_ago),
                    not_after=NOW + datetime.timedelta(days=days_left), key=key)


# --- certificates -----------------------------------------------------------------------------


@pytest.mark.parametrize(("signature", "level", "severity"), [
    ("sha1WithRSAEncryption", 2, "fail"),
    ("sha1WithRSAEncryption", 1, "fail" if sha1_rejected_from() == 1 else None),
    ("sha1WithRSAEncryption", 0, "warn"),
    ("md5WithRSAEncryption", 1, "fail"),
    ("ecdsa-with-SHA1", 2, "fail"),
    ("sha256WithRSAEncryption", 5, None),
])
def test_signature_against_security_level(signature, level, severity):
    found = [f for f in assess_certificate(info(signature), label="client certificate c.pem", role="client",
                                           level=level, now=NOW) if f.code == "weak_signature"]
    assert [f.severity for f in found] == ([severity] if severity else [])
    if severity == "fail":
        assert "(`ca md too weak`)" in found[0].cause
        assert found[0].remedy == "set tls.security_level = 0, or reissue the device certificate with SHA-256"
    if severity == "warn":
        assert "accepted only because tls.security_level = 0" in found[0].cause


@pytest.mark.parametrize(("key", "bits"), [("RSA 1024", 80), ("RSA 2048", 112), ("RSA 3072", 128),
                                           ("RSA 4096", 128), ("RSA 512", 0), ("EC secp256r1", 128),
                                           ("EC secp384r1", 192), ("Ed25519PublicKey", 128), ("DSA?", None)])
def test_key_security_bits(key, bits):
    assert key_security_bits(info(key=key)) == bits


def test_small_key_fails_at_the_level_that_rejects_it():
    at2 = assess_certificate(info(key="RSA 1024"), label="c", role="client", level=2, now=NOW)
    assert [f.code for f in at2] == ["key_too_small"]
    assert assess_certificate(info(key="RSA 1024"), label="c", role="client", level=1, now=NOW) == []


def test_not_yet_valid_with_a_1970_clock_blames_the_clock():
    epoch = datetime.datetime(1970, 1, 1, 0, 1, tzinfo=UTC)
    findings = assess_certificate(info(), label="client certificate c.pem", role="client", level=2, now=epoch)
    assert [f.code for f in findings] == ["cert_not_yet_valid"]
    assert "local clock 1970-01-01 00:01 UTC" in findings[0].cause
    assert findings[0].remedy.startswith("the local clock says 1970-01-01, which is wrong: a board without RTC boots "
                                         "in 1970 until NTP syncs")


def test_expiry_window():
    soon = assess_certificate(info(days_left=5.5), label="client certificate c.pem", role="client", level=2, now=NOW)
    assert [(f.code, f.severity) for f in soon] == [("cert_expires_soon", "warn")]
    assert "expires in 5 days" in soon[0].cause
    assert assess_certificate(info(days_left=20), label="c", role="client", level=2, now=NOW) == []
    gone = assess_certificate(info(days_left=-1.5), label="the broker certificate of b:8883", role="broker",
                              level=2, now=NOW)
    assert [(f.code, f.severity) for f in gone] == [("cert_expired", "fail")]
    assert gone[0].remedy.startswith("have the broker certificate reissued")


def test_extended_key_usage_for_the_role():
    bad = assess_certificate(info(), label="client certificate c.pem", role="client", level=2, now=NOW,
                             eku=["serverAuth"])
    assert [f.code for f in bad] == ["wrong_key_usage"]
    assert bad[0].remedy.endswith("extendedKeyUsage = clientAuth")
    assert assess_certificate(info(), label="c", role="client", level=2, now=NOW, eku=None) == []


@pytest.mark.parametrize(("names", "name", "expected"), [
    (("DNS:broker.example.com",), "broker.example.com", True),
    (("DNS:Broker.Example.com",), "broker.example.COM.", True),
    (("DNS:*.example.com",), "broker.example.com", True),
    (("DNS:*.example.com",), "a.broker.example.com", False),
    (("DNS:*.example.com",), "example.com", False),
    (("DNS:*.com",), "example.com", False),
    (("IP:127.0.0.1",), "127.0.0.1", True),
    (("DNS:127.0.0.1",), "127.0.0.1", False),
    (("IP:::1",), "0:0::1", True),
    (("CN:broker",), "broker", True),
    ((), "broker", False),
])
def test_name_matches(names, name, expected):
    assert name_matches(names, name) is expected


# --- TLS and MQTT words -----------------------------------------------------------------------


def _verify_error(code: int) -> ssl.SSLCertVerificationError:
    err = ssl.SSLCertVerificationError(1, "certificate verify failed")
    err.verify_code = code
    return err


def _alert(reason: str) -> ssl.SSLError:
    err = ssl.SSLError(1, reason)
    err.reason = reason
    return err


@pytest.mark.parametrize(("exc", "code"), [
    (_verify_error(62), "hostname_mismatch"), (_verify_error(64), "hostname_mismatch"),
    (_verify_error(68), "weak_signature"), (_verify_error(20), "untrusted_ca"), (_verify_error(19), "untrusted_ca"),
    (_verify_error(10), "cert_expired"), (_verify_error(9), "cert_not_yet_valid"), (_verify_error(66), "key_too_small"),
    (_alert("SSLV3_ALERT_CERTIFICATE_EXPIRED"), "client_cert_rejected"),
    (_alert("TLSV1_ALERT_UNKNOWN_CA"), "client_cert_rejected"),
    (_alert("TLSV13_ALERT_CERTIFICATE_REQUIRED"), "client_cert_rejected"),
    (_alert("TLSV1_ALERT_PROTOCOL_VERSION"), "tls_alert"),
    (_alert("WRONG_VERSION_NUMBER"), "not_tls"), (ConnectionResetError(104, "reset"), "not_tls"),
    (ssl.SSLError(1, "odd"), "tls_handshake_failed"),
])
def test_handshake_codes(exc, code):
    assert handshake_code(exc) == code


def _mqtt(**kw: object) -> MqttConfig:
    return replace(MqttConfig(hosts=(HostPort("b", 8883),), client_id="gw-0001"), **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(("code", "protocol", "finding_code", "words"), [
    (0x86, "3.1.1", "bad_credentials", "MQTT 3.1.1 CONNACK 4 (Bad user name or password)"),
    (0x86, "5", "bad_credentials", "MQTT 5 CONNACK 0x86 Bad user name or password"),
    (0x87, "3.1.1", "not_authorized", "MQTT 3.1.1 CONNACK 5 (Not authorized)"),
    (0x85, "3.1.1", "client_id_rejected", "MQTT 3.1.1 CONNACK 2 (Client identifier not valid)"),
    (0x84, "5", "protocol_unsupported", "MQTT 5 CONNACK 0x84"),
    (0x88, "3.1.1", "broker_unavailable", "MQTT 3.1.1 CONNACK 3 (Server unavailable)"),
    (0x8A, "5", "banned", "0x8A"),
    (0x9F, "5", "rate_limited", "0x9F"),
    (0x80, "5", "connect_refused", "0x80"),
])
def test_connack_in_words(code, protocol, finding_code, words):
    texts = {0x86: "Bad user name or password", 0x87: "Not authorized", 0x85: "Client identifier not valid",
             0x84: "Unsupported protocol version", 0x88: "Server unavailable", 0x8A: "Banned",
             0x9F: "Connection rate exceeded", 0x80: "Unspecified error"}
    cfg = _mqtt(protocol=protocol, username="gw-0001@tenant", password_file=Path("/etc/mqtt-agent/password"))
    found = connack_finding(code, texts[code], cfg, "gw-0001-doctor-abcdef")
    assert found.code == finding_code and found.severity == "fail"
    assert words in found.cause
    if finding_code == "bad_credentials":
        assert found.remedy.startswith("check mqtt.username ('gw-0001@tenant') and the password in "
                                       "mqtt.password_file (/etc/mqtt-agent/password)")
    if finding_code == "protocol_unsupported":
        assert found.remedy.startswith('set mqtt.protocol = "3.1.1"')


def test_identifier_rejected_explains_the_23_character_limit_of_the_probe_id():
    cfg = _mqtt(client_id="gateway-000000001")
    probe = probe_client_id(cfg.client_id, "abcdef")
    assert len(probe) > 23
    found = connack_finding(0x85, "Client identifier not valid", cfg, probe)
    assert "MQTT 3.1.1 brokers may refuse more than 23" in found.remedy
    assert "'gateway-000000001' is short enough and not affected" in found.remedy


def test_server_moved_names_the_new_server():
    found = connack_finding(0x9D, "Server moved", _mqtt(protocol="5"), "p", {"ServerReference": "new.example:8883"})
    assert found.remedy == "put new.example:8883 in mqtt.hosts"


@pytest.mark.parametrize("subscription", ["command///req/#", "command//+/req/#", "command/t1/dev-9/req/#",
                                          "c///q/#"])
def test_delivery_topic_matches_the_subscription_but_is_no_command(subscription):
    topic = delivery_topic(subscription, "gw-doctor-123456")
    assert parse_request(topic) is None, "the agent must not run the probe message"
    sub, top = subscription.split("/"), topic.split("/")
    assert len(top) == 5
    assert all(s in ("+", "#") or s == t for s, t in zip(sub, top))


def test_probe_client_id_is_never_the_production_one():
    ids = {probe_client_id("dev-1") for _ in range(20)}
    assert "dev-1" not in ids and len(ids) > 1
    assert all(i.startswith("dev-1-doctor-") and len(i) == len("dev-1-doctor-") + 6 for i in ids)


# --- history ----------------------------------------------------------------------------------

T = 1_800_000_000.0


def test_history_absent_is_no_history_yet(tmp_path):
    res = check_history(tmp_path, T)
    assert res.status == "ok" and res.summary.startswith("no history yet")


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"version": 7}'])
def test_history_unreadable_warns(tmp_path, text):
    (tmp_path / "connection-state.json").write_text(text)
    res = check_history(tmp_path, T)
    assert res.status == "warn"
    assert res.findings[0].code in ("history_unreadable", "history_version")


def test_history_tolerates_missing_and_wrong_fields():
    data = {"version": 1, "keepalive": "twenty", "disconnects": [{"at": "yesterday"}, 5, {"at": T - 10,
            "reason": "idle_timeout"}], "duplicate_client_id": None}
    res = assess_history(data, T)
    assert res.status == "ok"
    assert res.summary == "1 disconnect in 24 h (idle_timeout 1); last 10 s ago: idle_timeout"


def test_history_old_duplicate_client_id_only_warns():
    data = {"version": 1, "disconnects": [], "keepalive": {"current": 60, "configured": 60, "learned": False},
            "duplicate_client_id": {"client_id": "dev-1", "suspected_at": T - 3 * 86400, "takeovers": 2}}
    res = assess_history(data, T)
    assert [(f.code, f.severity) for f in res.findings] == [("duplicate_client_id", "warn")]
    assert "last suspected 3 days ago" in res.findings[0].cause
    assert "keepalive 60 s" in res.summary and "no disconnects recorded" in res.summary


def test_history_flapping_names_the_reason_and_its_remedy():
    data = {"version": 1, "disconnects": [{"at": T - 100 * i, "reason": "keepalive_timeout"} for i in range(6)]}
    res = assess_history(data, T)
    flap = res.findings[0]
    assert flap.code == "connection_flapping"
    assert "6 disconnects in the last hour, 6 of them keepalive_timeout" in flap.cause
    assert "the link loses packets" in flap.remedy


# --- local --------------------------------------------------------------------------------------


def test_clock_in_1970_fails():
    res = assess_clock(datetime.datetime(1970, 1, 1, 0, 0, 42, tzinfo=UTC), None)
    assert res.findings[0].code == "clock_wrong"
    assert "timedatectl set-ntp true" in res.findings[0].remedy


@pytest.mark.parametrize(("synced", "status"), [(True, "ok"), (None, "ok"), (False, "warn")])
def test_clock_sync_flag(synced, status):
    res = assess_clock(NOW, synced)
    assert res.status == status


@pytest.mark.parametrize(("free", "no_inodes", "read_only", "code"), [
    (10 * 1024 ** 3, False, False, None),
    (20 * 1024 ** 2, False, False, "state_dir_low_space"),
    (1024 ** 2, False, False, "state_dir_full"),
    (10 * 1024 ** 3, True, False, "state_dir_full"),
    (10 * 1024 ** 3, False, True, "state_dir_read_only"),
])
def test_state_dir_space(free, no_inodes, read_only, code):
    res = assess_state_dir(Path("/var/lib/mqtt-agent"), Path("/var/lib"), free, no_inodes=no_inodes,
                           read_only=read_only)
    assert [f.code for f in res.findings] == ([code] if code else [])
    assert "does not exist yet" in res.summary


def test_metrics_port_free_and_disabled():
    port = free_port()
    assert check_metrics_port(HostPort("127.0.0.1", port), 2).summary == "free"
    assert check_metrics_port(None, 2).summary == 'disabled ([metrics] listen = "")'


def check_port_serving(metric: str) -> CheckResult:
    """check_metrics_port against a real Prometheus exporter that serves one gauge named `metric`."""
    registry = CollectorRegistry()
    Gauge(metric, "a gauge", registry=registry).set(1)
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    try:
        return check_metrics_port(HostPort("127.0.0.1", port), 5)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_metrics_port_owned_by_a_running_agent():
    res = check_port_serving("mqtt_agent_connected")
    assert res.status == "ok"
    assert res.summary == "in use by a running mqtt-agent (its /metrics answers)"


def test_metrics_port_owned_by_another_exporter_fails():
    res = check_port_serving("node_load1")
    assert res.findings[0].code == "metrics_port_in_use"
    assert "it answers /metrics with HTTP 200, without mqtt_agent_ metrics" in res.findings[0].cause


def test_metrics_address_not_on_this_machine():
    # 192.0.2.1 (TEST-NET-1) is never a local address; binding it fails without sending anything.
    res = check_metrics_port(HostPort("192.0.2.1", 9883), 1)
    assert res.findings[0].code == "metrics_address_not_local"


# --- files --------------------------------------------------------------------------------------


def _config(make_config, tls: dict[str, object]) -> object:
    return load_config(make_config(None, {"tls": tls}))


def test_encrypted_key_without_and_with_a_wrong_passphrase(make_config, pki: PKI, tmp_path):
    locked = pki.ca.issue("dev-1", key_password="s3cret", filename="device-locked")
    cfg = _config(make_config, {"cert_file": str(locked.cert), "key_file": str(locked.key)})
    res = check_files(cfg, None)  # type: ignore[arg-type]
    assert [f.code for f in res.findings] == ["key_encrypted"]
    assert res.findings[0].remedy.startswith("set tls.key_password_file")
    wrong = tmp_path / "passphrase"
    wrong.write_text("not-it\n")
    wrong.chmod(0o600)
    cfg = _config(make_config, {"cert_file": str(locked.cert), "key_file": str(locked.key),
                                "key_password_file": str(wrong)})
    res = check_files(cfg, None)  # type: ignore[arg-type]
    assert [f.code for f in res.findings] == ["key_bad_passphrase"]
    right = tmp_path / "passphrase-ok"
    right.write_text("s3cret\n")
    right.chmod(0o640)
    cfg = _config(make_config, {"cert_file": str(locked.cert), "key_file": str(locked.key),
                                "key_password_file": str(right)})
    res = check_files(cfg, None)  # type: ignore[arg-type]
    assert [(f.code, f.severity) for f in res.findings] == [("secret_permissions", "warn")]
    assert "key matches the certificate" in res.summary


def test_certificate_file_that_is_not_a_certificate(make_config, pki: PKI, tmp_path):
    junk = tmp_path / "device.pem"
    junk.write_text("hello\n")
    cfg = _config(make_config, {"cert_file": str(junk)})
    res = check_files(cfg, None)  # type: ignore[arg-type]
    assert [f.code for f in res.findings] == ["cert_unparseable"]


@pytest.fixture
def world_traversable_dir() -> Iterator[Path]:
    """A directory whose every parent another user may traverse (pytest's tmp root is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="mqtt-agent-doctor-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


@pytest.mark.skipif(os.geteuid() != 0, reason="judging another user's access needs root")
def test_files_the_service_user_cannot_read(make_config, pki: PKI, world_traversable_dir):
    user = pwd.getpwnam("nobody")
    shared = world_traversable_dir
    for name, src, mode in (("ca.pem", pki.ca.cert_path, 0o644), ("device.pem", pki.device.cert, 0o644),
                            ("device.key", pki.device.key, 0o600)):
        (shared / name).write_bytes(src.read_bytes())
        (shared / name).chmod(mode)
    cfg = _config(make_config, {"ca_file": str(shared / "ca.pem"), "cert_file": str(shared / "device.pem"),
                                "key_file": str(shared / "device.key")})
    assert readable_by(shared / "ca.pem", user) and not readable_by(shared / "device.key", user)
    res = check_files(cfg, "nobody")  # type: ignore[arg-type]
    unreadable = [f for f in res.findings if f.code == "unreadable_by_service_user"]
    assert len(unreadable) == 1
    assert f"tls.key_file {shared / 'device.key'} is readable here (as root) but not by nobody" in unreadable[0].cause
    assert unreadable[0].remedy == f"chown nobody {shared / 'device.key'}"
    (shared / "device.key").chmod(0o644)
    assert readable_by(shared / "device.key", user)
    shared.chmod(0o700)
    assert not readable_by(shared / "ca.pem", user), "a closed directory hides the files in it"
    res = check_files(cfg, "nobody")  # type: ignore[arg-type]
    hidden = [f for f in res.findings if f.code == "unreadable_by_service_user"]
    assert len(hidden) == 3
    assert hidden[0].remedy == f"chmod a+x {shared} (that directory hides the file from nobody)"


# --- config and report --------------------------------------------------------------------------


def test_missing_config_file(tmp_path):
    report = run_doctor(tmp_path / "nope.toml", timeout=1, service_user=None)
    assert report.exit_code == 1
    first = report.ordered()[0]
    assert first.status == "fail" and "does not exist" in first.findings[0].cause
    assert first.findings[0].remedy.startswith("create it")
    assert report.probe_client_id is None
    assert json.loads(json.dumps(report.as_dict()))["client_id"] is None


def test_report_exit_code_and_order():
    report = Report(config="c.toml", agent_version="x")
    report.add(result(10, "clock", "fine"), result(2, "", "fine", [warn("w", "cause", "remedy")]),
               skipped(7, "b:1", "the TLS handshake failed"))
    assert report.exit_code == 0, "warnings do not fail"
    assert [c.number for c in report.ordered()] == [2, 7, 10]
    text = render_text(report)
    assert "warn  2  files" in text and "skip  7  mqtt_connect  b:1: not run: the TLS handshake failed" in text
    assert "cause:  cause" in text and "remedy: remedy" in text
    assert text.rstrip().endswith("0 failed, 1 warning, 1 ok, 1 skipped: exit 0")
    report.add(result(6, "b:1", "x", [warn("w", "c", "r"), replace(warn("f", "c", "r"), severity="fail")]))
    assert report.exit_code == 1
    assert report.as_dict()["counts"] == {"ok": 1, "warn": 1, "fail": 1, "skip": 1}



def test_an_internal_error_in_one_check_becomes_a_fail_line_not_a_crash():
    def broken() -> list[CheckResult]:
        raise KeyError("surprise")

    out = _guarded(9, "", broken)
    assert [(c.number, c.status) for c in out] == [(9, "fail")]
    assert out[0].findings[0].code == "internal_error"
    assert "KeyError" in out[0].findings[0].cause
