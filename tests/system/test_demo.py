"""The README's demo command keeps working: certificates, broker, agent, two commands answered."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_demo_runs_end_to_end() -> None:
    proc = subprocess.run([sys.executable, "scripts/demo.py", "--once"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "$ mqtt-agent send --config demo-run/mqtt-agent.toml ping\n200\n" in out
    assert "$ mqtt-agent send --config demo-run/mqtt-agent.toml uptime\n200\n" in out
    assert "agent stopped (exit 0)" in out


def test_setup_scripts_pass_shellcheck() -> None:
    import shutil

    import pytest

    if shutil.which("shellcheck") is None:
        pytest.fail("shellcheck is not installed; run ./scripts/test.sh, which installs it")
    scripts = ["scripts/test.sh", "scripts/demo.sh", "scripts/setup-common.sh", ".ci/run"]
    proc = subprocess.run(["shellcheck", "-x", *scripts], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout
