"""Backpressure instead of stalls: a burst of events larger than the queue gets 507s (never a hang), the
watchdog keeps petting through it, and commands are served while the queue is still full."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from agent.config import load_config
from agent.tools.send import send_command
from tests.support.api import api_path, status
from tests.support.mqttclient import TestClient
from tests.support.notify import NotifySocket

pytestmark = pytest.mark.integration

QUEUE = 100
APPS, EACH = 6, 50  # 300 events at once against a queue of 100


def _app(sock: Path, app: int, answers: list[tuple[int, int, int]]) -> None:
    """One app: EACH events one after the other on one kept-alive connection; (app, n, status) each."""
    from agent.tools.publish import _UnixConnection

    conn = _UnixConnection(str(sock), 30)
    try:
        for n in range(EACH):
            conn.request("POST", "/v1/events", body=json.dumps({"app": app, "n": n}).encode())
            resp = conn.getresponse()
            body = json.loads(resp.read())
            assert resp.status in (202, 507), (resp.status, body)
            if resp.status == 507:
                assert (body["error"], body["limit"], body["value"]) == ("queue_full", "publish.max_messages", QUEUE)
            answers.append((app, n, resp.status))
    finally:
        conn.close()


def test_a_burst_larger_than_the_queue_gets_507s_while_the_watchdog_pets_and_commands_are_served(
        tmp_path: Path, make_broker: Callable[..., Any], make_config: Callable[..., Path],
        run_agent: Callable[..., Any]) -> None:
    broker = make_broker()
    cfg = make_config(broker, {"publish": {"max_messages": QUEUE}})
    TestClient(cfg, client_id="watcher", clean=False, subscribe="event").close()  # the broker keeps its session
    notify = NotifySocket(tmp_path)
    try:
        # WatchdogSec=4 as systemd would pass it: a ping every 2 s while the agent is healthy.
        run_agent(cfg, env={"NOTIFY_SOCKET": notify.env_value, "WATCHDOG_USEC": "4000000"})
        sock = api_path(cfg)
        notify.wait_for("READY", "^1$")
        assert broker.proc is not None
        # The broker stops answering (SIGSTOP: the connection stays up, no PUBACK comes back): nothing leaves
        # the queue, so exactly QUEUE events are accepted whatever the order of the apps' requests.
        broker.proc.send_signal(signal.SIGSTOP)
        try:
            answers: list[tuple[int, int, int]] = []
            started = time.monotonic()
            apps = [threading.Thread(target=_app, args=(sock, a, answers)) for a in range(APPS)]
            for t in apps:
                t.start()
            for t in apps:
                t.join(120)
            assert not any(t.is_alive() for t in apps), "an app still waits for an answer: the API stalled"
            assert len(answers) == APPS * EACH
            accepted = [(a, n) for a, n, code in answers if code == 202]
            assert len(accepted) == QUEUE and len(answers) - len(accepted) == APPS * EACH - QUEUE
            st = status(sock)["queue"]  # the API still answers with the queue full
            assert st["messages"] == QUEUE and st["accepted"] == {"event": QUEUE}
            # The watchdog kept petting through the burst (and its wait): pings at least every 2 s.
            time.sleep(max(0.0, started + 4.5 - time.monotonic()))
            pings = notify.pings(started, time.monotonic())
            assert len(pings) >= 2, f"watchdog pings during the burst: {pings}"
        finally:
            broker.proc.send_signal(signal.SIGCONT)
        # A command is answered at once, with the queue still full of events on their way out.
        result = send_command(load_config(cfg), "ping", b"", timeout=20)
        assert result.status == 200
        watcher = TestClient(cfg, client_id="watcher", clean=False, subscribe="event")
        try:
            got = [json.loads(m.payload) for m in watcher.wait(QUEUE, timeout=30)]
        finally:
            watcher.close()
        # Every accepted event arrives, each app's in the order it sent them; no refused one.
        for app in range(APPS):
            assert [e["n"] for e in got if e["app"] == app] == [n for a, n in accepted if a == app]
        assert sorted((e["app"], e["n"]) for e in got) == sorted(accepted)
    finally:
        notify.close()
