"""What the MQTT session reports, in the agent's own types: how a connection ended, the observer
interface, and a snapshot of the session's state. Pure: no paho here, so the observers (metrics,
systemd status, health) do not depend on the network layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from agent.config import HostPort


@dataclass(frozen=True)
class ConnectionEnded:
    """How one connection (or connection attempt) ended: the raw evidence for classification."""

    host: HostPort
    kind: str
    reason: str
    attempt_started: float
    ended_at: float
    connected_at: float | None = None
    last_in: float | None = None
    last_out: float | None = None
    reason_code: int | None = None
    from_server: bool = False
    keepalive: int = 0
    error: str = ""
    session_present: bool | None = None  # from this connection's CONNACK
    longest_quiet: float | None = None  # longest silence the link carried (traffic flowed after it)
    link_error: str = ""  # how the socket ended, if it did: "closed by the peer", "reset by the peer"
    message_suspect: str = ""  # the unacknowledged message sent just before the end, if any (poison check)

    @property
    def uptime(self) -> float | None:
        return None if self.connected_at is None else self.ended_at - self.connected_at

    @property
    def idle_for(self) -> float | None:
        """Seconds since the last byte received when the connection ended."""
        return None if self.last_in is None else self.ended_at - self.last_in


class SessionListener:
    """Observes the session (metrics, systemd status, classifier). Default: nothing. Must not block."""

    def connecting(self, host: HostPort, attempt: int) -> None:
        pass

    def connected(self, host: HostPort, keepalive: int, session_present: bool) -> None:
        pass

    def connection_ended(self, ended: ConnectionEnded) -> None:
        pass

    def reconnect_scheduled(self, delay: float, ended: ConnectionEnded) -> None:
        pass

    def subscribed(self, topic: str, granted: bool, reason: str) -> None:
        pass

    # Events of the resilience layer (keepalive tuner, takeover detection, outbox).

    def keepalive_changed(self, old: int, new: int, direction: str, evidence: str) -> None:
        """The keepalive for the next CONNECT changed; direction is "down" or "up"."""

    def session_takeover(self, client_id: str) -> None:
        """Another client with the same client id took the session over."""

    def outbox_changed(self, size: int) -> None:
        """Responses waiting in the persistent outbox."""

    def outbox_dropped(self, count: int) -> None:
        """Responses dropped because the outbox was full (oldest first)."""

    def message_set_aside(self, reason: str) -> None:
        """A message was not sent as it was: "too_large" (over the size limit; a response is answered
        500 instead) or "poison" (the broker dropped the connection each time it was sent)."""


# --- what the session reports, as values ------------------------------------------------------------------
# The session and the connection monitor produce these; each knows which SessionListener method receives it,
# so there is no method name in a string and mypy checks every argument.


@dataclass(frozen=True)
class Connecting:
    host: HostPort
    attempt: int

    def deliver(self, to: SessionListener) -> None:
        to.connecting(self.host, self.attempt)


@dataclass(frozen=True)
class Connected:
    host: HostPort
    keepalive: int
    session_present: bool

    def deliver(self, to: SessionListener) -> None:
        to.connected(self.host, self.keepalive, self.session_present)


@dataclass(frozen=True)
class Ended:
    ended: ConnectionEnded

    def deliver(self, to: SessionListener) -> None:
        to.connection_ended(self.ended)


@dataclass(frozen=True)
class ReconnectScheduled:
    delay: float
    ended: ConnectionEnded

    def deliver(self, to: SessionListener) -> None:
        to.reconnect_scheduled(self.delay, self.ended)


@dataclass(frozen=True)
class Subscribed:
    topic: str
    granted: bool
    reason: str

    def deliver(self, to: SessionListener) -> None:
        to.subscribed(self.topic, self.granted, self.reason)


@dataclass(frozen=True)
class KeepaliveChanged:
    old: int
    new: int
    direction: str
    evidence: str

    def deliver(self, to: SessionListener) -> None:
        to.keepalive_changed(self.old, self.new, self.direction, self.evidence)


@dataclass(frozen=True)
class SessionTakeover:
    client_id: str

    def deliver(self, to: SessionListener) -> None:
        to.session_takeover(self.client_id)


@dataclass(frozen=True)
class OutboxChanged:
    size: int

    def deliver(self, to: SessionListener) -> None:
        to.outbox_changed(self.size)


@dataclass(frozen=True)
class OutboxDropped:
    count: int

    def deliver(self, to: SessionListener) -> None:
        to.outbox_dropped(self.count)


@dataclass(frozen=True)
class MessageSetAside:
    reason: str

    def deliver(self, to: SessionListener) -> None:
        to.message_set_aside(self.reason)


SessionEvent = Union[Connecting, Connected, Ended, ReconnectScheduled, Subscribed, KeepaliveChanged,
                     SessionTakeover, OutboxChanged, OutboxDropped, MessageSetAside]


@dataclass(frozen=True)
class SessionState:
    connected: bool
    host: HostPort | None
    protocol: str
    keepalive: int | None
    connected_since: float | None
    connects: int
    attempts: int
    last_end: ConnectionEnded | None
    subscribed: bool
    keepalive_set_by_broker: bool = False  # MQTT 5 CONNACK Server Keep Alive replaced the one we asked for
    max_message_bytes: int | None = None  # the size limit in force for what the agent publishes (None: none)
