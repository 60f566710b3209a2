"""Certificate renewal against a real mosquitto with require_certificate and a CA made by the tests.

The broker runs with `use_subject_as_username`, so its log names the subject of the certificate each
client connected with: the exec signer below issues renewed certificates with O=renewed in the subject,
which is how the tests see that the broker got the new certificate (and not the configured one).
"""

from __future__ import annotations

import datetime
import json
import re
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from agent.config import load_config
from agent.tools.send import send_command
from tests.conftest import DEVICE_ID
from tests.support.agentproc import run_cli
from tests.support.mosquitto import free_port
from tests.support.mqttclient import TestClient
from tests.support.outcomes import scrape_text as scrape
from tests.support.outcomes import wait_metric, wait_until
from tests.support.pki import TestCA, sign_csr
from tests.support.renewal import broker_subjects, openssl_signer, revocation_list, script, short_lived

UTC = datetime.timezone.utc
REVOKED_SERIAL = 0x5EED5EED


def sample(text: str, name: str, labels: str = "") -> float | None:
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else None


@pytest.fixture
def renewal_broker(make_broker, pki, tmp_path):
    def make(extra: list[str] | None = None):
        return make_broker(extra=["use_subject_as_username true", *(extra or [])])
    return make


def renewal_config(make_config, broker, pki, device, tmp_path, renewal: dict[str, Any],
                   metrics_port: int | None = None, commands: dict[str, Any] | None = None) -> Path:
    sections: dict[str, Any] = {
        "tls": {"cert_file": str(device.cert), "key_file": str(device.key)},
        "renewal": {"check_interval": 0.5, "probe_timeout": 5.0, "retry_min": 60.0, **renewal},
        "metrics": {"listen": f"127.0.0.1:{metrics_port}" if metrics_port else ""},
    }
    sections.update(commands or {})
    return make_config(broker, sections)


def test_short_lived_certificate_renews_itself_and_commands_keep_flowing(renewal_broker, make_config, run_agent,
                                                                         pki, tmp_path):
    broker = renewal_broker()
    device = short_lived(pki.ca, 180, "short-device")
    ledger = tmp_path / "ledger"
    counter = script(tmp_path / "count.sh", f'echo "$MQTT_AGENT_REQ_ID" >> "{ledger}"\necho done\n')
    port = free_port()
    # before = 170 s of a 240 s lifetime: due about 10 s after start (earlier by the device's offset).
    cfg = renewal_config(make_config, broker, pki, device, tmp_path,
                         {"signer": "exec", "command": [openssl_signer(tmp_path, pki.ca)], "before": 170.0},
                         metrics_port=port, commands={"commands.count": {"argv": [counter]}})
    agent = run_agent(cfg)
    assert broker_subjects(broker)[-1] == f"CN={DEVICE_ID}"
    before = scrape(port)
    assert sample(before, "mqtt_agent_tls_certificate_expiry_timestamp_seconds", '{certificate="client"}') == \
        pytest.approx(x509.load_pem_x509_certificate(device.cert.read_bytes()).not_valid_after_utc.timestamp())
    next_at = sample(before, "mqtt_agent_tls_renewal_next_timestamp_seconds")
    assert next_at is not None and time.time() - 60 < next_at < time.time() + 15

    watcher = TestClient(cfg, subscribe="command///res/#")
    sent: list[str] = []
    stop = threading.Event()

    def keep_sending() -> None:
        while not stop.is_set() and len(sent) < 400:
            rid = uuid.uuid4().hex[:12]
            sent.append(rid)
            watcher.publish(f"command///req/{rid}/count")
            time.sleep(0.1)

    sender = threading.Thread(target=keep_sending)
    sender.start()
    try:
        wait_metric(port, "mqtt_agent_tls_renewals_total", 1, timeout=60, result="success")
        wait_until(lambda: len(broker_subjects(broker)) >= 2, 20, "the agent reconnects with the new pair")
        time.sleep(1.5)  # commands keep arriving after the switch
    finally:
        stop.set()
        sender.join()
    try:
        wait_until(lambda: len({m.topic.split("/")[4] for m in watcher.messages}) >= len(sent), 30,
                   "every command answered")
    finally:
        got = {m.topic.split("/")[4] for m in watcher.messages}
        print("unanswered:", [r for r in sent if r not in got], "ran:", len(ledger.read_text().split()),
              "sent:", len(sent), [m.topic for m in watcher.messages][:3])
    watcher.close()
    # The broker saw the renewed certificate (O=renewed) for the agent's client id after the switch.
    assert broker_subjects(broker)[-1] == f"O=renewed,CN={DEVICE_ID}"
    # Nothing lost, nothing doubled: every command ran once and was answered once, with 200.
    ran = ledger.read_text().split()
    assert sorted(ran) == sorted(sent)
    answers: dict[str, list[str]] = {}
    for m in watcher.messages:
        rid, status = m.topic.split("/")[4:6]
        answers.setdefault(rid, []).append(status)
    assert {rid: answers.get(rid) for rid in sent} == {rid: ["200"] for rid in sent}
    # The renewed pair is in agent.state_dir, 0600; the metrics follow it.
    state = load_config(cfg).agent.state_dir / "tls"
    active = state / "active.pem"
    assert active.stat().st_mode & 0o777 == 0o600
    new_cert = x509.load_pem_x509_certificate(active.read_bytes())
    assert new_cert.subject.rfc4514_string() == f"O=renewed,CN={DEVICE_ID}"
    after = scrape(port)
    assert sample(after, "mqtt_agent_tls_renewals_total", '{result="success"}') == 1.0
    assert sample(after, "mqtt_agent_tls_certificate_expiry_timestamp_seconds", '{certificate="client"}') == \
        pytest.approx(new_cert.not_valid_after_utc.timestamp())
    assert (tmp_path / "signer-saw-device").read_text().strip() == DEVICE_ID
    # The info command says which pair is in use.
    info = json.loads(send_command(load_config(cfg), "info", timeout=10).body)
    assert info["tls_certificate"]["pair"]["source"] == "renewed"
    assert info["tls_certificate"]["pair"]["serial"] == f"{new_cert.serial_number:x}"
    # A restart keeps the renewed pair (the newest valid one).
    agent.stop()
    run_agent(cfg)
    wait_until(lambda: broker_subjects(broker)[-1] == f"O=renewed,CN={DEVICE_ID}", 10, "restart uses renewed")
    again = json.loads(send_command(load_config(cfg), "info", timeout=10).body)
    assert again["tls_certificate"]["pair"]["source"] == "renewed"


