"""What the benchmark ran on: CPU, memory, OS, versions, load. Results mean little without it."""

from __future__ import annotations

import os
import platform
import re
import ssl
import subprocess
from pathlib import Path
from typing import Any

from bench.procs import REPO


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def mem_available_kib() -> int:
    """MemAvailable from /proc/meminfo (0 if unknown)."""
    m = re.search(r"^MemAvailable:\s+(\d+)", _read("/proc/meminfo"), re.M)
    return int(m.group(1)) if m else 0


def loadavg() -> str:
    return " ".join(_read("/proc/loadavg").split()[:3])


def _cpu_model() -> str:
    text = _read("/proc/cpuinfo")
    for key in ("model name", "Model", "Hardware"):
        m = re.search(rf"^{key}\s*:\s*(.+)$", text, re.M)
        if m:
            return m.group(1).strip()
    return platform.processor() or platform.machine()


def _os_name() -> str:
    m = re.search(r'^PRETTY_NAME="?([^"\n]+)"?', _read("/etc/os-release"), re.M)
    return m.group(1) if m else platform.system()


def _mosquitto_version() -> str:
    try:
        out = subprocess.run(["mosquitto", "-h"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "mosquitto (unknown version)"
    m = re.search(r"mosquitto version (\S+)", out)
    return f"mosquitto {m.group(1)}" if m else "mosquitto (unknown version)"


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    commit = out.stdout.strip() or "unknown"
    return commit + (" (with local changes)" if dirty else "")


def _version(dist: str) -> str:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:  # noqa: BLE001 - a missing distribution is reported, not fatal
        return "unknown"


def describe() -> dict[str, Any]:
    """The machine and software versions, as JSON-able data."""
    from agent import __version__

    mem_kib = 0
    m = re.search(r"^MemTotal:\s+(\d+)", _read("/proc/meminfo"), re.M)
    if m:
        mem_kib = int(m.group(1))
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "arch": platform.machine(),
        "kernel": platform.release(),
        "os": _os_name(),
        "python": platform.python_version(),
        "paho_mqtt": _version("paho-mqtt"),
        "openssl": ssl.OPENSSL_VERSION,
        "mosquitto": _mosquitto_version(),
        "agent_version": __version__,
        "git_commit": _git_commit(),
        "loadavg_start": loadavg(),
    }
