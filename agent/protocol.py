"""Pure protocol types: what arrives, what a handler sees, what goes back, and status codes.

Statuses are HTTP codes, restricted to 200-299 and 400-599 as the Hono MQTT adapter requires.
Error bodies are JSON `{"error": "..."}`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

OK = 200
BAD_REQUEST = 400
NOT_FOUND = 404
GONE = 410
PAYLOAD_TOO_LARGE = 413
TOO_MANY_REQUESTS = 429
INTERNAL_ERROR = 500
UNAVAILABLE = 503
TIMEOUT = 504

JSON = "application/json"


def is_valid_status(status: object) -> bool:
    """Only 2xx and 4xx/5xx may be sent back (Hono rejects other response codes)."""
    return isinstance(status, int) and not isinstance(status, bool) and (
        200 <= status <= 299 or 400 <= status <= 599
    )


@dataclass(frozen=True)
class Inbound:
    """A received MQTT message in the agent's own terms (no paho types past the session)."""

    topic: str
    payload: bytes
    qos: int = 1
    dup: bool = False
    received_wall: float = 0.0
    received_mono: float = 0.0
    response_topic: str | None = None
    correlation_data: bytes | None = None
    user_properties: tuple[tuple[str, str], ...] = ()
    message_expiry: int | None = None
    content_type: str | None = None


@dataclass(frozen=True)
class ReplyRoute:
    """Where a response goes: the Hono response topic base and, for MQTT 5 requests, the Response Topic."""

    topic_base: str | None
    response_topic: str | None = None
    correlation_data: bytes | None = None

    @property
    def silent(self) -> bool:
        return self.topic_base is None and self.response_topic is None


@dataclass(frozen=True)
class Request:
    """What a handler receives."""

    command: str
    req_id: str
    device_id: str
    payload: bytes = b""
    via_gateway: bool = False
    content_type: str | None = None
    user_properties: tuple[tuple[str, str], ...] = ()
    deadline: float = float("inf")  # time.monotonic() value by which the handler must be done

    def json(self, *, allow_empty: bool = True) -> Any:
        """The payload decoded as JSON; an empty payload is None. Raises BadRequest."""
        if not self.payload.strip():
            if allow_empty:
                return None
            raise BadRequest(f"command {self.command!r} needs a JSON payload")
        try:
            return json.loads(self.payload)
        except (UnicodeDecodeError, ValueError) as exc:
            raise BadRequest(f"payload is not valid JSON: {exc}") from exc


# json.dumps(obj, separators=(",", ":"), sort_keys=True), without building an encoder for every response.
_COMPACT = json.JSONEncoder(separators=(",", ":"), sort_keys=True)


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str | None = JSON
    headers: tuple[tuple[str, str], ...] = field(default=())

    @classmethod
    def ok(cls, obj: Any, status: int = OK) -> Response:
        return cls(status, _COMPACT.encode(obj).encode(), JSON)

    @classmethod
    def error(cls, status: int, message: str, **extra: Any) -> Response:
        return cls.ok({"error": message, **extra}, status=status)



class CommandError(Exception):
    """Raised by a handler to answer with an error status and message."""

    status = INTERNAL_ERROR

    def __init__(self, message: str, status: int | None = None, **extra: Any) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status
        self.message = message
        self.extra = extra

    def response(self) -> Response:
        return Response.error(self.status, self.message, **self.extra)


class BadRequest(CommandError):
    status = BAD_REQUEST


class CommandTimeout(CommandError):
    status = TIMEOUT
