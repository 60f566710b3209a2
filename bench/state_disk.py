"""What durability costs: bytes written to the state disk, fsyncs per command, PUBACK delay, and the
round trip and throughput against the baseline, measured in one run on one broker.

    python -m bench.state_disk            # the short run (2-3 minutes); bench/results/state-disk.{md,json}
    python -m bench.state_disk --quick    # tiny counts, one round (a smoke run, ~20 s; not judged)

Responders take turns on one broker: the baseline (bench/baseline.py, no disk at all), this agent, and
the agent of an earlier commit (`--before REF`, repeatable, taken with `git archive`; by default the agent
before the one durable store, BEFORE_REF; `--before ""` skips it). Per agent, in the first round:

- bytes written: `write_bytes` of /proc/PID/io (what the process made the kernel write to the block device;
  the agent logs at warning level, so that is the state store) over each phase;
- fsyncs: `strace -c` attached to every thread of the agent for each phase, counting fsync + fdatasync
  system calls (a real count); for this agent also its own `mqtt_agent_state_fsyncs_total` (durable commits);
- phases: `iso` (commands one at a time), `w64` (64 outstanding), `idle` (no traffic).

Then, in every round (the order of the responders rotates from round to round), without strace:
`ping` p50/p99 (sequential) and throughput (64 outstanding), and for this agent the PUBACK delay from its
own `mqtt_agent_command_ack_delay_seconds` histogram (bucket upper bounds, over all rounds). Each figure is
the median over rounds.

The disk's own fsync latency is measured in the same run, in the state directory's file system (4 KiB
write + fdatasync, median of 200; rewriting in place, as SQLite reuses its WAL, and appending). So is the
state store alone (`store_commit_latency`: one ping journalled as done with its response, committed on the
calling thread, no network): the floor under what durability adds to a `ping`.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from bench.env import BenchEnv
from bench.loadgen import Loader
from bench.procs import Proc
from bench.report import median, percentile
from tests.support.agentproc import REPO

PAYLOAD = b'{"echo":"bench"}'
# The agent before the one durable store (issue 10's starting point): what durability is compared with.
BEFORE_REF = "8866abd"


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
    return percentile(times, 50)


def store_commit_latency(directory: Path, n: int = 500, warmup: int = 200) -> float:
    """Median seconds for the state store alone (this process; no network, no dispatcher, no other thread) to
    journal one `ping` as done with its response, durably: the same StateStore, rows and fsync as the agent's
    short path, committed on the calling thread. The floor under the agent's `ping` p50 minus the baseline's,
    next to the target's allowance (one fsync + 0.15 ms)."""
    import threading

    from agent.protocol import Inbound, Response
    from agent.state.store import OutMessage, StateStore

    store = StateStore(directory / "store-floor")
    response = Response.ok({"device_id": "bench", "uptime_s": 1.0, "version": "bench", "echo": "bench"})
    times: list[float] = []
    errors: list[BaseException] = []
    try:
        for i in range(warmup + n):
            done = threading.Event()
            msg = Inbound(f"command///req/f{i}/ping", PAYLOAD, received_wall=time.time())
            reply = [OutMessage(f"command///res/f{i}/200", response.body)]
            def produce(reply: list[OutMessage] = reply) -> tuple[Response, list[OutMessage]]:
                return response, reply

            def committed(outcome: Any, done: threading.Event = done) -> None:
                if outcome.error is not None:
                    errors.append(outcome.error)
                done.set()

            t0 = time.perf_counter()
            store.add_done(f"f{i}", msg, produce, answer=lambda record: [], then=committed, lead=True)
            if not done.wait(10.0) or errors:
                raise RuntimeError(f"the state store did not commit within 10 s: {errors[:1]}")
            if i >= warmup:
                times.append(time.perf_counter() - t0)
            time.sleep(0.0005)  # commands one at a time, as the sequential pings are
    finally:
        store.close()
        shutil.rmtree(directory / "store-floor", ignore_errors=True)
    return percentile(times, 50)


def write_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/io") as fh:
        for line in fh:
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    raise RuntimeError(f"no write_bytes for pid {pid}")


