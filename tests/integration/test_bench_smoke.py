"""The benchmark harness (bench/): its pure parts exactly, and a smoke run with tiny counts.

No timing is asserted anywhere: speed and memory targets live in the benchmark's own report.
The smoke run asserts that every phase ran against the real processes and wrote its results.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


FIGURES_WITH_BOTH = ("ping_p50_ms", "ping_p99_ms", "throughput_per_s", "exec_p50_ms", "exec_p99_ms", "idle_rss_mib",
                     "idle_cpu_percent", "start_subscribed_s", "start_first_answer_s", "reconnect_after_up_s",
                     "reconnect_after_down_s")


FIGURES_AGENT_ONLY = ("rss_after_mib", "rss_growth_mib", "rss_growth_second_half_mib", "start_ready_s")


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_quick_run_measures_every_figure_and_writes_markdown_and_json(tmp_path: Path) -> None:
    if shutil.which("mosquitto") is None:
        pytest.fail("mosquitto is not installed; run ./scripts/test.sh, which installs it")
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    data = json.loads((out / "latest.json").read_text())
    md = (out / "latest.md").read_text()

    assert data["judged"] is False
    figures = {f["key"]: f for f in data["figures"]}
    for key in FIGURES_WITH_BOTH:
        assert isinstance(figures[key]["agent"], (int, float)), key
        assert isinstance(figures[key]["baseline"], (int, float)), key
    for key in FIGURES_AGENT_ONLY:
        assert isinstance(figures[key]["agent"], (int, float)), key
    assert all(f["met"] is None for f in data["figures"])

    commands = data["results"]["commands"]
    assert commands["agent"]["errors"] == 0 and commands["baseline"]["errors"] == 0  # every command answered 2xx
    assert commands["agent"]["ready_source"] in ("sd_notify", "log")
    assert data["results"]["memory"]["agent"]["errors"] == 0
    fleet = data["results"]["fleet"]
    assert [f["jitter"] for f in fleet] == [True, False]
    for storm in fleet:
        assert storm["back"] == storm["agents"] == 3
        assert storm["connects"] >= 3 and storm["peak_connects_per_s"] >= 1
    assert data["machine"]["cores"] and data["machine"]["mosquitto"].startswith("mosquitto ")

    assert "| `ping` round trip, sequential, p50 | ms |" in md
    assert "## Fleet storm: one broker restarted under 3 agents" in md
    assert "smoke run: tiny counts, targets not judged" in md
    assert md in proc.stdout  # the table is printed as well


@pytest.mark.integration
@pytest.mark.timeout(200)
def test_publish_bench_quick_run_measures_both_paths_and_the_baseline(tmp_path: Path) -> None:
    out = tmp_path / "publish"
    proc = subprocess.run([sys.executable, "-m", "bench.publish", "--quick", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    data = json.loads((out / "publish.json").read_text())
    assert data["judged"] is False
    assert data["bare"]["messages"] == data["batch"]["messages"] == 400 and data["single"]["messages"] == 200
    for path in ("single", "batch"):
        for key in ("msg_per_s", "latency_p50_ms", "latency_p99_ms", "state_bytes_written_per_msg"):
            assert isinstance(data[path][key], (int, float)) and data[path][key] > 0, (path, key)
    md = (out / "publish.md").read_text()
    assert "| bare paho publisher | 400 |" in md and "Smoke run" in md


@pytest.mark.integration
@pytest.mark.timeout(200)
def test_state_disk_quick_run_has_every_figure_for_agent_before_and_baseline(tmp_path: Path) -> None:
    """bench/state_disk.py on tiny counts (one round, ~20 s): every figure measured, every command answered
    200, durability visible in the counts (each isolated command fsynced), Markdown and JSON written."""
    if shutil.which("strace") is None:
        pytest.fail("strace is not installed; run ./scripts/test.sh, which installs it")
    out = tmp_path / "state-disk"
    proc = subprocess.run([sys.executable, "-m", "bench.state_disk", "--quick", "--before", "HEAD", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    data = json.loads(out.with_suffix(".json").read_text())
    md = out.with_suffix(".md").read_text()
    assert data["judged"] is False and data["rounds"] == 1
    assert 0 < data["fsync_latency_s"] < 10 and 0 < data["fsync_append_latency_s"] < 10
    assert 0 < data["store_commit_latency_s"] < 10 and "The state store alone" in md  # the floor under ping's cost
    counts = data["counts"]
    for who in ("agent", "before HEAD", "baseline"):
        r = data[who]
        assert r["errors"] == 0, who
        assert r["ping_p50_ms"] > 0 and r["ping_p99_ms"] >= r["ping_p50_ms"] and r["throughput"] > 0, who
    for who in ("agent", "before HEAD"):
        r = data[who]
        assert r["iso"]["answered"] == counts["iso"] and r["w64"]["answered"] == counts["w64"], who
        assert r["iso"]["fsyncs"] >= counts["iso"], who  # a real count: every isolated command was fsynced
        assert r["w64"]["fsyncs"] > 0 and r["iso"]["bytes"] > 0 and r["w64"]["bytes"] > 0, who
        assert r["idle"]["seconds"] == counts["idle"] and r["idle"]["bytes"] >= 0 and r["idle"]["fsyncs"] >= 0
    agent = data["agent"]
    assert agent["iso"]["durable_commits"] >= counts["iso"] and agent["w64"]["durable_commits"] > 0
    assert 0 < agent["iso"]["fsync_wall_s"] < 10 and 0 < agent["w64"]["fsync_wall_s"] < 10
    for key in ("puback_seq_p50_ms", "puback_seq_p99_ms", "puback_w64_p50_ms", "puback_w64_p99_ms"):
        assert isinstance(agent[key], (int, float)) and agent[key] > 0, key
    assert set(data["targets"]) == {"bytes_iso", "bytes_w64", "fsyncs_iso", "fsyncs_w64", "idle", "ping_p50",
                                    "throughput", "puback_seq", "puback_w64"}
    assert all(t["met"] is None for t in data["targets"].values())
    for row in ("| bytes written per command, 1 outstanding |", "| bytes written per command, 64 outstanding |",
                "| fsyncs per command, 1 outstanding (strace -c) |",
                "| fsyncs per command, 64 outstanding (strace -c) |",
                "| durable commits per command", "| fsync wall time per call", "| idle 2 s: bytes written / fsyncs |",
                "| `ping` p50 |",
                "| throughput, 64 outstanding |", "| PUBACK delay p50 / p99, 1 outstanding",
                "| PUBACK delay p50 / p99, 64 outstanding", "Disk fsync latency in the state dir's file system"):
        assert row in md, row
    assert "| figure | agent | before HEAD | baseline | target (agent) |" in md
    assert md in proc.stdout


def test_run_script_passes_shellcheck() -> None:
    if shutil.which("shellcheck") is None:
        pytest.fail("shellcheck is not installed; run ./scripts/test.sh, which installs it")
    proc = subprocess.run(["shellcheck", "-x", "bench/run.sh"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stdout

