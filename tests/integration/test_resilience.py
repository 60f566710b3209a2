"""Staying connected, end to end: the real agent, a real mosquitto, and a TCP fault proxy between
them that drops idle flows, black-holes traffic, resets, or accepts and then drops."""

from __future__ import annotations

import collections
import json
import re
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest

from agent.config import load_config
from agent.connection.adapter import new_client
from agent.tls.context import build_context
from agent.tools.send import send_command
from tests.support.metrics import value
from tests.support.mosquitto import Mosquitto
from tests.support.outcomes import info, metric, metrics_on, scrape, wait_metric, wait_until
from tests.support.proxy import FaultProxy

pytestmark = pytest.mark.integration

ENDED = r"connection to \S+ ended"


@pytest.fixture
def make_proxy() -> Iterator[Callable[[Mosquitto], FaultProxy]]:
    proxies: list[FaultProxy] = []

    def make(broker: Mosquitto) -> FaultProxy:
        proxy = FaultProxy(broker.host, broker.port).start()
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        proxy.stop()


def state(path: Path) -> dict[str, Any]:
    return json.loads((path / "connection-state.json").read_text())


def test_nat_idle_limit_converges_and_the_learned_keepalive_survives_a_restart(
        make_broker, make_proxy, make_config, run_agent, tmp_path):
    """Proxy idle limit 4 s, keepalive 30 s, min 1 s: below 4 s within 3 drops, then no drop for 20 s."""
    proxy = make_proxy(make_broker())
    proxy.idle_limit = 4.0
    port, metrics = metrics_on()
    cfg = make_config(proxy, {"mqtt": {"keepalive": 30}, "keepalive_tuning": {"min": 1}, **metrics}, name="nat")
    agent = run_agent(cfg)
    wait_metric(port, "mqtt_agent_keepalive_adjustments_total", 1, timeout=45, direction="down")
    # Connected again with the learned keepalive, below the proxy's 4 s idle limit.
    learned = wait_until(lambda: (k := metric(port, "mqtt_agent_keepalive_seconds")) < 30 and
                         metric(port, "mqtt_agent_connected") == 1 and int(k), 15, "reconnected, learned keepalive")
    assert learned < 4
    samples = scrape(port)
    assert value(samples, "mqtt_agent_keepalive_adjustments_total", direction="down") == 1  # one step, 3 drops
    assert value(samples, "mqtt_agent_disconnects_total", reason="idle_timeout") == 3
    assert sum(v for (n, _), v in samples.items() if n == "mqtt_agent_disconnects_total") == 3
    assert proxy.stats.idle_drops == 3
    time.sleep(20)
    assert sum(v for (n, _), v in scrape(port).items() if n == "mqtt_agent_disconnects_total") == 3  # none since
    assert proxy.stats.idle_drops == 3
    saved = state(tmp_path / "state-nat")
    assert saved["keepalive"]["current"] == learned and saved["keepalive"]["learned"] is True
    assert saved["keepalive"]["configured"] == 30
    assert [d["reason"] for d in saved["disconnects"]] == ["idle_timeout"] * 3
    assert agent.stop() == 0

    run_agent(cfg)
    # The restart's first connection already uses the learned keepalive.
    assert value(scrape(port), "mqtt_agent_connects_total") == 1
    assert info(cfg)["keepalive_s"] == learned


def test_black_hole_is_noticed_within_one_and_a_half_keepalives(make_broker, make_proxy, make_config, run_agent):
    keepalive = 4
    proxy = make_proxy(make_broker())
    port, metrics = metrics_on()
    cfg = make_config(proxy, {"mqtt": {"keepalive": keepalive, "connect_timeout": 2.0}, **metrics},
                      name="blackhole")
    run_agent(cfg)
    time.sleep(1.0)
    started = time.monotonic()
    proxy.blackhole()
    # Polled every 50 ms: the time seen here is at most a poll late, never early.
    wait_metric(port, "mqtt_agent_disconnects_total", 1, timeout=20, reason="keepalive_timeout")
    noticed = time.monotonic() - started
    assert noticed <= 1.5 * keepalive + 2.0, noticed
    assert noticed >= keepalive - 1.0  # it waited for the PINGREQ, not a guess
    time.sleep(1.0)
    proxy.resume()
    # Connected again: the broker kept the persistent session and its subscription, so the ping arrives.
    wait_until(lambda: metric(port, "mqtt_agent_connected") == 1 and metric(port, "mqtt_agent_connects_total") >= 2,
               20, "reconnected after the black hole")
    result = send_command(load_config(cfg), "ping", b"{}", timeout=10)
    assert result.status == 200


