"""Reconnect policy: exponential backoff with full jitter, reset only after a stable connection."""

from __future__ import annotations

import random
import statistics

import pytest

from agent.config import ReconnectConfig
from agent.connection.backoff import Backoff, HostRotation

CFG = ReconnectConfig(min_delay=1.0, max_delay=120.0, stable_after=60.0, jitter=True)


def test_delays_stay_between_min_and_a_doubling_ceiling():
    b = Backoff(CFG, random.Random(1))
    ceilings = []
    for _ in range(10):
        b.connection_ended(None)
        ceilings.append(b.ceiling())
        for _ in range(50):
            assert CFG.min_delay <= b.next_delay() <= b.ceiling()
    assert ceilings == [2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 120.0, 120.0, 120.0, 120.0]


def test_accept_then_drop_backs_off_instead_of_flapping_every_second():
    """Connections that die 0.3 s after CONNACK must not reset the backoff (paho's own delay would)."""
    b = Backoff(ReconnectConfig(min_delay=1.0, max_delay=120.0, stable_after=60.0, jitter=False))
    delays = []
    for _ in range(8):
        b.connection_ended(0.3)
        delays.append(b.next_delay())
    assert delays == [2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 120.0, 120.0]


def test_only_a_connection_up_for_stable_after_resets_the_backoff():
    b = Backoff(ReconnectConfig(min_delay=1.0, max_delay=120.0, stable_after=60.0, jitter=False))
    for _ in range(5):
        b.connection_ended(None)
    b.connection_ended(59.9)
    assert b.next_delay() == 64.0
    b.connection_ended(60.0)
    assert b.next_delay() == 2.0


def test_fleet_reconnects_are_spread_not_in_lockstep():
    """1000 gateways lose the broker at once: their retries spread over the window, round after round."""
    rng = random.Random(42)
    fleet = [Backoff(CFG, random.Random(rng.random())) for _ in range(1000)]
    for round_no in range(1, 6):
        delays = []
        for b in fleet:
            b.connection_ended(None)
            delays.append(b.next_delay())
        top = CFG.min_delay * 2**round_no
        # Full jitter: uniform over [min, ceiling], so the mean sits mid-window and the spread is wide.
        assert statistics.mean(delays) == pytest.approx((CFG.min_delay + top) / 2, rel=0.1)
        assert statistics.pstdev(delays) > 0.2 * (top - CFG.min_delay)
        # No 100 ms slot holds more than a few percent of the fleet.
        slots: dict[int, int] = {}
        for d in delays:
            slots[int(d * 10)] = slots.get(int(d * 10), 0) + 1
        assert max(slots.values()) < 0.1 * len(fleet) if round_no > 1 else max(slots.values()) < 0.2 * len(fleet)
        assert min(delays) >= CFG.min_delay and max(delays) <= top


def test_without_jitter_the_fleet_moves_in_lockstep():
    """The counter-example: the spread above comes from the jitter, not from the test."""
    fleet = [Backoff(ReconnectConfig(jitter=False)) for _ in range(100)]
    for b in fleet:
        b.connection_ended(None)
    assert len({b.next_delay() for b in fleet}) == 1


def test_takeover_damps_harder_and_needs_a_longer_connection_to_reset():
    b = Backoff(CFG, random.Random(3))
    b.connection_ended(2.0)
    b.takeover()
    assert b.damped and b.failures == 2
    for _ in range(200):
        d = b.next_delay()
        assert b.ceiling() / 2 <= d <= b.ceiling()  # upper half: the rate really falls
    assert b.stable_after == 240.0  # twice max_delay: the other client backs off as long as we do
    b.connection_ended(100.0)  # longer than stable_after, shorter than 2 x max_delay: not yet stable
    assert b.damped and b.failures == 3
    b.connection_ended(240.0)
    assert not b.damped and b.failures == 1


def test_host_rotation_moves_on_after_repeated_failures():
    rot = HostRotation(["a", "b"], attempts_per_host=2)
    assert rot.failed() is False and rot.current == "a"
    assert rot.failed() is True and rot.current == "b"
    rot.succeeded()
    assert rot.failed() is False and rot.current == "b"
    assert rot.failed() is True and rot.current == "a"
    single = HostRotation(["only"])
    assert not single.failed() and not single.failed() and single.current == "only"
