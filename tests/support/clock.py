"""A clock the test moves by hand, for every component that takes `clock=` (monotonic or wall)."""

from __future__ import annotations


class FakeClock:
    """Call it for the time; set `t` (or `now`, the same value) or `advance()` to move it."""

    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    @property
    def now(self) -> float:
        return self.t

    @now.setter
    def now(self, value: float) -> None:
        self.t = value

    def advance(self, seconds: float) -> float:
        self.t += seconds
        return self.t
