"""Check 6: the TLS handshake exactly as the agent does it, and when it fails, diagnostic retries
that each relax one setting (as an engineer would with `openssl s_client`) to pinpoint the cause.

The retries never send credentials: a broker whose certificate did not verify must not get them.
The words come from agent.tls.explain_handshake_error, so the doctor and the agent's log agree.
"""

from __future__ import annotations

import datetime
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, replace

from cryptography import x509

from agent.config import Config, HostPort, TlsConfig
from agent.connection import probe
from agent.errors import TLSSetupError
from agent.tls.certs import cert_info, load_certificates
from agent.tls.context import build_context
from agent.tls.explain import (
    X509_V_ERR_CA_KEY_TOO_SMALL,
    X509_V_ERR_CA_MD_TOO_WEAK,
    X509_V_ERR_CERT_HAS_EXPIRED,
    X509_V_ERR_CERT_NOT_YET_VALID,
    X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT,
    X509_V_ERR_EE_KEY_TOO_SMALL,
    X509_V_ERR_HOSTNAME_MISMATCH,
    X509_V_ERR_IP_ADDRESS_MISMATCH,
    X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN,
    X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT,
    X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY,
    X509_V_ERR_UNABLE_TO_VERIFY_LEAF_SIGNATURE,
    explain_handshake_error,
)
from agent.tools.doctor.certs import chain_details, chain_notes
from agent.tools.doctor.report import CheckResult, fail, result

_UNTRUSTED = {X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT, X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT,
              X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN, X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY,
              X509_V_ERR_UNABLE_TO_VERIFY_LEAF_SIGNATURE}
_NOT_TLS = {"WRONG_VERSION_NUMBER", "UNEXPECTED_EOF_WHILE_READING", "RECORD_LAYER_FAILURE", "HTTP_REQUEST",
            "UNKNOWN_PROTOCOL", "PACKET_LENGTH_TOO_LONG"}


def handshake_code(exc: BaseException) -> str:
    """A stable finding code for a handshake failure."""
    code = getattr(exc, "verify_code", None)
    reason = getattr(exc, "reason", None) or ""
    if code in (X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH):
        return "hostname_mismatch"
    if code == X509_V_ERR_CA_MD_TOO_WEAK or reason == "CA_MD_TOO_WEAK":
        return "weak_signature"
    if code in (X509_V_ERR_EE_KEY_TOO_SMALL, X509_V_ERR_CA_KEY_TOO_SMALL):
        return "key_too_small"
    if code in _UNTRUSTED:
        return "untrusted_ca"
    if code == X509_V_ERR_CERT_HAS_EXPIRED:
        return "cert_expired"
    if code == X509_V_ERR_CERT_NOT_YET_VALID:
        return "cert_not_yet_valid"
    if "ALERT" in reason:
        return "client_cert_rejected" if "CERTIFICATE" in reason or reason.endswith(
            ("UNKNOWN_CA", "ACCESS_DENIED")) else "tls_alert"
    if reason in _NOT_TLS or isinstance(exc, (ssl.SSLEOFError, ConnectionResetError, ConnectionAbortedError,
                                                BrokenPipeError)):
        return "not_tls"
    return "tls_handshake_failed"


def setup_code(err: TLSSetupError) -> str:
    """A stable finding code for a failure to build the agent's TLS context."""
    reason = getattr(err.__cause__, "reason", None) or ""
    return {
        "CA_MD_TOO_WEAK": "client_cert_weak_signature",
        "EE_KEY_TOO_SMALL": "client_key_too_small",
        "KEY_VALUES_MISMATCH": "key_mismatch",
        "X509_CHECK_PRIVATE_KEY": "key_mismatch",
        "BAD_DECRYPT": "key_encrypted",
    }.get(reason, "tls_setup_failed")


@dataclass(frozen=True)
class _Variant:
    """One relaxed setting to retry the handshake with."""

    label: str
    tls: TlsConfig | None  # None: plain MQTT
    verify: bool = True
    confirms: str = ""  # what it proves when it connects

    @property
    def proof(self) -> str:
        return self.confirms or f"with {self.label} it connects"


