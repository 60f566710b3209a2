"""Fleet storm: N agent processes on one mosquitto, the broker restarted under them.

What the broker sees is read from its own log (`connection_messages true`, `log_type subscribe`):
every CONNECT from a fleet agent ("New client connected from ... as fleet-..."), every accepted
TCP connection ("New connection from ...", which also counts the start-up port probe) and every
subscription ("CLIENT_ID 1 command///req/#"). Lines are stamped when read; the log is polled every
few milliseconds, far finer than the one-second rates reported.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.env import BenchEnv
from bench.machine import mem_available_kib
from bench.procs import NewLines, Proc, stop_all
from bench.report import peak_rate, per_second

NEW_CONNECTION = re.compile(r"New connection from ")
NEW_CLIENT = re.compile(r"New client connected from \S+ as (fleet-\S+) ")
SUBSCRIBED = re.compile(r"^\S+: (\S+) \d (command///req/#)$")

# Resident memory of one idle agent process is about 25-30 MiB; keep a margin for the broker,
# the benchmark itself and whatever else runs on the machine.
AGENT_BUDGET_KIB = 40 * 1024
MEMORY_SHARE = 0.5
START_BATCH = 10


@dataclass
class LogTail:
    """Follows a growing log file in a thread; keeps (time.perf_counter(), line) pairs."""

    path: Path
    interval: float = 0.005
    lines: list[tuple[float, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._new = NewLines(self.path, self.path.stat().st_size if self.path.exists() else 0)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="log-tail", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.poll()

    def poll(self) -> None:
        new = self._new.read()
        if new:
            with self._lock:
                self.lines += new

    def since(self, t0: float) -> list[tuple[float, str]]:
        with self._lock:
            return [(t, line) for t, line in self.lines if t >= t0]

    def subscribed(self, t0: float) -> dict[str, float]:
        """Client id -> when it (first) subscribed to the command topic at or after t0."""
        out: dict[str, float] = {}
        for t, line in self.since(t0):
            m = SUBSCRIBED.match(line)
            if m:
                out.setdefault(m.group(1), t)
        return out

    def matching(self, rx: re.Pattern[str], t0: float) -> list[float]:
        return [t for t, line in self.since(t0) if rx.search(line)]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)


def affordable_fleet(requested: int) -> tuple[int, str]:
    """How many agents fit in memory; a note if that is fewer than requested."""
    avail = mem_available_kib()
    if not avail:
        return requested, ""
    fits = max(2, int(avail * MEMORY_SHARE // AGENT_BUDGET_KIB))
    if fits >= requested:
        return requested, ""
    return fits, (f"fleet scaled down from {requested} to {fits} agents: {avail // 1024} MiB available, "
                  f"~{AGENT_BUDGET_KIB // 1024} MiB budgeted per agent, at most {MEMORY_SHARE:.0%} of it used")


def storm(env: BenchEnv, n: int, *, jitter: bool, downtime: float, timeout: float,
          log: Any = print) -> dict[str, Any]:
    """Start `n` agents, restart the broker, and measure how they come back."""
    tag = "jitter" if jitter else "nojitter"
    broker = env.broker(f"fleet-{tag}", extra=["log_type subscribe"])
    tail = LogTail(broker.log_path)
    agents: list[Proc] = []
    result: dict[str, Any] = {"jitter": jitter, "agents": n, "downtime_s": downtime}
    try:
        t_begin = time.perf_counter()
        start_deadline = time.monotonic() + 60 + 2.0 * n
        for i in range(n):
            name = f"fleet-{tag}-{i:03d}"
            agents.append(env.agent(name, broker, metrics=False, notify=False,
                                    overrides={"reconnect": {"jitter": jitter}}).start())
            if len(agents) % START_BATCH == 0 or len(agents) == n:
                # Let each batch connect before starting the next: 2 cores, and the start-up is not measured.
                _wait_until(lambda: len(tail.subscribed(t_begin)) >= len(agents), start_deadline,
                            f"{len(agents)} fleet agents subscribed", agents)
        log(f"  fleet ({tag}): {n} agents subscribed after {time.perf_counter() - t_begin:.1f} s")
        time.sleep(2.0)
        t_down = time.perf_counter()
        broker.stop()
        time.sleep(downtime)
        t_restart = time.perf_counter()  # nothing can reach the broker before this
        broker.start()
        t_up = time.perf_counter()  # the port accepts connections
        end = time.monotonic() + timeout
        while time.monotonic() < end and len(tail.subscribed(t_restart)) < n:
            time.sleep(0.05)
        time.sleep(1.0)  # late attempts still count towards the rate
        tail.poll()
        back = tail.subscribed(t_restart)
        connects = tail.matching(NEW_CLIENT, t_restart)
        result.update(
            tcp_accepts=len(tail.matching(NEW_CONNECTION, t_restart)),
            back=len(back),
            all_back_after_up_s=(max(back.values()) - t_up) if len(back) >= n else None,
            all_back_after_down_s=(max(back.values()) - t_down) if len(back) >= n else None,
            connects=len(connects),
            peak_connects_per_s=peak_rate(connects, 1.0),
            per_second=per_second(connects, t_restart),
            broker_start_s=t_up - t_restart,
        )
        if len(back) < n:
            result["note"] = f"only {len(back)} of {n} agents were back within {timeout:g} s"
        return result
    finally:
        stop_all(agents)
        tail.close()
        broker.stop()


def _wait_until(cond: Any, deadline: float, what: str, procs: list[Proc]) -> None:
    while not cond():
        dead = [p for p in procs if not p.alive]
        if dead:
            raise RuntimeError(f"fleet agent {dead[0].name} exited:\n{dead[0].tail()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)
