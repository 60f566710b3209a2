"""Failover policy (issue 17, point 8): a refused host is left at once, and the next host is tried
after about reconnect.min_delay, not after the backoff built against the dead one."""

from __future__ import annotations

import random

from agent.config import ReconnectConfig
from agent.connection.backoff import Backoff, HostRotation


def test_a_refused_host_is_left_after_one_try_an_ambiguous_failure_after_two():
    rotation = HostRotation(["a", "b"], attempts_per_host=2)
    assert rotation.failed(definite=True) is True and rotation.current == "b"
    assert rotation.failed() is False and rotation.current == "b"
    assert rotation.failed() is True and rotation.current == "a"


def test_a_single_host_is_never_rotated_even_when_refused():
    rotation = HostRotation(["a"])
    assert rotation.failed(definite=True) is False and rotation.current == "a"


def test_failover_delay_is_min_delay_jittered_whatever_the_backoff_built():
    cfg = ReconnectConfig(min_delay=1.0, max_delay=120.0)
    backoff = Backoff(cfg, random.Random(3))
    for _ in range(6):
        backoff.connection_ended(None)
    assert backoff.ceiling() == 64.0
    delays = [backoff.failover_delay() for _ in range(200)]
    assert all(0.5 <= d <= 1.0 for d in delays)
    assert max(delays) - min(delays) > 0.3  # spread, not in lockstep across a fleet
    assert backoff.failures == 6  # every host down: the delays after this one still grow


def test_failover_delay_without_jitter_is_min_delay():
    backoff = Backoff(ReconnectConfig(min_delay=2.0, jitter=False))
    backoff.connection_ended(None)
    assert backoff.failover_delay() == 2.0
