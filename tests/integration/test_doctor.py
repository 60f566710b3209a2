"""`mqtt-agent doctor` against real mosquitto brokers and certificates generated at test time.

One test per failure the issue names, each asserting the cause and the remedy the operator reads,
plus the all-fine run (exit 0) and the --json schema documented in docs/doctor.md.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from agent.cli import main
from agent.config import load_config
from agent.tools.doctor import Report, render_text
from agent.tools.send import send_command
from tests.conftest import PKI
from tests.support.agentproc import REPO
from tests.support.doctor import TIMEOUT, UTC, _schema, _validate, doctor, finding, one
from tests.support.metrics import value
from tests.support.mosquitto import free_port, make_password_file
from tests.support.outcomes import metrics_on, scrape
from tests.support.pki import TestCA


def render(report: Report) -> str:
    return render_text(report)


def test_all_fine_exits_0_and_never_uses_the_production_client_id(broker, make_config, tmp_path, capsys):
    cfg = make_config(broker)
    state_dir = tmp_path / "state-agent1"
    rc = main(["doctor", "--config", str(cfg), "--timeout", str(TIMEOUT)])
    out = capsys.readouterr().out
    assert rc == 0, out
    lines = [line for line in out.splitlines() if re.match(r"^(ok|warn|FAIL|skip) +\d+ ", line)]
    assert [int(line.split()[1]) for line in lines] == sorted(int(line.split()[1]) for line in lines)
    for line in lines:
        number = int(line.split()[1])
        assert line.startswith("ok") or (number == 10 and line.startswith("warn")), line
    assert re.search(r"^ok +8  subscribe .*granted QoS 1 .*came back: commands can arrive", out, re.M), out
    assert "0 failed" in out and out.rstrip().endswith("exit 0")
    probe = re.search(r"probe client id (dev-1-doctor-[0-9a-f]{6}): the production id dev-1 is never used", out)
    assert probe, out
    log = broker.log_text()
    assert f"as {probe.group(1)} " in log
    assert not re.search(r" as dev-1 \(", log), "the doctor connected with the production client id"
    assert not state_dir.exists(), "the doctor must not create or change files"


def test_all_fine_with_mqtt5(broker, make_config):
    report = doctor(make_config(broker, {"mqtt": {"protocol": "5"}}))
    assert report.exit_code == 0
    assert one(report, 7).summary.startswith("accepted dev-1-doctor-")
    assert "commands can arrive" in one(report, 8).summary


def test_running_agent_stays_connected_while_the_doctor_probes(broker, make_config, run_agent):
    """The point of the probe client id: the service is not kicked off the broker, and the delivery
    probe, which reaches the agent too, runs nothing there."""
    port, metrics = metrics_on()
    cfg = make_config(broker, metrics)
    agent = run_agent(cfg)
    report = doctor(cfg)
    assert report.exit_code == 0, render(report)
    assert "commands can arrive" in one(report, 8).summary
    assert send_command(load_config(cfg), "ping", b"{}", timeout=10).status == 200
    samples = scrape(port)
    # The ping is the only command the agent answered or refused: the probe ran nothing.
    assert sum(v for (n, _), v in samples.items() if n == "mqtt_agent_commands_total") == 1, agent.output
    assert value(samples, "mqtt_agent_commands_total", command="ping", status="200") == 1
    assert sum(v for (n, _), v in samples.items() if n == "mqtt_agent_commands_rejected_total") == 0
    # Never kicked off the broker: one connection, nothing ended.
    assert value(samples, "mqtt_agent_connects_total") == 1
    assert sum(v for (n, _), v in samples.items() if n == "mqtt_agent_disconnects_total") == 0, agent.output


def test_plain_mqtt_without_tls(make_broker, make_config):
    broker = make_broker(tls=False)
    report = doctor(make_config(broker, {"tls": {"enabled": False, "ca_file": None, "cert_file": None,
                                                 "key_file": None}}))
    assert report.exit_code == 0, render(report)
    assert finding(one(report, 1), "tls_disabled").severity == "warn"
    assert one(report, 3).summary == "not run: tls.enabled = false"
    assert one(report, 6).summary == "not run: tls.enabled = false (plain MQTT)"
    assert one(report, 7).status == "ok" and one(report, 8).status == "ok"


def test_sha1_signed_client_certificate(broker, make_config, pki: PKI):
    sha1 = pki.ca.issue("dev-1", sha1=True, filename="device-sha1")
    report = doctor(make_config(broker, {"tls": {"cert_file": str(sha1.cert), "key_file": str(sha1.key)}}))
    assert report.exit_code == 1
    cert = finding(one(report, 3, "client certificate"), "weak_signature")
    assert cert.severity == "fail"
    assert "sha1WithRSAEncryption" in cert.cause
    assert "rejected at OpenSSL security level >= 1 on OpenSSL 3 (`ca md too weak`)" in cert.cause
    assert cert.remedy == "set tls.security_level = 0, or reissue the device certificate with SHA-256"
    tls = one(report, 6)
    setup = finding(tls, "client_cert_weak_signature")
    assert "ca md too weak" in setup.cause
    # The retry at level 0 shows the broker (at its default level) rejects SHA1 too: level 0 is not the fix.
    assert tls.details["diagnosis"][0]["setting"] == "tls.security_level = 0"
    assert tls.details["diagnosis"][0]["connects"] is False
    assert setup.remedy.startswith("reissue the device certificate with SHA-256")
    assert one(report, 7).status == "skip" and one(report, 8).status == "skip"


def test_sha1_signed_broker_certificate(make_broker, make_config, pki: PKI):
    server = pki.ca.issue("localhost", sans=["localhost", "127.0.0.1"], server=True, sha1=True,
                          filename="broker-sha1")
    # mosquitto itself refuses to load a SHA1 certificate at its default security level.
    broker = make_broker(server=server, extra=["ciphers DEFAULT:@SECLEVEL=0"])
    report = doctor(make_config(broker))
    assert report.exit_code == 1
    cert = finding(one(report, 3, "broker"), "weak_signature")
    assert "rejected at OpenSSL security level >= 1 on OpenSSL 3 (`ca md too weak`)" in cert.cause
    assert cert.remedy.startswith("set tls.security_level = 0, or have the broker certificate reissued with SHA-256")
    tls = one(report, 6)
    handshake = finding(tls, "weak_signature")
    assert "sha1WithRSAEncryption" in handshake.cause
    assert "confirmed: with tls.security_level = 0 it connects" in handshake.cause
    assert "tls.security_level = 0" in handshake.remedy
    diagnosis = {d["setting"]: d["connects"] for d in tls.details["diagnosis"]}
    assert diagnosis["tls.security_level = 0"] is True
    assert diagnosis["tls.insecure = true (host-name check off)"] is False
    assert any("sha1WithRSAEncryption" in n for n in tls.notes), "the report shows the chain"
    assert one(report, 7).status == "skip"


def test_host_name_mismatch_suggests_server_name(make_broker, make_config, pki: PKI):
    server = pki.ca.issue("broker.example.test", sans=["broker.example.test"], server=True,
                          filename="broker-other-name")
    broker = make_broker(server=server)
    report = doctor(make_config(broker))
    assert report.exit_code == 1
    tls = one(report, 6)
    mismatch = finding(tls, "hostname_mismatch")
    assert "issued for broker.example.test, not for 127.0.0.1" in mismatch.cause
    assert mismatch.remedy.startswith('set tls.server_name = "broker.example.test"')
    # tls.insecure only as the weaker option, after the real fix.
    assert mismatch.remedy.index("tls.server_name") < mismatch.remedy.index("tls.insecure")
    assert "weaker, tls.insecure = true" in mismatch.remedy
    diagnosis = {d["setting"]: d["connects"] for d in tls.details["diagnosis"]}
    assert diagnosis['tls.server_name = "broker.example.test"'] is True
    assert diagnosis["tls.security_level = 0"] is False
    assert 'confirmed: with tls.server_name = "broker.example.test" it connects' in mismatch.cause
    chain = "\n".join(tls.notes)
    assert "DNS:broker.example.test" in chain and "issuer CN=mqtt-agent test CA" in chain
    static = finding(one(report, 3, "broker"), "hostname_mismatch")
    assert 'tls.server_name = "broker.example.test"' in static.remedy


def test_expired_client_certificate(broker, make_config, pki: PKI):
    now = datetime.datetime.now(UTC)
    expired = pki.ca.issue("dev-1", filename="device-expired", not_before=now - datetime.timedelta(days=60),
                           not_after=now - datetime.timedelta(days=2))
    report = doctor(make_config(broker, {"tls": {"cert_file": str(expired.cert), "key_file": str(expired.key)}}))
    assert report.exit_code == 1
    cert = finding(one(report, 3, "client certificate"), "cert_expired")
    assert re.search(r"client certificate device-expired.pem expired on \d{4}-\d\d-\d\d .* \(2 days ago; local clock",
                     cert.cause), cert.cause
    assert cert.remedy.startswith("renew the device certificate (tls.cert_file)")
    assert "timedatectl" in cert.remedy
    # TLS 1.3: the broker rejects the certificate after our handshake; the doctor still names it.
    rejected = finding(one(report, 6), "client_cert_rejected")
    assert "the broker says the client certificate has expired" in rejected.cause
    assert "after the handshake" in rejected.cause
    assert rejected.remedy.startswith(f"renew the device certificate (tls.cert_file {expired.cert}): it expired on")
    assert one(report, 7).status == "skip"


def test_broker_certificate_from_untrusted_ca(make_broker, make_config, tmp_path):
    other = TestCA(tmp_path / "other-ca", name="Other Untrusted CA")
    server = other.issue("localhost", sans=["localhost", "127.0.0.1"], server=True, filename="broker")
    broker = make_broker(server=server)
    report = doctor(make_config(broker))
    assert report.exit_code == 1
    tls = one(report, 6)
    untrusted = finding(tls, "untrusted_ca")
    assert "is not signed by a CA in tls.ca_file" in untrusted.cause
    assert "issuer: CN=Other Untrusted CA" in untrusted.cause
    assert untrusted.remedy == "set tls.ca_file to the CA certificate that issued the broker certificate"
    diagnosis = {d["setting"]: d["connects"] for d in tls.details["diagnosis"]}
    assert diagnosis == {"tls.security_level = 0": False, "tls.insecure = true (host-name check off)": False,
                         "certificate verification off (diagnosis only, not a setting)": True}
    assert "confirmed: the certificate chain is the cause: only with verification off does it connect" in \
        untrusted.cause
    assert any("issuer CN=Other Untrusted CA" in n for n in tls.notes)
    # The broker certificate itself is fine: name, signature and dates.
    assert one(report, 3, "broker").status == "ok"


def test_key_that_does_not_match_the_certificate(broker, make_config, pki: PKI, tmp_path):
    keys = tmp_path / "keys"
    keys.mkdir()
    other = pki.ca.issue("someone-else", filename="someone-else")
    shutil.copy(pki.device.cert, keys / "device.pem")
    shutil.copy(other.key, keys / "device.key")
    shutil.copy(pki.device.key, keys / "device-2025.key")
    for key in keys.glob("*.key"):
        key.chmod(0o600)
    report = doctor(make_config(broker, {"tls": {"cert_file": str(keys / "device.pem"),
                                                 "key_file": str(keys / "device.key")}}))
    assert report.exit_code == 1
    mismatch = finding(one(report, 2), "key_mismatch")
    assert f"tls.key_file {keys / 'device.key'} is not the private key of tls.cert_file" in mismatch.cause
    assert mismatch.remedy == f'set tls.key_file = "{keys / "device-2025.key"}": that key matches the certificate'
    # TLS cannot work with these files: the branch stops there; DNS and TCP still ran.
    assert one(report, 5).status == "ok"
    assert [one(report, n).status for n in (6, 7, 8)] == ["skip", "skip", "skip"]
    assert "key_mismatch" in one(report, 6).summary


def test_world_readable_key_warns_and_exits_0(broker, make_config, pki: PKI, tmp_path):
    key = tmp_path / "device.key"
    shutil.copy(pki.device.key, key)
    key.chmod(0o644)
    report = doctor(make_config(broker, {"tls": {"key_file": str(key)}}))
    files = one(report, 2)
    assert files.status == "warn"
    loose = finding(files, "key_permissions")
    assert loose.severity == "warn"
    assert loose.cause == f"tls.key_file {key} (the private key) is readable by every user on this machine (mode 0644)"
    assert loose.remedy.startswith(f"chmod 600 {key}")
    assert report.exit_code == 0
    assert one(report, 8).status == "ok"


def user_broker_config(make_broker: Any, make_config: Any, tmp_path: Path, *, sent_password: str,
                       acl: str | None = None, protocol: str = "3.1.1") -> Path:
    """A broker that knows user dev-1 (password "pw") and, with `acl`, an acl_file; a config that logs in
    as dev-1 with `sent_password` (read from a 0600 password_file)."""
    passwords = make_password_file(tmp_path / "passwd", {"dev-1": "pw"})
    acl_file = None
    if acl is not None:
        acl_file = tmp_path / "acl"
        acl_file.write_text(acl)
    broker = make_broker(password_file=passwords, acl_file=acl_file)
    secret = tmp_path / "mqtt-password"
    secret.write_text(sent_password + "\n")
    secret.chmod(0o600)
    return make_config(broker, {"mqtt": {"protocol": protocol, "username": "dev-1", "password_file": str(secret)}})


@pytest.mark.parametrize(("protocol", "connack"), [("3.1.1", "MQTT 3.1.1 CONNACK 5 (Not authorized)"),
                                                    ("5", "MQTT 5 CONNACK 0x87 Not authorized")])
def test_wrong_password(make_broker, make_config, tmp_path, protocol, connack):
    cfg = user_broker_config(make_broker, make_config, tmp_path, sent_password="wrong-password", protocol=protocol)
    secret = tmp_path / "mqtt-password"
    report = doctor(cfg)
    assert report.exit_code == 1
    assert one(report, 6).status == "ok"
    refused = finding(one(report, 7), "not_authorized")
    assert f"the broker refused user 'dev-1': not authorized ({connack})" in refused.cause
    assert "wrong user name or password" in refused.cause
    assert refused.remedy.startswith(f"check mqtt.username ('dev-1') and the password in mqtt.password_file ({secret})")
    assert one(report, 8).status == "skip"
    assert "wrong-password" not in json.dumps(report.as_dict()), "the password must never be printed"


def test_acl_file_forbidding_the_command_topic(make_broker, make_config, tmp_path):
    # The device may answer commands, and (mis)configured to write the command topic, but not read it.
    cfg = user_broker_config(make_broker, make_config, tmp_path, sent_password="pw",
                             acl="user dev-1\ntopic write command///req/#\ntopic readwrite command///res/#\n")
    report = doctor(cfg, timeout=2)
    assert report.exit_code == 1
    sub = one(report, 8)
    denied = finding(sub, "command_topic_not_readable")
    assert "granted the subscription to command///req/#" in denied.cause
    assert "its ACL does not let user 'dev-1' read the command topic, so commands never arrive" in denied.cause
    assert "`user dev-1` then `topic read command///req/#`" in denied.remedy
    assert "acl_file never refuses a subscription" in denied.remedy


def test_acl_file_allowing_the_command_topic_but_not_publishing_there(make_broker, make_config, tmp_path):
    """The normal device ACL: read commands, write responses. Delivery cannot be probed; that is no failure."""
    cfg = user_broker_config(make_broker, make_config, tmp_path, sent_password="pw",
                             acl="user dev-1\ntopic read command///req/#\ntopic write command///res/#\n")
    report = doctor(cfg)
    sub = one(report, 8)
    assert sub.status == "ok", sub
    assert "delivery not tested: this client may not publish on the command topic (PUBACK Not authorized)" \
        in sub.summary


def _dynsec_plugin() -> str:
    found = sorted(Path("/usr/lib").glob("*/mosquitto_dynamic_security.so"))
    found += sorted(Path("/usr/lib").glob("mosquitto_dynamic_security.so"))
    if not found:
        pytest.skip("mosquitto's dynamic security plugin is not installed")
    return str(found[0])


@pytest.mark.parametrize(("protocol", "suback"), [("3.1.1", "SUBACK 0x80, failure: the broker's ACL does not allow"),
                                                   ("5", "SUBACK 0x87, not authorized: the broker's ACL does not")])
def test_subscription_refused_by_the_broker(make_broker, make_config, tmp_path, protocol, suback):
    """mosquitto's dynamic-security plugin refuses subscriptions in the SUBACK (its acl_file never does)."""
    plugin = _dynsec_plugin()
    state = tmp_path / "dynsec.json"
    state.write_text(json.dumps({
        "defaultACLAccess": {"publishClientSend": True, "publishClientReceive": True, "subscribe": False,
                             "unsubscribe": True},
        "clients": [], "roles": [], "groups": [{"groupname": "devices", "roles": []}], "anonymousGroup": "devices",
    }))
    broker = make_broker(extra=[f"plugin {plugin}", f"plugin_opt_config_file {state}"])
    report = doctor(make_config(broker, {"mqtt": {"protocol": protocol}}))
    assert report.exit_code == 1
    refused = finding(one(report, 8), "subscribe_refused")
    assert f"the broker refused the subscription to command///req/# ({suback}" in refused.cause
    assert "commands cannot arrive" in refused.cause
    assert refused.remedy.startswith("allow this client (identified by its certificate) to subscribe to "
                                     "command///req/# in the broker's ACL")