def _variants(tls: TlsConfig, code: str, suggestion: str) -> list[_Variant]:
    """Relaxed settings to retry with, each alone, as an engineer would with `openssl s_client`."""
    if code == "not_tls":
        return [_Variant("plain MQTT without TLS", None)]
    out: list[_Variant] = []
    if tls.security_level > 0:
        out.append(_Variant("tls.security_level = 0", replace(tls, security_level=0)))
    if code == "hostname_mismatch" and suggestion and suggestion != tls.server_name:
        out.append(_Variant(f'tls.server_name = "{suggestion}"', replace(tls, server_name=suggestion, insecure=False)))
    if not tls.insecure:
        out.append(_Variant("tls.insecure = true (host-name check off)", replace(tls, insecure=True)))
    out.append(_Variant("certificate verification off (diagnosis only, not a setting)", replace(tls, insecure=True),
                        verify=False, confirms="the certificate chain is the cause: only with verification off "
                        "does it connect"))
    return out


@dataclass(frozen=True)
class Retry:
    """What one diagnostic retry showed."""

    label: str
    outcome: str
    tls_ok: bool


def _short(attempt: probe.Attempt) -> str:
    if attempt.tls_ok:
        answer = "; the broker answered CONNECT" if attempt.stage == probe.CONNACK else ""
        return f"handshake ok ({attempt.tls_version}){answer}"
    if attempt.stage == probe.TLS_REJECTED:
        return f"handshake done, then the broker rejected it ({short_error(attempt.error or Exception())})"
    return f"fails: {short_error(attempt.error or Exception(attempt.stage))}"


def _retry(cfg: Config, host: HostPort, probe_id: str, timeout: float, variant: _Variant) -> Retry:
    """One diagnostic connection without credentials."""
    label, tls, verify = variant.label, variant.tls, variant.verify
    ctx: ssl.SSLContext | None = None
    if tls is not None:
        try:
            ctx = build_context(tls)
        except TLSSetupError as err:
            return Retry(label, f"cannot even load the files: {err.cause}", False)
        if not verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
    attempt = probe.connect_attempt(cfg.mqtt, ctx, host, probe_id, timeout, label=label, credentials=False)
    if tls is None:
        ok = attempt.stage == probe.CONNACK
        return Retry(label, "the broker answered CONNECT in plain MQTT" if ok else f"no MQTT answer either "
                     f"({attempt.stage}: {attempt.error or attempt.connack_text or 'nothing'})", ok)
    return Retry(label, _short(attempt), attempt.tls_ok)


def _suggested_name(leaf: x509.Certificate | None) -> str:
    if leaf is None:
        return ""
    for entry in cert_info(leaf).names:
        kind, _, value = entry.partition(":")
        if kind in ("DNS", "CN") and not value.startswith("*"):
            return value
    return ""


def _client_cert_remedy(tls: TlsConfig, exc: BaseException, default: str, now: datetime.datetime) -> str:
    """The broker rejected our certificate: say what about it, from the certificate itself."""
    certs = load_certificates(tls.cert_file) if tls.cert_file else []
    if not certs:
        return default
    info = cert_info(certs[0])
    reason = str(getattr(exc, "reason", None) or "")
    if "EXPIRED" in reason:
        if info.not_after < now:
            return f"renew the device certificate (tls.cert_file {tls.cert_file}): it expired on " \
                   f"{info.not_after:%Y-%m-%d}"
        return (f"{tls.cert_file} is valid until {info.not_after:%Y-%m-%d} by this gateway's clock: the broker's clock "
                "or its view of the certificate differs; check the broker's time")
    if "UNKNOWN_CA" in reason:
        return (f"the broker does not trust {info.issuer}, the issuer of {tls.cert_file}: add that CA to the broker's "
                "client CA file (mosquitto: cafile), or get a device certificate from the CA the broker trusts")
    return default


