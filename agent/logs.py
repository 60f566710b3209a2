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
from typing import Callable, TextIO

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


# --- untrusted text and repeated warnings ------------------------------------------------------

# Topics, command names, request ids, payload excerpts, user properties and exec stderr come from the
# network or from programs: in a log line they are cut to this many characters and escaped, so that a
# 60,000-character command name costs a log line of ~200 characters, and a "\n" in it cannot forge a line.
UNTRUSTED_MAX = 120
_UNSAFE_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\\]")


def _escape_char(match: re.Match[str]) -> str:
    ch = match.group()
    if ch == "\\":
        return "\\\\"
    return {"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(ch) or (
        f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}")


def untrusted(value: object, limit: int = UNTRUSTED_MAX) -> str:
    """`value` fit for a log line: at most `limit` characters of it, control characters (and bidi
    overrides, and backslashes) escaped, and a marker saying how much was cut: `abc...[+59997 chars]`.
    Bytes are decoded as UTF-8 with replacement characters. Escaping happens after the cut, so the
    result is bounded by about 4 x `limit` + 20 characters whatever the input."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        text = bytes(value[: limit * 4]).decode("utf-8", "replace")
        total = len(value)
        unit = "bytes"
    else:
        text = value if isinstance(value, str) else str(value)
        total = len(text)
        unit = "chars"
    shown = text[:limit]
    out = _UNSAFE_CHARS.sub(_escape_char, shown)
    cut = total - (len(shown) if unit == "chars" else len(shown.encode("utf-8", "replace")))
    if cut > 0:
        out += f"...[+{cut} {unit}]"
    return out


class LogSummary:
    """Rate-limits one kind of repeated log line: the first event of a `key` (e.g. a rejection reason)
    is logged at once, later ones within `interval` seconds are only counted, and the next line for that
    key says how many were not logged ("... (and 1999 more like it in the last 60 s)").

    Metrics count every event; this only bounds the log (journald would otherwise rate-limit the whole
    service, including the lines that matter). Thread-safe; `clock` is injected for tests."""

    def __init__(self, logger: logging.Logger, interval: float = 60.0, *,
                 clock: Callable[[], float] | None = None, max_keys: int = 256) -> None:
        import threading
        import time

        self._log = logger
        self.interval = interval
        self._clock = clock or time.monotonic
        self._lock = threading.Lock()
        self._keys: dict[str, tuple[float, int]] = {}  # key -> (window start, suppressed count)
        self._max_keys = max_keys

    def log(self, key: str, level: int, msg: str, *args: object, extra: Mapping[str, object] | None = None) -> bool:
        """Log `msg % args` unless `key` was logged less than `interval` s ago. True if logged."""
        now = self._clock()
        with self._lock:
            start, suppressed = self._keys.get(key, (None, 0))
            if start is not None and now - start < self.interval:
                self._keys[key] = (start, suppressed + 1)
                return False
            if key not in self._keys and len(self._keys) >= self._max_keys:
                self._keys.pop(next(iter(self._keys)))  # keys are bounded even if a caller's are not
            self._keys[key] = (now, 0)
        if suppressed:
            msg += " (and %d more like it in the last %.0f s, not logged)"
            args = (*args, suppressed, now - start if start is not None else self.interval)
        self._log.log(level, msg, *args, extra=dict(extra) if extra else None)
        return True

    def flush(self) -> None:
        """Log the counts still held back (at shutdown)."""
        with self._lock:
            pending = [(k, n) for k, (_, n) in self._keys.items() if n]
            self._keys.clear()
        for key, count in pending:
            self._log.warning("%d more %s event(s) were not logged (rate limit)", count, untrusted(key))
