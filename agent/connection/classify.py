"""Pure disconnect classification: why did this connection end?

The session reports the raw evidence of every connection's end (times, idle time, reason code,
whether the broker sent a DISCONNECT). paho shows very different causes the same way: a NAT that
forgets idle flows and another client taking our session over both arrive as "connection lost"
(ReasonCode 0x80, no DISCONNECT from the broker) on MQTT 3.1.1 and on mosquitto < 2.0.15. The
classifier tells them apart from the history of connections:

- idle_timeout: the link dropped after being idle, at a consistent idle time (a NAT or firewall
  idle limit), longer than any idle time this path has been seen to carry.
- session_taken_over: DISCONNECT 0x8E, or the MQTT 3.1.1 signature: repeated drops of short-lived
  connections whose reconnect succeeds at once (the broker is fine and still holds our session)
  at moments unrelated to our idle time; the other client keeps reconnecting too.
- message_rejected: the connection ended right after the agent sent a message the broker never
  acknowledged (over a size limit it did not announce, or refused otherwise): a poison message, set
  aside after a few tries (agent/state/poison.py), not a takeover and not the network.
- keepalive_timeout, server_disconnect, auth_failed, tls_error, refused, network_error, shutdown.

Plain data in, a verdict out; time comes from an injected clock.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable, Protocol

# Final reasons (the `reason` label of mqtt_agent_disconnects_total).
IDLE_TIMEOUT = "idle_timeout"
KEEPALIVE_TIMEOUT = "keepalive_timeout"
SESSION_TAKEN_OVER = "session_taken_over"
SERVER_DISCONNECT = "server_disconnect"
AUTH_FAILED = "auth_failed"
TLS_ERROR = "tls_error"
REFUSED = "refused"
NETWORK_ERROR = "network_error"
SHUTDOWN = "shutdown"
MESSAGE_REJECTED = "message_rejected"
FINAL_KINDS = (IDLE_TIMEOUT, KEEPALIVE_TIMEOUT, SESSION_TAKEN_OVER, SERVER_DISCONNECT, AUTH_FAILED, TLS_ERROR,
               REFUSED, NETWORK_ERROR, SHUTDOWN, MESSAGE_REJECTED)

# Interim kinds the session reports before classification.
CONNECTION_LOST = "connection_lost"
RECONNECT_REQUESTED = "reconnect_requested"

_LOST_KINDS = (IDLE_TIMEOUT, NETWORK_ERROR, SESSION_TAKEN_OVER)  # what a "connection lost" can become

# A link quiet for less than this did not drop "because it was idle": no real NAT limit is that short.
IDLE_FLOOR = 1.0


PROTOCOL_HINT = ('; a broker that speaks only MQTT 3.1.1 (RabbitMQ 3.x, Eclipse Hono, amqtt) does this to an '
                 'MQTT 5 CONNECT: set mqtt.protocol = "3.1.1"')
UNSUPPORTED_VERSION = 0x84  # CONNACK "Unsupported Protocol Version" (aedes answers an MQTT 5 CONNECT so)
UNSUPPORTED_HINT = '; the broker does not speak MQTT 5: set mqtt.protocol = "3.1.1"'


def keepalive_hint(keepalive: int) -> str:
    return (f"; MQTT 3.1.1 has no such CONNACK code: aedes answers this way when the keepalive ({keepalive} s) is "
            "over its keepaliveLimit, so the keepalive may be over the broker's limit: lower mqtt.keepalive")


def connect_hint(end: EndEvidence, v5: bool, error: str, refused_code: int | None) -> str:
    """Words naming the likely setting for a connection that never got a (good) CONNACK, or ""."""
    if end.connected_at is not None or error:
        return ""  # connected, or TCP/TLS failed (explained where that is known)
    if v5 and end.kind in (NETWORK_ERROR, CONNECTION_LOST) and refused_code is None:
        return PROTOCOL_HINT
    if v5 and refused_code == UNSUPPORTED_VERSION:
        return UNSUPPORTED_HINT
    if not v5 and refused_code == 0x80:
        return keepalive_hint(end.keepalive)  # paho maps any non-standard 3.1.1 return code to 0x80
    return ""


def median(values: Sequence[float]) -> float:
    """The median (statistics.median without importing `statistics`, which costs the agent ~0.4 MiB)."""
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


class EndEvidence(Protocol):
    """What the classifier reads from the session's ConnectionEnded."""

    @property
    def kind(self) -> str: ...
    @property
    def reason(self) -> str: ...
    @property
    def connected_at(self) -> float | None: ...
    @property
    def ended_at(self) -> float: ...
    @property
    def keepalive(self) -> int: ...
    @property
    def uptime(self) -> float | None: ...
    @property
    def idle_for(self) -> float | None: ...
    @property
    def longest_quiet(self) -> float | None: ...
    @property
    def session_present(self) -> bool | None: ...
    @property
    def message_suspect(self) -> str: ...


