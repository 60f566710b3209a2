"""TLS context from the config, and TLS failures explained as cause + remedy.

The agent and `mqtt-agent doctor` build their context with the same function, so a diagnosis
reproduces exactly what the agent does.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import re
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.config import HostPort, TlsConfig, is_ip_address, read_secret
from agent.errors import EX_CONFIG, TLSSetupError

# `cryptography` is imported only where certificates are inspected (a TLS failure to explain, the doctor,
# enroll): it adds about 8 MiB to the agent's resident memory, which a healthy agent does not need.
if TYPE_CHECKING:
    from cryptography import x509

# OpenSSL verify codes (include/openssl/x509_vfy.h) the explanations below distinguish.
X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT = 2
X509_V_ERR_CERT_NOT_YET_VALID = 9
X509_V_ERR_CERT_HAS_EXPIRED = 10
X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT = 18
X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN = 19
X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY = 20
X509_V_ERR_UNABLE_TO_VERIFY_LEAF_SIGNATURE = 21
X509_V_ERR_HOSTNAME_MISMATCH = 62
X509_V_ERR_IP_ADDRESS_MISMATCH = 64
X509_V_ERR_EE_KEY_TOO_SMALL = 66
X509_V_ERR_CA_KEY_TOO_SMALL = 67
X509_V_ERR_CA_MD_TOO_WEAK = 68

_UNTRUSTED = {
    X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT,
    X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT,
    X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN,
    X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY,
    X509_V_ERR_UNABLE_TO_VERIFY_LEAF_SIGNATURE,
}

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


class _NamedTLSContext(ssl.SSLContext):
    """An SSLContext that verifies (and sends SNI for) a fixed name instead of the host dialled.

    paho passes the host it connects to as server_hostname; with tls.server_name set, the broker is
    reached by IP (or another alias) while its certificate is checked against its real name.
    """

    verify_name: str = ""

    def wrap_socket(self, sock: socket.socket, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        if self.verify_name and not kwargs.get("server_side"):
            kwargs["server_hostname"] = self.verify_name
        return super().wrap_socket(sock, *args, **kwargs)


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


def verify_name(tls: TlsConfig, host: str) -> str:
    """The name the broker certificate is checked against."""
    return tls.server_name or host


def build_context(tls: TlsConfig) -> ssl.SSLContext:
    """The client SSLContext the agent uses. Raises TLSSetupError (exit code 78) with cause and remedy."""
    ctx = _NamedTLSContext(ssl.PROTOCOL_TLS_CLIENT)
    # The security level must be set before load_cert_chain: OpenSSL checks the client certificate's
    # signature against the level while loading it, so a SHA1-signed certificate fails with
    # "ca md too weak" if the chain is loaded first.
    ctx.set_ciphers(f"DEFAULT:@SECLEVEL={tls.security_level}")
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.check_hostname = not tls.insecure
    ctx.verify_name = tls.server_name
    try:
        if tls.ca_file:
            ctx.load_verify_locations(cafile=str(tls.ca_file))
        else:
            ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    except (ssl.SSLError, OSError) as exc:
        raise _setup_error(
            f"tls.ca_file {tls.ca_file} could not be loaded as CA certificates ({exc})",
            "point tls.ca_file at the PEM file of the CA that issued the broker certificate",
        ) from exc
    if tls.cert_file and tls.key_file:
        if not tls.key_password_file and _is_encrypted_key(tls.key_file):
            raise _setup_error(f"tls.key_file {tls.key_file} is encrypted and no passphrase is configured",
                               "set tls.key_password_file to a file holding the key's passphrase")
        secret = read_secret(tls.key_password_file) if tls.key_password_file else ""
        try:
            # A callable, never None: with None, OpenSSL would prompt on the terminal and block the daemon.
            ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file), password=lambda: secret)
        except (ssl.SSLError, OSError) as exc:
            raise explain_chain_error(exc, tls) from exc
    return ctx


def _is_encrypted_key(path: Path) -> bool:
    try:
        head = path.read_bytes()[:4096]
    except OSError:
        return False
    return b"ENCRYPTED" in head


def _setup_error(cause: str, remedy: str) -> TLSSetupError:
    err = TLSSetupError(cause, remedy=remedy)
    err.exit_code = EX_CONFIG
    return err


def explain_chain_error(exc: BaseException, tls: TlsConfig) -> TLSSetupError:
    """Turn a load_cert_chain failure into cause + remedy."""
    reason = getattr(exc, "reason", None) or ""
    cert_path = tls.cert_file
    assert cert_path is not None
    certs = load_certificates(cert_path)
    if reason == "CA_MD_TOO_WEAK":
        sig = cert_info(certs[0]).signature if certs else "a weak digest"
        return _setup_error(
            f"client certificate {cert_path.name} is signed with {sig}, which OpenSSL security level "
            f"{tls.security_level} rejects (ca md too weak)",
            "set tls.security_level = 0 or reissue the certificate with SHA-256",
        )
    if reason == "EE_KEY_TOO_SMALL":
        key = cert_info(certs[0]).key if certs else "its key"
        return _setup_error(
            f"client certificate {cert_path.name} has a {key} key, too small for OpenSSL security level "
            f"{tls.security_level} (ee key too small)",
            "reissue the certificate with an RSA 2048 or EC P-256 key, or lower tls.security_level",
        )
    if reason in ("KEY_VALUES_MISMATCH", "X509_CHECK_PRIVATE_KEY"):
        return _setup_error(
            f"tls.key_file {tls.key_file} is not the private key of tls.cert_file {cert_path} (key values mismatch)",
            "point tls.key_file at the key the certificate was issued for",
        )
    assert tls.key_file is not None
    if reason in ("BAD_DECRYPT", "BAD_PASSWORD_READ") or "bad decrypt" in str(exc) or (
        _is_encrypted_key(tls.key_file) and reason in ("PEM_LIB", "")
    ):
        return _setup_error(
            f"tls.key_file {tls.key_file} is encrypted and could not be decrypted",
            "set tls.key_password_file to a file holding the key's passphrase"
            if not tls.key_password_file else "check the passphrase in tls.key_password_file",
        )
    if not certs:
        return _setup_error(
            f"tls.cert_file {cert_path} holds no readable certificate ({exc})",
            "point tls.cert_file at the device certificate in PEM format",
        )
    return _setup_error(
        f"the client certificate {cert_path} and key {tls.key_file} could not be loaded ({exc})",
        "check that both files are PEM and belong together",
    )


def fetch_peer_certificate(host: HostPort, tls: TlsConfig, timeout: float = 5.0) -> x509.Certificate | None:
    """Handshake once without verification to see the broker's certificate (for diagnosis only)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if tls.cert_file and tls.key_file and not tls.key_password_file:
        try:
            ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file))
        except (ssl.SSLError, OSError):
            pass  # the broker may still show its certificate without ours
    try:
        with socket.create_connection((host.host, host.port), timeout=timeout) as raw, ctx.wrap_socket(
            raw, server_hostname=verify_name(tls, host.host)
        ) as sock:
            der = sock.getpeercert(binary_form=True)
    except (OSError, ssl.SSLError, ValueError):
        return None
    from cryptography import x509

    return x509.load_der_x509_certificate(der) if der else None


