"""`mqtt-agent enroll`: device key and CSR made on the device, signed certificate checked and installed.

Real keys, real CSRs, certificates signed by a test CA (with cryptography, and with the exact openssl
command enroll prints), OpenSSL loading the result; no broker. The end-to-end run (enroll -> sign ->
install -> the agent answers a ping through a real mosquitto) is tests/integration/test_enroll.py.
"""

from __future__ import annotations

import datetime
import os
import pwd
import shlex
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from agent.config import load_config
from agent.errors import EX_CONFIG, ConfigError
from agent.tools import enroll as provision
from tests.support.agentproc import cli_in_process as run_cli
from tests.support.agentproc import write_toml
from tests.support.pki import TestCA, intermediate_ca
from tests.support.pki import sign_csr_file as sign

UTC = datetime.timezone.utc
OTHER_USER = "daemon"  # an existing non-root account, so ownership is really applied (and nothing is created)


def device_config(directory: Path, ca: Path | None, device_id: str = "gw-0001", **tls: object) -> Path:
    """A config whose certificate and key do not exist yet (the state before enrollment)."""
    tls_section: dict[str, object] = {"cert_file": "pki/device.pem", "key_file": "pki/device.key"}
    if ca is not None:
        tls_section["ca_file"] = str(ca)
    tls_section.update(tls)
    return write_toml(directory / "mqtt-agent.toml", {
        "agent": {"device_id": device_id, "state_dir": str(directory / "state")},
        "mqtt": {"hosts": ["127.0.0.1:8883"]},
        "tls": tls_section,
        "metrics": {"listen": ""},
    })


@pytest.fixture
def ca(tmp_path: Path) -> TestCA:
    return TestCA(tmp_path / "fleet-ca", name="fleet CA")


@pytest.fixture
def cfg(tmp_path: Path, ca: TestCA) -> Path:
    return device_config(tmp_path, ca.cert_path)


def owner_args() -> list[str]:
    return ["--owner", OTHER_USER] if os.geteuid() == 0 else []


# --- reading the config before the certificate exists ---------------------------------------------


def test_config_with_missing_certificate_is_read_for_enroll(cfg: Path) -> None:
    with pytest.raises(ConfigError):
        load_config(cfg)  # the agent's own validation refuses it: the files do not exist yet
    paths = provision.read_enroll_paths(cfg)
    assert paths.device_id == "gw-0001"
    assert paths.key_file == cfg.parent / "pki/device.key"  # relative to the config's directory
    assert paths.cert_file == cfg.parent / "pki/device.pem"
    assert paths.csr_file == cfg.parent / "pki/device.csr"


def test_config_problems_are_all_reported_with_key_paths(tmp_path: Path) -> None:
    bad = write_toml(tmp_path / "bad.toml", {"agent": {"device_id": "x"},
                                             "tls": {"enabled": False, "security_level": 9}})
    result = run_cli("enroll", "--config", str(bad))
    assert result.returncode == EX_CONFIG
    for expected in ("tls.enabled: is false", "tls.security_level: must be 0..5, got 9",
                     "tls.cert_file: is not set", "tls.key_file: is not set"):
        assert expected in result.stderr
    missing = run_cli("enroll", "--config", str(tmp_path / "nope.toml"))
    assert missing.returncode == EX_CONFIG
    assert "does not exist" in missing.stderr


def test_device_id_with_topic_characters_is_refused(cfg: Path) -> None:
    result = run_cli("enroll", "--config", str(cfg), "--device-id", "a/b", *owner_args())
    assert result.returncode == 1
    assert "must not contain '/'" in result.stderr
    assert not (cfg.parent / "pki/device.key").exists()


# --- key and CSR ----------------------------------------------------------------------------------


def test_enroll_creates_ec_key_0600_and_csr_with_device_id(cfg: Path) -> None:
    result = run_cli("enroll", "--config", str(cfg), *owner_args())
    assert result.returncode == 0, result.stderr
    key_path, csr_path = cfg.parent / "pki/device.key", cfg.parent / "pki/device.csr"
    st = key_path.stat()
    assert stat.S_IMODE(st.st_mode) == 0o600
    if os.geteuid() == 0:
        assert st.st_uid == pwd.getpwnam(OTHER_USER).pw_uid
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    csr = x509.load_pem_x509_csr(csr_path.read_bytes())
    assert csr.is_signature_valid
    assert csr.subject.rfc4514_string() == "CN=gw-0001"
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["gw-0001"]
    assert ExtendedKeyUsageOID.CLIENT_AUTH in csr.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert csr.public_key().public_numbers() == key.public_key().public_numbers()
    # It says where the CSR is and what to do next; it never prints the key.
    assert f"CSR:         {csr_path}" in result.stdout
    assert "next steps:" in result.stdout and "--install-cert" in result.stdout
    assert "PRIVATE KEY" not in result.stdout + result.stderr
    # No temporary files are left beside the key.
    assert sorted(p.name for p in key_path.parent.iterdir()) == ["device.csr", "device.key"]


