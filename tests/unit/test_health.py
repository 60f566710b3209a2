"""The watchdog's judgement (pure) and the notification thread's decisions, with a fake clock."""

from __future__ import annotations

from functools import partial

import pytest

from agent.commands.dispatch import ENFORCED_TIMEOUT_GRACE
from agent.config import HostPort, LimitsConfig
from agent.service.health import DNS_ALLOWANCE, DispatchEvidence, LoopEvidence, LoopPhases, Verdict, judge, longest_job
from agent.service.notify import Notifier, ServiceWatchdog
from tests.support.clock import FakeClock
from tests.support.events import ended as make_ended

STALL = 3.0
HOST = HostPort("broker", 8883)
ended = partial(make_ended, host=HOST)




def idle_dispatch(last_progress: float = 0.0) -> DispatchEvidence:
    return DispatchEvidence(last_progress=last_progress, in_flight=0, queued=0, workers=4, longest_job=32.0)


@pytest.mark.parametrize(("heartbeat_age", "busy_for", "healthy"), [
    (0.4, None, True),          # a normal loop turn
    (STALL, None, True),        # at the limit
    (STALL + 0.1, None, False),  # stuck while connected
    (60.0, 100.0, True),        # sleeping before a reconnect (or blocked connecting) for longer
    (60.0, -STALL + 0.1, True),  # just past the end of the wait, within the stall limit
    (60.0, -STALL - 0.1, False),  # the wait is long over and the loop never came back
])
def test_network_loop(heartbeat_age, busy_for, healthy):
    now = 5000.0
    busy_until = None if busy_for is None else now + busy_for
    verdict = judge(now, LoopEvidence(True, now - heartbeat_age, busy_until), idle_dispatch(now - 999), STALL)
    assert verdict.healthy is healthy
    if not healthy:
        assert verdict.problem == f"the MQTT network loop has not run for {heartbeat_age:.0f} s"


def test_dead_network_thread_is_unhealthy_even_with_a_fresh_heartbeat():
    verdict = judge(10.0, LoopEvidence(False, 10.0), idle_dispatch(), STALL)
    assert verdict == Verdict(False, "the MQTT network thread has stopped")


@pytest.mark.parametrize(("in_flight", "queued", "idle", "healthy", "problem"), [
    (0, 0, 10_000.0, True, ""),                 # nothing to do: no progress needed
    (4, 10, 20.0, True, ""),                    # all workers busy within their timeouts
    (4, 10, 32.0 + STALL + 1, False, "14 command(s) pending, none started or finished for 36 s "
                                    "(the longest command timeout is 32 s)"),
    (1, 0, 32.0 + STALL - 1, True, ""),         # a long command, still within its timeout
    (1, 0, 32.0 + STALL + 1, False, "1 command(s) pending, none started or finished for 36 s "
                                   "(the longest command timeout is 32 s)"),
    (2, 1, STALL - 0.5, True, ""),              # a worker is free and was just handed the job
    (2, 1, STALL + 1, False, "1 command(s) waiting with a worker free, none started for 4 s"),
])
def test_dispatcher(in_flight, queued, idle, healthy, problem):
    now = 5000.0
    dispatch = DispatchEvidence(now - idle, in_flight, queued, workers=4, longest_job=32.0)
    verdict = judge(now, LoopEvidence(True, now), dispatch, STALL)
    assert verdict == Verdict(healthy, problem)


def test_longest_job_covers_handler_timeouts_and_the_enforced_grace():
    class Slow:
        timeout = 300.0

    class Plain:
        pass

    limits = LimitsConfig(command_timeout=30.0)
    assert longest_job({"a": Plain()}, limits) == 30.0 + ENFORCED_TIMEOUT_GRACE
    assert longest_job({"a": Plain(), "b": Slow()}, limits) == 300.0 + ENFORCED_TIMEOUT_GRACE


