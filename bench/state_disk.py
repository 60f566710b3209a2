"""What durability costs: bytes written to the state disk, fsyncs per command, PUBACK delay, and the
round trip and throughput against the baseline, measured in one run on one broker.

    python -m bench.state_disk            # a short run (about 2 minutes); bench/results/state-disk.{md,json}
    python -m bench.state_disk --quick    # tiny counts (a smoke run)

Three responders take turns: the baseline (bench/baseline.py, no disk at all), this agent, and the agent
of `main` before this change (`--before REF`, taken with `git archive`; skipped with `--before ""`).
Per agent:

- bytes written: `write_bytes` of /proc/PID/io (what the process made the kernel write to the block device;
  the agent logs at warning level, so that is the state store) over each phase;
- fsyncs: `strace -c` attached to every thread of the agent for each phase, counting fsync + fdatasync;
- phases: `iso` (commands one at a time), `w64` (64 outstanding), `idle` (no traffic);
- `ping` p50 (sequential) and throughput (64 outstanding) without strace;
- PUBACK delay p50/p99 from the agent's own `mqtt_agent_command_ack_delay_seconds` histogram (bucket upper
  bounds), over the timed phases.

The disk's own fsync latency is measured in the same run, in the state directory's file system (4 KiB
write + fdatasync, median of 200).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable

from bench.env import BenchEnv
from bench.loadgen import Loader
from bench.procs import Proc
from bench.report import percentile
from tests.support.agentproc import REPO

PAYLOAD = b'{"echo":"bench"}'


def fsync_latency(directory: Path, n: int = 200, append: bool = False) -> float:
    """Median seconds of a 4 KiB write + fdatasync in `directory`: rewriting blocks in place (what a reused WAL
    costs), or appending (the file grows: the file system's journal commits too)."""
    path = directory / "fsync-probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    times = []
    try:
        for i in range(n):
            os.pwrite(fd, os.urandom(4096), (i if append else i % 16) * 4096)
            t0 = time.perf_counter()
            os.fdatasync(fd)
            times.append(time.perf_counter() - t0)
    finally:
        os.close(fd)
        path.unlink()
    return percentile(times, 0.5)


def write_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/io") as fh:
        for line in fh:
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    raise RuntimeError(f"no write_bytes for pid {pid}")


def counted(pid: int, work: Callable[[], Any], workdir: Path) -> tuple[Any, int, int]:
    """Run `work` with strace -c attached to every thread of `pid`: (result, bytes written, fsyncs)."""
    out = workdir / f"strace-{pid}-{time.monotonic_ns()}.txt"
    tids = [p.name for p in Path(f"/proc/{pid}/task").iterdir()]
    argv = ["strace", "-q", "-c", "-f", "-e", "trace=fsync,fdatasync", "-o", str(out)]
    for tid in tids:
        argv += ["-p", tid]
    tracer = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # attached
    before = write_bytes(pid)
    result = work()
    time.sleep(0.5)  # the last deletions and checkpoints of the phase
    written = write_bytes(pid) - before
    tracer.send_signal(signal.SIGINT)
    tracer.wait(30)
    calls = 0
    for line in out.read_text().splitlines():
        fields = line.split()
        if fields and fields[-1] in ("fsync", "fdatasync"):
            calls += int(fields[3])  # % time, seconds, usecs/call, calls, [errors,] syscall
    return result, written, calls


def ack_delay_buckets(port: int) -> list[tuple[float, float]]:
    """The agent's PUBACK delay histogram: (upper bound, cumulative count)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    buckets: list[tuple[float, float]] = []
    for line in text.splitlines():
        if line.startswith("mqtt_agent_command_ack_delay_seconds_bucket"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            buckets.append((float("inf") if le == "+Inf" else float(le), float(line.rsplit(" ", 1)[1])))
    return buckets


def ack_delay(before: list[tuple[float, float]], after: list[tuple[float, float]]) -> tuple[float | None, float | None]:
    """p50, p99 (bucket upper bounds, seconds) of the PUBACK delays observed between two scrapes."""
    buckets = [(le, c - (before[i][1] if i < len(before) else 0.0)) for i, (le, c) in enumerate(after)]
    if not buckets or buckets[-1][1] <= 0:
        return None, None
    total = buckets[-1][1]

    def q(p: float) -> float:
        return next(le for le, c in buckets if c >= p * total)

    return q(0.5), q(0.99)


def old_agent(ref: str, workdir: Path) -> Path | None:
    """The `agent` package of git `ref`, unpacked under workdir."""
    if not ref:
        return None
    target = workdir / "before"
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", ref, "agent"], capture_output=True,
                             check=True).stdout
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile() as fh:
        fh.write(archive)
        fh.flush()
        with tarfile.open(fh.name) as tar:
            tar.extractall(target)
    return target


def measure(env: BenchEnv, broker: Any, who: str, proc: Proc, loader: Loader, counts: dict[str, int],
            port: int | None, disk: bool) -> dict[str, Any]:
    proc.start()
    try:
        return _measure(env, proc, loader, counts, port, disk)
    finally:
        if proc.alive:
            proc.stop()  # also when a phase failed: no agent is left running
        loader.drain()


def _measure(env: BenchEnv, proc: Proc, loader: Loader, counts: dict[str, int], port: int | None,
             disk: bool) -> dict[str, Any]:
    loader.first_answer("ping", PAYLOAD, 0.05, 30, alive=proc.running)  # serving (it logs at warning level)
    time.sleep(0.5)
    loader.drain()
    loader.sequential("ping", PAYLOAD, counts["warmup"])
    res: dict[str, Any] = {}
    if disk:
        batch, written, fsyncs = counted(proc.pid, lambda: loader.sequential("ping", PAYLOAD, counts["iso"]), env.dir)
        res["iso"] = {"commands": counts["iso"], "bytes": written, "fsyncs": fsyncs,
                      "answered": sum(batch.statuses.values())}
        batch, written, fsyncs = counted(
            proc.pid, lambda: loader.windowed("ping", PAYLOAD, counts["w64"], 64), env.dir)
        res["w64"] = {"commands": counts["w64"], "bytes": written, "fsyncs": fsyncs,
                      "answered": sum(batch.statuses.values())}
        _, written, fsyncs = counted(proc.pid, lambda: time.sleep(counts["idle"]), env.dir)
        res["idle"] = {"seconds": counts["idle"], "bytes": written, "fsyncs": fsyncs}
    hist0 = ack_delay_buckets(port) if port is not None else []
    seq = loader.sequential("ping", PAYLOAD, counts["pings"])
    hist1 = ack_delay_buckets(port) if port is not None else []
    res["ping_p50_ms"] = percentile(seq.latencies, 0.5) * 1000
    res["ping_p99_ms"] = percentile(seq.latencies, 0.99) * 1000
    win = loader.windowed("ping", PAYLOAD, counts["throughput"], 64)
    res["throughput"] = win.rate
    if port is not None:  # the timed phases (no strace attached), each on its own
        for key, (a, b) in (("puback_seq", (hist0, hist1)), ("puback_w64", (hist1, ack_delay_buckets(port)))):
            p50, p99 = ack_delay(a, b)
            res[f"{key}_p50_ms"] = None if p50 is None else p50 * 1000
            res[f"{key}_p99_ms"] = None if p99 is None else p99 * 1000
    return res


def table(results: dict[str, Any], fsync_s: float, fsync_append_s: float, counts: dict[str, int]) -> str:
    whos = [w for w in ("agent", "before") if w in results]
    lines = [f"Disk fsync latency in the state dir's file system (4 KiB + fdatasync, median): {fsync_s * 1000:.2f} ms "
             f"rewriting in place, {fsync_append_s * 1000:.2f} ms appending",
             "", "| figure | " + " | ".join(whos) + " | baseline |", "| --- |" + " ---: |" * (len(whos) + 1)]

    def row(name: str, fn: Callable[[dict[str, Any]], str], base: str = "") -> None:
        lines.append(f"| {name} | " + " | ".join(fn(results[w]) for w in whos) + f" | {base} |")

    def per(phase: str, key: str, scale: float = 1.0, fmt: str = "{:.0f}") -> Callable[[dict[str, Any]], str]:
        return lambda r: fmt.format(r[phase][key] / r[phase]["commands"] / scale) if phase in r else "-"

    row("bytes written per command, 1 outstanding", per("iso", "bytes", 1024, "{:.1f} KiB"), "0")
    row("bytes written per command, 64 outstanding", per("w64", "bytes", 1024, "{:.1f} KiB"), "0")
    row("fsyncs per command, 1 outstanding", per("iso", "fsyncs", 1, "{:.2f}"), "0")
    row("fsyncs per command, 64 outstanding", per("w64", "fsyncs", 1, "{:.3f}"), "0")
    row(f"idle {counts['idle']} s: bytes written / fsyncs",
        lambda r: f"{r['idle']['bytes']} / {r['idle']['fsyncs']}" if "idle" in r else "-", "0 / 0")
    base = results["baseline"]
    row("`ping` p50", lambda r: f"{r['ping_p50_ms']:.3f} ms", f"{base['ping_p50_ms']:.3f} ms")
    row("`ping` p50 - baseline", lambda r: f"+{r['ping_p50_ms'] - base['ping_p50_ms']:.3f} ms", "")
    row("throughput, 64 outstanding",
        lambda r: f"{r['throughput']:,.0f}/s ({r['throughput'] / base['throughput']:.2f} x)",
        f"{base['throughput']:,.0f}/s")
    def puback(key: str) -> Callable[[dict[str, Any]], str]:
        def cell(r: dict[str, Any]) -> str:
            if r.get(key + "_p50_ms") is None:
                return "not measured"
            return f"<= {r[key + '_p50_ms']:g} / <= {r[key + '_p99_ms']:g} ms"
        return cell

    for key, what in (("puback_seq", "1 outstanding"), ("puback_w64", "64 outstanding")):
        row(f"PUBACK delay p50 / p99, {what} (histogram bucket bounds)", puback(key), "")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.state_disk", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny counts (smoke run)")
    ap.add_argument("--before", default="main", help="git ref of the agent to compare with ('' to skip)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "state-disk"), help="output path stem")
    args = ap.parse_args(argv)
    if shutil.which("strace") is None:
        print("strace is needed (Debian: apt-get install strace)", file=sys.stderr)
        return 2
    counts = ({"warmup": 20, "iso": 30, "w64": 200, "idle": 3, "pings": 50, "throughput": 300} if args.quick else
              {"warmup": 200, "iso": 300, "w64": 3000, "idle": 20, "pings": 1000, "throughput": 5000})
    workdir = Path(tempfile.mkdtemp(prefix="bench-state-"))  # on the same file system as /tmp here
    env = BenchEnv(workdir)
    results: dict[str, Any] = {}
    try:
        broker = env.broker("broker")
        loader = Loader(broker.host, broker.port, env.app_context(), "bench-state-loader")
        loader.connect()
        fsync_s = fsync_latency(workdir)
        fsync_append_s = fsync_latency(workdir, append=True)
        results["baseline"] = measure(env, broker, "baseline", env.baseline("baseline", broker), loader, counts,
                                      None, disk=False)
        print("baseline done", results["baseline"], flush=True)
        quiet = {"agent": {"log_level": "warning"}}
        cfg = env.agent_config("agent", broker, overrides=quiet)
        port = int(next(line for line in cfg.read_text().splitlines() if line.startswith("listen")).split(":")[-1]
                   .strip('"'))
        results["agent"] = measure(env, broker, "agent", Proc.agent("agent", cfg, workdir), loader, counts, port,
                                   disk=True)
        print("agent done", results["agent"], flush=True)
        before = old_agent(args.before, workdir)
        if before is not None:
            cfg = env.agent_config("before", broker, metrics=False, overrides=quiet)
            runner = (f"import sys, runpy; sys.path.insert(0, {str(before)!r}); "
                      "runpy.run_module('agent', run_name='__main__')")
            proc = Proc("before", [sys.executable, "-c", runner, "run", "--config", str(cfg)], workdir, notify=True)
            results["before"] = measure(env, broker, "before", proc, loader, counts, None, disk=True)
            print("before done", results["before"], flush=True)
        loader.close()
    finally:
        env.close()
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    text = (f"State-disk figures ({'quick' if args.quick else 'short'} run, {when}; "
            f"`before` = the agent of `{args.before}`)\n\n" + table(results, fsync_s, fsync_append_s, counts))
    print(text)
    out = Path(args.out)
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"counts": counts, "fsync_latency_s": fsync_s,
                                                   "fsync_append_latency_s": fsync_append_s, **results},
                                                   indent=1) + "\n")
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
