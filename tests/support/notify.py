"""A stand-in for systemd's notification socket: a real AF_UNIX datagram socket that records every
sd_notify message, for tests that run the real agent with NOTIFY_SOCKET pointing at it."""

from __future__ import annotations

import os
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Message:
    at: float  # time.monotonic() when received
    fields: dict[str, str] = field(default_factory=dict)

    def __contains__(self, key: str) -> bool:
        return key in self.fields

    def get(self, key: str, default: str = "") -> str:
        return self.fields.get(key, default)


def parse(datagram: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in datagram.decode("utf-8", "replace").split("\n"):
        if "=" in line:
            key, value = line.split("=", 1)
            out[key] = value
    return out


class NotifySocket:
    """Bound at a path in `directory` or, with abstract=True, in the abstract namespace ('@name')."""

    def __init__(self, directory: Path, *, abstract: bool = False) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = f"mqtt-agent-test-{os.getpid()}-{time.monotonic_ns()}"
            self.sock.bind(b"\0" + name.encode())
            self.env_value = "@" + name
        else:
            path = directory / "notify.sock"
            self.sock.bind(str(path))
            self.env_value = str(path)
        # sd_notify sends credentials; systemd requires SO_PASSCRED to read them. Set it like systemd does.
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.settimeout(0.2)
        self.messages: list[Message] = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._closed:
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            with self._cond:
                self.messages.append(Message(time.monotonic(), parse(data)))
                self._cond.notify_all()

    def close(self) -> None:
        self._closed = True
        self._thread.join(2)
        self.sock.close()

    def snapshot(self) -> list[Message]:
        with self._cond:
            return list(self.messages)

    def mark(self) -> int:
        with self._cond:
            return len(self.messages)

    def wait_for(self, key: str, pattern: str = "", timeout: float = 20.0, since: int = 0) -> Message:
        """The first message at or after index `since` with field `key` matching regex `pattern`."""
        rx = re.compile(pattern)
        end = time.monotonic() + timeout
        with self._cond:
            i = since
            while True:
                while i < len(self.messages):
                    msg = self.messages[i]
                    if key in msg.fields and rx.search(msg.fields[key]):
                        return msg
                    i += 1
                left = end - time.monotonic()
                if left <= 0:
                    seen = "\n".join(str(m.fields) for m in self.messages[-30:])
                    raise AssertionError(f"no sd_notify message with {key} matching {pattern!r} within {timeout} s;"
                                         f" last messages:\n{seen}")
                self._cond.wait(min(left, 0.2))

    def index_of(self, msg: Message) -> int:
        with self._cond:
            return next(i for i, m in enumerate(self.messages) if m is msg)

    def pings(self, start: float = 0.0, end: float = float("inf")) -> list[float]:
        """Arrival times of WATCHDOG=1 between monotonic times start and end."""
        return [m.at for m in self.snapshot() if m.get("WATCHDOG") == "1" and start <= m.at <= end]

    def statuses(self) -> list[str]:
        return [m.get("STATUS") for m in self.snapshot() if "STATUS" in m]
