"""Device keys and certificate requests: the key types enroll and renewal make, and the CSR."""

from __future__ import annotations

import re
from typing import Any, Union

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.errors import AgentError

PrivateKey = Union[ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey]


KEY_TYPES = ("ec", "rsa")


# A SAN dNSName must be ASCII; device ids that are not host-name-like get only the CN.
_DNS_LIKE = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_.-]{0,251}[A-Za-z0-9_])?$")


def generate_key(key_type: str) -> PrivateKey:
    """EC P-256 (the default: small, fast on a Pi, accepted by every broker) or RSA 2048."""
    if key_type == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise AgentError(f"--key-type must be one of {', '.join(KEY_TYPES)}, got {key_type!r}")


def describe_key(key: PrivateKey | Any) -> str:
    """'EC P-256' / 'RSA 2048' for messages."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return {"secp256r1": "EC P-256", "secp384r1": "EC P-384"}.get(key.curve.name, f"EC {key.curve.name}")
    if isinstance(key, rsa.RSAPrivateKey):
        return f"RSA {key.key_size}"
    return type(key).__name__


def build_csr(key: PrivateKey, device_id: str) -> x509.CertificateSigningRequest:
    """A CSR for a TLS client certificate with the device id as CN and (if host-name-like) as DNS SAN."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)])
    )
    if _DNS_LIKE.match(device_id):
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(device_id)]), critical=False)
    # Requested extensions; a CA that copies them (openssl -copy_extensions copy) issues a proper client cert.
    builder = builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    return builder.sign(key, hashes.SHA256())

