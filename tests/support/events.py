"""Typed session events made by hand, for the listeners' pure tests (metrics, health, sd_notify)."""

from __future__ import annotations

from typing import Any

from agent.config import HostPort
from agent.connection.events import ConnectionEnded


def ended(kind: str = "network_error", *, connected_at: float | None = None, host: HostPort | None = None,
          ended_at: float = 1.0, **fields: Any) -> ConnectionEnded:
    """A connection (connected_at set) or a connection attempt (None) that ended for `kind`; `fields`
    sets any other ConnectionEnded field (reason, last_in, reason_code, error, ...)."""
    values: dict[str, Any] = {"reason": "", "attempt_started": 0.0, **fields}
    return ConnectionEnded(host=host or HostPort("b", 1), kind=kind, ended_at=ended_at, connected_at=connected_at,
                           **values)