def test_duplicate_client_id_is_reported_and_damped_without_touching_the_keepalive(
        broker, make_config, run_agent, tmp_path):
    overrides = {"mqtt": {"keepalive": 5, "client_id": "dup-1"}, "reconnect": {"min_delay": 0.5, "max_delay": 8.0},
                 "keepalive_tuning": {"min": 1}}
    port, metrics = metrics_on()
    first = run_agent(make_config(broker, {**overrides, **metrics}, name="first"))
    time.sleep(2.0)
    clone = run_agent(make_config(broker, overrides, name="clone"), wait_subscribed=False)
    started = time.monotonic()
    connects_at_start = metric(port, "mqtt_agent_connects_total")
    # Operator interface: the report names the duplicate client id and the key to change; it comes after
    # at most 3 takeovers (their order relative to the report is only in the log).
    report = first.wait_for(r"another client is connecting with client id 'dup-1'.*mqtt\.client_id", timeout=40)
    report_index = first.lines.index(report.string)
    ends_before = [line for line in first.lines[:report_index + 1] if re.search(ENDED, line)]
    assert 1 <= len(ends_before) <= 3, ends_before
    assert "session_taken_over" in ends_before[-1]
    connects = {}  # the first agent's connections by the seconds since the clone started
    for at in (12.0, 16.0, 36.0):
        time.sleep(max(0.0, started + at - time.monotonic()))
        connects[at] = metric(port, "mqtt_agent_connects_total")
    early = (connects[12.0] - connects_at_start) / 12.0
    late = (connects[36.0] - connects[16.0]) / (36.0 - 16.0)
    assert early > late, connects  # flaps per second fall instead of ping-ponging at the minimum delay
    assert late * 60 <= 12, connects
    samples = scrape(port)
    assert sum(v for (n, _), v in samples.items() if n == "mqtt_agent_keepalive_adjustments_total") == 0
    assert value(samples, "mqtt_agent_keepalive_seconds") == 5  # every connection kept keepalive 5 s
    assert value(samples, "mqtt_agent_session_takeovers_total") >= 1
    saved = state(tmp_path / "state-first")
    assert saved["duplicate_client_id"]["client_id"] == "dup-1"
    assert saved["duplicate_client_id"]["takeovers"] >= 1
    assert saved["keepalive"]["current"] == 5 and not saved["keepalive"]["learned"]
    assert "session_taken_over" in [d["reason"] for d in saved["disconnects"]]
    # The clone reports it too (its keepalive is covered statistically by the classifier's simulation).
    # Operator interface, as above.
    clone.wait_for(r"another client is connecting with client id 'dup-1'", timeout=5)