def counted(pid: int, work: Callable[[], Any], workdir: Path) -> tuple[Any, int, int, float | None]:
    """Run `work` with strace -c -w attached to every thread of `pid`: (result, bytes written, fsyncs, their
    mean wall-clock seconds per call: the disk's fsync latency as the agent met it)."""
    out = workdir / f"strace-{pid}-{time.monotonic_ns()}.txt"
    tids = [p.name for p in Path(f"/proc/{pid}/task").iterdir()]
    argv = ["strace", "-q", "-c", "-w", "-f", "-e", "trace=fsync,fdatasync", "-o", str(out)]
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
    seconds = 0.0
    for line in out.read_text().splitlines():
        fields = line.split()
        if fields and fields[-1] in ("fsync", "fdatasync"):
            calls += int(fields[3])  # % time, seconds, usecs/call, calls, [errors,] syscall
            seconds += float(fields[1])
    return result, written, calls, (seconds / calls if calls else None)


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


def fsyncs_metric(port: int) -> float | None:
    """The agent's own count of durable commits (`mqtt_agent_state_fsyncs_total`; None if it has none)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    for line in text.splitlines():
        if line.startswith("mqtt_agent_state_fsyncs_total "):
            return float(line.split()[1])
    return None


def old_agent(ref: str, workdir: Path) -> Path | None:
    """The `agent` package of git `ref`, unpacked under workdir."""
    if not ref:
        return None
    target = workdir / f"before-{ref.replace('/', '_')}"
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", ref, "agent"], capture_output=True,
                             check=True).stdout
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile() as fh:
        fh.write(archive)
        fh.flush()
        with tarfile.open(fh.name) as tar:
            tar.extractall(target)
    return target


@dataclass
class Responder:
    name: str
    make: Callable[[], Proc]
    port: int | None = None  # metrics port (this agent only)
    disk: bool = False  # measure bytes and fsyncs (agents)
    result: dict[str, Any] = field(default_factory=dict)
    rounds: list[dict[str, Any]] = field(default_factory=list)
    acks: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # phase -> summed bucket deltas


def add_buckets(total: list[tuple[float, float]], before: list[tuple[float, float]],
                after: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """`total` plus the histogram's growth between two scrapes (cumulative buckets, same bounds)."""
    grown = [(le, c - (before[i][1] if i < len(before) else 0.0)) for i, (le, c) in enumerate(after)]
    if not total:
        return grown
    return [(le, c + total[i][1]) for i, (le, c) in enumerate(grown)]


def session(loader: Loader, r: Responder, counts: dict[str, int], first: bool, workdir: Path) -> None:
    proc = r.make()
    proc.start()
    try:
        loader.first_answer("ping", PAYLOAD, 0.05, 30, alive=proc.running)  # serving (it logs at warning level)
        time.sleep(0.5)
        loader.drain()
        loader.sequential("ping", PAYLOAD, counts["warmup"])
        if first and r.disk:
            disk_phases(loader, r, proc, counts, workdir)
        rnd: dict[str, Any] = {}
        hist0 = ack_delay_buckets(r.port) if r.port is not None else []
        seq = loader.sequential("ping", PAYLOAD, counts["pings"])
        hist1 = ack_delay_buckets(r.port) if r.port is not None else []
        rnd["ping_p50_ms"] = percentile(seq.latencies, 50) * 1000
        rnd["ping_p99_ms"] = percentile(seq.latencies, 99) * 1000
        rnd["ping_errors"] = seq.lost + sum(n for s, n in seq.statuses.items() if s != 200)
        win = loader.windowed("ping", PAYLOAD, counts["throughput"], 64)
        rnd["throughput"] = win.rate
        rnd["throughput_errors"] = win.lost + sum(n for s, n in win.statuses.items() if s != 200)
        if r.port is not None:
            hist2 = ack_delay_buckets(r.port)
            r.acks["seq"] = add_buckets(r.acks.get("seq", []), hist0, hist1)
            r.acks["w64"] = add_buckets(r.acks.get("w64", []), hist1, hist2)
        r.rounds.append(rnd)
    finally:
        if proc.alive:
            proc.stop()  # also when a phase failed: no agent is left running
        loader.drain()


