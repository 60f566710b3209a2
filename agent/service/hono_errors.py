"""Eclipse Hono's error messages (publish.hono_errors): the adapter's word that it could not process a
message the agent sent (too large, no such tenant, ...). Each is counted
(mqtt_agent_publish_hono_errors_total) and acknowledged, never dispatched as a command; at most
LOGS_PER_MINUTE a minute are logged, with what Hono said cut short and escaped."""

from __future__ import annotations

import logging
import time
from typing import Callable

from agent.logtext import untrusted
from agent.protocol import Inbound
from agent.topics import parse_error

log = logging.getLogger(__name__)

# At most this many log lines a minute (each one is counted).
LOGS_PER_MINUTE = 10


class HonoErrors:
    """Counts and logs the messages on Hono's error topic (subscribed when publish.hono_errors is on)."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic, per_minute: int = LOGS_PER_MINUTE) -> None:
        self.count = 0
        self._clock = clock
        self._per_minute = per_minute
        self._logged: list[float] = []  # when the lines of the last minute were logged

    @staticmethod
    def wants(msg: Inbound) -> bool:
        """Is this one of Hono's error messages (error///..., error//device/...)?"""
        return msg.topic.startswith("error/")

    def accept(self, msg: Inbound, ack: Callable[[], None]) -> None:
        ack()
        self.count += 1
        now = self._clock()
        self._logged = [t for t in self._logged if now - t < 60.0]
        if len(self._logged) < self._per_minute:
            self._logged.append(now)
            facts = parse_error(msg.topic, msg.payload)
            log.warning("Eclipse Hono could not process a message: %s", ", ".join(
                f"{k}={untrusted(v, 200)!r}" for k, v in facts.items()),
                extra={"HONO_ERROR": untrusted(facts.get("code", ""), 20)})
