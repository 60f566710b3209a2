"""Run the benchmark: `python -m bench` (full, a few minutes) or `python -m bench --quick` (smoke).

Writes `latest.json` and `latest.md` to bench/results/ (or --out) and prints the table.
See docs/benchmarks.md for what each figure means and how it is measured.
"""

from __future__ import annotations

import argparse
import datetime
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench import fleet, scenarios
from bench.env import BenchEnv
from bench.loadgen import Loader
from bench.machine import describe, loadavg
from bench.procs import REPO
from bench.report import figures, figures_json, render_markdown, write
from bench.scenarios import QUICK, Params

PHASES = ("commands", "reconnect", "idle", "fleet")


def _log(text: str) -> None:
    print(text, flush=True)


def build_parser() -> argparse.ArgumentParser:
    defaults = Params()
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark the agent against a minimal paho-mqtt responder on the same local mosquitto, in one "
        "run: command latency and throughput, exec round trip, memory, idle CPU, start-up, reconnect after a broker "
        "restart, and a fleet of agents through a broker restart with and without reconnect jitter.",
        epilog="The full run takes a few minutes and needs mosquitto (Debian: apt-get install mosquitto). "
        "Targets are judged only on a full run (not with --quick or with counts below the issue's).",
    )
    p.add_argument("--quick", action="store_true", help="smoke run with tiny counts (CI); targets are not judged")
    p.add_argument("--out", type=Path,
                   help="directory for latest.json and latest.md (default: bench/results, or bench/work/smoke with "
                   "--quick, so that a smoke run never replaces the committed results)")
    p.add_argument("--rounds", type=int, help=f"rounds of the command measurements (default {defaults.rounds})")
    p.add_argument("--pings", type=int, help=f"sequential pings per round (default {defaults.pings})")
    p.add_argument("--throughput", type=int,
                   help=f"commands per round in the throughput run (default {defaults.throughput})")
    p.add_argument("--idle-seconds", type=float, help=f"idle CPU window (default {defaults.idle_seconds:g})")
    p.add_argument("--memory-commands", type=int,
                   help=f"commands before the second RSS reading (default {defaults.memory_commands})")
    p.add_argument("--fleet", type=int, help=f"agents in the fleet storm (default {defaults.fleet}; scaled down "
                   "when memory is short)")
    p.add_argument("--fleet-downtime", type=float,
                   help=f"seconds the broker stays down in the fleet storm (default {defaults.fleet_downtime:g})")
    p.add_argument("--skip", action="append", default=[], choices=PHASES, help="leave a phase out (repeatable)")
    p.add_argument("--keep", action="store_true", help="keep the working directory (logs of every process)")
    return p


def params_from(args: argparse.Namespace) -> Params:
    params = QUICK if args.quick else Params()
    overrides: dict[str, Any] = {}
    for name in ("rounds", "pings", "throughput", "idle_seconds", "memory_commands", "fleet", "fleet_downtime"):
        value = getattr(args, name)
        if value is not None:
            overrides[name] = value
    return replace(params, **overrides)


def judged(params: Params, quick: bool) -> bool:
    """Targets are about full-size runs: a 60 s idle window, 20,000 commands, enough samples for a p99."""
    return not quick and params.idle_seconds >= 60 and params.memory_commands >= 20000 and params.pings >= 1000


