"""Untrusted text in log lines: cut to a short bound with control characters escaped, and
repeated warnings summarised (one line per reason per interval, with a count).
Every layer logs through these, so they sit with the shared vocabulary.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Callable

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