@pytest.mark.parametrize("case", ["other_key", "other_ca", "revoked"])
def test_a_bad_renewed_certificate_never_replaces_the_working_one(case, renewal_broker, make_config, run_agent,
                                                                  pki, tmp_path):
    extra: list[str] = []
    if case == "other_key":
        # A signer that ignores the CSR and returns a certificate for another key.
        signer = script(tmp_path / "wrong.sh", f'cat > /dev/null\ncat "{pki.device.cert}"\n')
        result, why = "rejected", "wrong_key"
    elif case == "other_ca":
        signer = openssl_signer(tmp_path, TestCA(tmp_path / "other-ca", name="some other CA"))
        result, why = "rejected", "untrusted"
    else:
        signer = openssl_signer(tmp_path, pki.ca, serial=REVOKED_SERIAL)
        extra = [f"crlfile {revocation_list(pki.ca, tmp_path / 'crl.pem', [REVOKED_SERIAL])}"]
        result, why = "probe_failed", "the broker refused the new certificate"
    broker = renewal_broker(extra)
    device = short_lived(pki.ca, 3600, f"device-{case}")
    port = free_port()
    cfg = renewal_config(make_config, broker, pki, device, tmp_path,
                         {"signer": "exec", "command": [signer], "before": 3590.0}, metrics_port=port)
    run_agent(cfg)
    wait_metric(port, "mqtt_agent_tls_renewals_total", 1, timeout=30, result=result)
    text = scrape(port)
    assert sample(text, "mqtt_agent_tls_renewals_total", f'{{result="{result}"}}') == 1.0
    assert sample(text, "mqtt_agent_tls_renewals_total", '{result="success"}') == 0.0
    # Backoff: the next attempt is retry_min (60 s) away, not now.
    next_at = sample(text, "mqtt_agent_tls_renewal_next_timestamp_seconds")
    assert next_at is not None and next_at > time.time() + 30
    tls_dir = load_config(cfg).agent.state_dir / "tls"
    assert not (tls_dir / "active.pem").exists()
    state = json.loads((tls_dir / "renewal.json").read_text())
    assert state["last_failure"]["result"] == result and why in state["last_failure"]["reason"]
    # Nothing switched: the broker only ever saw the configured certificate, and commands still work.
    assert set(broker_subjects(broker)) == {f"CN={DEVICE_ID}"}
    assert send_command(load_config(cfg), "ping", timeout=10).status == 200
    assert set(broker_subjects(broker)) == {f"CN={DEVICE_ID}"}


def test_cert_csr_and_cert_install_through_mqtt_agent_send(renewal_broker, make_config, run_agent, pki, tmp_path):
    broker = renewal_broker()
    device = short_lived(pki.ca, 3600, "device-cmd")
    cfg = renewal_config(make_config, broker, pki, device, tmp_path, {"signer": "command"})
    agent = run_agent(cfg)
    loaded = load_config(cfg)
    tls_dir = loaded.agent.state_dir / "tls"
    # cert.install before any cert.csr: nothing to install against.
    early = send_command(loaded, "cert.install", sign_csr(pki.ca, _any_csr()), timeout=20)
    assert early.status == 400 and b"no pending key" in early.body
    csr = send_command(loaded, "cert.csr", timeout=20)
    assert csr.status == 200 and csr.body.startswith(b"-----BEGIN CERTIFICATE REQUEST-----")
    assert (tls_dir / "pending.key").stat().st_mode & 0o777 == 0o600
    # A restart while the renewal is pending: the pending key survives and the signed chain still fits it.
    agent.stop()
    agent = run_agent(cfg)
    foreign = send_command(loaded, "cert.install", sign_csr(TestCA(tmp_path / "x", name="foreign CA"), csr.body),
                           timeout=30)
    assert foreign.status == 400 and b"untrusted" in foreign.body
    assert set(broker_subjects(broker)) == {f"CN={DEVICE_ID}"}
    installed = send_command(loaded, "cert.install", sign_csr(pki.ca, csr.body), timeout=30)
    assert installed.status == 200, installed.body
    body = json.loads(installed.body)
    assert body["installed"] is True and body["subject"] == f"O=renewed,CN={DEVICE_ID}"
    wait_until(lambda: broker_subjects(broker)[-1] == f"O=renewed,CN={DEVICE_ID}", 20, "switched to the new pair")
    assert not (tls_dir / "pending.key").exists() and (tls_dir / "active.pem").exists()
    assert send_command(loaded, "ping", timeout=10).status == 200


