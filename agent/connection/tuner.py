"""Keepalive auto-tuning: pure decisions, plus the state file that keeps what was learned.

A NAT, firewall or carrier that forgets flows idle longer than T drops every connection whose
keepalive is above T, and paho only shows "connection lost". The tuner watches drops classified
as `idle_timeout`; after `drops` of them within `window` it estimates T from the idle time
measured at each drop and picks a keepalive safely below it in one step (never below `min`,
never above the configured mqtt.keepalive). After `probe_after` without idle drops it probes a
longer keepalive (cellular links pay for every PINGREQ) and steps back at once if drops return.

Decisions are plain arithmetic over plain data with injected clocks; no file I/O here: what was learned
is kept in `{state_dir}/connection-state.json` by agent/state/connection_file.py.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable

from agent.config import KeepaliveTuningConfig

log = logging.getLogger(__name__)

# A drop this close to the keepalive (or later) happened when our own PINGREQ went out into a flow
# the path had already forgotten: it tells only that the limit is below the keepalive.
PING_PROVOKED = 0.9


@dataclass(frozen=True)
class Change:
    """One keepalive change, logged once and reported to listeners."""

    old: int
    new: int
    direction: str  # "down" or "up"
    evidence: str


@dataclass(frozen=True)
class _IdleDrop:
    at: float  # monotonic
    idle: float
    keepalive: int


def format_duration(seconds: float) -> str:
    """Seconds in the unit an operator reads fastest: 12 s, 9 min, 3 h, 2 d."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.0f} h"
    return f"{seconds / 86400:.0f} d"


def safe_keepalive(limit: float) -> int:
    """A keepalive that keeps a path with idle limit `limit` busy: a quarter below it, and at least
    2 s below (paho checks the keepalive twice a second, and the PINGREQ must cross the path)."""
    return math.floor(min(0.75 * limit, limit - 2.0))


