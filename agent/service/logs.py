"""Logging setup: structured records to the systemd journal under systemd, readable lines elsewhere.

Records may carry structured fields as upper-case `extra` keys (MQTT_REASON, MQTT_RC, COMMAND, REQ_ID,
STATUS, KEEPALIVE, ERROR_ID). When the agent's stderr is connected to the journal ($JOURNAL_STREAM,
see systemd.exec(5)), records go to journald's native socket with those keys as journal fields and
the record's level as PRIORITY, so `journalctl -u mqtt-agent MQTT_REASON=idle_timeout` or `-p warning`
work. Elsewhere the stderr format leaves the fields out.

Never log passwords, private keys or command payloads: only the message and the explicit fields are
sent (never the record's raw arguments).
"""

from __future__ import annotations

import logging
import os
import re
import socket
import struct
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TextIO

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


STDERR_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


JOURNAL_SOCKET = Path("/run/systemd/journal/socket")


SYSLOG_IDENTIFIER = "mqtt-agent"


# Journal field names: upper-case letters, digits and '_', not starting with '_' (reserved for journald).
_FIELD_RE = re.compile(r"^[A-Z][A-Z0-9_]{0,63}$")


# Fields the handler sets itself; an `extra` of the same name must not override them.
_OWN_FIELDS = frozenset({"MESSAGE", "PRIORITY", "SYSLOG_IDENTIFIER", "LOGGER", "THREAD_NAME", "CODE_FILE",
                         "CODE_LINE", "CODE_FUNC"})


def syslog_priority(levelno: int) -> int:
    """Python level -> syslog priority (journal PRIORITY)."""
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


def structured_fields(record: logging.LogRecord) -> dict[str, str]:
    """The upper-case `extra` fields of a record (None values left out)."""
    return {k: str(v) for k, v in record.__dict__.items()
            if _FIELD_RE.match(k) and k not in _OWN_FIELDS and v is not None}


def encode_journal_fields(fields: Mapping[str, str]) -> bytes:
    """journald's native protocol: KEY=VALUE lines; values with a newline in the length-prefixed form."""
    out = bytearray()
    for key, value in fields.items():
        data = value.encode("utf-8", "replace")
        if b"\n" in data:
            out += key.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += key.encode() + b"=" + data + b"\n"
    return bytes(out)


def journal_stream_matches(env: Mapping[str, str], stream: TextIO) -> bool:
    """True if `stream` is the journal stream systemd set up ($JOURNAL_STREAM is "device:inode")."""
    value = env.get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return st.st_dev == int(dev) and st.st_ino == int(ino)


class JournalHandler(logging.Handler):
    """Sends records to journald over its native datagram socket.

    If the journal cannot take a record (socket gone, queue full for a second, record too large), the
    record is written to stderr with a "<priority>" prefix instead, which journald parses on the stream.
    """

    def __init__(self, socket_path: Path = JOURNAL_SOCKET, *, identifier: str = SYSLOG_IDENTIFIER,
                 fallback: TextIO | None = None, send_timeout: float = 1.0) -> None:
        super().__init__()
        self.socket_path = socket_path
        self.identifier = identifier
        self.fallback = fallback if fallback is not None else sys.stderr
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        # A stuck journald must not wedge the agent's threads for long: give up and use stderr.
        self._sock.settimeout(send_timeout)
        self.setFormatter(logging.Formatter("%(message)s"))

    def fields(self, record: logging.LogRecord) -> dict[str, str]:
        fields = {
            "MESSAGE": self.format(record),
            "PRIORITY": str(syslog_priority(record.levelno)),
            "SYSLOG_IDENTIFIER": self.identifier,
            "LOGGER": record.name,
            "THREAD_NAME": record.threadName or "",
            "CODE_FILE": record.pathname or "",
            "CODE_LINE": str(record.lineno),
            "CODE_FUNC": record.funcName or "",
        }
        fields.update(structured_fields(record))
        return fields

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields = self.fields(record)
            datagram = encode_journal_fields(fields)
        except Exception:  # noqa: BLE001 - logging must not raise into the caller
            self.handleError(record)
            return
        try:
            self._sock.sendto(datagram, str(self.socket_path))
        except OSError:
            try:
                self.fallback.write(f"<{fields['PRIORITY']}>{record.name}: {fields['MESSAGE']}\n")
                self.fallback.flush()
            except Exception:  # noqa: BLE001 - nowhere left to report it
                pass

    def close(self) -> None:
        try:
            self._sock.close()
        finally:
            super().close()


def setup_logging(level: str = "info", *, journal: bool | None = None, journal_socket: Path = JOURNAL_SOCKET,
                  env: Mapping[str, str] | None = None) -> logging.Handler:
    """Install the one root handler. `journal=None`: the journal when stderr is systemd's journal
    stream and journald's socket exists, else readable stderr lines. Returns the handler."""
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    if journal is None:
        journal = journal_stream_matches(os.environ if env is None else env, sys.stderr) and journal_socket.exists()
    handler: logging.Handler
    if journal:
        handler = JournalHandler(journal_socket)
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(STDERR_FORMAT))
    root.addHandler(handler)
    set_level(level)
    return handler


def set_level(level: str) -> None:
    logging.getLogger().setLevel(LEVELS.get(level, logging.INFO))
    # paho logs nothing unless given a logger; keep third-party chatter at warning.
    logging.getLogger("paho").setLevel(logging.WARNING)