def test_loop_phases_follow_the_session_events():
    clock = FakeClock(100.0)
    phases = LoopPhases(connect_timeout=10.0, clock=clock)
    budget = 4 * 10.0 + DNS_ALLOWANCE
    assert phases.busy_until == 100.0 + budget  # the thread is only starting
    assert not phases.first_attempt.is_set()
    clock.now = 101.0
    phases.connecting(HOST, 1)
    assert phases.busy_until == 101.0 + budget
    assert phases.first_attempt.is_set()
    phases.connected(HOST, 60, False)
    assert phases.busy_until is None  # connected: the heartbeat alone counts
    clock.now = 200.0
    phases.connection_ended(ended(connected_at=101.0))
    assert phases.busy_until is None
    phases.reconnect_scheduled(64.0, ended())
    assert phases.busy_until == 264.0


class Recorder:
    def __init__(self) -> None:
        self.messages: list[str] = []

    def __call__(self, message: str) -> bool:
        self.messages.append(message)
        return True


def make_watchdog(verdicts: list[Verdict], interval: float | None = 2.0):
    sent = Recorder()
    clock = FakeClock(0.0)
    status = ["connected to broker:8883 (MQTT 3.1.1, keepalive 60 s)"]
    wd = ServiceWatchdog(Notifier(sent), lambda: status[0], lambda: verdicts[0], interval=interval, clock=clock)
    return wd, sent, clock, status


def test_watchdog_pings_on_its_interval_only_while_healthy():
    verdicts = [Verdict(True)]
    wd, sent, clock, _ = make_watchdog(verdicts)
    due = 0.0
    timeline = []
    for t in range(12):
        clock.now = float(t)
        verdicts[0] = Verdict(not 4 <= t <= 7, "the MQTT network loop has not run for 5 s")
        before = len(sent.messages)
        due = wd._turn(due)
        timeline.append((t, [m for m in sent.messages[before:]]))
    pings = [t for t, msgs in timeline if "WATCHDOG=1" in msgs]
    # every 2 s while healthy; none at 4..7; the first healthy turn after that pings at once
    assert pings == [0, 2, 8, 10]
    statuses = [m for m in sent.messages if m.startswith("STATUS=")]
    assert statuses == [
        "STATUS=connected to broker:8883 (MQTT 3.1.1, keepalive 60 s)",
        "STATUS=unhealthy: the MQTT network loop has not run for 5 s (watchdog pings withheld)",
        "STATUS=connected to broker:8883 (MQTT 3.1.1, keepalive 60 s)",
    ]


def test_the_thread_never_spins_while_unhealthy():
    verdicts = [Verdict(True)]
    wd, sent, clock, _ = make_watchdog(verdicts, interval=2.0)
    clock.now = 10.0
    due = wd._turn(10.0)  # pings, next one due at 12
    assert (due, sent.messages[-1]) == (12.0, "WATCHDOG=1")
    clock.now = 11.7
    assert wd.wait_time(due) == pytest.approx(0.3)
    verdicts[0] = Verdict(False, "the MQTT network thread has stopped")
    clock.now = 12.5
    due = wd._turn(due)
    assert due == 12.0 and sent.messages[-1].startswith("STATUS=unhealthy")  # no ping; overdue, kept due...
    assert wd.wait_time(due) == 1.0  # ...but the thread sleeps a full check interval between checks


def test_without_a_watchdog_only_status_is_sent():
    wd, sent, clock, status = make_watchdog([Verdict(True)], interval=None)
    wd._turn(0.0)
    status[0] = "reconnecting in 8 s: idle_timeout"
    clock.now = 1.0
    wd._turn(0.0)
    wd.set_phase("stopping: waiting up to 10 s for 1 running command(s)")
    wd._turn(0.0)
    assert sent.messages == [
        "STATUS=connected to broker:8883 (MQTT 3.1.1, keepalive 60 s)",
        "STATUS=reconnecting in 8 s: idle_timeout",
        "STATUS=stopping: waiting up to 10 s for 1 running command(s)",
    ]


def test_stall_limit_follows_the_watchdog_interval_with_a_floor():
    assert ServiceWatchdog.stall_limit(15.0) == 15.0  # WatchdogSec=30
    assert ServiceWatchdog.stall_limit(1.0) == 3.0
    assert ServiceWatchdog.stall_limit(None) == 15.0
