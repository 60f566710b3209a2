"""Check 2: the TLS and secret files: parseable, private enough, readable by the service user,
and the key belongs to the certificate. Reads files only; never changes them."""

from __future__ import annotations

import grp
import os
import pwd
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent.config import Config, read_secret
from agent.tls.certs import load_certificates
from agent.tools.doctor.report import CheckResult, Finding, fail, result, warn

# A TLS handshake cannot work while one of these is true, so the TLS and MQTT checks are skipped.
BLOCKS_TLS = frozenset({
    "ca_unparseable", "cert_unparseable", "key_unparseable", "key_encrypted", "key_bad_passphrase", "key_mismatch",
})

_SIBLING_LIMIT = 50
_SIBLING_MAX_BYTES = 64 * 1024


def _spki(public_key: Any) -> bytes:
    data: bytes = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return data


def load_private_key(data: bytes, password: str | None) -> Any:
    """Parse a PEM or DER private key. Raises TypeError (passphrase missing) or ValueError."""
    secret = password.encode() if password is not None else None
    if b"-----BEGIN" in data:
        return serialization.load_pem_private_key(data, secret)
    return serialization.load_der_private_key(data, secret)


def _is_encrypted(data: bytes) -> bool:
    return b"ENCRYPTED" in data[:200]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _too_open(path: Path, what: str, config_key: str, code: str) -> Finding | None:
    """Warn when a secret file is readable by its group or by everyone."""
    try:
        mode = _mode(path)
    except OSError:
        return None
    if not mode & 0o044:
        return None
    who = "every user on this machine" if mode & 0o004 else "its group"
    return warn(
        code,
        f"{config_key} {path} ({what}) is readable by {who} (mode {mode:04o})",
        f"chmod 600 {path} (and chown it to the user the agent runs as)",
    )


def service_user(name: str | None) -> pwd.struct_passwd | None:
    """The account the systemd unit runs the agent as, if it exists and differs from ours."""
    if not name:
        return None
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        return None
    return None if pw.pw_uid == os.geteuid() else pw


def _allows(st: os.stat_result, uid: int, gids: set[int], bits: tuple[int, int, int]) -> bool:
    owner, group, other = bits
    if st.st_uid == uid:
        return bool(st.st_mode & owner)
    if st.st_gid in gids:
        return bool(st.st_mode & group)
    return bool(st.st_mode & other)


def access_blocker(path: Path, pw: pwd.struct_passwd) -> Path | None:
    """What stops user `pw` from reading `path`: a directory it cannot traverse, or the file itself; None if
    nothing does. Judged from owner, group and mode bits (POSIX ACLs are not read)."""
    if pw.pw_uid == 0:
        return None
    gids = {pw.pw_gid} | {g.gr_gid for g in grp.getgrall() if pw.pw_name in g.gr_mem}
    real = path.resolve()
    try:
        for directory in reversed(real.parents):
            if not _allows(directory.stat(), pw.pw_uid, gids, (stat.S_IXUSR, stat.S_IXGRP, stat.S_IXOTH)):
                return directory
        if not _allows(real.stat(), pw.pw_uid, gids, (stat.S_IRUSR, stat.S_IRGRP, stat.S_IROTH)):
            return real
    except OSError:
        return real
    return None


def readable_by(path: Path, pw: pwd.struct_passwd) -> bool:
    """Whether user `pw` may read `path` (owner, group and mode bits; POSIX ACLs are not read)."""
    return access_blocker(path, pw) is None


def _matching_sibling(cert: x509.Certificate, candidates: Iterable[Path], exclude: Path) -> Path | None:
    """A private key file next to the configured one that does match the certificate (unencrypted keys only)."""
    want = _spki(cert.public_key())
    seen = 0
    for path in candidates:
        if path == exclude or path.suffix not in (".key", ".pem") or not path.is_file():
            continue
        seen += 1
        if seen > _SIBLING_LIMIT:
            break
        try:
            if path.stat().st_size > _SIBLING_MAX_BYTES:
                continue
            data = path.read_bytes()
            if b"PRIVATE KEY" not in data or _is_encrypted(data):
                continue
            if _spki(load_private_key(data, None).public_key()) == want:
                return path
        except (OSError, ValueError, TypeError):
            continue
    return None


