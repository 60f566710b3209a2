"""Power cuts (LazyFS) while apps publish: no message that got 202 is lost.

The state directory is on LazyFS, which drops every write not yet fsynced at a cut. An app publishes
events and telemetry batches through the API while the broker is down; the gateway loses power three
times (the agent and its children SIGKILLed, the unsynced writes dropped), and the agent starts again.
Then the broker comes back: everything that was answered 202 arrives (a message whose 202 the app
did not see may arrive although the app sent it again: at least once).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from tests.support.agentproc import AgentProcess
from tests.support.api import api_path, ndjson, post, wait_socket
from tests.support.mqttclient import TestClient
from tests.system.test_powercut import _powercut, lazyfs  # noqa: F401 - the LazyFS fixture

pytestmark = pytest.mark.integration

CUTS = 3


def test_power_cuts_lose_no_accepted_message(make_broker: Callable[..., Any], make_config: Callable[..., Path],
                                             lazyfs: Path) -> None:  # noqa: F811
    broker = make_broker(extra=["max_queued_messages 0"])
    cfg = make_config(broker, {"agent": {"state_dir": str(lazyfs)}}, name="pcpub")
    TestClient(cfg, client_id="cloud-pc", clean=False, subscribe="#").close()
    broker.stop()
    sock = api_path(cfg)
    accepted: list[str] = []
    stop = threading.Event()

    def app() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            try:
                if n % 5:
                    code, _ = post(sock, "/v1/events", json.dumps({"id": f"e{n}"}).encode())
                    ids = [f"e{n}"]
                else:
                    ids = [f"t{n}.{i}" for i in range(20)]
                    code, _ = post(sock, "/v1/telemetry/batch", ndjson([{"id": i} for i in ids]))
            except OSError:
                time.sleep(0.02)
                continue
            if code == 202:
                accepted.extend(ids)

    agents: list[AgentProcess] = []

    def start() -> AgentProcess:
        agent = AgentProcess(cfg, new_session=True).start()
        agents.append(agent)
        wait_socket(sock, 30)
        return agent

    agent = start()
    sender = threading.Thread(target=app, daemon=True)
    sender.start()
    try:
        for _ in range(CUTS):
            time.sleep(1.5)
            agent.kill_group()
            _powercut("cut", str(lazyfs))
            agent = start()
        time.sleep(1.0)
        stop.set()
        sender.join(10)
        broker.start()
        cloud = TestClient(cfg, client_id="cloud-pc", clean=False, subscribe="#")
        try:
            deadline = time.monotonic() + 60
            want = set(accepted)
            while time.monotonic() < deadline:
                got = {json.loads(m.payload)["id"] for m in list(cloud.messages)}
                if want <= got:
                    break
                time.sleep(0.2)
            got = {json.loads(m.payload)["id"] for m in list(cloud.messages)}
        finally:
            cloud.close()
    finally:
        stop.set()
        for a in agents:
            if a.proc and a.proc.poll() is None:
                a.stop()
    lost = sorted(set(accepted) - got)
    assert len(accepted) > 100, "the app got too few messages accepted to prove anything"
    assert lost == [], f"{len(lost)} message(s) answered 202 were lost: {lost[:20]}"
    events = [i for i in accepted if i.startswith("e")]
    print(f"power cuts: {CUTS}, accepted: {len(accepted)} ({len(events)} events), lost: 0")