@dataclass(frozen=True)
class Verdict:
    kind: str
    reason: str
    declared_takeover: bool = False  # True when this end made the classifier suspect a duplicate client id


@dataclass(frozen=True)
class _Drop:
    at: float
    kind: str
    uptime: float
    idle: float
    candidate: bool  # could be a takeover: reconnected at once, broker kept the session, not a NAT pattern


def idle_tolerance(typical: float) -> float:
    """How far a drop's idle time may differ from the typical one and still be the same NAT limit
    (timer granularity of middleboxes plus our loop's detection delay)."""
    return max(0.5, 0.1 * typical)


class Classifier:
    """Turns each connection's raw end into one of FINAL_KINDS, remembering recent history.

    `stable_after` separates short-lived connections (part of a flap) from established ones;
    once a duplicate client id is suspected, only a connection up for `suspicion_uptime` (twice the
    longest reconnect delay: the other client backs off too) ends the suspicion. `window` is how far
    back drops count as one pattern; `persistent_session` says whether the broker keeps our session
    (then a reconnect without it means the broker lost state, e.g. a restart, not a takeover).
    """

    def __init__(
        self,
        *,
        stable_after: float = 60.0,
        suspicion_uptime: float = 240.0,
        window: float = 600.0,
        persistent_session: bool = True,
        nat_drops: int = 3,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stable_after = stable_after
        # Drops at a consistent idle time it takes to call a NAT "likely": the keepalive tuner's
        # keepalive_tuning.drops, so the words and the action agree.
        self.nat_drops = max(1, nat_drops)
        self.suspicion_uptime = max(stable_after, suspicion_uptime)
        self.window = window
        self.persistent_session = persistent_session
        self._clock = clock
        self._drops: deque[_Drop] = deque(maxlen=64)
        self._failed_since_drop = False
        self._connected_before = False
        self._tolerated: list[tuple[float, float]] = []  # (at, seconds of quiet the path carried)
        self.suspected_at: float | None = None
        self.takeovers = 0
        self.revised_restart = False  # set when a failed CONNECT showed the last idle drop was a broker restart

    # --- evidence kept between connections -----------------------------------------------------

    def tolerated_idle(self) -> float:
        """The longest quiet this path carried recently (traffic flowed again after it)."""
        now = self._clock()
        self._tolerated = [(at, q) for at, q in self._tolerated if now - at <= self.window]
        return max((q for _, q in self._tolerated), default=0.0)

    def _recent(self) -> list[_Drop]:
        now = self._clock()
        return [d for d in self._drops if now - d.at <= self.window]

    @property
    def suspecting_takeover(self) -> bool:
        """True while a duplicate client id is suspected (until a long connection, or `window` without takeovers)."""
        if self.suspected_at is not None and self._clock() - self.suspected_at > self.window:
            self.suspected_at = None
        return self.suspected_at is not None

    def clear_suspicion(self) -> None:
        self.suspected_at = None

    def connection_up_for(self, uptime: float) -> None:
        """A connection has been up `uptime` s: long enough, and the other client has gone."""
        if self.suspected_at is not None and uptime >= self.suspicion_uptime:
            self.suspected_at = None

    # --- classification ------------------------------------------------------------------------

    def classify(self, end: EndEvidence) -> Verdict:
        kind = end.kind
        if kind in (SHUTDOWN, RECONNECT_REQUESTED):
            return Verdict(SHUTDOWN, end.reason)
        if end.connected_at is None:
            first_failure = not self._failed_since_drop
            self._failed_since_drop = True
            after_idle_drop = bool(self._drops) and self._drops[-1].kind == IDLE_TIMEOUT
            if first_failure and kind in (REFUSED, NETWORK_ERROR, CONNECTION_LOST) and after_idle_drop:
                # The broker that dropped us refuses the very next CONNECT: it was restarting (or stopping),
                # which is no evidence about a NAT; the drop leaves the idle pattern.
                last = self._drops.pop()
                self._drops.append(_Drop(last.at, NETWORK_ERROR, last.uptime, last.idle, False))
                self.revised_restart = True
                final = kind if kind in FINAL_KINDS else NETWORK_ERROR
                return Verdict(final, f"{end.reason}; so the broker was restarting or stopping when it dropped the "
                               "last connection (not a NAT or firewall idle limit)")
            if kind == CONNECTION_LOST:
                return Verdict(NETWORK_ERROR, f"the connection closed before the broker's CONNACK ({end.reason})")
            return Verdict(kind if kind in FINAL_KINDS else NETWORK_ERROR, end.reason)
        first_try = not self._failed_since_drop
        self._failed_since_drop = False
        first_connection = not self._connected_before
        self._connected_before = True
        if end.longest_quiet:
            self._tolerated.append((end.ended_at, end.longest_quiet))
        uptime = end.uptime or 0.0
        idle = end.idle_for if end.idle_for is not None else uptime
        if end.message_suspect and kind in (CONNECTION_LOST, SERVER_DISCONNECT):
            # The broker closed right after a message it did not take: that message is the cause, not the
            # network and not another client (on MQTT 3.1.1 it would look like a duplicate client id).
            self._record(end, MESSAGE_REJECTED, uptime, idle, False)
            return Verdict(MESSAGE_REJECTED, f"{end.reason}; right after we sent {end.message_suspect}: the broker "
                           "refuses that message (likely over its size limit: see mqtt.max_message_bytes); it is set "
                           "aside after a few tries")
        if kind == SESSION_TAKEN_OVER:
            declared = self.suspected_at is None
            self._record(end, SESSION_TAKEN_OVER, uptime, idle, True)
            self._suspect()
            return Verdict(SESSION_TAKEN_OVER, end.reason, declared)
        if kind != CONNECTION_LOST:
            self._record(end, kind, uptime, idle, False)
            return Verdict(kind if kind in FINAL_KINDS else NETWORK_ERROR, end.reason)
        return self._connection_lost(end, uptime, idle, first_try, first_connection)

    def _connection_lost(self, end: EndEvidence, uptime: float, idle: float, first_try: bool,
                         first_connection: bool) -> Verdict:
        recent = self._recent()
        tolerated = self.tolerated_idle()
        earlier = [d.idle for d in recent if d.kind in _LOST_KINDS and d.idle >= IDLE_FLOOR][-3:]
        typical = median(earlier) if earlier else None
        consistent = typical is not None and abs(idle - typical) <= idle_tolerance(typical)
        # Idle-related: quiet long enough to matter, and longer than this path has carried recently (a NAT
        # with a limit T cannot drop a flow idle for less than a silence it carried before). If the limit
        # shrinks, the old evidence expires after `window` and the drops count as idle again.
        idle_like = idle >= IDLE_FLOOR and idle > tolerated
        nat_pattern = idle_like and (typical is None or consistent)
        # A broker that lost our session was restarted (no takeover); the agent's first session may be new.
        session_kept = end.session_present is not False or not self.persistent_session or first_connection
        could_be_takeover = first_try and session_kept
        if self.suspecting_takeover and could_be_takeover and uptime < self.suspicion_uptime:
            self._record(end, SESSION_TAKEN_OVER, uptime, idle, True)
            self._suspect()
            return Verdict(SESSION_TAKEN_OVER, self._takeover_reason(uptime, repeated=True))
        ongoing_nat = [d.kind for d in recent[-2:]] == [IDLE_TIMEOUT, IDLE_TIMEOUT]
        # The other client reconnects after its own jittered backoff, so takeovers end our connections
        # after varying uptimes; a broker or middlebox that accepts and then drops does it after a fixed one.
        earlier_uptimes = [d.uptime for d in recent if d.candidate][-3:]
        fixed_uptime = bool(earlier_uptimes) and abs(uptime - median(earlier_uptimes)) <= idle_tolerance(
            median(earlier_uptimes))
        if (could_be_takeover and uptime < self.stable_after and not nat_pattern and not ongoing_nat
                and earlier_uptimes and not fixed_uptime):
            self._record(end, SESSION_TAKEN_OVER, uptime, idle, True)
            self._suspect()
            return Verdict(SESSION_TAKEN_OVER, self._takeover_reason(uptime, repeated=False), True)
        if nat_pattern:
            self._record(end, IDLE_TIMEOUT, uptime, idle, could_be_takeover)
            like = len([d for d in recent if d.kind == IDLE_TIMEOUT and typical is not None
                        and abs(d.idle - typical) <= idle_tolerance(typical)])
            head = f"{end.reason} after {idle:.1f} s without traffic, within the keepalive ({end.keepalive} s)"
            if like + 1 >= self.nat_drops:
                # The pattern the keepalive tuner acts on: only now is a NAT the likely cause.
                return Verdict(IDLE_TIMEOUT, f"{head}, like {like} drop(s) before at this idle time: a NAT or "
                               "firewall idle limit is likely")
            if like:
                return Verdict(IDLE_TIMEOUT, f"{head}, like {like} drop(s) before at this idle time: if it keeps "
                               "happening at this idle time, a NAT or firewall idle limit is likely")
            return Verdict(IDLE_TIMEOUT, f"{head}; one drop does not say why (a broker restart, another client "
                           "with this client id, or, if it repeats at this idle time, a NAT or firewall idle limit)")
        self._record(end, NETWORK_ERROR, uptime, idle, could_be_takeover)
        if idle < IDLE_FLOOR:
            why = f"{idle:.1f} s after the last traffic"
        elif idle <= tolerated:
            why = f"after {idle:.1f} s idle, though this path has carried {tolerated:.1f} s of quiet"
        else:
            why = f"after {idle:.1f} s idle, unlike the recent drops (around {typical or 0:.1f} s)"
        return Verdict(NETWORK_ERROR, f"{end.reason}; the broker or the network closed it {why}")

    def _record(self, end: EndEvidence, kind: str, uptime: float, idle: float, candidate: bool) -> None:
        self._drops.append(_Drop(end.ended_at, kind, uptime, idle, candidate))

    def _suspect(self) -> None:
        self.takeovers += 1
        self.suspected_at = self._clock()

    def _takeover_reason(self, uptime: float, repeated: bool) -> str:
        count = sum(1 for d in self._recent() if d.kind == SESSION_TAKEN_OVER)
        times = "once" if count == 1 else f"{count} times"
        return (f"closed {'again ' if repeated else ''}{uptime:.1f} s after CONNACK, at no particular idle time, "
                f"while the broker kept our session and reconnects succeed at once ({times} in "
                f"{self.window / 60:.0f} min): another client is connecting with the same client id")
