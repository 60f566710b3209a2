"""agent.wakeup.WakeUp: the main loop's (and the pump's and the API server's) wake-up, set from signal
handlers and other threads (no lock taken)."""

from __future__ import annotations

import signal
import time

from agent.wakeup import WakeUp


def test_a_wake_up_before_the_wait_ends_it_at_once_and_is_then_forgotten() -> None:
    w = WakeUp()
    w.set()
    w.set()
    t0 = time.monotonic()
    w.wait(10.0)
    assert time.monotonic() - t0 < 5.0
    t0 = time.monotonic()
    w.wait(0.05)  # both wake-ups were consumed by the first wait
    assert time.monotonic() - t0 >= 0.04


def test_a_signal_handler_wakes_a_waiting_main_thread() -> None:
    w = WakeUp()
    old = signal.signal(signal.SIGALRM, lambda *_: w.set())
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        t0 = time.monotonic()
        w.wait(10.0)
        assert time.monotonic() - t0 < 5.0
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def test_set_never_blocks_even_when_nobody_waits() -> None:
    w = WakeUp()
    for _ in range(100_000):  # far more than a pipe holds
        w.set()
    w.wait(0.0)
