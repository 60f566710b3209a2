"""`{state_dir}/connection-state.json`: what the keepalive tuner learned, kept across restarts.

Read defensively (a missing, unreadable or garbled file is logged and ignored: the tuner starts afresh) and
written through agent/state/files.py (temp file, fsync, rename, fsync the directory; mode 0600).
`mqtt-agent doctor` reads it too.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from agent.state.files import write_atomic

log = logging.getLogger(__name__)

STATE_FILE = "connection-state.json"
STATE_VERSION = 1


class StateFile:
    """`{state_dir}/connection-state.json`: read defensively, written atomically with mode 0600."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> dict[str, Any]:
        """The saved state, or {} if there is none or it is unreadable (logged, never fatal)."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            log.warning("cannot read %s (%s); starting without the learned connection state", self.path,
                        exc.strerror or exc)
            return {}
        try:
            data = json.loads(raw.decode("utf-8"))
        except ValueError as exc:  # UnicodeDecodeError too: binary garbage after a bad SD card or a cut
            log.warning("%s is not valid JSON (%s); starting without the learned connection state (it is "
                        "written again at the next change)", self.path, str(exc)[:200])
            return {}
        if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
            log.warning("%s has an unknown format; starting without the learned connection state", self.path)
            return {}
        return data

    def save(self, data: dict[str, Any]) -> None:
        """Replace the file atomically; an I/O error is logged, not raised (the agent keeps running)."""
        payload = json.dumps({"version": STATE_VERSION, **data}, indent=1, sort_keys=True) + "\n"
        try:
            write_atomic(self.path, payload.encode("utf-8"))
        except OSError as exc:
            log.warning("cannot write %s: %s", self.path, exc.strerror or exc)

