"""The measurements, each against real processes on a real mosquitto.

Agent and baseline take turns on the same broker (both subscribe to `command///req/#`, so they
cannot run at once), alternating which goes first in each round so that neither always meets
the machine in the same state. Every wait is bounded; a process that dies or never answers ends
the measurement with an error naming it.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Any, Callable

from bench.env import BenchEnv
from bench.loadgen import Loader
from bench.procs import Proc
from bench.report import percentile
from tests.support.mosquitto import Mosquitto

SUBSCRIBED = r"\bsubscribed\b"
CONNECTED = r"\bconnected\b"
PAYLOAD = b'{"echo":"bench"}'
WHO = ("agent", "baseline")

Log = Callable[[str], None]


@dataclass(frozen=True)
class Params:
    """Counts and durations. The defaults are the issue's full run; `QUICK` is the CI smoke run."""

    rounds: int = 5
    warmup: int = 300
    pings: int = 1000
    throughput: int = 5000
    window: int = 64
    execs: int = 50
    idle_seconds: float = 60.0
    memory_commands: int = 20000
    reconnect_rounds: int = 3
    fleet: int = 100
    fleet_downtime: float = 5.0
    fleet_timeout: float = 180.0
    startup_probe_interval: float = 0.005

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


QUICK = Params(rounds=1, warmup=20, pings=30, throughput=300, execs=3, idle_seconds=2.0, memory_commands=400,
               reconnect_rounds=1, fleet=3, fleet_downtime=1.0, fleet_timeout=60.0)


def _ms(values: list[float], q: float) -> float:
    return percentile(values, q) * 1000.0


def _last(res: dict[str, Any], key: str) -> str:
    values = res.get(key) or [None]
    return "-" if values[-1] is None else f"{values[-1]:.3f}"


def _start(env: BenchEnv, who: str, name: str, broker: Mosquitto) -> Proc:
    proc = env.agent(name, broker) if who == "agent" else env.baseline(name, broker)
    return proc.start()


