"""Pure reconnect arithmetic: backoff with jitter and broker failover order."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Generic, TypeVar

from agent.config import ReconnectConfig

T = TypeVar("T")


class Backoff:
    """Exponential backoff with full jitter between min_delay and max_delay.

    The failure count resets only when a connection has stayed up for `stable_after` seconds,
    not on CONNACK: paho resets its own delay on every CONNACK, which turns a broker that
    accepts and then drops into a 1 s flap forever.

    While another client is suspected of using our client id (`damped`), every takeover adds an
    extra doubling, delays are drawn from the upper half of the range (so the rate really falls
    instead of sometimes drawing the minimum), and only a connection that outlives twice the
    longest delay counts as stable: the other client backs off as long as we do, so a connection
    merely longer than `stable_after` does not prove it has gone.
    """

    def __init__(self, cfg: ReconnectConfig, rng: random.Random | None = None) -> None:
        self.cfg = cfg
        self.failures = 0
        self.damped = False
        self._rng = rng or random.Random()

    @property
    def stable_after(self) -> float:
        """Uptime after which a connection resets the backoff."""
        if self.damped:
            return max(self.cfg.stable_after, 2.0 * self.cfg.max_delay)
        return self.cfg.stable_after

    def connection_ended(self, uptime: float | None) -> None:
        """Account for one ended connection or failed attempt; `uptime` is None if it never connected."""
        if uptime is not None and uptime >= self.stable_after:
            self.failures = 0
            self.damped = False
        self.failures += 1

    def takeover(self) -> None:
        """A session takeover (duplicate client id): damp harder until a connection proves stable."""
        self.damped = True
        self.failures += 1

    def ceiling(self) -> float:
        """The largest delay the next attempt may wait."""
        exp = min(self.failures, 32)
        return float(min(self.cfg.max_delay, self.cfg.min_delay * 2.0**exp))

    def next_delay(self) -> float:
        top = self.ceiling()
        if not self.cfg.jitter:
            return top
        low = max(self.cfg.min_delay, top / 2.0) if self.damped else self.cfg.min_delay
        return self._rng.uniform(low, top)

    def failover_delay(self) -> float:
        """The wait before the first try of the next host after a failover: about `min_delay`, not the
        backoff built up against the host that failed (a cluster node's loss must not cost the whole
        backoff again). Jittered over [min_delay / 2, min_delay] so a fleet failing over at once spreads."""
        if not self.cfg.jitter:
            return self.cfg.min_delay
        return self._rng.uniform(self.cfg.min_delay / 2.0, self.cfg.min_delay)

    def reset(self) -> None:
        self.failures = 0


class HostRotation(Generic[T]):
    """Tries hosts in order; moves on after `attempts_per_host` consecutive failures on one host."""

    def __init__(self, hosts: Sequence[T], attempts_per_host: int = 2) -> None:
        if not hosts:
            raise ValueError("at least one host is needed")
        self.hosts = list(hosts)
        self.attempts_per_host = attempts_per_host
        self.index = 0
        self._failures = 0

    @property
    def current(self) -> T:
        return self.hosts[self.index]

    def succeeded(self) -> None:
        self._failures = 0

    def failed(self, definite: bool = False) -> bool:
        """Record a failure on the current host; True if the rotation moved to another host.
        `definite`: the host is known to be down (nothing listens on its port): move on at once."""
        self._failures += 1
        if (definite or self._failures >= self.attempts_per_host) and len(self.hosts) > 1:
            self.index = (self.index + 1) % len(self.hosts)
            self._failures = 0
            return True
        return False