def test_enroll_rsa_and_explicit_device_id(cfg: Path) -> None:
    result = run_cli("enroll", "--config", str(cfg), "--device-id", "gw-0042", "--key-type", "rsa", *owner_args())
    assert result.returncode == 0, result.stderr
    key = serialization.load_pem_private_key((cfg.parent / "pki/device.key").read_bytes(), password=None)
    assert isinstance(key, rsa.RSAPrivateKey) and key.key_size == 2048
    csr = x509.load_pem_x509_csr((cfg.parent / "pki/device.csr").read_bytes())
    assert csr.subject.rfc4514_string() == "CN=gw-0042"
    # The config still says gw-0001: the operator is told to align it.
    assert "agent.device_id" in result.stdout and "gw-0042" in result.stdout


def test_enroll_is_idempotent_and_force_replaces_the_key(cfg: Path) -> None:
    assert run_cli("enroll", "--config", str(cfg), *owner_args()).returncode == 0
    key_path, csr_path = cfg.parent / "pki/device.key", cfg.parent / "pki/device.csr"
    key1, csr1, mtime1 = key_path.read_bytes(), csr_path.read_bytes(), key_path.stat().st_mtime_ns
    again = run_cli("enroll", "--config", str(cfg), *owner_args())
    assert again.returncode == 0
    assert "kept" in again.stdout and "unchanged" in again.stdout
    assert key_path.read_bytes() == key1 and csr_path.read_bytes() == csr1
    assert key_path.stat().st_mtime_ns == mtime1
    forced = run_cli("enroll", "--config", str(cfg), "--force", *owner_args())
    assert forced.returncode == 0
    assert key_path.read_bytes() != key1 and csr_path.read_bytes() != csr1
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    # Asking for another key type does not replace a key silently.
    rsa_wish = run_cli("enroll", "--config", str(cfg), "--key-type", "rsa", *owner_args())
    assert rsa_wish.returncode == 0
    assert "kept the existing EC P-256 key; --force replaces it with a new RSA 2048 key" in rsa_wish.stdout


def test_enroll_tightens_a_readable_key_and_rewrites_a_foreign_csr(cfg: Path, ca: TestCA) -> None:
    assert run_cli("enroll", "--config", str(cfg), *owner_args()).returncode == 0
    key_path, csr_path = cfg.parent / "pki/device.key", cfg.parent / "pki/device.csr"
    key_path.chmod(0o644)
    # A CSR left over from another device (other key, other CN) must not be kept.
    other = ec.generate_private_key(ec.SECP256R1())
    csr_path.write_bytes(provision.build_csr(other, "someone-else").public_bytes(serialization.Encoding.PEM))
    result = run_cli("enroll", "--config", str(cfg), *owner_args())
    assert result.returncode == 0
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert "tightened the mode" in result.stdout
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    csr = x509.load_pem_x509_csr(csr_path.read_bytes())
    assert csr.subject.rfc4514_string() == "CN=gw-0001"
    assert csr.public_key().public_numbers() == key.public_key().public_numbers()  # type: ignore[union-attr]


def test_encrypted_key_uses_key_password_file(tmp_path: Path, ca: TestCA) -> None:
    secret = tmp_path / "key.pass"
    secret.write_text("s3cret\n")
    cfg = device_config(tmp_path, ca.cert_path, key_password_file=str(secret))
    assert run_cli("enroll", "--config", str(cfg), *owner_args()).returncode == 0
    key_path = tmp_path / "pki/device.key"
    assert b"ENCRYPTED" in key_path.read_bytes()
    serialization.load_pem_private_key(key_path.read_bytes(), password=b"s3cret")
    sign(ca, tmp_path / "pki/device.csr", tmp_path / "signed.pem")
    assert run_cli("enroll", "--config", str(cfg), "--install-cert", str(tmp_path / "signed.pem")).returncode == 0
    load_config(cfg)  # the agent can now load the whole config, certificate and encrypted key included


def test_unreadable_existing_key_is_not_overwritten(cfg: Path) -> None:
    key_path = cfg.parent / "pki/device.key"
    key_path.parent.mkdir()
    key_path.write_bytes(b"not a key\n")
    result = run_cli("enroll", "--config", str(cfg), *owner_args())
    assert result.returncode == 1
    assert "--force" in result.stderr
    assert key_path.read_bytes() == b"not a key\n"


