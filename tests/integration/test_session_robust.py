"""The network thread outlives bugs: an unexpected exception inside the connect loop is logged, the
connection is reset, and the session connects again (a dead thread would leave a quiet agent)."""

from __future__ import annotations

import logging
import threading
from typing import Any

import pytest

import agent.connection.session as session_mod
from agent.config import load_config
from agent.connection.monitor import ConnectionMonitor
from agent.connection.session import ConnectionEnded, Session, SessionListener
from agent.tls.context import build_context

pytestmark = pytest.mark.integration


class Events(SessionListener):
    def __init__(self) -> None:
        self.connected_event = threading.Event()
        self.ended: list[ConnectionEnded] = []

    def connected(self, host: Any, keepalive: int, session_present: bool) -> None:
        self.connected_event.set()

    def connection_ended(self, ended: ConnectionEnded) -> None:
        self.ended.append(ended)


def test_network_thread_survives_an_internal_error(broker, make_config, monkeypatch, caplog) -> None:
    monkeypatch.setattr(session_mod, "INTERNAL_ERROR_RETRY", 0.2)
    cfg = load_config(make_config(broker))
    calls: list[int] = []

    def keepalive() -> int:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("tuner bug")
        return 30

    events = Events()
    monitor = ConnectionMonitor(cfg.mqtt, cfg.reconnect, cfg.keepalive_tuning)
    session = Session(cfg.mqtt, cfg.tls, monitor=monitor, ssl_context=build_context(cfg.tls),
                      on_message=lambda msg, ack: ack(), keepalive=keepalive, listeners=[events])
    with caplog.at_level(logging.ERROR, logger="agent.connection.session"):
        session.start()
        try:
            assert events.connected_event.wait(15), caplog.text
            assert session.thread_alive
            assert len(calls) == 2
            assert "internal error in the MQTT network loop; the connection is reset and retried in 0.2 s" in (
                caplog.text)
            assert "RuntimeError: tuner bug" in caplog.text
        finally:
            session.stop()
    assert [e.kind for e in events.ended][-1] == "shutdown"
