"""The listener contract the metrics and systemd layers build on, checked on an in-process Session
against a real mosquitto behind a fault proxy: every connection ends exactly once with a final reason
through a keepalive tuning and probe cycle. (The outbox events, which need no broker, are
tests/unit/test_session_events.py.)"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.config import load_config
from agent.connection.classify import FINAL_KINDS, IDLE_TIMEOUT, SHUTDOWN
from tests.support.proxy import FaultProxy
from tests.support.sessions import SessionFactory


@pytest.fixture
def session_factory(tmp_path: Path) -> Iterator[SessionFactory]:
    factory = SessionFactory(tmp_path)
    yield factory
    factory.close()


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
