"""Check 3: the certificates themselves: signature algorithm against the OpenSSL security level,
key size, validity window against the local clock, intended use, and the broker's name.

The assessments are pure functions of (certificate facts, settings, now); the callers read files
or hand in the chain the broker sent.
"""

from __future__ import annotations

import datetime
import ipaddress
import re
import ssl
from collections.abc import Sequence
from typing import Any

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from agent.config import Config, HostPort, TlsConfig
from agent.tls.certs import CertInfo, cert_info, load_certificates
from agent.tls.explain import (
    X509_V_ERR_HOSTNAME_MISMATCH,
    X509_V_ERR_IP_ADDRESS_MISMATCH,
    explain_handshake_error,
    verify_name,
)
from agent.tools.doctor.report import CheckResult, Finding, fail, result, skipped, warn

EXPIRY_WARNING_DAYS = 14  # time enough to renew; short-lived certificates (30 days) do not warn all the time
_OUTSIDE_VALIDITY = ("cert_expired", "cert_not_yet_valid")
# Bits of security each OpenSSL security level requires of keys and signatures (SSL_CTX_set_security_level(3)).
LEVEL_BITS = {0: 0, 1: 80, 2: 112, 3: 128, 4: 192, 5: 256}
_RSA_BITS = ((15360, 256), (7680, 192), (3072, 128), (2048, 112), (1024, 80))


def sha1_rejected_from() -> int:
    """The lowest security level that rejects SHA1 signatures: OpenSSL 3 counts SHA1 as < 80 bits."""
    return 1 if ssl.OPENSSL_VERSION_INFO >= (3,) else 2


def _md5(info: CertInfo) -> bool:
    return info.signature.startswith("md5")


def signature_rejected_at(info: CertInfo, level: int) -> bool:
    """Whether OpenSSL at `level` refuses the certificate's signature digest."""
    if not info.weak_signature:
        return False
    return level >= (1 if _md5(info) else sha1_rejected_from())


def key_security_bits(info: CertInfo) -> int | None:
    """Security bits of the certificate's key as OpenSSL counts them; None if unknown."""
    kind, _, size = info.key.partition(" ")
    digits = re.search(r"\d+", size)
    if kind == "RSA" and digits:
        bits = int(digits.group())
        return next((sec for limit, sec in _RSA_BITS if bits >= limit), 0)
    if kind == "EC" and digits:
        return int(digits.group()) // 2
    if "Ed25519" in info.key:
        return 128
    return None


def _day(when: datetime.datetime) -> str:
    return f"{when:%Y-%m-%d %H:%M} UTC"


def _clock_hint(now: datetime.datetime) -> str:
    if now.year < 2020:
        return (f"the local clock says {now:%Y-%m-%d}, which is wrong: a board without RTC boots in 1970 until "
                "NTP syncs; check `timedatectl` and the NTP service (systemd-timesyncd, chrony)")
    return "if the local clock is wrong, fix it first (`timedatectl`, NTP)"


def _not_yet_valid_hint(now: datetime.datetime) -> str:
    if now.year < 2020:
        return _clock_hint(now)
    # fake-hwclock (Raspberry Pi OS) restores the last shutdown time: plausible, but days or months behind.
    return ("check the local clock first (`timedatectl`): a board without RTC, such as a Raspberry Pi, starts in "
            "1970 or at its last shutdown time until NTP syncs; if the clock is right, the certificate was issued "
            "with a start date in the future")


