"""The renewed pairs under agent.state_dir/tls and the renewal state file.

A pair is ONE file holding the certificate chain followed by its private key (0600): OpenSSL loads
both from it, and a single rename replaces both at once, so a power cut can never leave a certificate
next to the wrong key. The files, each written with agent/state/files.py (temp, fsync, rename, fsync dir):

    pending.key    a new key whose CSR is out for signing (cert.csr, or the exec signer)
    pending.pem    a signed, checked pair waiting for its probe CONNECT
    active.pem     the renewed pair in use
    previous.pem   the pair in use before the last switch, kept as the fallback for keep_previous
    rejected.pem   the last pair rolled back (for doctor; never used)
    renewal.json   failures, last failure, last success, the watch after a switch (no secrets)
    renew-request  `mqtt-agent renew` asks the running agent to renew now ("force" inside: even if not due)

Every step of a switch is one rename, in an order where any prefix leaves a usable pair.
"""

from __future__ import annotations

import datetime
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from agent.config import TlsConfig, read_secret
from agent.state.files import fsync_dir, remove_stale_temps, write_atomic
from agent.tls.certs import load_certificates
from agent.tls.check import CertCheckError, CheckedChain, PrivateKey, check_chain

log = logging.getLogger(__name__)

PENDING_KEY = "pending.key"
PENDING = "pending.pem"
ACTIVE = "active.pem"
PREVIOUS = "previous.pem"
REJECTED = "rejected.pem"
STATE = "renewal.json"
REQUEST = "renew-request"

_KEY_BLOCK = re.compile(rb"-----BEGIN (?:ENCRYPTED |EC |RSA )?PRIVATE KEY-----.+?-----END (?:ENCRYPTED |EC |RSA )?"
                        rb"PRIVATE KEY-----\n?", re.S)


@dataclass(frozen=True)
class Pair:
    """A certificate and key the agent could use. `source`: "renewed", "previous" or "configured"."""

    source: str
    cert_file: Path
    key_file: Path
    not_before: datetime.datetime
    not_after: datetime.datetime
    subject: str
    serial: int

    def tls(self, base: TlsConfig) -> TlsConfig:
        """`base` with this pair's files (everything else, CA and security level included, as configured)."""
        from dataclasses import replace

        return replace(base, cert_file=self.cert_file, key_file=self.key_file)

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "cert_file": str(self.cert_file), "subject": self.subject,
                "serial": f"{self.serial:x}", "not_after": self.not_after.isoformat()}


def _password(tls: TlsConfig) -> bytes | None:
    return read_secret(tls.key_password_file).encode() if tls.key_password_file else None


def load_key(path: Path, tls: TlsConfig) -> PrivateKey:
    """The private key in `path` (a key file or a pair file). Raises ValueError/OSError."""
    data = path.read_bytes()
    match = _KEY_BLOCK.search(data)
    if match is None:
        raise ValueError(f"{path} holds no private key")
    key = serialization.load_pem_private_key(match.group(0), password=_password(tls))
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
        raise ValueError(f"{path} holds a {type(key).__name__}, not an EC or RSA key")
    return key


def key_pem(key: PrivateKey, tls: TlsConfig) -> bytes:
    """The key as PKCS#8 PEM, encrypted with tls.key_password_file's passphrase when one is configured."""
    password = _password(tls)
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)


def check_pair(source: str, cert_file: Path, key_file: Path, tls: TlsConfig, device_id: str,
               now: datetime.datetime) -> tuple[Pair, CheckedChain]:
    """Check a pair on disk with the one chain checker. Raises CertCheckError (or ValueError/OSError)."""
    key = load_key(key_file, tls)
    anchors = load_certificates(tls.ca_file) if tls.ca_file else []
    checked = check_chain(load_certificates(cert_file), key, anchors, now=now, source=str(cert_file),
                          anchor_file=tls.ca_file or "(tls.ca_file not set)", device_id=device_id)
    pair = Pair(source, cert_file, key_file, checked.not_before, checked.not_after, checked.subject,
                checked.leaf.serial_number)
    return pair, checked


