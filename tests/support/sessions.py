"""An in-process Session wired as the agent wires it (monitor, outbox on a real state store), with a
listener that records every event: for the tests of the listener contract (unit and integration)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Callable

from agent.config import Config
from agent.connection.monitor import ConnectionMonitor
from agent.connection.session import ConnectionEnded, Session, SessionListener
from agent.state.outbox import Outbox
from agent.state.store import StateStore
from agent.tls.context import build_context


class Recorder(SessionListener):
    """Every listener event, in order, as (name, args); `wait` blocks until a predicate over them holds."""

    def __init__(self) -> None:
        self.events: list[tuple[str, tuple[Any, ...]]] = []
        self.cond = threading.Condition()

    def _add(self, name: str, *args: Any) -> None:
        with self.cond:
            self.events.append((name, args))
            self.cond.notify_all()

    def connected(self, host: Any, keepalive: int, session_present: bool) -> None:
        self._add("connected", keepalive)

    def connection_ended(self, ended: ConnectionEnded) -> None:
        self._add("connection_ended", ended)

    def keepalive_changed(self, old: int, new: int, direction: str, evidence: str) -> None:
        self._add("keepalive_changed", old, new, direction, evidence)

    def outbox_changed(self, size: int) -> None:
        self._add("outbox_changed", size)

    def outbox_dropped(self, count: int) -> None:
        self._add("outbox_dropped", count)

    def wait(self, pred: Callable[[list[tuple[str, tuple[Any, ...]]]], bool], timeout: float = 20.0) -> None:
        end = time.monotonic() + timeout
        with self.cond:
            while not pred(self.events):
                left = end - time.monotonic()
                assert left > 0, f"timed out; events: {self.events}"
                self.cond.wait(left)

    def named(self, name: str) -> list[tuple[Any, ...]]:
        with self.cond:
            return [args for n, args in self.events if n == name]


class SessionFactory:
    """make(cfg) -> (session, recorder, outbox), each stopped and closed by close()."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.made: list[tuple[Session, Outbox]] = []

    def make(self, cfg: Config) -> tuple[Session, Recorder, Outbox]:
        state = self.dir / f"state{len(self.made)}"
        state.mkdir()
        outbox = Outbox(StateStore(state), cfg.limits.max_outbox_messages, window=cfg.mqtt.max_inflight,
                        report_interval=0)
        monitor = ConnectionMonitor(cfg.mqtt, cfg.reconnect, cfg.keepalive_tuning, state_dir=state)
        rec = Recorder()
        session = Session(cfg.mqtt, cfg.tls, monitor=monitor, ssl_context=build_context(cfg.tls),
                          on_message=lambda msg, ack: ack(), outbox=outbox, listeners=[rec])
        self.made.append((session, outbox))
        return session, rec, outbox

    __call__ = make

    def close(self) -> None:
        for session, outbox in self.made:
            session.stop()
            outbox.close()
