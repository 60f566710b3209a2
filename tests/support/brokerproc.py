"""What every broker fixture does with its process: start it in its own session and wait until it
listens, stop it with a bounded SIGTERM -> SIGKILL to the whole group, kill it (a lost node), restart it
on the same port, and keep its output in one log file of which errors quote a bounded tail.

A broker kind says how it is started (`command`, and `prepare` for config files written before every
start); tests/support/mosquitto.py (the host's mosquitto) and tests/support/brokers/ (the interop kinds)
build on this.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

LOG_TAIL = 3000  # characters of a broker's log quoted in an error


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_port(host: str, port: int, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return True
        time.sleep(0.02)
    return False


class BrokerProcess:
    """One broker process (or process group) listening on `host:port`."""

    kind = "broker"
    start_timeout = 15.0  # until it listens
    stop_timeout = 20.0  # after SIGTERM, before SIGKILL

    def __init__(self, workdir: Path, *, host: str = "127.0.0.1", port: int | None = None,
                 log_name: str | None = None) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.host = host
        self.port = port or free_port(host)
        self.log_path = self.dir / (log_name or f"{self.kind}.log")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def command(self) -> tuple[list[str], dict[str, str]]:
        """argv and extra environment of the broker process."""
        raise NotImplementedError

    def prepare(self) -> None:
        """Write config files; called before every start."""

    def start(self) -> BrokerProcess:
        self.prepare()
        argv, env = self.command()
        with open(self.log_path, "ab") as log:  # the child keeps its own descriptor
            log.write(f"--- start {time.strftime('%H:%M:%S')}: {' '.join(argv)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                         env={**os.environ, **env}, start_new_session=True)
        end = time.monotonic() + self.start_timeout
        while not wait_port(self.host, self.port, 0.5):
            if self.proc.poll() is not None or time.monotonic() > end:
                self.stop()
                raise RuntimeError(f"{self.kind} did not listen on {self.address} within "
                                   f"{self.start_timeout:g} s:\n{self.log_tail()}")
        return self

    def _signal(self, sig: int) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)

    def stop(self, timeout: float | None = None) -> None:
        """SIGTERM to the group, at most `timeout` (stop_timeout) to exit, then SIGKILL to what is left."""
        if self.proc is None:
            return
        self._signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(self.stop_timeout if timeout is None else timeout)
        self._signal(signal.SIGKILL)  # whatever of the group is left (epmd, children)
        self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        """SIGKILL to the whole group: a node lost, no clean shutdown, no persistence save."""
        if self.proc is None:
            return
        self._signal(signal.SIGKILL)
        self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, size: int = LOG_TAIL) -> str:
        return self.log_text()[-size:]

    def __enter__(self) -> BrokerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