def test_accept_then_drop_backs_off_instead_of_flapping(make_broker, make_proxy, make_config, run_agent):
    proxy = make_proxy(make_broker())
    proxy.drop_after = 0.3  # CONNACK gets through, then the connection is reset
    port, metrics = metrics_on()
    cfg = make_config(proxy, {"reconnect": {"min_delay": 0.5, "max_delay": 8.0}, **metrics}, name="flap")
    agent = run_agent(cfg, wait_subscribed=False)
    time.sleep(15.0)
    samples = scrape(port)
    connects = value(samples, "mqtt_agent_connects_total")
    assert 3 <= connects <= 9, connects  # a fixed 0.5-1 s retry would have connected 12-18 times
    # Every drop is a network error, not mistaken for a takeover or anything else.
    ends = {dict(labels)["reason"]: v for (n, labels), v in samples.items() if n == "mqtt_agent_disconnects_total"}
    assert ends["network_error"] >= 3 and sum(ends.values()) == ends["network_error"], ends
    # The backoff's ceiling per attempt is only in the log line (the backoff itself is unit-tested).
    ceilings = [float(x) for x in re.findall(r"reconnecting in [\d.]+ s \(network_error; random delay up to ([\d.]+) s",
                                             agent.output)]
    assert ceilings[:4] == [1.0, 2.0, 4.0, 8.0], ceilings  # doubles at every drop: no reset on CONNACK
    assert set(ceilings[4:]) <= {8.0}
    delays = [float(x) for x in re.findall(r"reconnecting in ([\d.]+) s", agent.output)]
    assert all(0.5 <= d <= c for d, c in zip(delays, ceilings))
    assert proxy.stats.timed_drops >= 3


def test_failover_leaves_a_host_that_accepts_then_drops(make_broker, make_proxy, make_config, run_agent):
    broker = make_broker()
    bad = make_proxy(broker)
    bad.drop_after = 0.3
    port, metrics = metrics_on()
    cfg = make_config(bad, {"mqtt": {"hosts": [bad.address, broker.address]},
                            "reconnect": {"min_delay": 0.2, "max_delay": 1.0}, **metrics}, name="failover")
    run_agent(cfg, wait_subscribed=False)
    wait_until(lambda: metric(port, "mqtt_agent_broker_info", host=broker.address, protocol="3.1.1") == 1 and
               metric(port, "mqtt_agent_connected") == 1, 30, "connected to the good broker")
    ended = sum(v for (n, _), v in scrape(port).items() if n == "mqtt_agent_disconnects_total")
    time.sleep(6.0)
    assert sum(v for (n, _), v in scrape(port).items() if n == "mqtt_agent_disconnects_total") == ended  # stays
    assert bad.stats.timed_drops == 2
    # The agent serves commands on the good broker (the sender goes there directly).
    assert send_command(load_config(make_config(broker, name="direct")), "ping", b"{}", timeout=10).status == 200


class RetryingSender:
    """A command sender that survives broker restarts: persistent session, QoS 1, resubscribes on every
    connect, and re-sends (same REQ_ID) each command still unanswered after `retry_after` seconds."""

    def __init__(self, cfg_path: Path, window: int = 16, retry_after: float = 3.0) -> None:
        cfg = load_config(cfg_path)
        from dataclasses import replace
        mqtt_cfg = replace(cfg.mqtt, clean_session=False)
        self.client = new_client(mqtt_cfg, f"sender-{uuid.uuid4().hex[:6]}", build_context(cfg.tls))
        self.client.reconnect_delay_set(0.1, 0.5)
        self.host = cfg.mqtt.hosts[0]
        self.window = window
        self.retry_after = retry_after
        self.lock = threading.Lock()
        self.responses: dict[str, list[int]] = collections.defaultdict(list)
        self.sent_at: dict[str, float] = {}
        self.publishes = 0
        self.subscribed = threading.Event()
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: self.subscribed.set()

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if not reason.is_failure:
            client.subscribe("command///res/#", qos=1)

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        parts = msg.topic.split("/")
        with self.lock:
            self.responses[parts[4]].append(int(parts[5]))

    def start(self) -> None:
        self.client.connect(self.host.host, self.host.port, keepalive=5)
        self.client.loop_start()
        assert self.subscribed.wait(10)

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def send(self, rid: str) -> None:
        self.client.publish(f"command///req/{rid}/count", b"", qos=1)
        with self.lock:
            self.sent_at[rid] = time.monotonic()
            self.publishes += 1

    def run(self, rids: list[str], deadline: float, on_progress: Callable[[int], None]) -> None:
        todo = list(rids)
        while time.monotonic() < deadline:
            with self.lock:
                answered = {r for r in self.sent_at if self.responses.get(r)}
                outstanding = [r for r in self.sent_at if r not in answered]
                stale = [r for r in outstanding if time.monotonic() - self.sent_at[r] > self.retry_after]
            if not todo and not outstanding:
                return
            for rid in stale:
                self.send(rid)
            while todo and len(outstanding) < self.window:
                rid = todo.pop(0)
                self.send(rid)
                outstanding.append(rid)
                on_progress(len(rids) - len(todo))
            time.sleep(0.02)


