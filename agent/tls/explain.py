"""TLS failures in words: why a chain did not load or a handshake failed, as cause + remedy
naming the setting; the broker's certificate fetched for the explanation.
"""

from __future__ import annotations

import datetime
import socket
import ssl
from pathlib import Path
from typing import TYPE_CHECKING

from agent.config import HostPort, TlsConfig, is_ip_address, read_secret
from agent.errors import EX_CONFIG, TLSSetupError

# `cryptography` is imported only where certificates are inspected (a TLS failure to explain, the doctor,
# enroll): it adds about 8 MiB to the agent's resident memory, which a healthy agent does not need.
if TYPE_CHECKING:
    from cryptography import x509
from agent.tls.certs import cert_info, load_certificates

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


def verify_name(tls: TlsConfig, host: str) -> str:
    """The name the broker certificate is checked against."""
    return tls.server_name or host


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
    """The broker's certificate, from one handshake without verification (for diagnosis only)."""
    chain, _ = fetch_chain(host, tls, timeout)
    return chain[0] if chain else None


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


# --- the broker's certificates, seen without verifying them (diagnosis only) -----------------------------


def unverified_context(tls: TlsConfig) -> ssl.SSLContext:
    """A context that accepts any broker certificate: for diagnosis only, never for MQTT with credentials."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if tls.cert_file and tls.key_file:
        try:
            password = read_secret(tls.key_password_file) if tls.key_password_file else None
            ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file), password=password)
        except (ssl.SSLError, OSError, ValueError):
            pass  # the broker still shows its certificate before it asks for ours
    return ctx


def peer_chain(sock: ssl.SSLSocket) -> list[x509.Certificate]:
    """The chain the peer sent, unverified (also after a failed handshake, when it is needed)."""
    from cryptography import x509  # only when there is a failure to explain
    # Python 3.13 made get_unverified_chain public (DER bytes); 3.10-3.12 have it on the internal
    # _sslobj (Certificate objects). It works even after a failed handshake, which is when we need it.
    getter = getattr(sock, "get_unverified_chain", None) or getattr(
        getattr(sock, "_sslobj", None), "get_unverified_chain", None)
    chain: list[x509.Certificate] = []
    if getter is not None:
        for item in getter() or []:
            der = item if isinstance(item, bytes) else item.public_bytes(2)  # 2 = _ssl.ENCODING_DER
            chain.append(x509.load_der_x509_certificate(der))
        return chain
    try:  # Python 3.9: the leaf only, and only after a completed handshake
        der = sock.getpeercert(binary_form=True)
    except (ValueError, OSError):
        return []
    return [x509.load_der_x509_certificate(der)] if der else []


def fetch_chain(host: HostPort, tls: TlsConfig, timeout: float) -> tuple[list[x509.Certificate], str]:
    """The certificate chain the broker sends, without verifying it. Returns (chain, error text or "")."""
    ctx = unverified_context(tls)
    try:
        raw = socket.create_connection((host.host, host.port), timeout=timeout)
    except OSError as exc:
        return [], exc.strerror or str(exc)
    error = ""
    with raw:
        sock = ctx.wrap_socket(raw, server_hostname=verify_name(tls, host.host), do_handshake_on_connect=False)
        try:
            sock.do_handshake()
        except (ssl.SSLError, OSError) as exc:
            error = str(exc)
        try:
            chain = peer_chain(sock)
        except ValueError as exc:
            chain, error = [], error or f"unreadable certificate: {exc}"
        sock.close()
    return chain, error