class KeepaliveTuner:
    """Learns the longest keepalive the path tolerates. Not thread-safe: the network thread owns it."""

    def __init__(
        self,
        cfg: KeepaliveTuningConfig,
        configured: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.cfg = cfg
        self.configured = configured
        self._clock = clock
        self._wall = wall
        self.current = configured
        self.evidence = ""
        self.changed_at: float | None = None  # wall time
        self.last_idle_drop_at: float | None = None  # wall time
        self.last_good: int | None = None  # the value before a probe, to return to if the probe fails
        self._drops: list[_IdleDrop] = []
        self._floor_warned = False
        self._started = wall()

    @property
    def learned(self) -> bool:
        return self.current != self.configured

    @property
    def probing(self) -> bool:
        return self.last_good is not None

    # --- persistence -----------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "current": self.current,
            "configured": self.configured,
            "learned": self.learned,
            "evidence": self.evidence,
            "changed_at": self.changed_at,
            "last_idle_drop_at": self.last_idle_drop_at,
            "last_good": self.last_good,
            "min": self.cfg.min,
        }

    def restore(self, data: Any) -> str | None:
        """Take over a learned keepalive saved by an earlier run; returns a log message, or None if
        nothing usable was saved. Values are clamped to the current [min, mqtt.keepalive]."""
        if not self.cfg.enabled or not isinstance(data, dict):
            return None
        current = data.get("current")
        if not isinstance(current, int) or isinstance(current, bool) or current <= 0:
            return None
        if not data.get("learned"):
            return None
        clamped = max(self.cfg.min, min(self.configured, current))
        if clamped == self.configured:
            return None
        self.current = clamped
        self.evidence = str(data.get("evidence") or "")
        self.changed_at = _float_or_none(data.get("changed_at"))
        self.last_idle_drop_at = _float_or_none(data.get("last_idle_drop_at"))
        last_good = data.get("last_good")
        if isinstance(last_good, int) and not isinstance(last_good, bool) and self.cfg.min <= last_good < clamped:
            self.last_good = last_good
        note = "" if clamped == current else f" (saved {current} s, clamped to keepalive_tuning.min..mqtt.keepalive)"
        return f"using the learned keepalive {clamped} s instead of {self.configured} s{note}: {self.evidence}"

    # --- decisions -------------------------------------------------------------------------------

    def idle_drop(self, idle: float, keepalive_used: int) -> Change | None:
        """A connection dropped after `idle` s without traffic (classified idle_timeout)."""
        self.last_idle_drop_at = self._wall()
        if not self.cfg.enabled:
            return None
        now = self._clock()
        if self.last_good is not None and keepalive_used > self.last_good:
            # The probe failed: the longer keepalive is not tolerated; go back without waiting for more drops.
            old, new = self.current, self.last_good
            self.last_good = None
            self._drops.clear()
            return self._set(old, new, "down", f"keepalive {old} s -> {new} s: a drop after {idle:.1f} s idle "
                                               "while probing the longer keepalive; back to the last good value")
        self._drops = [d for d in self._drops if now - d.at <= self.cfg.window]
        self._drops.append(_IdleDrop(now, idle, keepalive_used))
        if len(self._drops) < self.cfg.drops:
            return None
        drops = self._drops
        span = format_duration(now - drops[0].at)
        limits = [d.idle for d in drops if d.idle < PING_PROVOKED * d.keepalive]
        if limits:
            lo, hi = min(limits), max(limits)
            target = safe_keepalive(lo)
            if hi - lo >= 1.0:
                seen = f"{lo:.0f}-{hi:.0f} s"
            else:
                seen = f"{lo:.1f}-{hi:.1f} s" if hi - lo >= 0.05 else f"{lo:.1f} s"
            how = f"{len(drops)} drops in {span} after {seen} idle"
        else:
            target = min(d.keepalive for d in drops) // 2
            how = f"{len(drops)} drops in {span}, each when the keepalive PINGREQ went out; halving"
        new = max(self.cfg.min, min(self.configured, target))
        if new >= self.current:
            if new == self.cfg.min == self.current and not self._floor_warned:
                self._floor_warned = True
                log.warning("the path drops connections idle for about %s, but the keepalive is already at "
                            "keepalive_tuning.min (%d s): lower keepalive_tuning.min or raise the idle timeout of "
                            "the NAT/firewall", seen if limits else f"{self.current} s", self.cfg.min)
            self._drops.clear()
            return None
        self._drops.clear()
        return self._set(self.current, new, "down", f"keepalive {self.current} s -> {new} s: {how}")

    def probe_due(self) -> bool:
        """True when the keepalive has been below the configured one for `probe_after` without an idle drop."""
        if not self.cfg.enabled or self.current >= self.configured:
            return False
        quiet_since = max(t for t in (self.last_idle_drop_at, self.changed_at, self._started) if t is not None)
        return self._wall() - quiet_since >= self.cfg.probe_after

    def probe(self) -> Change | None:
        """Step toward the configured keepalive: halfway, at least 1 s (applies at the next CONNECT)."""
        if not self.probe_due():
            return None
        old = self.current
        new = min(self.configured, old + max(1, math.ceil((self.configured - old) / 2)))
        self.last_good = old
        since = format_duration(self._wall() - max(t for t in (self.last_idle_drop_at, self.changed_at,
                                                                 self._started) if t is not None))
        return self._set(old, new, "up", f"keepalive {old} s -> {new} s: no idle drop for {since}; "
                                         "probing a longer keepalive")

    def connection_up_for(self, uptime: float, keepalive: int) -> None:
        """A probe that survived a full window of traffic at its keepalive becomes the new good value."""
        if self.last_good is not None and keepalive == self.current and uptime >= max(self.cfg.window,
                                                                                      4.0 * keepalive):
            self.last_good = None

    def retract_drop(self) -> None:
        """The last idle drop was a broker restart after all (the next CONNECT was refused): not evidence."""
        if self._drops:
            self._drops.pop()

    def forget_drops(self) -> None:
        """Drop the idle evidence (it was gathered while another client took our session over)."""
        self._drops.clear()

    def _set(self, old: int, new: int, direction: str, evidence: str) -> Change:
        self.current = new
        self.evidence = evidence
        self.changed_at = self._wall()
        return Change(old, new, direction, evidence)


def _float_or_none(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