def assess_certificate(info: CertInfo, *, label: str, role: str, level: int, now: datetime.datetime,
                       eku: Sequence[str] | None = None, check_signature: bool = True) -> list[Finding]:
    """Problems of one certificate. role: "client", "broker" or "ca" (decides the remedies)."""
    findings: list[Finding] = []
    reissue = ("reissue the device certificate" if role == "client"
               else "have the broker certificate reissued" if role == "broker" else "replace the CA certificate")
    if check_signature and signature_rejected_at(info, level):
        floor = 1 if _md5(info) else sha1_rejected_from()
        openssl = "OpenSSL 3" if ssl.OPENSSL_VERSION_INFO >= (3,) else "OpenSSL 1.1"
        findings.append(fail(
            "weak_signature",
            f"{label} is signed with {info.signature}: rejected at OpenSSL security level >= {floor} on {openssl} "
            f"(`ca md too weak`); tls.security_level is {level}",
            f"set tls.security_level = 0, or {reissue} with SHA-256",
        ))
    elif check_signature and info.weak_signature:
        findings.append(warn(
            "weak_signature",
            f"{label} is signed with {info.signature}; it is accepted only because tls.security_level = {level}",
            f"{reissue} with SHA-256, then set tls.security_level back to 2",
        ))
    bits = key_security_bits(info)
    if bits is not None and bits < LEVEL_BITS.get(level, 0):
        findings.append(fail(
            "key_too_small",
            f"{label} has a {info.key} key ({bits} bits of security), too small for OpenSSL security level {level}",
            f"{reissue} with an RSA 2048 or EC P-256 key, or lower tls.security_level",
        ))
    if info.not_before > now:
        findings.append(fail(
            "cert_not_yet_valid",
            f"{label} is not valid yet: valid from {_day(info.not_before)}, local clock {_day(now)}",
            _not_yet_valid_hint(now),
        ))
    elif info.not_after < now:
        days = (now - info.not_after).days
        findings.append(fail(
            "cert_expired",
            f"{label} expired on {_day(info.not_after)} ({days} day{'s' if days != 1 else ''} ago; "
            f"local clock {_day(now)})",
            f"{'renew the device certificate (tls.cert_file)' if role == 'client' else reissue}; "
            + _clock_hint(now),
        ))
    elif info.not_after - now < datetime.timedelta(days=EXPIRY_WARNING_DAYS):
        days = (info.not_after - now).days
        findings.append(warn(
            "cert_expires_soon",
            f"{label} expires in {days} day{'s' if days != 1 else ''}, on {_day(info.not_after)}",
            "renew the device certificate (tls.cert_file) before then" if role == "client" else f"{reissue} soon",
        ))
    wanted = {"client": ("clientAuth", "client authentication"), "broker": ("serverAuth", "server authentication")}
    if eku is not None and role in wanted and wanted[role][0] not in eku and "anyExtendedKeyUsage" not in eku:
        findings.append(warn(
            "wrong_key_usage",
            f"{label} does not allow {wanted[role][1]} (extended key usage: {', '.join(eku) or 'none'})",
            f"{reissue} with extendedKeyUsage = {wanted[role][0]}",
        ))
    return findings


def extended_key_usage(cert: x509.Certificate) -> list[str] | None:
    """EKU names, or None if the certificate has no EKU extension (then any use is allowed)."""
    try:
        ext = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return None
    names = {ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth", ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth",
             ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE: "anyExtendedKeyUsage"}
    return [names.get(oid, oid.dotted_string) for oid in ext]


def _dns_match(pattern: str, name: str) -> bool:
    pattern, name = pattern.lower().rstrip("."), name.lower().rstrip(".")
    if pattern == name:
        return True
    # A wildcard covers exactly one left-most label (RFC 6125), as OpenSSL checks it.
    if pattern.startswith("*.") and "." in name:
        return name.split(".", 1)[1] == pattern[2:] and pattern.count(".") >= 2
    return False


def name_matches(names: Sequence[str], name: str) -> bool:
    """Whether `name` (a DNS name or an IP address) is covered by cert_info-style names ("DNS:x", "IP:y", "CN:z")."""
    try:
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(name)
    except ValueError:
        ip = None
    for entry in names:
        kind, _, value = entry.partition(":")
        if ip is not None:
            if kind == "IP" and ipaddress.ip_address(value) == ip:
                return True
        elif kind in ("DNS", "CN") and _dns_match(value, name):
            return True
    return False


def describe(info: CertInfo) -> str:
    """One line of facts about a certificate, as the text report shows it."""
    names = f", names {', '.join(info.names)}" if info.names else ""
    return (f"subject {info.subject}, issuer {info.issuer}{names}, {info.signature}, {info.key}, "
            f"valid {info.not_before:%Y-%m-%d} to {info.not_after:%Y-%m-%d}")


def chain_notes(chain: Sequence[x509.Certificate], host: HostPort) -> list[str]:
    """The chain a broker sent, as text report lines."""
    lines = [f"certificate chain sent by {host}:"]
    lines += [f"  {i}: {describe(cert_info(c))}" for i, c in enumerate(chain)]
    return lines


def chain_details(chain: Sequence[x509.Certificate]) -> list[dict[str, Any]]:
    """The chain a broker sent, for --json."""
    return [cert_info(c).as_dict() for c in chain]