def test_owner_rules() -> None:
    try:
        service = pwd.getpwnam(provision.DEFAULT_OWNER)
    except KeyError:
        with pytest.raises(provision.EnrollError, match=r"deploy/install\.sh"):
            provision.resolve_owner(None, euid=0)
    else:  # the service user exists on this machine: as root it is the default owner
        assert provision.resolve_owner(None, euid=0) == provision.Owner(service.pw_name, service.pw_uid,
                                                                         service.pw_gid)
    with pytest.raises(provision.EnrollError, match="does not exist"):
        provision.resolve_owner("no-such-user-xyz", euid=0)
    daemon = provision.resolve_owner(OTHER_USER, euid=0)
    assert daemon is not None and daemon.uid == pwd.getpwnam(OTHER_USER).pw_uid
    nobody = pwd.getpwnam("nobody").pw_uid
    assert provision.resolve_owner(None, euid=nobody) is None  # unprivileged: the key stays the caller's
    with pytest.raises(provision.EnrollError, match="only root"):
        provision.resolve_owner(OTHER_USER, euid=nobody)


# --- installing the signed certificate -----------------------------------------------------------


@pytest.fixture
def enrolled(cfg: Path) -> Path:
    result = run_cli("enroll", "--config", str(cfg), *owner_args())
    assert result.returncode == 0, result.stderr
    return cfg


def test_printed_openssl_command_signs_and_install_cert_installs(enrolled: Path, ca: TestCA) -> None:
    out = run_cli("enroll", "--config", str(enrolled), *owner_args()).stdout
    line = next(ln.strip() for ln in out.splitlines() if ln.strip().startswith("openssl x509 -req"))
    argv = [{"fleet-ca.pem": str(ca.cert_path), "fleet-ca.key": str(ca.key_path)}.get(a, a) for a in shlex.split(line)]
    pki_dir = enrolled.parent / "pki"
    incoming = enrolled.parent / "incoming"
    incoming.mkdir()
    subprocess.run(argv, cwd=pki_dir, check=True, capture_output=True, timeout=60)
    signed = incoming / "device.pem"
    (pki_dir / "device.pem").rename(signed)  # as if copied back from the CA machine
    result = run_cli("enroll", "--config", str(enrolled), "--install-cert", str(signed))
    assert result.returncode == 0, result.stderr
    assert "certificate installed" in result.stdout
    cert_path = pki_dir / "device.pem"
    assert stat.S_IMODE(cert_path.stat().st_mode) == 0o644
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    cert.verify_directly_issued_by(ca.cert)
    assert cert.subject.rfc4514_string() == "CN=gw-0001"
    # openssl copied the requested extensions: SAN and clientAuth.
    assert cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName) == ["gw-0001"]
    assert sorted(p.name for p in pki_dir.iterdir()) == ["device.csr", "device.key", "device.pem"]
    load_config(enrolled)
    check = run_cli("check-config", "--config", str(enrolled), "--quiet")
    assert check.returncode == 0, check.stderr
    # Installing the same certificate again changes nothing.
    mtime = cert_path.stat().st_mtime_ns
    again = run_cli("enroll", "--config", str(enrolled), "--install-cert", str(signed))
    assert again.returncode == 0 and "unchanged" in again.stdout
    assert cert_path.stat().st_mtime_ns == mtime
    # enroll now sees an enrolled device and only explains renewal.
    status = run_cli("enroll", "--config", str(enrolled), *owner_args())
    assert "already enrolled" in status.stdout and "next steps" not in status.stdout


def test_install_cert_before_enroll_says_what_to_do(cfg: Path, ca: TestCA) -> None:
    other = ca.issue("gw-0001", filename="early")
    result = run_cli("enroll", "--config", str(cfg), "--install-cert", str(other.cert))
    assert result.returncode == 1
    assert "does not exist: run `mqtt-agent enroll` first" in result.stderr


def test_certificate_for_another_key_is_refused(enrolled: Path, ca: TestCA, tmp_path: Path) -> None:
    other = ca.issue("gw-0001", filename="other")  # right CN, wrong key
    result = run_cli("enroll", "--config", str(enrolled), "--install-cert", str(other.cert))
    assert result.returncode == 1
    assert "is not a certificate for this device's key" in result.stderr
    assert not (enrolled.parent / "pki/device.pem").exists()


def test_certificate_from_another_ca_is_refused_unless_that_ca_is_given(enrolled: Path, tmp_path: Path) -> None:
    rogue = TestCA(tmp_path / "rogue", name="rogue CA")
    signed = sign(rogue, enrolled.parent / "pki/device.csr", tmp_path / "rogue-signed.pem")
    result = run_cli("enroll", "--config", str(enrolled), "--install-cert", str(signed))
    assert result.returncode == 1
    assert "is not signed by a CA in" in result.stderr and "--ca FILE" in result.stderr
    assert not (enrolled.parent / "pki/device.pem").exists()
    # Device certificates may come from another CA than the broker's: --ca names it.
    ok = run_cli("enroll", "--config", str(enrolled), "--install-cert", str(signed), "--ca", str(rogue.cert_path))
    assert ok.returncode == 0, ok.stderr


