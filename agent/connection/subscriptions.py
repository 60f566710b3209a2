"""The session's subscriptions: the command topic (and Hono's error topic), subscribed after every
CONNACK, and a refused SUBSCRIBE retried after 2, 4, 8 ... 60 s (backoff.Backoff, no jitter: one gateway,
one broker ACL to fix) with words that name the fix.

No paho here: the session hands in a `subscribe(topic) -> message id or None` and the SUBACK's reason
code as a number; time comes from an injected clock. It runs on the network thread only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Callable

from agent.config import ReconnectConfig
from agent.connection.backoff import Backoff
from agent.connection.events import SessionEvent, Subscribed

log = logging.getLogger(__name__)


RC_SHARED_UNSUPPORTED = 0x9E  # SUBACK: "Shared Subscriptions not supported"


SHARED_UNSUPPORTED_FIX = ("this broker does not serve shared subscriptions (mqtt.shared_group): remove "
                          "mqtt.shared_group, or use a broker that supports them (mosquitto 2, EMQX, HiveMQ)")


# A refused SUBSCRIBE is retried after 2, 4, 8 ... 60 s (no jitter: one gateway, one broker ACL to fix).
SUBSCRIBE_RETRY = ReconnectConfig(min_delay=1.0, max_delay=60.0, stable_after=0.0, jitter=False)


@dataclass
class _SubscribeState:
    pending_mid: int | None = None
    granted: bool = False
    retry_at: float | None = None
    backoff: Backoff = field(default_factory=lambda: Backoff(SUBSCRIBE_RETRY))


@dataclass(frozen=True)
class SubAck:
    """One SUBACK reason code in the agent's own type (paho's ReasonCode stays in the session)."""

    code: int
    text: str
    failure: bool


class Subscriptions:
    """The topics of one session and, per connection, whether the broker granted each."""

    def __init__(self, topics: Sequence[str], subscribe: Callable[[str], int | None], *, client_id: str,
                 notify: Callable[[SessionEvent], None], clock: Callable[[], float] = time.monotonic) -> None:
        self.topics = list(topics)
        self._subscribe = subscribe  # sends SUBSCRIBE; the message id, or None if it could not be queued
        self._client_id = client_id
        self._notify = notify
        self._clock = clock
        self._state: dict[str, _SubscribeState] = {}

    def new_connection(self) -> None:
        """A connection begins: nothing granted yet, no retry due, fresh backoff."""
        self._state = {t: _SubscribeState() for t in self.topics}

    @property
    def granted(self) -> bool:
        """Every topic granted on the current connection."""
        return all(s.granted for s in self._state.values())

    def subscribe_all(self) -> None:
        """After CONNACK: subscribe to every topic."""
        for topic in self._state:
            self._send(topic)

    def retry_due(self, now: float) -> None:
        """Subscribe again to the topics whose retry delay after a refusal has passed."""
        for topic, state in self._state.items():
            if state.retry_at is not None and now >= state.retry_at:
                log.info("retrying the subscription to %s", topic)
                self._send(topic)

    def _send(self, topic: str) -> None:
        state = self._state[topic]
        state.pending_mid = self._subscribe(topic)
        state.retry_at = None

    def answered(self, mid: int, code: SubAck | None) -> None:
        """The broker's SUBACK for message id `mid`: its first reason code (None: it sent none)."""
        for topic, state in self._state.items():
            if state.pending_mid != mid:
                continue
            state.pending_mid = None
            if code is not None and not code.failure:
                state.granted = True
                state.backoff.reset()
                log.info("subscribed to %s (QoS %d)", topic, code.code)
                self._notify(Subscribed(topic, True, code.text))
                continue
            state.granted = False
            state.backoff.connection_ended(None)
            delay = state.backoff.next_delay()
            state.retry_at = self._clock() + delay
            fix = (SHARED_UNSUPPORTED_FIX if code is not None and code.code == RC_SHARED_UNSUPPORTED
                   else f"check the broker ACL for client {self._client_id}")
            log.error("the broker refused the subscription to %s (SUBACK %s): commands cannot arrive; %s; "
                      "retrying in %.0f s", topic,
                      f"0x{code.code:02X} {code.text}" if code is not None else "missing", fix, delay,
                      extra={"MQTT_REASON": "subscribe_failed"})
            self._notify(Subscribed(topic, False, code.text if code is not None else "None"))
