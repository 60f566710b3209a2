"""Child processes under measurement: start time, READY over a real NOTIFY_SOCKET, log lines, /proc.

Output goes to a file rather than a pipe: a reader thread in the benchmark process would compete
for the GIL with the load generator (and for one of only two cores with the process measured).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLK_TCK = os.sysconf("SC_CLK_TCK")


class NotifySocket:
    """An AF_UNIX datagram socket given to a child as $NOTIFY_SOCKET, as systemd does for Type=notify.

    Records when each sd_notify message first arrived (time.perf_counter()).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        path.unlink(missing_ok=True)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        self._sock.settimeout(0.2)
        self.first_seen: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._recv, name=f"notify-{path.name}", daemon=True)
        self._thread.start()

    def _recv(self) -> None:
        while not self._stop.is_set():
            try:
                data = self._sock.recv(4096)
            except socket.timeout:
                continue
            except OSError:
                return
            now = time.perf_counter()
            for line in data.decode("utf-8", "replace").splitlines():
                key = line.split("=", 1)[0] if line.startswith(("READY=", "STOPPING=", "RELOADING=")) else line
                self.first_seen.setdefault(key, now)

    @property
    def ready_at(self) -> float | None:
        return self.first_seen.get("READY")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._sock.close()
        self.path.unlink(missing_ok=True)


class NewLines:
    """The lines appended to a file since the last call, each stamped (time.perf_counter()) when read."""

    def __init__(self, path: Path, offset: int = 0) -> None:
        self.path = path
        self._offset = offset
        self._partial = b""

    def read(self) -> list[tuple[float, str]]:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self._offset)
                data = fh.read()
        except FileNotFoundError:
            return []
        if not data:
            return []
        now = time.perf_counter()
        self._offset += len(data)
        chunks = (self._partial + data).split(b"\n")
        self._partial = chunks.pop()
        return [(now, c.decode("utf-8", "replace")) for c in chunks]


class Proc:
    """A child process; `started` is time.perf_counter() just before it was spawned."""

    def __init__(self, name: str, argv: list[str], workdir: Path, *, env: dict[str, str] | None = None,
                 notify: bool = False) -> None:
        self.name = name
        self.argv = argv
        self.log_path = workdir / f"{name}.log"
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        # Never inherit the benchmark's own service-manager sockets.
        for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM"):
            self.env.pop(key, None)
        self.notify = NotifySocket(workdir / f"{name}.notify") if notify else None
        if self.notify:
            self.env["NOTIFY_SOCKET"] = str(self.notify.path)
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self._log = NewLines(self.log_path)
        self.lines: list[tuple[float, str]] = []

    @classmethod
    def agent(cls, name: str, config: Path, workdir: Path, notify: bool = True) -> Proc:
        return cls(name, [sys.executable, "-m", "agent", "run", "--config", str(config)], workdir, notify=notify)

    def start(self) -> Proc:
        log = open(self.log_path, "wb")  # noqa: SIM115 - handed to the child
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=self.env,
                                     stdin=subprocess.DEVNULL)
        log.close()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def running(self) -> bool:
        """`alive` as a callable, for waits that give up when the process has died."""
        return self.alive

    # --- log lines ---------------------------------------------------------------------------------

    def read_lines(self) -> None:
        """Pick up lines written since the last call, stamped with the time they were read."""
        self.lines += self._log.read()

    def first_line(self, pattern: str) -> float | None:
        """When a line matching `pattern` was first read, or None."""
        self.read_lines()
        rx = re.compile(pattern)
        for when, line in self.lines:
            if rx.search(line):
                return when
        return None

    def wait_line(self, pattern: str, timeout: float) -> float:
        """Poll the log (every 2 ms) until a matching line appears; returns when it was read."""
        end = time.monotonic() + timeout
        while True:
            when = self.first_line(pattern)
            if when is not None:
                return when
            if not self.alive:
                raise RuntimeError(f"{self.name} exited with {self.proc and self.proc.returncode}:\n{self.tail()}")
            if time.monotonic() > end:
                raise RuntimeError(f"{self.name}: no line matching {pattern!r} within {timeout:g} s:\n{self.tail()}")
            time.sleep(0.002)

    def tail(self, n: int = 30) -> str:
        self.read_lines()
        return "\n".join(line for _, line in self.lines[-n:])

    # --- /proc ------------------------------------------------------------------------------------

    def rss_kib(self) -> int:
        return rss_kib(self.pid)

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    # --- stopping ---------------------------------------------------------------------------------

    def signal(self, sig: int = signal.SIGTERM) -> None:
        if self.alive:
            assert self.proc is not None
            self.proc.send_signal(sig)

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, then SIGKILL if it has not exited within `timeout`."""
        if self.proc is None:
            return None
        self.signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        if self.notify:
            self.notify.close()
            self.notify = None
        return rc


def rss_kib(pid: int) -> int:
    """Resident set size (VmRSS) in KiB."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    with open(f"/proc/{pid}/stat") as fh:
        text = fh.read()
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def stop_all(procs: list[Proc], timeout: float = 30.0) -> None:
    """SIGTERM every process at once, then wait for each (SIGKILL past the shared deadline)."""
    for p in procs:
        p.signal(signal.SIGTERM)
    end = time.monotonic() + timeout
    for p in procs:
        try:
            p.stop(max(end - time.monotonic(), 0.1))
        except OSError:
            pass
