"""Run the real agent (`python -m agent run`) as a child process and watch its log lines."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import tomli_w

REPO = Path(__file__).resolve().parents[2]


def write_toml(path: Path, sections: dict[str, dict[str, Any]]) -> Path:
    """Write {"agent": {...}, "commands.echo": {...}} as TOML (a dotted name is a nested table)."""
    doc: dict[str, Any] = {}
    for name, values in sections.items():
        table = doc
        for part in name.split("."):
            table = table.setdefault(part, {})
        table.update(values)
    path.write_text(tomli_w.dumps(doc))
    return path


def run_cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 60,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
    """`mqtt-agent ARGS...` of this checkout as a child process (`python -m agent`), output captured."""
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True, text=True, cwd=cwd or REPO,
                          env={**os.environ, **env} if env is not None else None, timeout=timeout, input=input)


def cli_in_process(*args: str) -> subprocess.CompletedProcess[str]:
    """`mqtt-agent ARGS...` through agent.cli.main in this process (a tool's tests, no interpreter start
    per call): exit status and captured stdout/stderr, as run_cli returns them."""
    import contextlib
    import io
    import logging

    from agent.cli import main

    root = logging.getLogger()
    saved = (root.level, list(root.handlers))  # main() sets logging up for a process: undo it after
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as exc:  # argparse: --help (0) and usage errors (2)
                code = exc.code if isinstance(exc.code, int) else 1
    finally:
        root.setLevel(saved[0])
        root.handlers[:] = saved[1]
    return subprocess.CompletedProcess(["mqtt-agent", *args], code, out.getvalue(), err.getvalue())


class AgentProcess:
    def __init__(self, config: Path, *, env: dict[str, str] | None = None, args: tuple[str, ...] = (),
                 new_session: bool = False, wrapper: tuple[str, ...] = ()) -> None:
        self.config = config
        self.wrapper = wrapper  # e.g. ("strace", "-f", ...): the agent runs under it
        self.new_session = new_session  # its own process group: `kill_group` takes its children too
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.args = args
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self.proc: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None

    def start(self) -> AgentProcess:
        self.proc = subprocess.Popen(
            [*self.wrapper, sys.executable, "-m", "agent", "run", "--config", str(self.config), *self.args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=self.env,
            start_new_session=self.new_session,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        assert self.proc and self.proc.stdout
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def mark(self) -> int:
        with self._cond:
            return len(self.lines)

    def wait_for(self, pattern: str, timeout: float = 15.0, since: int = 0) -> re.Match[str]:
        """Wait for a log line matching `pattern` (regex) at or after line `since`."""
        rx = re.compile(pattern)
        end = time.monotonic() + timeout
        with self._cond:
            i = since
            while True:
                while i < len(self.lines):
                    m = rx.search(self.lines[i])
                    if m:
                        return m
                    i += 1
                left = end - time.monotonic()
                if left <= 0 or (self.proc and self.proc.poll() is not None and i >= len(self.lines)):
                    raise AssertionError(f"no log line matching {pattern!r} within {timeout} s; log:\n"
                                         + "\n".join(self.lines[-60:]))
                self._cond.wait(min(left, 0.2))

    def count(self, pattern: str) -> int:
        rx = re.compile(pattern)
        with self._cond:
            return sum(1 for line in self.lines if rx.search(line))

    @property
    def output(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        assert self.proc
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        if self._reader:
            self._reader.join(5)
        return rc

    def kill_group(self) -> None:
        """SIGKILL the agent and every child it started (a power cut takes them all at once)."""
        assert self.proc and self.new_session
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        if self._reader:
            self._reader.join(5)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self._reader:
            self._reader.join(5)