def test_broker_killed_three_times_every_command_runs_exactly_once_and_is_answered(
        make_broker, make_config, run_agent, tmp_path):
    broker = make_broker()
    counter = tmp_path / "executions.txt"
    port, metrics = metrics_on()
    cfg = make_config(broker, {
        "mqtt": {"keepalive": 5},
        "reconnect": {"min_delay": 0.2, "max_delay": 1.0},
        "commands.count": {"argv": ["/bin/sh", "-c", f'echo "$MQTT_AGENT_REQ_ID" >> {counter}'], "timeout": 10.0},
        **metrics,
    }, name="kills")
    run_agent(cfg)
    sender = RetryingSender(cfg)
    sender.start()
    rids = [f"c{i:03d}" for i in range(200)]
    kills: list[int] = []

    def kill_at(progress: int) -> None:
        if len(kills) < 3 and progress >= 50 * (len(kills) + 1):
            kills.append(progress)
            broker.kill()
            time.sleep(0.5)
            broker.start()

    try:
        sender.run(rids, time.monotonic() + 90, kill_at)
    finally:
        sender.stop()
    assert len(kills) == 3
    executed = collections.Counter(counter.read_text().split())
    assert set(executed) == set(rids)
    assert [rid for rid, n in executed.items() if n != 1] == []  # exactly once, despite re-sends
    assert all(sender.responses[rid] and set(sender.responses[rid]) == {200} for rid in rids)
    assert sender.publishes > len(rids)  # the kills did force re-sends: the dedupe was exercised
    assert sum(v for (n, _), v in scrape(port).items() if n == "mqtt_agent_disconnects_total") >= 3


def test_a_response_in_the_outbox_survives_an_agent_crash(make_broker, make_proxy, make_config, run_agent, tmp_path):
    """The link is down when the command finishes, then the agent is SIGKILLed: the response waits on
    disk (in the state store's outbound queue) and goes out after the restart, once."""
    broker = make_broker()
    proxy = make_proxy(broker)
    ledger = tmp_path / "ran.txt"
    port, metrics = metrics_on()
    cfg = make_config(proxy, {
        "mqtt": {"keepalive": 5},
        "commands.slow": {"argv": ["/bin/sh", "-c", f"echo run >> {ledger}; sleep 2; echo done"], "timeout": 10.0},
        **metrics,
    }, name="crash")
    direct = make_config(broker, name="observer")
    agent = run_agent(cfg)
    sender = RetryingSender(direct)
    sender.start()
    try:
        sender.client.publish("command///req/r1/slow", b"", qos=1).wait_for_publish(5)
        wait_until(ledger.exists, 5, "the command started")
        time.sleep(0.5)  # the command is journalled and acknowledged; the handler sleeps
        proxy.refuse = True
        proxy.reset_all()
        wait_metric(port, "mqtt_agent_commands_total", 1, timeout=10, command="slow", status="200")
        time.sleep(0.3)
        agent.kill()
        db = sqlite3.connect(str(tmp_path / "state-crash" / "state.sqlite3"))
        assert db.execute("SELECT topic, kind FROM outbox").fetchall() == [("command///res/r1/200", "response")]
        assert db.execute("SELECT state, status FROM commands").fetchall() == [("done", 200)]
        db.close()
        assert sender.responses == {}
        proxy.refuse = False
        run_agent(cfg)
        end = time.monotonic() + 10
        while not sender.responses and time.monotonic() < end:
            time.sleep(0.05)
        time.sleep(1.0)
        assert dict(sender.responses) == {"r1": [200]}
        assert ledger.read_text() == "run\n"  # answered from the outbox, not run again
        assert metric(port, "mqtt_agent_commands_total", command="slow", status="200") == 0  # this run: none
    finally:
        sender.stop()
