"""certcheck on cryptography < 41 (Debian 12's python3-cryptography 38, used by the Debian package), which has
no Certificate.signature_algorithm_parameters: the parameters derived from the signature's OID verify."""

from __future__ import annotations

import datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID

from agent.tls.check import _signature_parameters


def _cert(issuer_key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, pss: bool = False) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ca")])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
               .public_key(ec.generate_private_key(ec.SECP256R1()).public_key())
               .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1)))
    if pss:
        pss_padding = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
        return builder.sign(issuer_key, hashes.SHA256(), rsa_padding=pss_padding)  # type: ignore[arg-type]
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.mark.parametrize("kind", ["rsa-pkcs1", "rsa-pss", "ec"])
def test_parameters_from_the_oid_verify_the_signature(kind: str) -> None:
    key = ec.generate_private_key(ec.SECP256R1()) if kind == "ec" else rsa.generate_private_key(65537, 2048)
    cert = _cert(key, pss=kind == "rsa-pss")
    digest = cert.signature_hash_algorithm
    params = _signature_parameters(cert, key.public_key(), digest)
    if kind == "ec":
        key.public_key().verify(cert.signature, cert.tbs_certificate_bytes, params)  # type: ignore[call-arg]
    else:
        key.public_key().verify(cert.signature, cert.tbs_certificate_bytes, params, digest)  # type: ignore[call-arg, arg-type]
