"""What a test asserts on instead of the agent's log text: metric samples scraped over HTTP, the `info`
command's answer (sent through the broker), and a bounded poll for either.

Log lines are wording and may change; these are the agent's interfaces (metric names and the `info`
fields are released, see README "Metrics and alerts").
"""

from __future__ import annotations

import json
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, TypeVar

from agent.config import load_config
from agent.tools.send import send_command
from tests.support.metrics import Samples, parse
from tests.support.mosquitto import free_port

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout: float = 10.0, what: str = "condition",
               interval: float = 0.05) -> T:
    """Poll `predicate` until it returns something true (returned), bounded by `timeout`."""
    end = time.monotonic() + timeout
    while True:
        got = predicate()
        if got:
            return got
        assert time.monotonic() < end, f"not reached within {timeout} s: {what}"
        time.sleep(interval)


def script(tmp_path: Path, name: str, body: str) -> str:
    """An executable /bin/sh script (dedented body) for an exec command; returns its path."""
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + textwrap.dedent(body))
    path.chmod(0o755)
    return str(path)


def send(cfg_path: Path, command: str, payload: bytes = b"", **kw: Any) -> Any:
    """`mqtt-agent send` in-process: the command through the broker, its response back (a SendResult)."""
    return send_command(load_config(cfg_path), command, payload, timeout=kw.pop("timeout", 10), **kw)


def info(cfg_path: Path, timeout: float = 10.0) -> dict[str, Any]:
    """The agent's `info` command answer (connection facts, command counts), through the broker."""
    result = send_command(load_config(cfg_path), "info", timeout=timeout)
    assert result.status == 200, result
    return dict(json.loads(result.body))


def metrics_on() -> tuple[int, dict[str, dict[str, Any]]]:
    """A free loopback port and the config override that serves /metrics on it."""
    port = free_port()
    return port, {"metrics": {"listen": f"127.0.0.1:{port}"}}


def scrape_text(port: int, timeout: float = 10.0) -> str:
    """/metrics as text; retried while nothing listens yet (an agent just started), up to `timeout`."""
    end = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as resp:
                assert resp.status == 200
                return str(resp.read().decode())
        except urllib.error.URLError as exc:
            if not isinstance(exc.reason, ConnectionRefusedError) or time.monotonic() > end:
                raise
        time.sleep(0.05)


def scrape(port: int) -> Samples:
    """Every sample of the agent's /metrics, keyed (name, sorted labels)."""
    return parse(scrape_text(port))


def scrape_flat(port: int) -> dict[str, float]:
    """Every sample keyed as the exposition writes it: 'name{label="v",...}' (or 'name')."""
    out: dict[str, float] = {}
    for line in scrape_text(port).splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def metric(port: int, name: str, **labels: str) -> float:
    """One sample's value (0.0 if the series does not exist yet)."""
    return scrape(port).get((name, tuple(sorted(labels.items()))), 0.0)


def wait_metric(port: int, name: str, at_least: float, timeout: float = 20.0, **labels: str) -> float:
    """Poll /metrics until the sample reaches `at_least`; returns its value."""
    end = time.monotonic() + timeout
    while True:
        value = metric(port, name, **labels)
        if value >= at_least:
            return value
        assert time.monotonic() < end, f"{name}{labels} = {value}, not >= {at_least} within {timeout} s"
        time.sleep(0.05)