def tls_failure(cfg: Config, host: HostPort, probe_id: str, timeout: float, exc: BaseException,
                 chain: Sequence[x509.Certificate], now: datetime.datetime, after_handshake: bool) -> CheckResult:
    """Check 6 for a failed handshake: the agent's explanation, refined by retries, plus the chain."""
    leaf = chain[0] if chain else None
    code = handshake_code(exc)
    if isinstance(exc, ssl.SSLError):
        err = explain_handshake_error(exc, host, cfg.tls, leaf)
    else:  # the peer hung up on our ClientHello: what a plain-MQTT port does
        err = TLSSetupError(f"{host} closed the connection during the TLS handshake ({short_error(exc)})",
                            remedy="check that this port serves MQTT over TLS (8883), or set tls.enabled = false "
                            "for a plain port")
    notes: list[str] = []
    variants: list[_Variant] = []
    retries: list[Retry] = []
    if code not in ("client_cert_rejected", "tls_alert"):
        # A broker's verdict on our certificate cannot be changed from this side: no retries for those.
        variants = _variants(cfg.tls, code, _suggested_name(leaf))
        retries = [_retry(cfg, host, probe_id, timeout, v) for v in variants]
    cause, remedy = err.cause, err.remedy
    if code == "client_cert_rejected":
        remedy = _client_cert_remedy(cfg.tls, exc, remedy, now)
    if after_handshake:
        cause += "; in TLS 1.3 the broker checks the client certificate after the handshake, and sent this alert then"
    fixed = [v for v, r in zip(variants, retries) if r.tls_ok]
    if retries:
        notes.append("diagnosis (retries without credentials):")
        notes.append(f"  as configured: {short_error(exc)}")
        notes += [f"  {r.label}: {r.outcome}" for r in retries]
    if fixed:
        cause += f"; confirmed: {fixed[0].proof}"
        if code == "not_tls":
            remedy = "this port serves plain MQTT: use the broker's TLS port (usually 8883) in mqtt.hosts, or set " \
                     "tls.enabled = false on a trusted network"
    elif retries:
        cause += "; no single relaxed setting makes it connect"
    if chain:
        notes += chain_notes(chain, host)
    details = {
        "error": str(exc),
        "verify_code": getattr(exc, "verify_code", None),
        "diagnosis": [{"setting": r.label, "result": r.outcome, "connects": r.tls_ok} for r in retries],
        "chain": chain_details(chain),
    }
    return result(6, str(host), f"handshake failed: {short_error(exc)}", [fail(code, cause, remedy)], details,
                  notes)


def short_error(exc: BaseException) -> str:
    """An error in words: the verify message, the TLS alert without underscores, or the OS error."""
    verify = getattr(exc, "verify_message", None)
    if verify:
        return str(verify).lower()
    reason = getattr(exc, "reason", None)
    if isinstance(exc, ssl.SSLError) and reason:
        return str(reason).lower().replace("_", " ")
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc)


def setup_failure(cfg: Config, host: HostPort, probe_id: str, timeout: float, err: TLSSetupError) -> CheckResult:
    """Check 6 when the agent cannot even build its TLS context from the files."""
    code = setup_code(err)
    notes: list[str] = []
    remedy = err.remedy
    details: dict[str, object] = {"error": str(err)}
    if code in ("client_cert_weak_signature", "client_key_too_small") and cfg.tls.security_level > 0:
        label = "tls.security_level = 0"
        try:
            relaxed = build_context(replace(cfg.tls, security_level=0))
        except TLSSetupError as again:
            return result(6, str(host), "the agent cannot set up TLS with these files",
                          [fail(code, err.cause, f"{remedy}; at tls.security_level = 0: {again.cause}")], details)
        attempt = probe.connect_attempt(cfg.mqtt, relaxed, host, probe_id, timeout, label=label, credentials=False)
        notes += ["diagnosis (retry without credentials):", f"  {label}: {_short(attempt)}"]
        details["diagnosis"] = [{"setting": label, "result": _short(attempt), "connects": attempt.tls_ok}]
        if not attempt.tls_ok:
            remedy = ("reissue the device certificate with SHA-256 (or a larger key): at tls.security_level = 0 the "
                      f"agent can load it, but the broker rejects it ({short_error(attempt.error or err)})")
    return result(6, str(host), "the agent cannot set up TLS with these files", [fail(code, err.cause, remedy)],
                  details, notes)
