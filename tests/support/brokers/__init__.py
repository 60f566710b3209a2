"""Real MQTT brokers of several kinds on free loopback ports, for the interop suite and issue 17's tests.

Every kind offers the same small interface (`Broker`): start, stop (clean), kill (SIGKILL), restart on
the same port, `address` for `mqtt.hosts`, and a few facts the scenarios branch on (`mqtt5`, `tls`).
Each process runs in its own session so a stop reaches its children (RabbitMQ's erl, epmd, ...).

    kind                  where it comes from                         TLS
    mosquitto-2.0.11      the host's Debian 12 package                mutual TLS
    mosquitto-2.0.21      Debian 13 package in a cached trixie root   mutual TLS
    rabbitmq-3.10         the host's Debian 12 package, MQTT plugin   mutual TLS
    rabbitmq-4.0          Debian 13 package in the trixie root        mutual TLS
    aedes-1.2             npm, cached, tests/support/brokers/aedes_server.mjs   mutual TLS
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

from tests.support.mosquitto import free_port, wait_port

__all__ = ["Broker", "free_port", "wait_port"]


class Broker:
    """One broker process (or process group) on 127.0.0.1."""

    kind = "broker"
    mqtt5 = False  # speaks MQTT 5
    start_timeout = 15.0

    def __init__(self, workdir: Path, *, tls: bool = True, port: int | None = None) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.tls = tls
        self.log_path = self.dir / f"{self.kind}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def command(self) -> tuple[list[str], dict[str, str]]:
        raise NotImplementedError

    def prepare(self) -> None:
        """Write config files; called before every start."""

    def start(self) -> Broker:
        self.prepare()
        argv, env = self.command()
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child process
        log.write(f"--- start {time.strftime('%H:%M:%S')}: {' '.join(argv)}\n".encode())
        log.flush()
        self.proc = subprocess.Popen(argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                     env={**os.environ, **env}, start_new_session=True)
        log.close()
        end = time.monotonic() + self.start_timeout
        while not wait_port(self.host, self.port, 0.5):
            if self.proc.poll() is not None or time.monotonic() > end:
                self.stop()
                raise RuntimeError(f"{self.kind} did not listen on {self.address} within "
                                   f"{self.start_timeout} s:\n{self.log_text()[-3000:]}")
        return self

    def _signal(self, sig: int) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc is None:
            return
        self._signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        self._signal(signal.SIGKILL)  # whatever of the group is left (epmd, children)
        self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        """SIGKILL to the whole group: a node lost, no clean shutdown."""
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

    def __enter__(self) -> Broker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