def check_files(cfg: Config, user_name: str | None = "mqtt-agent") -> CheckResult:
    """Check 2. `user_name`: the service account (systemd User=) whose read access is checked when we are root."""
    t, m = cfg.tls, cfg.mqtt
    findings: list[Finding] = []
    facts: list[str] = []
    details: dict[str, Any] = {}
    secrets = [(m.password_file, "the MQTT password", "mqtt.password_file")]
    if t.enabled:
        secrets.append((t.key_password_file, "the key passphrase", "tls.key_password_file"))
    for path, what, key in secrets:
        too_open = _too_open(path, what, key, "secret_permissions") if path else None
        if too_open:
            findings.append(too_open)
    cert: x509.Certificate | None = None
    if t.enabled:
        if t.ca_file:
            cas = load_certificates(t.ca_file)
            details["ca_certificates"] = len(cas)
            if cas:
                facts.append(f"CA file has {len(cas)} certificate{'s' if len(cas) != 1 else ''}")
            else:
                findings.append(fail("ca_unparseable", f"tls.ca_file {t.ca_file} holds no certificate (PEM or DER)",
                                     "point tls.ca_file at the PEM file of the CA that issued the broker certificate"))
        else:
            facts.append("CA: the system trust store")
        if t.cert_file and t.key_file:
            certs = load_certificates(t.cert_file)
            cert = certs[0] if certs else None
            if cert is None:
                findings.append(fail("cert_unparseable", f"tls.cert_file {t.cert_file} holds no certificate",
                                     "point tls.cert_file at the device certificate in PEM format"))
            findings += _check_key(cfg, cert, facts, details)
    pw = service_user(user_name) if os.geteuid() == 0 else None
    if pw is not None:
        details["service_user"] = pw.pw_name
        blocked = _service_user_findings(cfg, pw)
        findings += blocked
        if not blocked:
            facts.append(f"readable by the service user {pw.pw_name}")
    if not t.enabled:
        facts.insert(0, "TLS is disabled: no certificate files")
    summary = "; ".join(f for f in facts if f) or "no files configured"
    return result(2, "", summary, findings, details)


def _service_user_findings(cfg: Config, pw: pwd.struct_passwd) -> list[Finding]:
    """Files root can read here but the service account cannot: the agent works by hand, fails as a service."""
    t, m = cfg.tls, cfg.mqtt
    private = ("tls.key_file", "tls.key_password_file", "mqtt.password_file")
    out: list[Finding] = []
    for path, key in ((t.ca_file, "tls.ca_file"), (t.cert_file, "tls.cert_file"), (t.key_file, "tls.key_file"),
                      (t.key_password_file, "tls.key_password_file"), (m.password_file, "mqtt.password_file")):
        if path is None or (not t.enabled and key.startswith("tls.")):
            continue
        blocker = access_blocker(path, pw)
        if blocker is None:
            continue
        if blocker != path.resolve():
            fix = f"chmod a+x {blocker} (that directory hides the file from {pw.pw_name})"
        elif key in private:
            fix = f"chown {pw.pw_name} {path}"
        else:
            fix = f"chmod a+r {path}"
        out.append(fail("unreadable_by_service_user",
                        f"{key} {path} is readable here (as root) but not by {pw.pw_name}, the user the service "
                        "runs as", fix))
    return out


def _check_key(cfg: Config, cert: x509.Certificate | None, facts: list[str], details: dict[str, Any]) -> list[Finding]:
    t = cfg.tls
    assert t.key_file is not None and t.cert_file is not None
    findings: list[Finding] = []
    too_open = _too_open(t.key_file, "the private key", "tls.key_file", "key_permissions")
    if too_open:
        findings.append(too_open)
    else:
        facts.append(f"key mode {_mode(t.key_file):04o}")
    try:
        data = t.key_file.read_bytes()
        password = read_secret(t.key_password_file) if t.key_password_file else None
    except OSError as exc:
        return [*findings, fail("key_unparseable", f"tls.key_file {t.key_file} cannot be read: {exc.strerror or exc}",
                                f"check the permissions of {t.key_file}")]
    try:
        key = load_private_key(data, password)
    except TypeError:
        if _is_encrypted(data) and password is None:
            return [*findings, fail("key_encrypted", f"tls.key_file {t.key_file} is encrypted with a passphrase",
                                    "set tls.key_password_file to a file (mode 0600) holding the passphrase")]
        return [*findings, fail("key_unparseable", f"tls.key_file {t.key_file} is not encrypted, but "
                                "tls.key_password_file is set", "remove tls.key_password_file")]
    except ValueError:
        if _is_encrypted(data):
            return [*findings, fail("key_bad_passphrase", f"the passphrase in tls.key_password_file "
                                    f"{t.key_password_file} does not decrypt tls.key_file {t.key_file}",
                                    "put the key's passphrase (one line) in tls.key_password_file")]
        return [*findings, fail("key_unparseable", f"tls.key_file {t.key_file} holds no private key (PEM or DER)",
                                "point tls.key_file at the device's private key")]
    if cert is None:
        return findings
    if _spki(key.public_key()) == _spki(cert.public_key()):
        facts.append("key matches the certificate")
        details["key_matches_certificate"] = True
        return findings
    details["key_matches_certificate"] = False
    dirs = {t.key_file.parent, t.cert_file.parent}
    candidates = sorted(p for d in dirs for p in _listdir(d))
    sibling = _matching_sibling(cert, candidates, t.key_file)
    if sibling is not None:
        remedy = f'set tls.key_file = "{sibling}": that key matches the certificate'
    else:
        remedy = (f"point tls.key_file at the key {t.cert_file.name} was issued for (or tls.cert_file at the "
                  f"certificate issued for this key); compare `openssl x509 -noout -pubkey -in {t.cert_file}` "
                  f"with `openssl pkey -pubout -in {t.key_file}`")
    findings.append(fail("key_mismatch", f"tls.key_file {t.key_file} is not the private key of tls.cert_file "
                         f"{t.cert_file} (their public keys differ)", remedy))
    return findings


def _listdir(directory: Path) -> list[Path]:
    try:
        return list(directory.iterdir())
    except OSError:
        return []