def test_dns_failure_and_unreachable_network_in_a_network_namespace(make_config):
    """In a fresh network namespace nothing is reachable and no DNS server answers, and no packet
    leaves this machine: the doctor runs there as a subprocess."""
    unshare = shutil.which("unshare")
    if unshare is None or subprocess.run([unshare, "-n", "true"], capture_output=True).returncode != 0:
        pytest.skip("cannot create a network namespace here (unshare -n needs root)")
    cfg = make_config(None, {"mqtt": {"hosts": ["mqtt.doctor-test.example:8883", "192.0.2.1:8883"]}})
    proc = subprocess.run([unshare, "-n", sys.executable, "-m", "agent", "doctor", "--json", "--timeout", "3",
                           "--config", str(cfg)], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 1, proc.stderr
    data = json.loads(proc.stdout)
    by = {(c["number"], c["target"]): c for c in data["checks"]}
    dns = by[(4, "mqtt.doctor-test.example:8883")]
    assert dns["status"] == "fail"
    assert dns["findings"][0]["code"] in ("dns_unavailable", "dns_no_such_name")
    assert "mqtt.doctor-test.example" in dns["findings"][0]["cause"]
    assert by[(5, "mqtt.doctor-test.example:8883")]["summary"] == "not run: DNS resolution failed"
    tcp = by[(5, "192.0.2.1:8883")]
    assert tcp["findings"][0]["code"] == "unreachable"
    assert "there is no route to it" in tcp["findings"][0]["cause"]
    assert "ip route" in tcp["findings"][0]["remedy"]


def test_tls_configured_but_the_port_speaks_plain_mqtt(make_broker, make_config):
    broker = make_broker(tls=False)
    report = doctor(make_config(broker))
    plain = finding(one(report, 6), "not_tls")
    assert "during the TLS handshake" in plain.cause or "did not complete a TLS handshake" in plain.cause
    assert "confirmed: with plain MQTT without TLS it connects" in plain.cause
    assert plain.remedy.startswith("this port serves plain MQTT")


def test_history_names_disconnects_learned_keepalive_and_duplicate_client_id(broker, make_config, tmp_path):
    cfg = make_config(broker, name="hist")
    state = tmp_path / "state-hist"
    state.mkdir()
    now = datetime.datetime.now(UTC).timestamp()
    history = {
        "version": 1,
        "keepalive": {"current": 20, "configured": 60, "learned": True,
                      "evidence": "keepalive 60 s -> 20 s: 3 drops in 9 min after 25-28 s idle",
                      "changed_at": now - 600, "last_idle_drop_at": now - 700},
        "disconnects": [{"at": now - 900 + i * 60, "reason": "idle_timeout", "host": broker.address,
                         "uptime_s": 30.1, "idle_s": 25.2, "reason_code": 128} for i in range(5)]
        + [{"at": now - 60, "reason": "session_taken_over", "host": broker.address, "uptime_s": 2.0,
            "idle_s": 0.5, "reason_code": 142}],
        "duplicate_client_id": {"client_id": "dev-1", "suspected_at": now - 60, "takeovers": 3},
    }
    (state / "connection-state.json").write_text(json.dumps(history))
    before = (state / "connection-state.json").read_bytes()
    report = doctor(cfg)
    hist = one(report, 9)
    assert "6 disconnects in 24 h (idle_timeout 5, session_taken_over 1)" in hist.summary
    assert "keepalive learned: 20 s instead of 60 s (keepalive 60 s -> 20 s: 3 drops" in hist.summary
    duplicate = finding(hist, "duplicate_client_id")
    assert duplicate.severity == "fail"
    assert "another client seems to use client id 'dev-1'" in duplicate.cause and "3 times" in duplicate.cause
    assert duplicate.remedy.startswith("give every gateway its own mqtt.client_id")
    flapping = finding(hist, "connection_flapping")
    assert "6 disconnects in the last hour, 5 of them idle_timeout" in flapping.cause
    assert report.exit_code == 1
    assert (state / "connection-state.json").read_bytes() == before


def test_metrics_port_used_by_another_program_fails(broker, make_config):
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen(1)
    port = squatter.getsockname()[1]
    try:
        report = doctor(make_config(broker, {"metrics": {"listen": f"127.0.0.1:{port}"}}), timeout=2)
    finally:
        squatter.close()
    taken = finding(one(report, 10, "metrics"), "metrics_port_in_use")
    assert f"127.0.0.1:{port} is already in use by another program" in taken.cause
    assert f"ss -ltnp 'sport = :{port}'" in taken.remedy
    assert report.exit_code == 1


def test_json_report_follows_the_documented_schema(make_broker, make_config, pki: PKI):
    server = pki.ca.issue("broker.example.test", sans=["broker.example.test"], server=True,
                          filename="broker-json")
    broker = make_broker(server=server)
    cfg = make_config(broker, {"mqtt": {"hosts": [broker.address, f"127.0.0.1:{free_port()}"]}})
    proc = subprocess.run([sys.executable, "-m", "agent", "doctor", "--json", "--config", str(cfg)],
                          capture_output=True, text=True, cwd=REPO, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 1, proc.stderr
    data = json.loads(proc.stdout)
    assert _validate(data, _schema()) == []
    assert data["exit_code"] == 1 and data["schema_version"] == 1
    assert data["probe_client_id"].startswith("dev-1-doctor-") and data["client_id"] == "dev-1"
    assert [c["number"] for c in data["checks"]] == sorted(c["number"] for c in data["checks"])
    assert data["counts"]["fail"] == sum(1 for c in data["checks"] if c["status"] == "fail")
    codes = {(c["id"], f["code"]) for c in data["checks"] for f in c["findings"]}
    assert ("tls", "hostname_mismatch") in codes and ("tcp", "connection_refused") in codes
    tls = next(c for c in data["checks"] if c["id"] == "tls" and c["target"] == broker.address)
    assert tls["details"]["chain"][0]["names"] == ["DNS:broker.example.test"]
    assert tls["details"]["chain"][0]["signature_algorithm"] == "sha256WithRSAEncryption"

