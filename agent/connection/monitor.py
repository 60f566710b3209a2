"""Staying connected: what the session asks after every connection's end, and before every connect.

`ConnectionMonitor` ties the pure parts together: the classifier names why a connection ended,
the keepalive tuner learns from idle drops, the backoff damps reconnects (harder when another
client uses our client id), and `connection-state.json` in state_dir keeps what was learned and
the recent disconnects for `mqtt-agent doctor`. It runs on the session's network thread only.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from agent.config import KeepaliveTuningConfig, MqttConfig, ReconnectConfig
from agent.connection.backoff import Backoff
from agent.connection.classify import (
    AUTH_FAILED,
    IDLE_TIMEOUT,
    NETWORK_ERROR,
    REFUSED,
    SESSION_TAKEN_OVER,
    SHUTDOWN,
    Classifier,
    EndEvidence,
    connect_hint,
)
from agent.connection.events import KeepaliveChanged, SessionEvent, SessionTakeover
from agent.connection.tuner import Change, KeepaliveTuner
from agent.state.connection_file import STATE_FILE, StateFile

log = logging.getLogger(__name__)

MAX_DISCONNECTS = 50


class ConnectionMonitor:
    """Classification, keepalive tuning, reconnect damping and their persistence, for one session."""

    def __init__(
        self,
        mqtt_cfg: MqttConfig,
        reconnect_cfg: ReconnectConfig,
        tuning_cfg: KeepaliveTuningConfig,
        *,
        state_dir: Path | None = None,
        client_id: str | None = None,
        backoff: Backoff | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.client_id = client_id or mqtt_cfg.client_id
        self.v5 = mqtt_cfg.is_v5
        self.backoff = backoff or Backoff(reconnect_cfg)
        self.classifier = Classifier(
            stable_after=reconnect_cfg.stable_after,
            suspicion_uptime=2.0 * reconnect_cfg.max_delay,
            window=max(600.0, 4.0 * reconnect_cfg.max_delay),
            persistent_session=not mqtt_cfg.clean_session,
            nat_drops=tuning_cfg.drops,
            clock=clock,
        )
        self.tuner = KeepaliveTuner(tuning_cfg, mqtt_cfg.keepalive, clock=clock, wall=wall)
        self._wall = wall
        self._clock = clock
        self._file = StateFile(state_dir / STATE_FILE) if state_dir is not None else None
        self.disconnects: deque[dict[str, Any]] = deque(maxlen=MAX_DISCONNECTS)
        self.duplicate: dict[str, Any] | None = None
        self._declared = False
        self._restore()

    # --- state file ----------------------------------------------------------------------------

    def _restore(self) -> None:
        if self._file is None:
            return
        data = self._file.load()
        message = self.tuner.restore(data.get("keepalive"))
        if message:
            log.info("%s", message, extra={"KEEPALIVE": self.tuner.current})
        for item in data.get("disconnects") or []:
            if isinstance(item, dict):
                self.disconnects.append(item)
        dup = data.get("duplicate_client_id")
        if isinstance(dup, dict) and dup.get("client_id") == self.client_id:
            self.duplicate = dup  # shown by doctor until a connection proves the other client gone

    def save(self) -> None:
        if self._file is None:
            return
        self._file.save({
            "keepalive": self.tuner.to_dict(),
            "disconnects": list(self.disconnects),
            "duplicate_client_id": self.duplicate,
        })

    # --- questions from the session ------------------------------------------------------------

    def keepalive(self) -> int:
        """The keepalive for the next CONNECT."""
        return self.tuner.current

    def classify(self, raw: Any) -> Any:
        """The session's ConnectionEnded with its final kind and reason (call `account` next)."""
        end: EndEvidence = raw
        verdict = self.classifier.classify(end)
        self._declared = verdict.declared_takeover
        refused = raw.reason_code if verdict.kind in (REFUSED, AUTH_FAILED) else None
        hint = connect_hint(end, self.v5, raw.error, refused)
        return replace(raw, kind=verdict.kind, reason=verdict.reason + hint)

    def account(self, ended: Any) -> list[SessionEvent]:
        """Account for a classified end in the backoff, the tuner and the state file; returns the
        events for the session's listeners."""
        events: list[SessionEvent] = []
        if self.classifier.revised_restart:
            self.classifier.revised_restart = False
            self.tuner.retract_drop()
            for entry in reversed(self.disconnects):
                if entry.get("uptime_s") is not None:
                    if entry.get("reason") == IDLE_TIMEOUT:
                        entry["reason"] = NETWORK_ERROR
                        entry["note"] = "the broker was restarting (it refused the next connection)"
                    break
        if ended.kind != SHUTDOWN:
            self.backoff.connection_ended(ended.uptime)
        if ended.kind == SESSION_TAKEN_OVER:
            self.backoff.takeover()
            events.append(SessionTakeover(self.client_id))
            self._takeover(self._declared)
        elif ended.kind == IDLE_TIMEOUT and ended.idle_for is not None:
            change = self.tuner.idle_drop(ended.idle_for, ended.keepalive)
            if change:
                events.append(self._changed(change))
        self._declared = False
        if ended.kind != SHUTDOWN:
            self._record(ended)
            self.save()
        return events

    def connection_up_for(self, uptime: float, keepalive: int) -> None:
        """Called while a connection lasts: a long one ends the duplicate-id suspicion and confirms a probe."""
        self.classifier.connection_up_for(uptime)
        self.tuner.connection_up_for(uptime, keepalive)
        if (self.duplicate is not None and not self.classifier.suspecting_takeover
                and uptime >= self.classifier.suspicion_uptime):
            log.info("the connection has been stable for %.0f s: the other client with client id %s seems gone",
                     uptime, self.client_id)
            self.duplicate = None
            self.save()

    def probe(self) -> list[SessionEvent] | None:
        """If a longer keepalive is due for a probe, switch to it; the session then reconnects to apply it."""
        if not self.tuner.probe_due():
            return None
        change = self.tuner.probe()
        if change is None:
            return None
        event = self._changed(change)
        self.save()
        return [event]

    # --- internals -----------------------------------------------------------------------------

    def _changed(self, change: Change) -> SessionEvent:
        log.warning("%s", change.evidence, extra={"KEEPALIVE": change.new, "KEEPALIVE_DIRECTION": change.direction})
        return KeepaliveChanged(change.old, change.new, change.direction, change.evidence)

    def _takeover(self, declared: bool) -> None:
        now = self._wall()
        if declared or self.duplicate is None:
            self.duplicate = {"client_id": self.client_id, "suspected_at": round(now, 3), "takeovers": 0}
        self.duplicate["takeovers"] = int(self.duplicate.get("takeovers", 0)) + 1
        # Drops that looked idle-related during the takeovers were takeovers too: no tuning from them.
        self.tuner.forget_drops()
        if declared:
            log.error("another client is connecting with client id %r: the broker closed this connection when it "
                      "took the session over (MQTT 3.1.1 shows this only as a lost connection). Give each device "
                      "its own mqtt.client_id (default: agent.device_id) and stop the clone; a shorter keepalive "
                      "does not help. Until then reconnects back off exponentially (up to %g s).",
                      self.client_id, self.backoff.cfg.max_delay, extra={"MQTT_REASON": SESSION_TAKEN_OVER})

    def _record(self, ended: Any) -> None:
        entry = {
            "at": round(self._wall(), 3),
            "reason": ended.kind,
            "host": str(ended.host),
            "uptime_s": None if ended.uptime is None else round(ended.uptime, 1),
            "idle_s": None if ended.idle_for is None else round(ended.idle_for, 1),
            "reason_code": ended.reason_code,
        }
        last = self.disconnects[-1] if self.disconnects else None
        # A long outage is one entry with a count, not fifty identical failed attempts.
        if (last is not None and ended.connected_at is None and last.get("uptime_s") is None
                and last.get("reason") == ended.kind and last.get("host") == entry["host"]):
            last["repeats"] = int(last.get("repeats", 1)) + 1
            last["at"] = entry["at"]
            return
        if ended.kind == NETWORK_ERROR and ended.connected_at is None:
            entry["error"] = ended.reason[:200]
        self.disconnects.append(entry)
