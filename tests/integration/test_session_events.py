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

from agent.config import Config, load_config
from agent.connection.classify import FINAL_KINDS, IDLE_TIMEOUT, SHUTDOWN
from agent.connection.monitor import ConnectionMonitor
from agent.connection.session import ConnectionEnded, Session, SessionListener
from agent.state.outbox import Outbox
from agent.state.store import StateStore
from agent.tls.context import build_context
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
        outbox = Outbox(StateStore(state), cfg.limits.max_outbox_messages, window=cfg.mqtt.max_inflight,
                        report_interval=0)
        monitor = ConnectionMonitor(cfg.mqtt, cfg.reconnect, cfg.keepalive_tuning, state_dir=state)
        rec = Recorder()
        session = Session(cfg.mqtt, cfg.tls, monitor=monitor, ssl_context=build_context(cfg.tls),
                          on_message=lambda msg, ack: ack(), outbox=outbox, listeners=[rec])
        made.append((session, outbox))
        return session, rec, outbox

    yield make
    for session, outbox in made:
        session.stop()
        outbox.close()


def test_each_connection_ends_once_with_a_final_reason_through_a_tuning_and_probe_cycle(
        make_broker, make_config, session_factory):
    """Idle limit 2.5 s: tuned down to 1 s; after probe_after without drops the session reconnects with
    a longer keepalive (a `shutdown` end: the agent asked for it); the next idle drop sends it straight back."""
    broker = make_broker()
    proxy = FaultProxy(broker.host, broker.port).start()
    try:
        proxy.idle_limit = 2.5
        cfg = load_config(make_config(proxy, {"mqtt": {"keepalive": 30},
                                              "keepalive_tuning": {"min": 1, "drops": 2, "probe_after": 5.0}}))
        session, rec, _ = session_factory(cfg)
        session.start()
        rec.wait(lambda ev: len([1 for n, _ in ev if n == "keepalive_changed"]) == 3, timeout=40)
        session.stop()
    finally:
        proxy.stop()
    changes = rec.named("keepalive_changed")
    assert [(old, new, direction) for old, new, direction, _ in changes] == [
        (30, 1, "down"), (1, 16, "up"), (16, 1, "down")]
    assert changes[0][3].startswith("keepalive 30 s -> 1 s: 2 drops in ")
    assert changes[1][3].startswith("keepalive 1 s -> 16 s: no idle drop for ")
    assert "while probing" in changes[2][3]
    assert [args[0] for args in rec.named("connected")][:4] == [30, 30, 1, 16]
    ends = [args[0] for args in rec.named("connection_ended")]
    assert len(ends) == len(rec.named("connected"))  # exactly one end per connection, none twice
    assert all(e.kind in FINAL_KINDS for e in ends)
    assert [e.kind for e in ends][:4] == [IDLE_TIMEOUT, IDLE_TIMEOUT, SHUTDOWN, IDLE_TIMEOUT]
    assert ends[2].reason == "applying a longer keepalive (probe)"


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