def _any_csr() -> bytes:
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, DEVICE_ID)]))
           .sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.PEM)


def test_broker_that_drops_the_renewed_certificate_after_the_switch_gets_the_previous_one_back(
        renewal_broker, make_config, run_agent, pki, tmp_path):
    broker = renewal_broker()
    device = short_lived(pki.ca, 3600, "device-rollback")
    port = free_port()
    cfg = renewal_config(make_config, broker, pki, device, tmp_path,
                         {"signer": "exec", "command": [openssl_signer(tmp_path, pki.ca)], "before": 3590.0},
                         metrics_port=port)
    run_agent(cfg)
    wait_metric(port, "mqtt_agent_tls_renewals_total", 1, timeout=30, result="success")
    wait_until(lambda: broker_subjects(broker)[-1] == f"O=renewed,CN={DEVICE_ID}", 20, "switched")
    tls_dir = load_config(cfg).agent.state_dir / "tls"
    renewed = x509.load_pem_x509_certificate((tls_dir / "active.pem").read_bytes())
    # The CA revokes the new certificate right after the switch (before it is proven): the broker now
    # refuses every connection made with it.
    broker.options.extra.append(f"crlfile {revocation_list(pki.ca, tmp_path / 'crl2.pem', [renewed.serial_number])}")
    broker.restart()
    wait_metric(port, "mqtt_agent_tls_renewals_total", 1, timeout=60, result="rolled_back")
    assert json.loads((tls_dir / "renewal.json").read_text())["last_failure"]["result"] == "rolled_back"
    wait_until(lambda: broker_subjects(broker)[-1] == f"CN={DEVICE_ID}", 30, "connected again with the configured pair")
    assert not (tls_dir / "active.pem").exists()
    assert x509.load_pem_x509_certificate((tls_dir / "rejected.pem").read_bytes()).serial_number == \
        renewed.serial_number
    text = scrape(port)
    assert sample(text, "mqtt_agent_tls_renewals_total", '{result="rolled_back"}') == 1.0
    assert sample(text, "mqtt_agent_tls_certificate_expiry_timestamp_seconds", '{certificate="client"}') == \
        pytest.approx(x509.load_pem_x509_certificate(device.cert.read_bytes()).not_valid_after_utc.timestamp())
    assert send_command(load_config(cfg), "ping", timeout=10).status == 200


def test_mqtt_agent_renew_runs_it_now_and_check_config_names_the_pair(renewal_broker, make_config, run_agent,
                                                                      pki, tmp_path):
    broker = renewal_broker()
    device = short_lived(pki.ca, 7200, "device-cli")  # 0.66 of its life is an hour away: not due
    cfg = renewal_config(make_config, broker, pki, device, tmp_path,
                         {"signer": "exec", "command": [openssl_signer(tmp_path, pki.ca)], "before": 60.0})
    before = run_cli("check-config", "--config", str(cfg))
    assert before.returncode == 0 and f"TLS client certificate in use: configured pair {device.cert}" in before.stdout
    never_ran = run_cli("renew", "--config", str(cfg), "--timeout", "3")
    assert never_ran.returncode == 1 and "has the agent run yet?" in never_ran.stderr
    run_agent(cfg)
    not_due = run_cli("renew", "--config", str(cfg))
    assert not_due.returncode == 0 and not_due.stdout.startswith("not_due: not due until"), not_due
    assert set(broker_subjects(broker)) == {f"CN={DEVICE_ID}"}
    forced = run_cli("renew", "--force", "--config", str(cfg))
    assert forced.returncode == 0 and forced.stdout.startswith("success: renewed certificate in use"), forced
    wait_until(lambda: broker_subjects(broker)[-1] == f"O=renewed,CN={DEVICE_ID}", 20, "switched")
    after = run_cli("check-config", "--config", str(cfg))
    active = load_config(cfg).agent.state_dir / "tls" / "active.pem"
    assert f"TLS client certificate in use: renewed pair {active}" in after.stdout
    doctor = json.loads(run_cli("doctor", "--json", "--config", str(cfg)).stdout)
    renewal = next(c for c in doctor["checks"] if c["id"] == "renewal")
    assert renewal["details"]["pair"]["source"] == "renewed" and renewal["status"] == "ok", renewal
