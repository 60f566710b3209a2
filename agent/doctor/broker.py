"""Checks 6, 7 and 8 for one broker: the TLS handshake exactly as the agent does it (with diagnostic
retries that pinpoint the setting at fault), CONNACK in words, and the command subscription
(SUBACK, then a delivery probe, because some brokers grant every subscription and withhold messages).
"""

from __future__ import annotations

import datetime
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, replace

from cryptography import x509

from agent.config import Config, HostPort, MqttConfig, TlsConfig
from agent.doctor import probe
from agent.doctor.certs import chain_details, chain_notes
from agent.doctor.report import CheckResult, Finding, fail, result, skipped
from agent.errors import TLSSetupError
from agent.tls import (
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
    build_context,
    cert_info,
    explain_handshake_error,
    load_certificates,
)

_UNTRUSTED = {X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT, X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT,
              X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN, X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY,
              X509_V_ERR_UNABLE_TO_VERIFY_LEAF_SIGNATURE}
_NOT_TLS = {"WRONG_VERSION_NUMBER", "UNEXPECTED_EOF_WHILE_READING", "RECORD_LAYER_FAILURE", "HTTP_REQUEST",
            "UNKNOWN_PROTOCOL", "PACKET_LENGTH_TOO_LONG"}
# MQTT 3.1.1 CONNACK return codes as paho maps them onto MQTT 5 reason codes.
V311_RC = {0x84: 1, 0x85: 2, 0x88: 3, 0x86: 4, 0x87: 5}
UNTESTED = "untested"  # the delivery probe could not run
MAX_V311_CLIENT_ID = 23  # MQTT 3.1.1 brokers must accept 1..23 characters and may refuse longer ids


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
class Retry:
    label: str
    outcome: str
    tls_ok: bool


def _short(attempt: probe.Attempt) -> str:
    if attempt.tls_ok:
        answer = "; the broker answered CONNECT" if attempt.stage == probe.CONNACK else ""
        return f"handshake ok ({attempt.tls_version}){answer}"
    if attempt.stage == probe.TLS_REJECTED:
        return f"handshake done, then the broker rejected it ({_short_error(attempt.error or Exception())})"
    return f"fails: {_short_error(attempt.error or Exception(attempt.stage))}"


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


@dataclass(frozen=True)
class _Variant:
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