def check_local_certificates(cfg: Config, now: datetime.datetime) -> list[CheckResult]:
    """Check 3 for the files on this gateway: the CA file and the client certificate."""
    t = cfg.tls
    if not t.enabled:
        return [skipped(3, "", "tls.enabled = false")]
    out: list[CheckResult] = []
    if t.ca_file:
        cas = load_certificates(t.ca_file)
        if cas:
            findings: list[Finding] = []
            usable = 0
            for ca in cas:
                info = cert_info(ca)
                # OpenSSL does not check a trust anchor's own signature: only a non-root CA can be "too weak".
                found = assess_certificate(info, label=f"CA certificate {info.subject} in tls.ca_file", role="ca",
                                           level=t.security_level, now=now, check_signature=not info.self_signed)
                usable += not any(f.code in _OUTSIDE_VALIDITY for f in found)
                findings += found
            if usable and len(cas) > 1:
                # Another certificate in the file may be the one the broker chains to: an unusable extra only warns.
                findings = [warn(f.code, f.cause, f.remedy) if f.code in _OUTSIDE_VALIDITY else f for f in findings]
            first = cert_info(cas[0])
            more = f" and {len(cas) - 1} more" if len(cas) > 1 else ""
            out.append(result(3, "tls.ca_file", f"{first.subject}{more}, valid until {first.not_after:%Y-%m-%d}",
                              findings, {"certificates": [cert_info(c).as_dict() for c in cas]}))
        else:
            out.append(skipped(3, "tls.ca_file", "no certificate could be read (see check 2)"))
    if t.cert_file:
        certs = load_certificates(t.cert_file)
        if certs:
            info = cert_info(certs[0])
            findings = assess_certificate(info, label=f"client certificate {t.cert_file.name}", role="client",
                                          level=t.security_level, now=now, eku=extended_key_usage(certs[0]))
            out.append(result(3, "client certificate", f"{info.subject}, {info.signature}, {info.key}, valid until "
                              f"{info.not_after:%Y-%m-%d}", findings, {"certificate": info.as_dict()}))
        else:
            out.append(skipped(3, "client certificate", "no certificate could be read (see check 2)"))
    return out


def _name_mismatch(host: HostPort, tls: TlsConfig, leaf: x509.Certificate) -> Finding:
    """Word the mismatch exactly as the agent's log does (agent.tls.explain_handshake_error)."""
    probe = ssl.SSLCertVerificationError(1, "host name mismatch")
    ip_name = True
    try:
        ipaddress.ip_address(verify_name(tls, host.host))
    except ValueError:
        ip_name = False
    probe.verify_code = X509_V_ERR_IP_ADDRESS_MISMATCH if ip_name else X509_V_ERR_HOSTNAME_MISMATCH
    err = explain_handshake_error(probe, host, tls, leaf)
    return fail("hostname_mismatch", err.cause, err.remedy)


def check_broker_certificate(chain: Sequence[x509.Certificate], host: HostPort, tls: TlsConfig,
                             now: datetime.datetime) -> CheckResult:
    """Check 3 for the certificate chain a broker presented (fetched without verification)."""
    leaf = chain[0]
    info = cert_info(leaf)
    findings = assess_certificate(info, label=f"the broker certificate of {host}", role="broker",
                                  level=tls.security_level, now=now, eku=extended_key_usage(leaf))
    for cert in chain[1:]:
        ci = cert_info(cert)
        if ci.self_signed:
            continue  # a root: its own signature is not checked, and whether it is trusted is check 6's question
        findings += assess_certificate(ci, label=f"intermediate CA certificate {ci.subject} sent by {host}",
                                       role="ca", level=tls.security_level, now=now)
    name = verify_name(tls, host.host)
    matched = name_matches(info.names, name)
    if not matched and not tls.insecure:
        findings.append(_name_mismatch(host, tls, leaf))
    how = ("name not checked (tls.insecure = true)" if tls.insecure
           else f"matches {name}" if matched else f"does not match {name}")
    summary = f"{info.subject}, {', '.join(info.names) or 'no names'}, {info.signature}, valid until " \
              f"{info.not_after:%Y-%m-%d}, {how}"
    details = {"verify_name": name, "name_matches": matched, "chain": chain_details(chain)}
    return result(3, f"broker {host}", summary, findings, details)