def disk_phases(loader: Loader, r: Responder, proc: Proc, counts: dict[str, int], workdir: Path) -> None:
    def phase(key: str, work: Callable[[], Any], commands: int) -> None:
        commits0 = fsyncs_metric(r.port) if r.port is not None else None
        batch, written, fsyncs, per_call = counted(proc.pid, work, workdir)
        entry: dict[str, Any] = {"bytes": written, "fsyncs": fsyncs, "fsync_wall_s": per_call}
        if commands:
            entry["commands"] = commands
            entry["answered"] = sum(n for s, n in batch.statuses.items() if s == 200)
        else:
            entry["seconds"] = counts["idle"]
        commits1 = fsyncs_metric(r.port) if r.port is not None else None
        if commits0 is not None and commits1 is not None:
            entry["durable_commits"] = commits1 - commits0
        r.result[key] = entry

    phase("iso", lambda: loader.sequential("ping", PAYLOAD, counts["iso"]), counts["iso"])
    phase("w64", lambda: loader.windowed("ping", PAYLOAD, counts["w64"], 64), counts["w64"])
    phase("idle", lambda: time.sleep(counts["idle"]), 0)


def summarise(r: Responder) -> None:
    for key in ("ping_p50_ms", "ping_p99_ms", "throughput"):
        r.result[key] = median([rnd[key] for rnd in r.rounds])
        r.result[key + "_rounds"] = [rnd[key] for rnd in r.rounds]
    r.result["errors"] = sum(rnd["ping_errors"] + rnd["throughput_errors"] for rnd in r.rounds)
    for phase, buckets in r.acks.items():
        p50, p99 = ack_delay([], buckets) if buckets else (None, None)
        r.result[f"puback_{phase}_p50_ms"] = None if p50 is None else p50 * 1000
        r.result[f"puback_{phase}_p99_ms"] = None if p99 is None else p99 * 1000


def paired(r: dict[str, Any], base: dict[str, Any], key: str, how: Callable[[float, float], float]) -> float:
    """Median over rounds of how(responder, baseline) within each round (measured minutes apart, not a whole
    run apart: on a shared machine the load changes from round to round more than within one)."""
    pairs = [how(a, b) for a, b in zip(r[key + "_rounds"], base[key + "_rounds"])]
    value = median(pairs)
    assert value is not None
    return value


def ratio(a: float, b: float) -> float:
    return a / b if b else 0.0


def minus(a: float, b: float) -> float:
    return a - b


def targets(results: dict[str, Any], fsync_s: float) -> dict[str, tuple[str, bool]]:
    """Issue 10's targets for this agent: figure -> (target, met)."""
    a, base = results["agent"], results["baseline"]
    ping_extra = fsync_s * 1000 + 0.15
    out: dict[str, tuple[str, bool]] = {}
    if "iso" in a:
        out["bytes_iso"] = ("<= 16 KiB", a["iso"]["bytes"] / a["iso"]["commands"] <= 16 * 1024)
        out["fsyncs_iso"] = ("<= 1", a["iso"]["fsyncs"] / a["iso"]["commands"] <= 1.0)
    if "w64" in a:
        out["bytes_w64"] = ("<= 4 KiB", a["w64"]["bytes"] / a["w64"]["commands"] <= 4 * 1024)
        out["fsyncs_w64"] = ("well under 1 (<= 0.5)", a["w64"]["fsyncs"] / a["w64"]["commands"] <= 0.5)
    if "idle" in a:
        out["idle"] = ("0 / 0", a["idle"]["bytes"] == 0 and a["idle"]["fsyncs"] == 0)
    out["ping_p50"] = (f"<= baseline + 1 fsync + 0.15 ms = +{ping_extra:.3f} ms",
                       paired(a, base, "ping_p50_ms", minus) <= ping_extra)
    out["throughput"] = (">= 0.6 x", paired(a, base, "throughput", ratio) >= 0.6)
    for phase in ("seq", "w64"):
        p99 = a.get(f"puback_{phase}_p99_ms")
        if p99 is not None:
            out[f"puback_{phase}"] = ("p99 <= 50 ms", p99 <= 50)
    return out


