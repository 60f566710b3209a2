"""Logging setup: readable lines on stderr.

Records may carry structured fields as upper-case `extra` keys (MQTT_REASON, COMMAND, REQ_ID,
KEEPALIVE, ...); the stderr format leaves them out, a journald handler can send them as fields.
Never log passwords, private keys or command payloads.
"""

from __future__ import annotations

import logging
import sys

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
STDERR_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def setup_logging(level: str = "info") -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(STDERR_FORMAT))
    root.addHandler(handler)
    set_level(level)


def set_level(level: str) -> None:
    logging.getLogger().setLevel(LEVELS.get(level, logging.INFO))
    # paho logs nothing unless given a logger; keep third-party chatter at warning.
    logging.getLogger("paho").setLevel(logging.WARNING)