def run(args: argparse.Namespace) -> int:
    params = params_from(args)
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="mqtt-agent-bench-"))
    run_: dict[str, Any] = {
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": describe(),
        "params": params.as_dict(),
        "judged": judged(params, args.quick),
    }
    results: dict[str, Any] = {"params": params.as_dict()}
    notes: list[str] = []
    failed: list[str] = []
    _log(f"mqtt-agent benchmark ({'smoke' if args.quick else 'full'} run), working directory {work}")
    env = BenchEnv(work)
    idle = None

    def phase(name: str, fn: Any) -> Any:
        _log(f"== {name}")
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - one failed phase must not lose the others' results
            failed.append(name)
            notes.append(f"{name} failed: {exc}".splitlines()[0])
            traceback.print_exc()
            return None

    try:
        commands_broker = env.broker("broker-commands")
        idle_broker = env.broker("broker-idle")
        loader = Loader(commands_broker.host, commands_broker.port, env.app_context(), "bench-loader")
        loader.connect()
        if "idle" not in args.skip:
            idle = phase("idle processes (agent, baseline, bare paho client)",
                         lambda: scenarios.idle_start(env, idle_broker, 0.5 if args.quick else 3.0, _log))
        if "commands" not in args.skip:
            results["commands"] = phase("commands (agent and baseline alternating)",
                                        lambda: scenarios.command_rounds(env, commands_broker, loader, params, _log))
        if "reconnect" not in args.skip:
            results["reconnect"] = phase("reconnect after a broker restart",
                                         lambda: scenarios.reconnect_rounds(env, commands_broker, loader, params,
                                                                            _log))
        loader.close()
        if idle is not None:
            group = idle
            results["idle"] = phase(f"idle CPU ({params.idle_seconds:g} s window)",
                                    lambda: scenarios.idle_finish(group, params.idle_seconds))

            def memory() -> dict[str, Any]:
                mem_loader = Loader(idle_broker.host, idle_broker.port, env.app_context(), "bench-loader-mem")
                mem_loader.connect()
                try:
                    return scenarios.memory_after_commands(group, mem_loader, params, _log)
                finally:
                    mem_loader.close()

            results["memory"] = phase(f"memory after {params.memory_commands:,} commands", memory)
            for proc in group.procs.values():
                proc.stop()
            idle = None
        if "fleet" not in args.skip:
            n, note = fleet.affordable_fleet(params.fleet)
            if note:
                notes.append(note)
                _log(f"  note: {note}")
            storms = []
            for jitter in (True, False):
                storm = phase(f"fleet storm, {n} agents, jitter {'on' if jitter else 'off'}",
                              lambda j=jitter: fleet.storm(env, n, jitter=j, downtime=params.fleet_downtime,
                                                           timeout=params.fleet_timeout, log=_log))
                if storm is not None:
                    storms.append(storm)
                    _log(f"  {storm.get('back')}/{n} back, all after {storm.get('all_back_after_up_s')} s; "
                         f"peak {storm.get('peak_connects_per_s')} CONNECTs in 1 s")
            results["fleet"] = storms
    finally:
        if idle is not None:
            for proc in idle.procs.values():
                proc.stop()
        env.close()
        if args.keep or failed:
            _log(f"working directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    results = {k: v for k, v in results.items() if v is not None}
    run_["results"] = results
    run_["figures"] = figures_json(figures(results, judge=run_["judged"]))
    run_["notes"] = notes + default_notes(run_)
    run_["duration_s"] = round(time.perf_counter() - started, 1)
    run_["loadavg_end"] = loadavg()
    out = args.out or (REPO / "bench" / "work" / "smoke" if args.quick else REPO / "bench" / "results")
    json_path, md_path = write(run_, out)
    print()
    print(render_markdown(run_))
    _log(f"written: {json_path} and {md_path}")
    if failed:
        _log(f"failed phases: {', '.join(failed)}")
        return 1
    return 0


def default_notes(run_: dict[str, Any]) -> list[str]:
    notes = []
    errors = {w: run_["results"].get("commands", {}).get(w, {}).get("errors", 0) for w in ("agent", "baseline")}
    if any(errors.values()):
        notes.append(f"non-2xx or unanswered commands: agent {errors['agent']}, baseline {errors['baseline']}")
    if not run_["judged"]:
        notes.append("targets not judged: a smoke run, or counts below the issue's (60 s idle, 20,000 commands, "
                     "1,000 pings)")
    return notes


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if shutil.which("mosquitto") is None:
        print("the benchmark needs mosquitto (Debian: apt-get install mosquitto)", file=sys.stderr)
        return 1
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