def test_chain_with_intermediate_is_installed_leaf_first(enrolled: Path, ca: TestCA, tmp_path: Path) -> None:
    inter_cert, inter_key = intermediate_ca(ca)
    leaf = sign(ca, enrolled.parent / "pki/device.csr", tmp_path / "leaf.pem", issuer_cert=inter_cert,
                issuer_key=inter_key)
    bundle = tmp_path / "bundle.pem"
    # Intermediate first: the leaf is found by its key, whatever the order in the file.
    bundle.write_bytes(inter_cert.public_bytes(serialization.Encoding.PEM) + leaf.read_bytes())
    result = run_cli("enroll", "--config", str(enrolled), "--install-cert", str(bundle))
    assert result.returncode == 0, result.stderr
    installed = x509.load_pem_x509_certificates((enrolled.parent / "pki/device.pem").read_bytes())
    assert [c.subject.rfc4514_string() for c in installed] == ["CN=gw-0001", "CN=fleet intermediate"]
    # Without the intermediate the leaf does not chain to the CA.
    alone = run_cli("enroll", "--config", str(enrolled), "--install-cert", str(leaf), "--ca", str(ca.cert_path))
    assert alone.returncode == 1 and "is not signed by a CA" in alone.stderr


def test_expired_or_server_only_certificates_are_refused(enrolled: Path, ca: TestCA, tmp_path: Path) -> None:
    now = datetime.datetime.now(UTC)
    expired = sign(ca, enrolled.parent / "pki/device.csr", tmp_path / "expired.pem",
                   not_before=now - datetime.timedelta(days=10), not_after=now - datetime.timedelta(days=1))
    result = run_cli("enroll", "--config", str(enrolled), "--install-cert", str(expired))
    assert result.returncode == 1 and "expired on" in result.stderr
    server = sign(ca, enrolled.parent / "pki/device.csr", tmp_path / "server.pem",
                  eku=[ExtendedKeyUsageOID.SERVER_AUTH])
    result = run_cli("enroll", "--config", str(enrolled), "--install-cert", str(server))
    assert result.returncode == 1 and "clientAuth" in result.stderr
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("hello\n")
    result = run_cli("enroll", "--config", str(enrolled), "--install-cert", str(garbage))
    assert result.returncode == 1 and "holds no readable certificate" in result.stderr
    assert not (enrolled.parent / "pki/device.pem").exists()


def test_sha1_certificate_needs_security_level_0(tmp_path: Path, ca: TestCA) -> None:
    cfg = device_config(tmp_path, ca.cert_path, device_id="legacy-1")
    assert run_cli("enroll", "--config", str(cfg), "--key-type", "rsa", *owner_args()).returncode == 0
    signed = tmp_path / "sha1.pem"
    # cryptography refuses SHA1 signatures; legacy CAs made them with openssl like this.
    subprocess.run(["openssl", "x509", "-req", "-sha1", "-in", str(tmp_path / "pki/device.csr"), "-CA",
                    str(ca.cert_path), "-CAkey", str(ca.key_path), "-days", "30", "-copy_extensions", "copy",
                    "-out", str(signed)], check=True, capture_output=True, timeout=60)
    refused = run_cli("enroll", "--config", str(cfg), "--install-cert", str(signed))
    assert refused.returncode == 1
    assert "ca md too weak" in refused.stderr and "tls.security_level = 0" in refused.stderr
    assert "sha1.pem" in refused.stderr and ".tmp" not in refused.stderr
    assert not (tmp_path / "pki/device.pem").exists()
    legacy = device_config(tmp_path, ca.cert_path, device_id="legacy-1", security_level=0)
    accepted = run_cli("enroll", "--config", str(legacy), "--install-cert", str(signed))
    assert accepted.returncode == 0, accepted.stderr
    assert "warning: the certificate is signed with sha1WithRSAEncryption" in accepted.stdout


def test_option_combinations_are_checked(enrolled: Path) -> None:
    result = run_cli("enroll", "--config", str(enrolled), "--install-cert", "x.pem", "--force")
    assert result.returncode == 1 and "not to --install-cert" in result.stderr
    result = run_cli("enroll", "--config", str(enrolled), "--ca", "ca.pem", *owner_args())
    assert result.returncode == 1 and "--ca is used with --install-cert" in result.stderr
    helptext = run_cli("enroll", "--help").stdout
    for option in ("--device-id", "--key-type", "--force", "--install-cert", "--owner", "--ca"):
        assert option in helptext
