"""Store and forward with a real agent: an outage, an agent restart and a SIGKILL lose and double nothing.

An app publishes 10,000 telemetry messages (batches of 100) and 500 events while the broker is down
(for at least OUTAGE seconds; the issue asks for 60, scaled down so the test stays near a minute), the agent is
stopped and started once and SIGKILLed once in between. Then the broker comes back: every event arrives
exactly once and in order, and all the telemetry too (the bounds are not reached: the policy keeps all),
and the queue metrics say so before and after.
"""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable

import pytest

from tests.support.agentproc import AgentProcess
from tests.support.api import api_path, ndjson, post_until_accepted, status, wait_socket
from tests.support.mosquitto import free_port
from tests.support.mqttclient import TestClient
from tests.support.outcomes import wait_until

pytestmark = pytest.mark.integration

TELEMETRY = 10_000
EVENTS = 500
BATCH = 100
OUTAGE = 15.0  # seconds the broker is down at least


def _metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not exported")


def _samples(port: int, name: str) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith(name)}


def test_outage_restart_and_sigkill_lose_and_double_nothing(make_broker: Callable[..., Any],
                                                            make_config: Callable[..., Path]) -> None:
    broker = make_broker(extra=["max_queued_messages 0"])
    port = free_port()
    cfg = make_config(broker, {"metrics": {"listen": f"127.0.0.1:{port}"}}, name="durable")
    TestClient(cfg, client_id="cloud", clean=False, subscribe="#").close()  # a backend with a session
    sock = api_path(cfg)
    agents: list[AgentProcess] = []

    def start() -> AgentProcess:
        agent = AgentProcess(cfg).start()
        agents.append(agent)
        wait_socket(sock)
        return agent

    agent = start()
    wait_until(lambda: _metric(port, "mqtt_agent_connected") == 1, 20, "connected before the outage")
    broker.stop()
    down_at = time.monotonic()
    seq_t = seq_e = 0

    def publish_share(batches: int) -> None:
        nonlocal seq_t, seq_e
        for _ in range(batches):
            post_until_accepted(sock, "/v1/telemetry/batch", ndjson([{"t": seq_t + i} for i in range(BATCH)]))
            seq_t += BATCH
            for _ in range(EVENTS * BATCH // TELEMETRY):
                post_until_accepted(sock, "/v1/events", json.dumps({"e": seq_e}).encode())
                seq_e += 1

    total_batches = TELEMETRY // BATCH
    try:
        publish_share(total_batches // 3)
        assert agent.stop() == 0  # a clean restart
        agent = start()
        publish_share(total_batches // 3)
        agent.kill()  # SIGKILL: whatever was answered 202 is on disk
        agent = start()
        publish_share(total_batches - 2 * (total_batches // 3))
        assert (seq_t, seq_e) == (TELEMETRY, EVENTS)
        queued = status(sock)["queue"]
        assert queued["messages"] == TELEMETRY + EVENTS and queued["dropped"] == {}
        assert _metric(port, "mqtt_agent_publish_queue_messages") == TELEMETRY + EVENTS
        time.sleep(max(0.0, down_at + OUTAGE - time.monotonic()))
        assert _metric(port, "mqtt_agent_publish_queue_oldest_age_seconds") >= OUTAGE - 1
        broker.start()
        cloud = TestClient(cfg, client_id="cloud", clean=False, subscribe="#")
        try:
            got = cloud.wait(TELEMETRY + EVENTS, timeout=120)
            time.sleep(1.0)  # anything sent twice would have arrived by now
            got = list(cloud.messages)
        finally:
            cloud.close()
        events = [json.loads(m.payload)["e"] for m in got if m.topic.startswith("event")]
        telemetry = [json.loads(m.payload)["t"] for m in got if m.topic.startswith("telemetry")]
        assert events == list(range(EVENTS))  # exactly once, in order
        assert telemetry == list(range(TELEMETRY))  # the policy kept all of them (no bound reached), in order
        deadline = time.monotonic() + 20
        while _metric(port, "mqtt_agent_publish_queue_messages") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _metric(port, "mqtt_agent_publish_queue_messages") == 0
        assert _metric(port, "mqtt_agent_publish_queue_bytes") == 0
        sent = _samples(port, "mqtt_agent_publish_sent_total")
        # The last agent sent everything (its predecessors never reached the broker).
        assert sent == {'mqtt_agent_publish_sent_total{kind="telemetry"}': TELEMETRY,
                        'mqtt_agent_publish_sent_total{kind="event"}': EVENTS}
    finally:
        for a in agents:
            if a.proc and a.proc.poll() is None:
                a.stop()
    for a in agents:
        assert "Traceback" not in a.output, a.output[-3000:]