class PairStore:
    """The files above, in `directory` (created 0700)."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory

    def path(self, name: str) -> Path:
        return self.dir / name

    def exists(self, name: str) -> bool:
        return self.path(name).exists()

    def ensure(self) -> None:
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        remove_stale_temps(self.dir)

    # --- the pending key and pair -----------------------------------------------------------------

    def write_pending_key(self, pem: bytes) -> None:
        self.ensure()
        write_atomic(self.path(PENDING_KEY), pem, 0o600)

    def write_pending_pair(self, chain_pem: bytes, key_bytes: bytes) -> None:
        """The signed chain with its key in one file; then the bare key is no longer needed."""
        self.ensure()
        write_atomic(self.path(PENDING), chain_pem + key_bytes, 0o600)
        self.remove(PENDING_KEY)

    def remove(self, name: str) -> None:
        try:
            self.path(name).unlink()
        except FileNotFoundError:
            return
        fsync_dir(self.dir)

    # --- switching ---------------------------------------------------------------------------------

    def promote(self) -> None:
        """pending -> active, the old active -> previous. A cut between the steps leaves the old active
        in use and pending still waiting (it is probed again), or the new active in use."""
        active, previous, pending = self.path(ACTIVE), self.path(PREVIOUS), self.path(PENDING)
        if active.exists():
            active.replace(previous)
            fsync_dir(self.dir)
        else:
            self.remove(PREVIOUS)  # the fallback is the configured pair
        pending.replace(active)
        fsync_dir(self.dir)

    def demote(self) -> None:
        """Roll back: active -> rejected, previous (if any) -> active; else the configured pair is used."""
        active, previous = self.path(ACTIVE), self.path(PREVIOUS)
        if active.exists():
            active.replace(self.path(REJECTED))
            fsync_dir(self.dir)
        if previous.exists():
            previous.replace(active)
            fsync_dir(self.dir)

    def reject_pending(self) -> None:
        pending = self.path(PENDING)
        if pending.exists():
            pending.replace(self.path(REJECTED))
            fsync_dir(self.dir)

    # --- state and requests ------------------------------------------------------------------------

    def read_state(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path(STATE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def write_state(self, state: dict[str, Any]) -> None:
        self.ensure()
        write_atomic(self.path(STATE), json.dumps(state, sort_keys=True).encode(), 0o600)

    def take_request(self) -> str | None:
        """None, "renew" or "force": what `mqtt-agent renew` asked for (the request is consumed)."""
        path = self.path(REQUEST)
        try:
            text = path.read_text(encoding="utf-8", errors="replace").strip()
        except FileNotFoundError:
            return None
        except OSError:
            text = ""
        self.remove(REQUEST)
        return "force" if text == "force" else "renew"


def candidates(store: PairStore, tls: TlsConfig) -> list[tuple[str, Path, Path]]:
    """(source, cert file, key file) of every pair the agent could use, newest kind first."""
    out = [("renewed", store.path(ACTIVE), store.path(ACTIVE)), ("previous", store.path(PREVIOUS),
                                                                  store.path(PREVIOUS))]
    out = [c for c in out if c[1].exists()]
    if tls.cert_file and tls.key_file:
        out.append(("configured", tls.cert_file, tls.key_file))
    return out


def select_pair(store: PairStore, tls: TlsConfig, device_id: str, now: datetime.datetime) -> Pair | None:
    """The newest valid pair: the one with the latest notAfter among those that pass the checker.

    None when nothing passes (the configured pair is then used as is, and fails with its own message)."""
    best: Pair | None = None
    for source, cert_file, key_file in candidates(store, tls):
        try:
            pair, _ = check_pair(source, cert_file, key_file, tls, device_id, now)
        except (CertCheckError, ValueError, TypeError, OSError) as exc:
            if source != "configured":
                log.warning("the %s certificate pair %s is not usable and is skipped: %s", source, cert_file, exc)
            continue
        if best is None or pair.not_after > best.not_after:
            best = pair
    return best
