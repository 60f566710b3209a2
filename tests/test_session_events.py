"""The listener contract the metrics and systemd layers build on, checked on an in-process Session
against a real mosquitto: every connection ends exactly once with a final reason, and the
resilience events (keepalive_changed, outbox_changed, outbox_dropped) reach every listener."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest

from agent.classify import FINAL_KINDS, IDLE_TIMEOUT, SHUTDOWN
from agent.config import Config, load_config
from agent.outbox import Outbox
from agent.resilience import ConnectionMonitor
from agent.session import ConnectionEnded, Session, SessionListener
from agent.tls import build_context
from tests.support.proxy import FaultProxy

pytestmark = pytest.mark.integration


class Recorder(SessionListener):
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


@pytest.fixture
def session_factory(tmp_path: Path) -> Iterator[Callable[..., tuple[Session, Recorder, Outbox]]]:
    made: list[tuple[Session, Outbox]] = []

    def make(cfg: Config) -> tuple[Session, Recorder, Outbox]:
        state = tmp_path / f"state{len(made)}"
        state.mkdir()
        outbox = Outbox(state / "outbox.sqlite3", cfg.limits.max_outbox_messages, window=cfg.mqtt.max_inflight)
        monitor = ConnectionMonitor(cfg.mqtt, cfg.reconnect, cfg.keepalive_tuning, state_dir=state)
        rec = Recorder()
        session = Session(cfg.mqtt, cfg.tls, cfg.reconnect, ssl_context=build_context(cfg.tls),
                          on_message=lambda msg: None, monitor=monitor, outbox=outbox, listeners=[rec])
        made.append((session, outbox))
        return session, rec, outbox

    yield make
    for session, outbox in made:
        session.stop()
        outbox.close()


def test_each_connection_ends_once_with_a_final_reason_and_tuning_is_reported(
        make_broker, make_config, session_factory):
    broker = make_broker()
    proxy = FaultProxy(broker.host, broker.port).start()
    try:
        proxy.idle_limit = 2.5
        cfg = load_config(make_config(proxy, {"mqtt": {"keepalive": 30},
                                              "keepalive_tuning": {"min": 1, "drops": 2}}))
        session, rec, _ = session_factory(cfg)
        session.start()
        rec.wait(lambda ev: any(n == "connected" and a == (1,) for n, a in ev))
        changes = rec.named("keepalive_changed")
        assert len(changes) == 1
        old, new, direction, evidence = changes[0]
        assert (old, new, direction) == (30, 1, "down")
        assert evidence.startswith("keepalive 30 s -> 1 s: 2 drops in ")
        session.stop()
    finally:
        proxy.stop()
    ends = [args[0] for args in rec.named("connection_ended")]
    connects = rec.named("connected")
    assert len(ends) == len(connects)  # exactly one end per connection, none twice
    assert all(e.kind in FINAL_KINDS for e in ends)
    assert [e.kind for e in ends] == [IDLE_TIMEOUT, IDLE_TIMEOUT, SHUTDOWN]


def test_outbox_size_and_drops_reach_the_listeners(make_config, session_factory):
    # Nothing listens on the broker port: the link stays down and responses pile up in the outbox.
    cfg = load_config(make_config(None, {"limits": {"max_outbox_messages": 3}}))
    session, rec, outbox = session_factory(cfg)
    session.start()
    for n in range(5):
        session.publish(f"command///res/r{n}/200", b"{}", 1)
    rec.wait(lambda ev: len([a for n, a in ev if n == "outbox_dropped"]) == 2)
    assert rec.named("outbox_dropped") == [(1,), (1,)]
    sizes = [args[0] for args in rec.named("outbox_changed")]
    assert sizes[-1] == 3 and max(sizes) == 3
    assert sizes == sorted(sizes)
    assert outbox.size == 3 and session.unacknowledged() == 3
    rec.wait(lambda ev: any(n == "connection_ended" for n, _ in ev))
    ends = [args[0] for args in rec.named("connection_ended")]
    assert ends and all(e.kind == "refused" for e in ends)
