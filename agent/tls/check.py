"""The one chain checker: is this certificate chain usable with this private key?

`enroll --install-cert`, certificate renewal (exec signer, `cert.install`) and `doctor` all ask the
same question before a certificate is trusted with the device's identity: the leaf's public key is the
device key's, it chains (through intermediates given with it) to a CA in tls.ca_file, it is inside its
validity, it may be used for TLS client authentication, and OpenSSL loads it with the key at the
configured tls.security_level exactly as the agent will. Nothing here writes a file the agent uses.
"""

from __future__ import annotations

import datetime
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, SignatureAlgorithmOID

from agent.errors import AgentError
from agent.tls.certs import cert_info

PrivateKey = Union[ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey]

# Why a chain was refused, as a short stable word (metrics label, state file, doctor).
WRONG_KEY = "wrong_key"
UNTRUSTED = "untrusted"
EXPIRED = "expired"
NOT_CLIENT_AUTH = "not_client_auth"
SECURITY_LEVEL = "security_level"
UNREADABLE = "unreadable"
NO_CA = "no_ca"


class CertCheckError(AgentError):
    """The chain is not usable; `reason` is one of the words above, the message says why and what to do."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class CheckedChain:
    """A chain that passed: leaf first, then intermediates (not the anchor), ready to be written as PEM."""

    leaf: x509.Certificate
    chain: list[x509.Certificate]
    subject: str
    issuer: str
    not_before: datetime.datetime
    not_after: datetime.datetime
    warnings: list[str] = field(default_factory=list)

    @property
    def pem(self) -> bytes:
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.chain)


def public_der(obj: Any) -> bytes:
    """SubjectPublicKeyInfo DER of a key, certificate or CSR (to compare identities)."""
    der: bytes = obj.public_key().public_bytes(serialization.Encoding.DER,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    return der


def issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """Whether `issuer` signed `cert`.

    Checked by hand rather than with Certificate.verify_directly_issued_by, which refuses SHA1
    signatures ("Unsupported signature algorithm"): legacy fleet CAs still issue them, and whether
    they are acceptable is tls.security_level's call, checked by OpenSSL in `openssl_accepts`.
    """
    if cert.issuer != issuer.subject:
        return False
    public = issuer.public_key()
    digest = cert.signature_hash_algorithm
    params = getattr(cert, "signature_algorithm_parameters", None)  # cryptography >= 41
    if params is None:
        params = _signature_parameters(cert, public, digest)
    try:
        if isinstance(public, rsa.RSAPublicKey) and isinstance(params, (padding.PKCS1v15, padding.PSS)) and digest:
            public.verify(cert.signature, cert.tbs_certificate_bytes, params, digest)
        elif isinstance(public, ec.EllipticCurvePublicKey) and isinstance(params, ec.ECDSA):
            public.verify(cert.signature, cert.tbs_certificate_bytes, params)
        else:
            cert.verify_directly_issued_by(issuer)
    except (InvalidSignature, UnsupportedAlgorithm, ValueError, TypeError, AttributeError):
        # AttributeError: verify_directly_issued_by is cryptography >= 40 (only other key types get there).
        return False
    return True


def _signature_parameters(cert: x509.Certificate, public: Any, digest: Any) -> Any:
    """The signature's padding (RSA) or ECDSA parameters from its algorithm OID, for cryptography < 41,
    which lacks Certificate.signature_algorithm_parameters: Debian 12 (and Raspberry Pi OS bookworm)
    ship python3-cryptography 38, which the Debian package uses."""
    if digest is None:
        return None
    if isinstance(public, ec.EllipticCurvePublicKey):
        return ec.ECDSA(digest)
    if isinstance(public, rsa.RSAPublicKey):
        if cert.signature_algorithm_oid == SignatureAlgorithmOID.RSASSA_PSS:
            return padding.PSS(mgf=padding.MGF1(digest), salt_length=padding.PSS.AUTO)
        return padding.PKCS1v15()
    return None


def chain_to_anchor(leaf: x509.Certificate, intermediates: Sequence[x509.Certificate],
                    anchors: Sequence[x509.Certificate]) -> list[x509.Certificate] | None:
    """The path leaf -> ... -> anchor through `intermediates`, or None if the leaf does not chain to an anchor."""
    path = [leaf]
    pool = list(intermediates)
    while len(path) <= len(intermediates) + 1:
        current = path[-1]
        anchor = next((a for a in anchors if issued_by(current, a)), None)
        if anchor is not None:
            return [*path, anchor]
        step = next((c for c in pool if issued_by(current, c)), None)
        if step is None:
            return None
        pool.remove(step)
        path.append(step)
    return None


def check_chain(certs: Sequence[x509.Certificate], key: PrivateKey, anchors: Sequence[x509.Certificate], *,
                now: datetime.datetime, source: str, anchor_file: Path | str, device_id: str | None = None,
                csr_hint: str = "sign this device's CSR") -> CheckedChain:
    """Check `certs` (leaf and intermediates, any order) against `key` and the CA `anchors`.

    Raises CertCheckError naming `source` (where the chain came from) and the fix. The OpenSSL load at
    the security level is a separate step (`openssl_accepts`), since it needs the files on disk.
    """
    if not certs:
        raise CertCheckError(UNREADABLE, f"{source} holds no readable certificate (PEM or DER expected)")
    mine = public_der(key)
    leaf = next((c for c in certs if public_der(c) == mine), None)
    if leaf is None:
        shown = cert_info(certs[0])
        raise CertCheckError(
            WRONG_KEY, f"{source} is not a certificate for this device's key (it is for {shown.subject}, "
            f"{shown.key}): {csr_hint} and return that certificate")
    if not anchors:
        raise CertCheckError(NO_CA, f"{anchor_file} holds no readable CA certificate")
    info = cert_info(leaf)
    chain = chain_to_anchor(leaf, [c for c in certs if c is not leaf], anchors)
    if chain is None:
        raise CertCheckError(UNTRUSTED, f"{source} (issuer: {info.issuer}) is not signed by a CA in {anchor_file}")
    warnings: list[str] = []
    if info.not_after < now:
        raise CertCheckError(EXPIRED, f"{source} expired on {info.not_after:%Y-%m-%d %H:%M} UTC (local clock: "
                             f"{now:%Y-%m-%d %H:%M} UTC); have the CSR signed again")
    if info.not_before > now:
        warnings.append(f"the certificate is valid only from {info.not_before:%Y-%m-%d %H:%M} UTC; the local clock "
                        f"says {now:%Y-%m-%d %H:%M} UTC (a board without RTC needs NTP before it can connect)")
    try:
        eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        eku = None
    if eku is not None and ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
        raise CertCheckError(NOT_CLIENT_AUTH, f"{source} may not be used for TLS client authentication (its "
                             "extended key usage lacks clientAuth), so brokers reject it: sign the CSR as a client "
                             "certificate (e.g. extendedKeyUsage = clientAuth)")
    cns = [str(a.value) for a in leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if device_id and cns != [device_id]:
        warnings.append(f"the certificate's subject is {info.subject}, not CN={device_id} (agent.device_id); "
                        "brokers that take the identity from the CN will see another device")
    if info.weak_signature:
        warnings.append(f"the certificate is signed with {info.signature}: OpenSSL accepts it only with "
                        "tls.security_level = 0; have it reissued with SHA-256")
    return CheckedChain(leaf=leaf, chain=chain[:-1], subject=info.subject, issuer=info.issuer,
                        not_before=info.not_before, not_after=info.not_after, warnings=warnings)


def openssl_accepts(cert_pem: bytes, key_file: Path, *, ca_file: Path | None, security_level: int,
                    key_password_file: Path | None, source: str, workdir: Path) -> None:
    """Let OpenSSL load the chain with the key at the security level, as the agent will. Raises CertCheckError.

    The chain is written to a private temporary file in `workdir` (removed afterwards)."""
    from agent.config import TlsConfig
    from agent.tls.context import build_context

    fd, tmp_name = tempfile.mkstemp(dir=workdir, prefix=".certcheck.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(cert_pem)
        tls = TlsConfig(ca_file=ca_file if ca_file and ca_file.exists() else None, cert_file=tmp,
                        key_file=key_file, key_password_file=key_password_file, security_level=security_level)
        try:
            build_context(tls)
        except AgentError as exc:
            # The message names the temporary file; the operator knows the source.
            text = str(exc).replace(str(tmp), source).replace(tmp.name, source)
            raise CertCheckError(SECURITY_LEVEL, f"OpenSSL does not accept the certificate with the key: "
                                 f"{text}") from exc
    finally:
        tmp.unlink(missing_ok=True)
