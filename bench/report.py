"""Pure: statistics, the issue's targets, and the Markdown/JSON form of a benchmark run.

Raw results are plain JSON-able data (lists of per-round values); `figures()` reduces them to one
row per figure (median over rounds), computes the agent/baseline ratio and checks the targets.
Targets are judged only on a full-size run: a smoke run's tiny counts say nothing about them.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

MIB = 1024.0  # KiB per MiB


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty sequence."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def median(values: Sequence[float | None]) -> float | None:
    """Median of the values that were measured (None when none were)."""
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def peak_rate(times: Sequence[float], window: float = 1.0) -> int:
    """The largest number of events inside any window of `window` seconds."""
    ordered = sorted(times)
    best = 0
    lo = 0
    for hi, t in enumerate(ordered):
        while t - ordered[lo] >= window:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


def per_second(times: Sequence[float], origin: float) -> list[int]:
    """Events counted in consecutive one-second bins starting at `origin` (events before it are ignored)."""
    offsets = [t - origin for t in times if t >= origin]
    if not offsets:
        return []
    bins = [0] * (int(max(offsets)) + 1)
    for off in offsets:
        bins[int(off)] += 1
    return bins


@dataclass(frozen=True)
class Figure:
    """One row of the results table."""

    key: str
    label: str
    unit: str
    agent: float | None
    baseline: float | None = None
    baseline_is: str = "baseline responder"
    target: str = ""
    met: bool | None = None
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.agent is None or not self.baseline:
            return None
        return self.agent / self.baseline


Check = Callable[[float, "float | None"], bool]

# key -> (target as written in the issue, check(agent, baseline))
TARGETS: dict[str, tuple[str, Check]] = {
    "ping_p50_ms": ("≤ 1.5 x baseline", lambda a, b: b is not None and a <= 1.5 * b),
    "ping_p99_ms": ("≤ 2 x baseline", lambda a, b: b is not None and a <= 2.0 * b),
    "throughput_per_s": ("≥ 2,000/s and ≥ 0.6 x baseline", lambda a, b: b is not None and a >= 2000 and a >= 0.6 * b),
    "idle_rss_mib": ("≤ 1.3 x bare paho client", lambda a, b: b is not None and a <= 1.3 * b),
    "rss_growth_mib": ("≤ 2 MB", lambda a, b: a <= 2.0),
    "idle_cpu_percent": ("≤ 0.5 % of one core", lambda a, b: a <= 0.5),
    "start_ready_s": ("≤ 1.0 s", lambda a, b: a <= 1.0),
    "start_first_answer_s": ("≤ 1.5 s", lambda a, b: a <= 1.5),
}


def _cmd(results: dict[str, Any], who: str, key: str) -> float | None:
    return median(results.get("commands", {}).get(who, {}).get(key, []))


def _kib_to_mib(value: float | None) -> float | None:
    return None if value is None else value / MIB


def figures(results: dict[str, Any], *, judge: bool) -> list[Figure]:
    """The table rows. `judge`: evaluate targets (full-size runs only)."""
    rows: list[Figure] = []

    def add(key: str, label: str, unit: str, agent: float | None, baseline: float | None = None, **kw: Any) -> None:
        entry = TARGETS.get(key)
        target = entry[0] if entry else ""
        met = None
        if judge and entry is not None and agent is not None:
            met = bool(entry[1](agent, baseline))
        rows.append(Figure(key, label, unit, agent, baseline, target=target, met=met, **kw))

    for key, label in (("ping_p50_ms", "`ping` round trip, sequential, p50"),
                       ("ping_p99_ms", "`ping` round trip, sequential, p99")):
        add(key, label, "ms", _cmd(results, "agent", key), _cmd(results, "baseline", key))
    window = results.get("params", {}).get("window", 64)
    add("throughput_per_s", f"throughput, {window} commands outstanding", "commands/s",
        _cmd(results, "agent", "throughput_per_s"), _cmd(results, "baseline", "throughput_per_s"))
    add("exec_p50_ms", "exec command (`/bin/true`) round trip, p50", "ms",
        _cmd(results, "agent", "exec_p50_ms"), _cmd(results, "baseline", "exec_p50_ms"),
        note="process spawn included; compare with `ping` p50")
    add("exec_p99_ms", "exec command (`/bin/true`) round trip, p99", "ms",
        _cmd(results, "agent", "exec_p99_ms"), _cmd(results, "baseline", "exec_p99_ms"))

    idle = results.get("idle", {})
    add("idle_rss_mib", "resident memory, idle after start", "MiB",
        _kib_to_mib(idle.get("agent", {}).get("rss_kib")), _kib_to_mib(idle.get("bare", {}).get("rss_kib")),
        baseline_is="bare connected paho client",
        note=_join("baseline responder: " + _fmt(_kib_to_mib(idle.get("baseline", {}).get("rss_kib"))) + " MiB"
                   if idle.get("baseline", {}).get("rss_kib") else ""))
    mem = results.get("memory", {})
    n = mem.get("commands", 0)
    agent_mem = mem.get("agent", {})
    after = agent_mem.get("rss_after_kib")
    before = agent_mem.get("rss_idle_kib")
    half = agent_mem.get("rss_half_kib")
    add("rss_after_mib", f"resident memory after {n:,} commands", "MiB", _kib_to_mib(after),
        _kib_to_mib(mem.get("baseline", {}).get("rss_after_kib")))
    add("rss_growth_mib", f"resident memory growth over {n:,} commands", "MiB",
        _kib_to_mib(after - before) if after is not None and before is not None else None,
        note="after minus idle-after-start")
    add("rss_growth_second_half_mib", f"growth over the second {n - n // 2:,} commands (leak check)", "MiB",
        _kib_to_mib(after - half) if after is not None and half is not None else None)
    add("idle_cpu_percent", f"CPU while idle and connected ({idle.get('seconds', 0):.0f} s)", "% of one core",
        idle.get("agent", {}).get("cpu_percent"), idle.get("baseline", {}).get("cpu_percent"),
        note=_join("bare paho client: " + _fmt(idle.get("bare", {}).get("cpu_percent")) + " %"
                   if idle.get("bare", {}).get("cpu_percent") is not None else ""))

    source = results.get("commands", {}).get("agent", {}).get("ready_source", "log")
    ready_label = ("start → READY=1 (sd_notify)" if source == "sd_notify"
                   else "start → subscribed (log line: no READY=1 was sent)")
    add("start_ready_s", ready_label, "s", _cmd(results, "agent", "start_ready_s"),
        _cmd(results, "baseline", "start_subscribed_s"), baseline_is="baseline: start → subscribed")
    add("start_subscribed_s", "start → subscribed to the command topic", "s",
        _cmd(results, "agent", "start_subscribed_s"), _cmd(results, "baseline", "start_subscribed_s"))
    add("start_first_answer_s", "start → first command answered", "s",
        _cmd(results, "agent", "start_first_answer_s"), _cmd(results, "baseline", "start_first_answer_s"))

    rec = results.get("reconnect", {})
    add("reconnect_after_up_s", "broker restart: back up → commands served again", "s",
        median(rec.get("agent", {}).get("after_up_s", [])), median(rec.get("baseline", {}).get("after_up_s", [])),
        note="agent: [reconnect] defaults (jittered backoff); baseline: paho's reconnect_delay_set defaults")
    add("reconnect_after_down_s", "broker restart: stop → commands served again", "s",
        median(rec.get("agent", {}).get("after_down_s", [])), median(rec.get("baseline", {}).get("after_down_s", [])))
    return rows


def _join(*parts: str) -> str:
    return "; ".join(p for p in parts if p)


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if value == 0:
        return "0"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def _met(value: bool | None) -> str:
    return "-" if value is None else ("yes" if value else "**no**")


def render_markdown(run: dict[str, Any]) -> str:
    """The results as Markdown: machine, parameters, the figures table, the fleet table, notes."""
    m = run.get("machine", {})
    p = run.get("params", {})
    res = run.get("results", {})
    lines = [
        "# mqtt-agent benchmark results",
        "",
        f"Run {run.get('started', '?')} ({run.get('duration_s', 0):.0f} s)"
        + (" — **smoke run: tiny counts, targets not judged**" if not run.get("judged") else "") + ".",
        "",
        f"Machine: {m.get('cpu', '?')}, {m.get('cores', '?')} cores, {m.get('memory_gib', '?')} GiB RAM; "
        f"{m.get('os', '?')}, Linux {m.get('kernel', '?')} ({m.get('arch', '?')}); Python {m.get('python', '?')}, "
        f"paho-mqtt {m.get('paho_mqtt', '?')}, {m.get('mosquitto', '?')}, {m.get('openssl', '?')}; "
        f"agent {m.get('agent_version', '?')} at {m.get('git_commit', '?')}.",
        f"Load average at start {m.get('loadavg_start', '?')}, at end {run.get('loadavg_end', '?')} "
        "(other work on the machine shows here; agent and baseline ran alternately in the same run, on the same "
        "broker, so they saw the same conditions).",
        "",
        f"Counts: {p.get('rounds')} rounds, each for agent and baseline in turn: {p.get('warmup')} warm-up commands, "
        f"{p.get('pings')} sequential `ping`s, {p.get('throughput')} commands with {p.get('window')} outstanding, "
        f"{p.get('execs')} exec commands. Figures are medians over rounds. Idle window {p.get('idle_seconds')} s; "
        f"memory after {p.get('memory_commands')} commands; {p.get('reconnect_rounds')} broker restarts per side; "
        f"fleet of {p.get('fleet')} agents, broker down {p.get('fleet_downtime')} s.",
        "",
        "| figure | unit | agent | baseline | agent / baseline | target | met |",
        "| --- | --- | ---: | ---: | ---: | --- | --- |",
    ]
    for f in run.get("figures", []):
        fig = Figure(**f)
        if fig.agent is None and fig.baseline is None:
            continue  # a phase that was skipped or failed (the notes say which)
        base = _fmt(fig.baseline)
        if fig.baseline is not None and fig.baseline_is != "baseline responder":
            base += f" ({fig.baseline_is})"
        ratio = "-" if fig.ratio is None else f"{fig.ratio:.2f}"
        label = fig.label + (f" — {fig.note}" if fig.note else "")
        lines.append(f"| {label} | {fig.unit} | {_fmt(fig.agent)} | {base} | {ratio} | {fig.target or '-'} | "
                     f"{_met(fig.met)} |")
    fleet = res.get("fleet", [])
    if fleet:
        lines += [
            "",
            f"## Fleet storm: one broker restarted under {fleet[0].get('agents')} agents "
            f"(down {p.get('fleet_downtime')} s)",
            "",
            "| `[reconnect] jitter` | agents back | all back after broker up | after broker stop | "
            "peak CONNECT attempts in any 1 s | CONNECT attempts | attempts per second after restart |",
            "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        for run_ in fleet:
            hist = " ".join(str(n) for n in run_.get("per_second", [])[:30])
            lines.append(
                f"| {'on' if run_.get('jitter') else 'off'} | {run_.get('back')}/{run_.get('agents')} | "
                f"{_fmt(run_.get('all_back_after_up_s'))} s | {_fmt(run_.get('all_back_after_down_s'))} s | "
                f"{run_.get('peak_connects_per_s')} | {run_.get('connects')} | {hist} |")
    notes = list(run.get("notes", []))
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def write(run: dict[str, Any], out: Path) -> tuple[Path, Path]:
    """Write `latest.json` and `latest.md` into `out`; returns both paths."""
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "latest.json"
    md_path = out / "latest.md"
    json_path.write_text(json.dumps(run, indent=2, sort_keys=True) + "\n")
    md_path.write_text(render_markdown(run))
    return json_path, md_path


def figures_json(rows: list[Figure]) -> list[dict[str, Any]]:
    return [asdict(r) for r in rows]