def command_rounds(env: BenchEnv, broker: Mosquitto, loader: Loader, p: Params, log: Log) -> dict[str, Any]:
    """Start-up, sequential `ping`, throughput with `window` outstanding, exec round trip; per round."""
    out: dict[str, Any] = {w: defaultdict(list) for w in WHO}
    for w in WHO:
        out[w]["errors"] = 0
    ready_seen = False
    for r in range(p.rounds):
        order = WHO if r % 2 == 0 else WHO[::-1]
        for who in order:
            proc = _start(env, who, f"{who}-r{r}", broker)
            res = out[who]
            try:
                first = loader.first_answer("ping", PAYLOAD, p.startup_probe_interval, 60.0,
                                            alive=proc.running, tick=proc.read_lines)
                subscribed = proc.first_line(SUBSCRIBED)
                ready = proc.notify.ready_at if proc.notify else None
                res["start_first_answer_s"].append(first - proc.started)
                res["start_subscribed_s"].append(None if subscribed is None else subscribed - proc.started)
                if who == "agent":
                    ready_seen = ready_seen or ready is not None
                    # Before READY=1 exists (or if it never came), the log's "subscribed" line stands in.
                    at = ready if ready is not None else subscribed
                    res["start_ready_s"].append(None if at is None else at - proc.started)
                loader.drain()
                loader.sequential("ping", PAYLOAD, p.warmup // 2)
                loader.windowed("ping", PAYLOAD, p.warmup, p.window)
                seq = loader.sequential("ping", PAYLOAD, p.pings)
                thr = loader.windowed("ping", PAYLOAD, p.throughput, p.window)
                ex = loader.sequential("true", b"", p.execs)
                for batch in (seq, thr, ex):
                    res["errors"] += batch.errors
                if seq.latencies:
                    res["ping_p50_ms"].append(_ms(seq.latencies, 50))
                    res["ping_p99_ms"].append(_ms(seq.latencies, 99))
                res["throughput_per_s"].append(thr.rate)
                if ex.latencies:
                    res["exec_p50_ms"].append(_ms(ex.latencies, 50))
                    res["exec_p99_ms"].append(_ms(ex.latencies, 99))
                log(f"  round {r + 1}/{p.rounds} {who:8s}: first answer {first - proc.started:.3f} s, "
                    f"ping p50 {_last(res, 'ping_p50_ms')} ms p99 {_last(res, 'ping_p99_ms')} ms, "
                    f"{thr.rate:,.0f} commands/s, exec p50 {_last(res, 'exec_p50_ms')} ms"
                    + (f", {res['errors']} errors so far" if res["errors"] else ""))
            finally:
                proc.stop()
                loader.drain(quiet=0.1)
    out["agent"]["ready_source"] = "sd_notify" if ready_seen else "log"
    return {w: dict(v) for w, v in out.items()}


@dataclass
class IdleGroup:
    """Agent, baseline responder and bare paho client, started on their own broker and left alone."""

    agent: Proc
    baseline: Proc
    bare: Proc
    t0: float = 0.0
    cpu0: dict[str, float] | None = None
    rss: dict[str, int] | None = None

    @property
    def procs(self) -> dict[str, Proc]:
        return {"agent": self.agent, "baseline": self.baseline, "bare": self.bare}


def idle_start(env: BenchEnv, broker: Mosquitto, settle: float, log: Log) -> IdleGroup:
    """Start the three idle processes; once connected and settled, take RSS and the first CPU reading.

    The idle processes get no traffic, so their own CPU time is what they cost while idle, whatever
    else the machine does meanwhile (the other measurements run on another broker).
    """
    group = IdleGroup(env.agent("idle-agent", broker), env.baseline("idle-baseline", broker),
                      env.baseline("idle-bare", broker, bare=True))
    for proc in group.procs.values():
        proc.start()
    group.agent.wait_line(SUBSCRIBED, 60.0)
    group.baseline.wait_line(SUBSCRIBED, 60.0)
    group.bare.wait_line(CONNECTED, 60.0)
    time.sleep(settle)
    group.rss = {k: p.rss_kib() for k, p in group.procs.items()}
    group.cpu0 = {k: p.cpu_seconds() for k, p in group.procs.items()}
    group.t0 = time.perf_counter()
    log(f"  idle: RSS agent {group.rss['agent'] / 1024:.1f} MiB, baseline {group.rss['baseline'] / 1024:.1f} MiB, "
        f"bare paho client {group.rss['bare'] / 1024:.1f} MiB; CPU window started")
    return group


def idle_finish(group: IdleGroup, seconds: float) -> dict[str, Any]:
    """Wait for the rest of the window, then read CPU time again."""
    left = seconds - (time.perf_counter() - group.t0)
    if left > 0:
        time.sleep(left)
    elapsed = time.perf_counter() - group.t0
    assert group.cpu0 is not None and group.rss is not None
    out: dict[str, Any] = {"seconds": round(elapsed, 1)}
    for key, proc in group.procs.items():
        if not proc.alive:
            raise RuntimeError(f"{proc.name} exited during the idle window:\n{proc.tail()}")
        cpu = proc.cpu_seconds() - group.cpu0[key]
        out[key] = {"rss_kib": group.rss[key], "cpu_seconds": round(cpu, 3),
                    "cpu_percent": round(100.0 * cpu / elapsed, 4)}
    return out


def memory_after_commands(group: IdleGroup, loader: Loader, p: Params, log: Log) -> dict[str, Any]:
    """RSS of the idle agent after `memory_commands` commands (and halfway, to tell growth from a leak)."""
    assert group.rss is not None
    group.baseline.stop()  # it would answer the same requests
    group.bare.stop()
    loader.drain(quiet=0.1)
    half = p.memory_commands // 2
    first = loader.windowed("ping", PAYLOAD, half, p.window, timeout=300.0)
    rss_half = group.agent.rss_kib()
    second = loader.windowed("ping", PAYLOAD, p.memory_commands - half, p.window, timeout=300.0)
    time.sleep(1.0)  # let the last responses and log lines go out
    rss_after = group.agent.rss_kib()
    errors = first.errors + second.errors
    log(f"  memory: agent RSS idle {group.rss['agent'] / 1024:.1f} MiB, after {half:,} commands "
        f"{rss_half / 1024:.1f} MiB, after {p.memory_commands:,} {rss_after / 1024:.1f} MiB"
        + (f", {errors} errors" if errors else ""))
    return {"commands": p.memory_commands,
            "agent": {"rss_idle_kib": group.rss["agent"], "rss_half_kib": rss_half, "rss_after_kib": rss_after,
                      "errors": errors}}


def reconnect_rounds(env: BenchEnv, broker: Mosquitto, loader: Loader, p: Params, log: Log) -> dict[str, Any]:
    """Restart the broker under a serving responder; time until a command is answered again."""
    out: dict[str, Any] = {w: defaultdict(list) for w in WHO}
    for r in range(p.reconnect_rounds):
        order = WHO if r % 2 == 0 else WHO[::-1]
        for who in order:
            proc = _start(env, who, f"{who}-reconnect-r{r}", broker)
            try:
                loader.first_answer("ping", PAYLOAD, 0.02, 60.0, alive=proc.running)
                loader.drain(quiet=0.1)
                t_down = time.perf_counter()
                broker.stop()
                broker.start()
                t_up = time.perf_counter()
                served = loader.until_served("ping", PAYLOAD, 0.02, 120.0, alive=proc.running)
                out[who]["after_up_s"].append(served - t_up)
                out[who]["after_down_s"].append(served - t_down)
                log(f"  reconnect {r + 1}/{p.reconnect_rounds} {who:8s}: served again {served - t_up:.2f} s after "
                    f"the broker was back ({served - t_down:.2f} s after it stopped)")
            finally:
                proc.stop()
                loader.drain(quiet=0.1)
    return {w: dict(v) for w, v in out.items()}