def explain_handshake_error(
    exc: BaseException, host: HostPort, tls: TlsConfig, peer: x509.Certificate | None = None
) -> TLSSetupError:
    """Turn a TLS handshake failure into cause + remedy. `peer`: the broker certificate, if fetched."""
    info = cert_info(peer) if peer is not None else None
    name = verify_name(tls, host.host)
    code = getattr(exc, "verify_code", None)
    reason = getattr(exc, "reason", None) or ""
    shown = f" ({', '.join(info.names)})" if info and info.names else ""
    if code in (X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH):
        entries = [n.split(":", 1) for n in info.names] if info else []
        cert_names = [value for _, value in entries]
        # A name to verify against: a DNS name (or a CN) of the certificate, never one of its IP entries.
        suggestion = next((value for kind, value in entries if kind != "IP" and not is_ip_address(value)), "")
        remedy = (
            f'set tls.server_name = "{suggestion}" (connect by {host.host}, verify the name {suggestion}); '
            "or, weaker, tls.insecure = true to skip the name check"
            if suggestion and not tls.server_name
            else "connect by a name the certificate lists, or set tls.server_name to one of them; "
            "or, weaker, tls.insecure = true to skip the name check"
        )
        issued_for = f"is issued for {', '.join(cert_names)}" if cert_names else "does not list it"
        return TLSSetupError(
            f"host name verification failed: the broker certificate at {host} {issued_for}, "
            f"not for {name}{' (tls.server_name)' if tls.server_name else ''}",
            remedy=remedy,
        )
    if code == X509_V_ERR_CA_MD_TOO_WEAK or reason == "CA_MD_TOO_WEAK":
        sig = info.signature if info else "a weak digest"
        return TLSSetupError(
            f"the broker certificate at {host} is signed with {sig}, which OpenSSL security level "
            f"{tls.security_level} rejects (ca md too weak)",
            remedy="set tls.security_level = 0, or have the broker certificate reissued with SHA-256",
        )
    if code in (X509_V_ERR_EE_KEY_TOO_SMALL, X509_V_ERR_CA_KEY_TOO_SMALL):
        return TLSSetupError(
            f"the broker certificate at {host} uses a key too small for OpenSSL security level "
            f"{tls.security_level}{f' ({info.key})' if info else ''}",
            remedy="lower tls.security_level (1 accepts RSA 1024), or reissue the broker certificate",
        )
    if code in _UNTRUSTED:
        issuer = f" (issuer: {info.issuer})" if info else ""
        where = f"tls.ca_file {tls.ca_file}" if tls.ca_file else "the system trust store (tls.ca_file is not set)"
        return TLSSetupError(
            f"the broker certificate at {host}{shown} is not signed by a CA in {where}{issuer}",
            remedy="set tls.ca_file to the CA certificate that issued the broker certificate",
        )
    if code == X509_V_ERR_CERT_HAS_EXPIRED:
        when = f" on {info.not_after:%Y-%m-%d}" if info else ""
        return TLSSetupError(
            f"the broker certificate at {host} expired{when} (local clock: {_now():%Y-%m-%d %H:%M} UTC)",
            remedy="renew the broker certificate; if the date above is wrong, fix the clock (NTP)",
        )
    if code == X509_V_ERR_CERT_NOT_YET_VALID:
        when = f" before {info.not_before:%Y-%m-%d}" if info else ""
        return TLSSetupError(
            f"the broker certificate at {host} is not valid yet{when} (local clock: {_now():%Y-%m-%d %H:%M} UTC)",
            remedy="check the system clock: a board without RTC boots in 1970 until NTP syncs (timedatectl)",
        )
    alerts = {
        "TLSV13_ALERT_CERTIFICATE_REQUIRED": "the broker requires a client certificate",
        "SSLV3_ALERT_BAD_CERTIFICATE": "the broker rejected the client certificate",
        "TLSV1_ALERT_UNKNOWN_CA": "the broker does not trust the CA that issued the client certificate",
        "SSLV3_ALERT_CERTIFICATE_EXPIRED": "the broker says the client certificate has expired",
        "TLSV1_ALERT_ACCESS_DENIED": "the broker denied access to this client certificate",
    }
    if reason in alerts:
        remedy = (
            "set tls.cert_file and tls.key_file to the device certificate and key"
            if not tls.cert_file
            else f"check that {tls.cert_file} is issued by a CA the broker trusts and is still valid"
        )
        return TLSSetupError(f"{alerts[reason]} ({reason.lower()})", remedy=remedy)
    if reason in ("WRONG_VERSION_NUMBER", "UNEXPECTED_EOF_WHILE_READING", "RECORD_LAYER_FAILURE") or (
        isinstance(exc, ssl.SSLEOFError)
    ):
        return TLSSetupError(
            f"{host} did not complete a TLS handshake ({reason.lower() or exc})",
            remedy="check that this port serves MQTT over TLS (8883), or set tls.enabled = false for a plain port",
        )
    verify = getattr(exc, "verify_message", None)
    return TLSSetupError(f"TLS handshake with {host} failed: {verify or reason or exc}",
                         remedy="run `mqtt-agent doctor` for a step-by-step diagnosis")


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)