def _tls_failure(cfg: Config, host: HostPort, probe_id: str, timeout: float, exc: BaseException,
                 chain: Sequence[x509.Certificate], now: datetime.datetime, after_handshake: bool) -> CheckResult:
    leaf = chain[0] if chain else None
    code = handshake_code(exc)
    if isinstance(exc, ssl.SSLError):
        err = explain_handshake_error(exc, host, cfg.tls, leaf)
    else:  # the peer hung up on our ClientHello: what a plain-MQTT port does
        err = TLSSetupError(f"{host} closed the connection during the TLS handshake ({_short_error(exc)})",
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
        notes.append(f"  as configured: {_short_error(exc)}")
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
    return result(6, str(host), f"handshake failed: {_short_error(exc)}", [fail(code, cause, remedy)], details,
                  notes)


def _short_error(exc: BaseException) -> str:
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


def _setup_failure(cfg: Config, host: HostPort, probe_id: str, timeout: float, err: TLSSetupError) -> CheckResult:
    code = setup_code(err)
    notes: list[str] = []
    remedy = err.remedy
    details: dict[str, object] = {"error": str(err)}
    if code in ("client_cert_weak_signature", "client_key_too_small") and cfg.tls.security_level > 0:
        label = "tls.security_level = 0"
        attempt = probe.connect_attempt(cfg.mqtt, build_context(replace(cfg.tls, security_level=0)), host, probe_id,
                                        timeout, label=label, credentials=False)
        notes += ["diagnosis (retry without credentials):", f"  {label}: {_short(attempt)}"]
        details["diagnosis"] = [{"setting": label, "result": _short(attempt), "connects": attempt.tls_ok}]
        if not attempt.tls_ok:
            remedy = ("reissue the device certificate with SHA-256 (or a larger key): at tls.security_level = 0 the "
                      f"agent can load it, but the broker rejects it ({_short_error(attempt.error or err)})")
    return result(6, str(host), "the agent cannot set up TLS with these files", [fail(code, err.cause, remedy)],
                  details, notes)


def connack_finding(code: int, text: str, mqtt_cfg: MqttConfig, probe_id: str,
                    properties: dict[str, object] | None = None) -> Finding:
    """A refused CONNACK in words, with the setting to change."""
    v5 = mqtt_cfg.is_v5
    label = f"MQTT 5 CONNACK 0x{code:02X} {text}" if v5 else f"MQTT 3.1.1 CONNACK {V311_RC.get(code, code)} ({text})"
    user = mqtt_cfg.username
    secret = (f"mqtt.password_file ({mqtt_cfg.password_file})" if mqtt_cfg.password_file
              else "mqtt.password" if mqtt_cfg.password else "mqtt.password_file (not set)")
    if code == 0x86:
        if not user:
            return fail("bad_credentials", f"the broker wants a user name and password ({label})",
                        "set mqtt.username and mqtt.password_file (Hono: user name DEVICE-AUTH-ID@TENANT)")
        return fail("bad_credentials", f"the broker rejected user name {user!r} or its password ({label})",
                    f"check mqtt.username ({user!r}) and the password in {secret}; "
                    "Hono expects the user name as DEVICE-AUTH-ID@TENANT")
    if code == 0x87:
        if user:
            return fail(
                "not_authorized",
                f"the broker refused user {user!r}: not authorized ({label}); mosquitto and other brokers answer "
                "a wrong user name or password this way too",
                f"check mqtt.username ({user!r}) and the password in {secret}; if both are right, the broker's "
                "configuration does not allow this user to connect",
            )
        return fail("not_authorized", f"the broker refused the connection: not authorized ({label}); it does not "
                    "accept this client without credentials",
                    "set mqtt.username and mqtt.password_file to the device's credentials, or have the broker accept "
                    "the client certificate as identity (mosquitto: use_identity_as_username true)")
    if code == 0x85:
        long_probe = not v5 and len(probe_id) > MAX_V311_CLIENT_ID >= len(mqtt_cfg.client_id)
        why = (f"the probe id has {len(probe_id)} characters and MQTT 3.1.1 brokers may refuse more than "
               f"{MAX_V311_CLIENT_ID}; the agent's own id {mqtt_cfg.client_id!r} is short enough and not affected"
               if long_probe else
               "if the broker ties client ids to users or certificates, it accepts only the production id, which "
               "the doctor never uses; otherwise check the broker's client-id rules for mqtt.client_id")
        return fail("client_id_rejected", f"the broker rejected the client id {probe_id!r} ({label})", why)
    if code == 0x84:
        other = "3.1.1" if v5 else "5"
        return fail("protocol_unsupported", f"the broker does not speak MQTT {mqtt_cfg.protocol} ({label})",
                    f'set mqtt.protocol = "{other}" (Eclipse Hono speaks 3.1.1 only)')
    if code in (0x88, 0x89):
        return fail("broker_unavailable", f"the broker is up but cannot serve logins now ({label})",
                    "retry later and check the broker's log (Hono: its device registry or auth service may be down)")
    if code in (0x9C, 0x9D):
        ref = (properties or {}).get("ServerReference")
        return fail("server_moved", f"the broker sends this client elsewhere ({label}){f': {ref}' if ref else ''}",
                    f"put {ref} in mqtt.hosts" if ref else "ask the broker operator for the new address")
    if code == 0x8A:
        return fail("banned", f"the broker has banned this client ({label})", "ask the broker operator")
    if code in (0x97, 0x9F):
        return fail("rate_limited", f"the broker limits connections ({label})",
                    "retry later; if many gateways share one account, give each its own credentials")
    return fail("connect_refused", f"the broker refused the connection ({label})",
                "check the broker's log for this client")


def delivery_topic(command_topic: str, probe_id: str) -> str:
    """A topic the command subscription matches but the agent does not parse as a command (5 segments)."""
    prefix, tenant, device, action, _ = command_topic.split("/")
    return "/".join((prefix, tenant, "doctor-probe" if device == "+" else device, action, probe_id))


_SUBACK_WORDS = {
    0x80: "failure: the broker's ACL does not allow this client to subscribe to it",
    0x87: "not authorized: the broker's ACL does not allow this client to subscribe to it",
    0x8F: "the broker considers the topic filter invalid",
    0x97: "the broker's subscription quota is exhausted",
    0x9E: "the broker does not support shared subscriptions",
    0xA2: "the broker does not support wildcard subscriptions",
}


def _identity(cfg: Config) -> str:
    if cfg.mqtt.username:
        return f"user {cfg.mqtt.username!r}"
    if cfg.tls.enabled and cfg.tls.cert_file:
        return "this client (identified by its certificate)"
    return "anonymous clients"


def _acl_hint(cfg: Config) -> str:
    user = f"`user {cfg.mqtt.username}` then " if cfg.mqtt.username else ""
    return f"mosquitto acl_file: {user}`topic read {cfg.mqtt.command_topic}`"


def check_subscribe(cfg: Config, host: HostPort, attempt: probe.Attempt, ctx: ssl.SSLContext | None,
                    probe_id: str, timeout: float) -> CheckResult:
    """Check 8 on an accepted probe connection (which it closes)."""
    topic, qos = cfg.mqtt.command_topic, cfg.mqtt.qos
    sub = probe.subscribe(attempt, topic, qos, timeout)
    target = str(host)
    if sub.granted is None:
        attempt.close()
        return result(8, target, f"no answer to SUBSCRIBE {topic}", [fail(
            "no_suback", f"the broker did not acknowledge the subscription to {topic}: {sub.text}",
            "check the broker's log for this client; some brokers drop a client whose subscription they refuse")])
    if not sub.granted:
        attempt.close()
        assert sub.code is not None
        words = _SUBACK_WORDS.get(sub.code, sub.text)
        return result(8, target, f"refused: SUBACK 0x{sub.code:02X}", [fail(
            "subscribe_refused",
            f"the broker refused the subscription to {topic} (SUBACK 0x{sub.code:02X}, {words}): commands cannot "
            "arrive",
            f"allow {_identity(cfg)} to subscribe to {topic} in the broker's ACL ({_acl_hint(cfg)}; "
            "mosquitto dynamic security: a subscribePattern ACL)",
        )], {"suback": sub.code})
    granted = f"granted QoS {sub.code} (SUBACK 0x{sub.code:02X})"
    details: dict[str, object] = {"suback": sub.code}
    delivery, note = _probe_delivery(cfg, host, attempt, ctx, probe_id, timeout)
    details["delivery"] = delivery.outcome
    notes = []
    if delivery.other_topics:
        notes.append(f"{len(delivery.other_topics)} command(s) arrived during the probe ({delivery.other_topics[0]}"
                     f"{', ...' if len(delivery.other_topics) > 1 else ''}): the doctor neither ran nor "
                     "acknowledged them; a running agent receives its own copy")
    if delivery.outcome in (probe.NOT_DELIVERED, probe.NO_SUBSCRIBERS):
        return result(8, target, f"{granted}, but messages are not delivered", [fail(
            "command_topic_not_readable",
            f"the broker granted the subscription to {topic} but did not deliver a probe message published "
            f"there{f' (PUBACK: {delivery.text})' if delivery.text else ''}: its ACL does not let {_identity(cfg)} "
            "read the command topic, so commands never arrive",
            f"allow {_identity(cfg)} to read {topic} in the broker's ACL ({_acl_hint(cfg)}); mosquitto's "
            "acl_file never refuses a subscription, it withholds the messages",
        )], details, notes)
    return result(8, target, f"{granted}; {note}", (), details, notes)


def _probe_delivery(cfg: Config, host: HostPort, attempt: probe.Attempt, ctx: ssl.SSLContext | None,
                    probe_id: str, timeout: float) -> tuple[probe.DeliveryOutcome, str]:
    """Publish on the command topic and see whether it comes back. With MQTT 3.1.1 a PUBACK cannot say
    "not allowed to publish", so that question goes over an MQTT 5 connection (same TLS and credentials)."""
    topic = delivery_topic(cfg.mqtt.command_topic, probe_id)
    if not cfg.mqtt.is_v5:
        attempt.close()
        attempt = probe.connect_attempt(replace(cfg.mqtt, protocol="5"), ctx, host, probe_id, timeout,
                                        label="MQTT 5 delivery probe", keep_open=True)
        if not attempt.accepted:
            reason = attempt.connack_text or attempt.stage
            return probe.DeliveryOutcome(UNTESTED), f"delivery not tested (the broker does not accept MQTT 5: {reason})"
        sub = probe.subscribe(attempt, cfg.mqtt.command_topic, cfg.mqtt.qos, timeout)
        if not sub.granted:
            attempt.close()
            return probe.DeliveryOutcome(UNTESTED), f"delivery not tested (MQTT 5 subscription: {sub.text})"
    try:
        outcome = probe.delivery_probe(attempt, topic, timeout)
    finally:
        attempt.close()
    if outcome.outcome == probe.DELIVERED:
        return outcome, f"a probe message on {topic} came back: commands can arrive"
    if outcome.outcome == probe.PUBLISH_REFUSED:
        return outcome, ("delivery not tested: this client may not publish on the command topic (PUBACK "
                         f"{outcome.text}), as it should be")
    if outcome.outcome == probe.CLOSED_ON_PUBLISH:
        return outcome, "delivery not tested: the broker closed the connection on the probe publish (Hono does)"
    return outcome, ""


def check_broker(cfg: Config, host: HostPort, probe_id: str, timeout: float,
                 chain: Sequence[x509.Certificate], now: datetime.datetime) -> list[CheckResult]:
    """Checks 6-8 for one broker whose TCP port answered."""
    target = str(host)
    ctx: ssl.SSLContext | None = None
    if cfg.tls.enabled:
        try:
            ctx = build_context(cfg.tls)
        except TLSSetupError as err:
            return [_setup_failure(cfg, host, probe_id, timeout, err),
                    skipped(7, target, "TLS could not be set up"), skipped(8, target, "TLS could not be set up")]
    attempt = probe.connect_attempt(cfg.mqtt, ctx, host, probe_id, timeout, keep_open=True)
    out: list[CheckResult] = []
    if attempt.stage == probe.TCP_FAILED:
        failed = fail("tcp_error", f"connecting to {host} failed this time: {attempt.error}",
                      "the port answered a moment ago: the broker or the link is unstable; run the doctor again")
        if ctx is None:
            return [skipped(6, target, "tls.enabled = false (plain MQTT)"),
                    result(7, target, "connect failed", [failed]), skipped(8, target, "the connection failed")]
        return [result(6, target, "connect failed", [failed]), skipped(7, target, "the connection failed"),
                skipped(8, target, "the connection failed")]
    if attempt.stage in (probe.TLS_FAILED, probe.TLS_REJECTED):
        assert attempt.error is not None
        return [_tls_failure(cfg, host, probe_id, timeout, attempt.error, chain, now,
                             after_handshake=attempt.stage == probe.TLS_REJECTED),
                skipped(7, target, "the TLS handshake failed"), skipped(8, target, "the TLS handshake failed")]
    if ctx is None:
        out.append(skipped(6, target, "tls.enabled = false (plain MQTT)"))
    else:
        client_cert = ", client certificate accepted" if cfg.tls.cert_file and attempt.stage == probe.CONNACK else ""
        name = "host name not checked (tls.insecure)" if cfg.tls.insecure else "broker certificate verified"
        out.append(result(6, target, f"{attempt.tls_version}, {attempt.cipher}, {name}{client_cert}",
                          details={"version": attempt.tls_version, "cipher": attempt.cipher,
                                   "chain": chain_details(chain)}))
    out.append(_connect_result(cfg, host, attempt, probe_id, timeout))
    if attempt.accepted:
        out.append(check_subscribe(cfg, host, attempt, ctx, probe_id, timeout))
    else:
        attempt.close()
        out.append(skipped(8, target, "the broker did not accept the connection"))
    return out


def _connect_result(cfg: Config, host: HostPort, attempt: probe.Attempt, probe_id: str,
                    timeout: float) -> CheckResult:
    target = str(host)
    proto = f"MQTT {cfg.mqtt.protocol}"
    details: dict[str, object] = {"protocol": cfg.mqtt.protocol, "client_id": probe_id, "stage": attempt.stage,
                                  "connack": attempt.connack, "properties": attempt.properties}
    if attempt.accepted:
        ka = attempt.properties.get("ServerKeepAlive")
        extra = f", the broker sets keepalive {ka} s" if ka is not None else ""
        return result(7, target, f"accepted {probe_id} ({proto}) in {attempt.seconds * 1000:.0f} ms{extra}",
                      details=details)
    if attempt.stage == probe.CONNACK:
        assert attempt.connack is not None
        finding = connack_finding(attempt.connack, attempt.connack_text, cfg.mqtt, probe_id, attempt.properties)
        return result(7, target, f"refused: {attempt.connack_text}", [finding], details)
    if attempt.stage == probe.CLOSED:
        return result(7, target, "closed without CONNACK", [fail(
            "closed_before_connack",
            f"the broker closed the connection without answering CONNECT ({proto}, client id {probe_id})",
            "check the broker's log for this client: it may want the other MQTT version (mqtt.protocol), "
            "refuse this certificate or user, or limit connections",
        )], details)
    return result(7, target, f"no CONNACK within {timeout:g} s", [fail(
        "no_connack", f"the broker did not answer CONNECT within {timeout:g} s",
        f"check that {host} serves MQTT ({'TLS' if cfg.tls.enabled else 'plain'}); the broker may be overloaded; "
        "retry with a larger --timeout",
    )], details)
