"""Pure renewal policy: when a certificate is due, and how long to wait after a failure."""

from __future__ import annotations

import hashlib

# A fleet enrolled on one day must not renew in the same minute: each device renews up to this share of
# the certificate's lifetime earlier than the policy says, by an offset derived from its device id
# (stable across restarts, so a device does not drift earlier at every start).
SPREAD = 0.05


def device_offset(device_id: str) -> float:
    """A stable number in [0, 1) for this device."""
    digest = hashlib.sha256(device_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def due_at(not_before: float, not_after: float, device_id: str, *, at: float, before: float) -> float:
    """Unix time at which renewal is due: once `at` of the lifetime is used or `before` seconds remain,
    whichever comes first, moved earlier by the device's share of the spread window."""
    life = max(not_after - not_before, 0.0)
    due = min(not_before + at * life, not_after - before)
    due -= device_offset(device_id) * SPREAD * life
    return max(due, not_before)


def retry_delay(failures: int, lo: float, hi: float) -> float:
    """Seconds to wait after `failures` consecutive failures: lo, 2 lo, 4 lo, ... capped at hi."""
    if failures <= 0:
        return 0.0
    return float(min(hi, lo * 2 ** min(failures - 1, 40)))