def table(results: dict[str, Any], fsync_s: float, fsync_append_s: float, counts: dict[str, int],
          judged: bool = True, store_s: float | None = None) -> str:
    whos = [w for w in results if w != "baseline"]
    goals = targets(results, fsync_s)
    lines = [f"Disk fsync latency in the state dir's file system (4 KiB + fdatasync, median of 200): "
             f"{fsync_s * 1000:.3f} ms rewriting in place, {fsync_append_s * 1000:.3f} ms appending"]
    if store_s is not None:
        lines.append("")
        lines.append(f"The state store alone (no network, no dispatcher, one thread: one `ping` journalled as done "
                     f"with its response, durably; median of {counts['store']}): {store_s * 1000:.3f} ms, against "
                     f"the `ping` target's allowance over the baseline of {fsync_s * 1000 + 0.15:.3f} ms")
    lines += ["", "| figure | " + " | ".join(whos) + " | baseline | target (agent) |",
             "| --- |" + " ---: |" * (len(whos) + 1) + " --- |"]

    def row(name: str, fn: Callable[[dict[str, Any]], str], base: str = "", goal: str = "") -> None:
        verdict = ""
        if goal in goals:
            text, met = goals[goal]
            verdict = f"{text}: {'met' if met else '**missed**'}" if judged else f"{text} (not judged)"
        lines.append(f"| {name} | " + " | ".join(fn(results[w]) for w in whos) + f" | {base} | {verdict} |")

    def per(phase: str, key: str, scale: float = 1.0, fmt: str = "{:.0f}") -> Callable[[dict[str, Any]], str]:
        return lambda r: fmt.format(r[phase][key] / r[phase]["commands"] / scale) if key in r.get(phase, {}) else "-"

    row("bytes written per command, 1 outstanding", per("iso", "bytes", 1024, "{:.1f} KiB"), "0", "bytes_iso")
    row("bytes written per command, 64 outstanding", per("w64", "bytes", 1024, "{:.1f} KiB"), "0", "bytes_w64")
    row("fsyncs per command, 1 outstanding (strace -c)", per("iso", "fsyncs", 1, "{:.2f}"), "0", "fsyncs_iso")
    row("fsyncs per command, 64 outstanding (strace -c)", per("w64", "fsyncs", 1, "{:.3f}"), "0", "fsyncs_w64")
    row("durable commits per command, 1 / 64 outstanding (mqtt_agent_state_fsyncs_total)",
        lambda r: (f"{r['iso']['durable_commits'] / r['iso']['commands']:.2f} / "
                   f"{r['w64']['durable_commits'] / r['w64']['commands']:.3f}")
        if "durable_commits" in r.get("iso", {}) else "-", "")
    row("fsync wall time per call, 1 / 64 outstanding (strace -c -w: the disk as the agent met it)",
        lambda r: " / ".join(f"{r[ph]['fsync_wall_s'] * 1000:.3f} ms" if r.get(ph, {}).get("fsync_wall_s") else "-"
                             for ph in ("iso", "w64")), "")
    row(f"idle {counts['idle']} s: bytes written / fsyncs",
        lambda r: f"{r['idle']['bytes']} / {r['idle']['fsyncs']}" if "idle" in r else "-", "0 / 0", "idle")
    base = results["baseline"]
    row("`ping` p50", lambda r: f"{r['ping_p50_ms']:.3f} ms", f"{base['ping_p50_ms']:.3f} ms")
    row("`ping` p50 - baseline (median of the rounds' differences)",
        lambda r: f"+{paired(r, base, 'ping_p50_ms', minus):.3f} ms", "", "ping_p50")
    row("`ping` p99", lambda r: f"{r['ping_p99_ms']:.3f} ms", f"{base['ping_p99_ms']:.3f} ms")
    row("throughput, 64 outstanding",
        lambda r: f"{r['throughput']:,.0f}/s ({paired(r, base, 'throughput', ratio):.2f} x)",
        f"{base['throughput']:,.0f}/s", "throughput")

    def puback(key: str) -> Callable[[dict[str, Any]], str]:
        def cell(r: dict[str, Any]) -> str:
            if r.get(key + "_p50_ms") is None:
                return "not measured"
            return f"<= {r[key + '_p50_ms']:g} / <= {r[key + '_p99_ms']:g} ms"
        return cell

    for key, what in (("puback_seq", "1 outstanding"), ("puback_w64", "64 outstanding")):
        row(f"PUBACK delay p50 / p99, {what} (histogram bucket bounds)", puback(key), "", key)
    rounds = len(base.get("throughput_rounds", [])) or 1
    lines += ["", f"`ping` and throughput: median of {rounds} round(s) (per round: {counts['pings']} sequential pings, "
                  f"{counts['throughput']} pings with 64 outstanding; the responders' order rotates); the ratio and "
                  f"the difference to the baseline are the median of each round's own; bytes and fsyncs: "
                  f"{counts['iso']} and {counts['w64']} pings in the first round, strace attached."]
    for w in (*whos, "baseline"):
        r = results[w]
        lines.append(f"- {w}, per round: throughput " + ", ".join(f"{v:,.0f}" for v in r["throughput_rounds"])
                     + "/s; `ping` p50 " + ", ".join(f"{v:.3f}" for v in r["ping_p50_ms_rounds"]) + " ms")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.state_disk", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny counts, one round (smoke run; not judged)")
    ap.add_argument("--before", action="append", default=None,
                    help=f"git ref of an agent to compare with (repeatable; default {BEFORE_REF}, the agent "
                         "before the one durable store; '' for none)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds of the timed phases (default 3; quick: 1)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "state-disk"), help="output path stem")
    args = ap.parse_args(argv)
    if shutil.which("strace") is None:
        print("strace is needed (Debian: apt-get install strace)", file=sys.stderr)
        return 2
    befores = [b for b in (args.before if args.before is not None else [BEFORE_REF]) if b]
    rounds = args.rounds or (1 if args.quick else 3)
    counts = ({"warmup": 20, "iso": 30, "w64": 200, "idle": 2, "pings": 50, "throughput": 300, "store": 50}
              if args.quick else {"warmup": 200, "iso": 300, "w64": 3000, "idle": 10, "pings": 1000, "throughput": 5000,
               "store": 500})
    workdir = Path(tempfile.mkdtemp(prefix="bench-state-"))  # on the same file system as /tmp here
    env = BenchEnv(workdir)
    results: dict[str, Any] = {}
    started = time.monotonic()
    try:
        broker = env.broker("broker")
        loader = Loader(broker.host, broker.port, env.app_context(), "bench-state-loader")
        loader.connect()
        fsync_s = fsync_latency(workdir)
        fsync_append_s = fsync_latency(workdir, append=True)
        store_s = store_commit_latency(workdir, n=counts["store"])
        quiet = {"agent": {"log_level": "warning"}}
        cfg = env.agent_config("agent", broker, overrides=quiet)
        port = int(next(line for line in cfg.read_text().splitlines() if line.startswith("listen")).split(":")[-1]
                   .strip('"'))
        responders = [Responder("baseline", lambda: env.baseline("baseline", broker)),
                      Responder("agent", lambda: Proc.agent("agent", cfg, workdir), port=port, disk=True)]
        for ref in befores:
            tree = old_agent(ref, workdir)
            assert tree is not None
            old_cfg = env.agent_config(f"before-{len(responders)}", broker, overrides=quiet)
            old_port = int(next(line for line in old_cfg.read_text().splitlines() if line.startswith("listen"))
                           .split(":")[-1].strip('"'))
            runner = (f"import sys, runpy; sys.path.insert(0, {str(tree)!r}); "
                      "runpy.run_module('agent', run_name='__main__')")

            def make(name: str = f"before {ref}", runner: str = runner, old_cfg: Path = old_cfg) -> Proc:
                return Proc(name.replace(" ", "-"), [sys.executable, "-c", runner, "run", "--config", str(old_cfg)],
                            workdir, notify=True)

            # Its metrics where it has them (the PUBACK delay histogram and the commit count came with this
            # store; an older agent shows "not measured").
            responders.append(Responder(f"before {ref}", make, port=old_port, disk=True))
        for n in range(rounds):
            order = responders[n % len(responders):] + responders[:n % len(responders)]
            for r in order:
                session(loader, r, counts, first=(n == 0), workdir=workdir)
                print(f"round {n + 1}/{rounds}: {r.name} done: {r.rounds[-1]}", flush=True)
        for r in responders:
            summarise(r)
            results[r.name] = r.result
        loader.close()
    finally:
        env.close()
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    judged = not args.quick
    text = (f"State-disk figures ({'quick' if args.quick else 'short'} run, {when}, "
            f"{time.monotonic() - started:.0f} s; `before REF` = the agent of that commit)\n\n"
            + table(results, fsync_s, fsync_append_s, counts, judged, store_s))
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text)
    goals = targets(results, fsync_s)
    out.with_suffix(".json").write_text(json.dumps({
        "counts": counts, "rounds": rounds, "judged": judged, "fsync_latency_s": fsync_s,
        "fsync_append_latency_s": fsync_append_s, "store_commit_latency_s": store_s,
        "targets": {k: {"target": t, "met": (m if judged else None)} for k, (t, m) in goals.items()},
        **results}, indent=1) + "\n")
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
