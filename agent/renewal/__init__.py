"""Client certificate renewal: a new key made on the device, its CSR signed by the configured signer,
the certificate checked (agent/tls/check.py) and proven with a probe CONNECT before the session
switches to it, with the previous pair kept as the fallback.

    policy.py    pure: when to renew (lifetime share, before-expiry, per-device offset), retry backoff
    store.py     the pending / active / previous pairs under agent.state_dir/tls, and the state file
    signer.py    the exec signer (CSR on stdin, chain on stdout; no shell, timeout, clean environment)
    rollover.py  the state machine: sign, check, probe, switch, watch, roll back; the renewal thread
    handlers.py  the built-in commands cert.csr and cert.install (signer = "command")
"""

from __future__ import annotations

from pathlib import Path

# `cryptography` costs the agent ~8 MiB of resident memory: the renewal machinery (which needs it) is
# loaded only when renewal is on or a renewed pair is there to be used. This check must stay import-free.
_PAIR_FILES = ("active.pem", "previous.pem", "pending.pem")


def has_renewed_pair(state_dir: Path) -> bool:
    """Whether agent.state_dir/tls holds a renewed (or pending) pair."""
    return any((state_dir / "tls" / name).exists() for name in _PAIR_FILES)
