"""Is the agent actually working? The watchdog's judgement as a pure function over evidence.

systemd restarts the agent when WATCHDOG=1 pings stop, so pings must stop exactly when the agent is
wedged, and never merely because it is busy or waiting:

* The MQTT network loop stamps `Session.heartbeat` at every turn (at most ~0.5 s apart), but not while
  it sleeps before a reconnect or blocks in a connection attempt. `LoopPhases` follows the session's
  events to know how long such a wait may legitimately last.
* The dispatcher stamps `Dispatcher.last_progress` whenever a command starts or finishes. Work that is
  queued while a worker is free must start at once; and every running command finishes, or is answered
  504 by the timeout monitor, within its timeout plus a grace period. No progress beyond that is a wedge.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable, Protocol

from agent.commands.dispatch import ENFORCED_TIMEOUT_GRACE
from agent.config import HostPort, LimitsConfig
from agent.connection.events import ConnectionEnded, SessionListener

# DNS lookups are not bounded by connect_timeout; allow this much for them on top.
DNS_ALLOWANCE = 30.0


@dataclass(frozen=True)
class Verdict:
    healthy: bool
    problem: str = ""


@dataclass(frozen=True)
class LoopEvidence:
    alive: bool
    heartbeat: float
    busy_until: float | None = None  # a sleep or connect attempt may legitimately last until then


@dataclass(frozen=True)
class DispatchEvidence:
    last_progress: float
    in_flight: int
    queued: int
    workers: int
    longest_job: float  # the longest a started command may hold a worker before it is answered


def judge(now: float, loop: LoopEvidence, dispatch: DispatchEvidence, stall_limit: float) -> Verdict:
    """Healthy, or the problem in words. `stall_limit`: how long no progress is tolerated."""
    if not loop.alive:
        return Verdict(False, "the MQTT network thread has stopped")
    expected_by = loop.heartbeat + stall_limit
    if loop.busy_until is not None:
        expected_by = max(expected_by, loop.busy_until + stall_limit)
    if now > expected_by:
        return Verdict(False, f"the MQTT network loop has not run for {now - loop.heartbeat:.0f} s")
    idle = now - dispatch.last_progress
    if dispatch.queued > 0 and dispatch.in_flight < dispatch.workers and idle > stall_limit:
        return Verdict(False, f"{dispatch.queued} command(s) waiting with a worker free, none started for "
                              f"{idle:.0f} s")
    pending = dispatch.queued + dispatch.in_flight
    if pending > 0 and idle > dispatch.longest_job + stall_limit:
        return Verdict(False, f"{pending} command(s) pending, none started or finished for {idle:.0f} s "
                              f"(the longest command timeout is {dispatch.longest_job:.0f} s)")
    return Verdict(True)


def longest_job(handlers: Mapping[str, object], limits: LimitsConfig) -> float:
    """The longest time a started command may hold a worker before the dispatcher answers it."""
    longest = limits.command_timeout
    for handler in handlers.values():
        timeout = getattr(handler, "timeout", None)
        if isinstance(timeout, (int, float)) and timeout > 0:
            longest = max(longest, float(timeout))
    return longest + ENFORCED_TIMEOUT_GRACE


class LoopPhases(SessionListener):
    """Follows the session's events to know when the network loop may be silent: while it sleeps
    before a reconnect, and while one connection attempt (TCP, TLS, DNS) blocks."""

    def __init__(self, connect_timeout: float, clock: Callable[[], float] = time.monotonic) -> None:
        # TCP connect and TLS handshake are each bounded by connect_timeout; a failed handshake is
        # diagnosed with one more connection of the same bound.
        self.connect_budget = 4 * connect_timeout + DNS_ALLOWANCE
        self._clock = clock
        self._lock = threading.Lock()
        self._busy_until: float | None = self._clock() + self.connect_budget  # the thread is starting
        self.first_attempt = threading.Event()

    @property
    def busy_until(self) -> float | None:
        with self._lock:
            return self._busy_until

    def _busy(self, until: float | None) -> None:
        with self._lock:
            self._busy_until = until

    def connecting(self, host: HostPort, attempt: int) -> None:
        self._busy(self._clock() + self.connect_budget)
        self.first_attempt.set()

    def connected(self, host: HostPort, keepalive: int, session_present: bool) -> None:
        self._busy(None)

    def connection_ended(self, ended: ConnectionEnded) -> None:
        self._busy(None)

    def reconnect_scheduled(self, delay: float, ended: ConnectionEnded) -> None:
        self._busy(self._clock() + delay)


class _Loop(Protocol):
    @property
    def thread_alive(self) -> bool: ...

    heartbeat: float


class _Dispatch(Protocol):
    last_progress: float
    limits: LimitsConfig

    @property
    def in_flight(self) -> int: ...

    @property
    def queued(self) -> int: ...


class HealthCheck:
    """Collects the evidence from the live session and dispatcher and judges it (callable)."""

    def __init__(
        self,
        session: _Loop,
        dispatcher: _Dispatch,
        phases: LoopPhases,
        handlers: Callable[[], Mapping[str, object]],
        *,
        stall_limit: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.session = session
        self.dispatcher = dispatcher
        self.phases = phases
        self.handlers = handlers
        self.stall_limit = stall_limit
        self._clock = clock

    def evidence(self) -> tuple[LoopEvidence, DispatchEvidence]:
        d = self.dispatcher
        loop = LoopEvidence(self.session.thread_alive, self.session.heartbeat, self.phases.busy_until)
        dispatch = DispatchEvidence(d.last_progress, d.in_flight, d.queued, d.limits.max_concurrent_commands,
                                    longest_job(self.handlers(), d.limits))
        return loop, dispatch

    def __call__(self) -> Verdict:
        loop, dispatch = self.evidence()
        return judge(self._clock(), loop, dispatch, self.stall_limit)
