"""TLS context construction and the explanations of TLS failures."""

from __future__ import annotations

import datetime
import ssl
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from agent.config import HostPort, TlsConfig
from agent.errors import TLSSetupError
from agent.tls.certs import cert_info, load_certificates
from agent.tls.context import build_context
from agent.tls.explain import explain_handshake_error


def test_security_level_is_applied_before_the_chain(pki) -> None:
    sha1 = pki.ca.issue("legacy", sha1=True, filename="legacy")
    with pytest.raises(TLSSetupError) as info:
        build_context(TlsConfig(ca_file=pki.ca.cert_path, cert_file=sha1.cert, key_file=sha1.key))
    assert info.value.exit_code == 78
    assert str(info.value) == (
        "client certificate legacy.pem is signed with sha1WithRSAEncryption, which OpenSSL security level 2 "
        "rejects (ca md too weak): set tls.security_level = 0 or reissue the certificate with SHA-256")
    ctx = build_context(TlsConfig(ca_file=pki.ca.cert_path, cert_file=sha1.cert, key_file=sha1.key,
                                  security_level=0))
    assert ctx.verify_mode == ssl.CERT_REQUIRED


def test_encrypted_key_needs_its_passphrase(pki, tmp_path: Path) -> None:
    locked = pki.ca.issue("locked", key_password="s3cret", filename="locked")
    cfg = TlsConfig(ca_file=pki.ca.cert_path, cert_file=locked.cert, key_file=locked.key)
    with pytest.raises(TLSSetupError) as info:
        build_context(cfg)
    assert "is encrypted and no passphrase is configured" in str(info.value)
    assert "set tls.key_password_file" in str(info.value)
    pw = tmp_path / "pw"
    pw.write_text("wrong\n")
    with pytest.raises(TLSSetupError) as info:
        build_context(TlsConfig(ca_file=pki.ca.cert_path, cert_file=locked.cert, key_file=locked.key,
                                key_password_file=pw))
    assert "is encrypted and could not be decrypted: check the passphrase" in str(info.value)
    pw.write_text("s3cret\n")
    build_context(TlsConfig(ca_file=pki.ca.cert_path, cert_file=locked.cert, key_file=locked.key,
                            key_password_file=pw))


def test_ca_file_that_is_not_a_certificate(tmp_path: Path) -> None:
    junk = tmp_path / "ca.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(TLSSetupError) as info:
        build_context(TlsConfig(ca_file=junk))
    assert f"tls.ca_file {junk} could not be loaded as CA certificates" in str(info.value)


def test_server_name_is_what_gets_verified(pki) -> None:
    ctx = build_context(TlsConfig(ca_file=pki.ca.cert_path, server_name="broker.test"))
    assert ctx.check_hostname and ctx.verify_name == "broker.test"  # type: ignore[attr-defined]
    insecure = build_context(TlsConfig(ca_file=pki.ca.cert_path, insecure=True))
    assert not insecure.check_hostname and insecure.verify_mode == ssl.CERT_REQUIRED


def test_cert_info_reports_what_operators_ask_about(pki) -> None:
    past = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=10)
    old = pki.ca.issue("old", not_before=past, not_after=past + datetime.timedelta(days=1), filename="old")
    info = cert_info(load_certificates(old.cert)[0])
    assert info.subject == "CN=old" and info.issuer == "CN=mqtt-agent test CA"
    assert info.names == ("DNS:old",) and info.signature == "sha256WithRSAEncryption" and info.key == "EC secp256r1"
    assert info.not_after < datetime.datetime.now(datetime.timezone.utc)


def test_expired_broker_certificate_explanation(pki) -> None:
    exc = ssl.SSLCertVerificationError(1, "certificate verify failed: certificate has expired")
    exc.verify_code = 10
    err = explain_handshake_error(exc, HostPort("b", 8883), TlsConfig())
    assert str(err).startswith("the broker certificate at b:8883 expired")
    assert "fix the clock (NTP)" in err.remedy


def test_plain_port_explanation() -> None:
    exc = ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number")
    exc.reason = "WRONG_VERSION_NUMBER"  # type: ignore[misc]
    err = explain_handshake_error(exc, HostPort("b", 1883), TlsConfig())
    assert "did not complete a TLS handshake" in str(err) and "tls.enabled = false" in str(err)


def test_der_expiry_reader_agrees_with_cryptography(pki, tmp_path: Path) -> None:
    """The metrics exporter reads notAfter without `cryptography`; it must agree with it exactly."""
    from agent.tls.certs import certificate_expiries

    far = datetime.datetime(2061, 3, 4, 5, 6, 7, tzinfo=datetime.timezone.utc)  # GeneralizedTime (>= 2050)
    certs = [
        pki.ca.cert_path,
        pki.device.cert,
        pki.ca.issue("legacy-sha1", sha1=True, filename="expiry-sha1").cert,
        pki.ca.issue("far", not_after=far, filename="expiry-far").cert,
    ]
    for path in certs:
        expected = [c.not_valid_after_utc.timestamp() for c in load_certificates(path)]
        assert certificate_expiries(path) == expected, path
    assert certificate_expiries(certs[3]) == [far.timestamp()]
    chain = tmp_path / "chain.pem"
    chain.write_bytes(b"".join(p.read_bytes() for p in certs))
    assert len(certificate_expiries(chain)) == 4
    der = tmp_path / "device.der"
    der.write_bytes(load_certificates(pki.device.cert)[0].public_bytes(Encoding.DER))
    assert certificate_expiries(der) == certificate_expiries(pki.device.cert)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    assert certificate_expiries(garbage) == []
    assert certificate_expiries(tmp_path / "missing.pem") == []

