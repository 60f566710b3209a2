"""The listener contract, without a broker: on an in-process Session whose broker does not listen, the
outbox's size and drops reach every listener, and every failed attempt ends as `refused`. (Connections
that do end against a real mosquitto are tests/integration/test_session_events.py.)"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.config import load_config
from tests.support.sessions import SessionFactory


@pytest.fixture
def session_factory(tmp_path: Path) -> Iterator[SessionFactory]:
    factory = SessionFactory(tmp_path)
    yield factory
    factory.close()


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
