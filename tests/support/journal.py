"""journald's side of the native protocol, for the logging tests: a datagram socket that decodes records."""

from __future__ import annotations

import socket
import struct
from pathlib import Path


def decode(datagram: bytes) -> dict[str, str]:
    """journald's side of the native protocol."""
    out: dict[str, str] = {}
    i = 0
    while i < len(datagram):
        nl = datagram.index(b"\n", i)
        line = datagram[i:nl]
        if b"=" in line:
            key, val = line.split(b"=", 1)
            out[key.decode()] = val.decode()
            i = nl + 1
        else:
            (size,) = struct.unpack("<Q", datagram[nl + 1:nl + 9])
            out[line.decode()] = datagram[nl + 9:nl + 9 + size].decode()
            assert datagram[nl + 9 + size:nl + 10 + size] == b"\n"
            i = nl + 10 + size
    return out


class Journal:
    """A stand-in journald socket at `path`; `receive()` returns one record's fields."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(5)

    def receive(self) -> dict[str, str]:
        return decode(self.sock.recv(1 << 20))
