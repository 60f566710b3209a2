"""Reading certificates: PEM/DER files, what a certificate says (CertInfo), and expiry read
straight from the DER so a healthy agent never imports cryptography.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

# `cryptography` is imported only where certificates are inspected (a TLS failure to explain, the doctor,
# enroll): it adds about 8 MiB to the agent's resident memory, which a healthy agent does not need.
if TYPE_CHECKING:
    from cryptography import x509
_SIG_NAMES = {
    "1.2.840.113549.1.1.4": "md5WithRSAEncryption",
    "1.2.840.113549.1.1.5": "sha1WithRSAEncryption",
    "1.2.840.10045.4.1": "ecdsa-with-SHA1",
    "1.2.840.10040.4.3": "dsa-with-SHA1",
    "1.2.840.113549.1.1.11": "sha256WithRSAEncryption",
    "1.2.840.113549.1.1.12": "sha384WithRSAEncryption",
    "1.2.840.113549.1.1.13": "sha512WithRSAEncryption",
    "1.2.840.113549.1.1.10": "rsassaPss",
    "1.2.840.10045.4.3.2": "ecdsa-with-SHA256",
    "1.2.840.10045.4.3.3": "ecdsa-with-SHA384",
    "1.2.840.10045.4.3.4": "ecdsa-with-SHA512",
    "1.3.101.112": "ED25519",
}


WEAK_SIGNATURES = frozenset({"md5WithRSAEncryption", "sha1WithRSAEncryption", "ecdsa-with-SHA1", "dsa-with-SHA1"})


@dataclass(frozen=True)
class CertInfo:
    """The facts about a certificate an operator needs to see."""

    subject: str
    issuer: str
    names: tuple[str, ...]  # SAN entries as "DNS:x" / "IP:y"; CN if there is no SAN
    signature: str
    not_before: datetime.datetime
    not_after: datetime.datetime
    key: str

    @property
    def weak_signature(self) -> bool:
        return self.signature in WEAK_SIGNATURES

    @property
    def self_signed(self) -> bool:
        return self.subject == self.issuer

    def as_dict(self) -> dict[str, Any]:
        return {
            "subject": self.subject,
            "issuer": self.issuer,
            "names": list(self.names),
            "signature_algorithm": self.signature,
            "not_before": self.not_before.isoformat(),
            "not_after": self.not_after.isoformat(),
            "key": self.key,
        }


def _utc(cert: x509.Certificate, attr: str) -> datetime.datetime:
    value = getattr(cert, attr + "_utc", None)
    if value is None:  # cryptography < 42
        value = getattr(cert, attr).replace(tzinfo=datetime.timezone.utc)
    return value  # type: ignore[no-any-return]


def cert_info(cert: x509.Certificate) -> CertInfo:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    oid = cert.signature_algorithm_oid.dotted_string
    signature = _SIG_NAMES.get(oid) or str(getattr(cert.signature_algorithm_oid, "_name", oid))
    names: list[str] = []
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names += [f"DNS:{n}" for n in san.get_values_for_type(x509.DNSName)]
        names += [f"IP:{ip}" for ip in san.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        cns = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        names += [f"CN:{a.value!s}" for a in cns]
    public = cert.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        key = f"RSA {public.key_size}"
    elif isinstance(public, ec.EllipticCurvePublicKey):
        key = f"EC {public.curve.name}"
    else:
        key = type(public).__name__
    return CertInfo(
        subject=cert.subject.rfc4514_string(),
        issuer=cert.issuer.rfc4514_string(),
        names=tuple(names),
        signature=signature,
        not_before=_utc(cert, "not_valid_before"),
        not_after=_utc(cert, "not_valid_after"),
        key=key,
    )


_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----(.+?)-----END CERTIFICATE-----", re.S)


def _certificate_ders(path: Path) -> list[bytes]:
    """The DER bytes of every certificate in a PEM (or DER) file, in file order; [] if unreadable."""
    try:
        data = path.read_bytes()
    except OSError:
        return []
    if b"-----BEGIN" not in data:
        return [data]
    try:
        return [base64.b64decode(b"".join(m.split())) for m in _PEM_CERT.findall(data)]
    except binascii.Error:
        return []


def load_certificates(path: Path) -> list[x509.Certificate]:
    """Every certificate in a PEM (or DER) file; [] if none can be read."""
    from cryptography import x509

    try:
        return [x509.load_der_x509_certificate(der) for der in _certificate_ders(path)]
    except ValueError:
        return []


def _der_item(data: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, start of content, end of content) of the DER element at `pos`. Raises ValueError."""
    if pos + 2 > len(data):
        raise ValueError("truncated DER")
    tag, length = data[pos], data[pos + 1]
    pos += 2
    if length & 0x80:
        count = length & 0x7F
        if not 0 < count <= 4 or pos + count > len(data):
            raise ValueError("bad DER length")
        length = int.from_bytes(data[pos:pos + count], "big")
        pos += count
    if pos + length > len(data):
        raise ValueError("truncated DER")
    return tag, pos, pos + length


def der_not_after(der: bytes) -> float:
    """The notAfter of a DER certificate as a Unix time, read from the ASN.1 directly: the metrics
    exporter needs only this, and it should not cost the agent the `cryptography` import. Raises ValueError."""
    _, cert, _ = _der_item(der, 0)  # Certificate ::= SEQUENCE {
    _, pos, _ = _der_item(der, cert)  # tbsCertificate ::= SEQUENCE {
    tag, _, end = _der_item(der, pos)
    if tag == 0xA0:  # [0] version, present from v2 on
        pos = end
    for _ in range(3):  # serialNumber, signature, issuer
        pos = _der_item(der, pos)[2]
    tag, validity, _ = _der_item(der, pos)
    if tag != 0x30:
        raise ValueError("no validity in the certificate")
    not_before_end = _der_item(der, validity)[2]
    tag, start, end = _der_item(der, not_before_end)
    text = der[start:end].decode("ascii")
    if tag == 0x17:  # UTCTime YYMMDDHHMMSSZ: years 1950-2049
        year = int(text[:2])
        text = f"{1900 + year if year >= 50 else 2000 + year}{text[2:]}"
    elif tag != 0x18:  # GeneralizedTime YYYYMMDDHHMMSSZ
        raise ValueError("unexpected time type in the certificate")
    when = datetime.datetime.strptime(text.rstrip("Z"), "%Y%m%d%H%M%S").replace(tzinfo=datetime.timezone.utc)
    return when.timestamp()


def certificate_expiries(path: Path) -> list[float]:
    """notAfter (Unix time) of every certificate in a PEM or DER file, in file order; [] if unreadable."""
    try:
        return [der_not_after(der) for der in _certificate_ders(path)]
    except (ValueError, UnicodeDecodeError):
        return []

