"""Pure: an API request (path, query, headers, body) -> the telemetry/events to queue, or why not.

No sockets and no disk here: `server.py` moves the bytes, the outbox (agent/state/outbox.py) holds the
bounds and makes the messages durable. Every refusal is an `ApiError` with the HTTP status, a short
machine-readable `error`, the bound it hit (`limit`, a config key, and its `value`) and a sentence for
a person.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import parse_qsl

from agent.state import poison
from agent.state.store import OutMessage
from agent.topics import publish_topic

MAX_DEVICE_CHARS = 256
MAX_CONTENT_TYPE_CHARS = 256
MAX_TTL = 366 * 86400.0
_DEVICE_UNSAFE = re.compile(r"[/+#?\x00-\x1f\x7f]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
KNOWN_QUERY = {"device", "qos", "ttl"}


@dataclass(frozen=True)
class ApiError(Exception):
    status: int
    error: str
    message: str
    limit: str | None = None
    value: int | float | None = None

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"error": self.error, "message": self.message}
        if self.limit is not None:
            out["limit"] = self.limit
            out["value"] = self.value
        return out


@dataclass(frozen=True)
class PublishContext:
    """What building a message needs to know about the agent (from the config and the session)."""

    command_topic: str
    v5: bool
    max_message_bytes: Callable[[], int | None]  # the limit in force (mqtt.max_message_bytes / the broker's)
    max_batch: int
    wall: Callable[[], float]



def packet_size(topic: str, payload_len: int, qos: int, properties_len: int | None) -> int:
    """Bytes of the MQTT PUBLISH packet a message becomes (the session measures responses the same way)."""
    return poison.publish_packet_size(topic, payload_len, qos, properties_len)


def _v5_properties_len(content_type: str | None, ttl: float | None) -> int:
    body = 0
    if content_type is not None:
        body += 1 + 2 + len(content_type.encode("utf-8"))
    if ttl is not None:
        body += 1 + 4
    return poison.varint_len(body) + body


def parse_query(query: str) -> dict[str, str]:
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query), max_num_fields=16)
    except ValueError as exc:
        raise ApiError(400, "bad_query", f"the query string cannot be parsed: {exc}") from exc
    out: dict[str, str] = {}
    for key, value in pairs:
        if key not in KNOWN_QUERY:
            raise ApiError(400, "bad_query", f"unknown query parameter {key[:40]!r} (known: device, qos, ttl)")
        if key in out:
            raise ApiError(400, "bad_query", f"query parameter {key!r} given twice")
        out[key] = value
    return out


@dataclass(frozen=True)
class _Options:
    device: str | None
    qos: int
    ttl: float | None


def _options(kind: str, query: Mapping[str, str]) -> _Options:
    device = query.get("device")
    if device is not None and (not device or len(device) > MAX_DEVICE_CHARS or _DEVICE_UNSAFE.search(device)):
        raise ApiError(400, "bad_device", f"device must be 1..{MAX_DEVICE_CHARS} characters without '/', '+', "
                                          "'#', '?' or control characters")
    qos_text = query.get("qos")
    qos = 1
    if qos_text is not None:
        if qos_text not in ("0", "1"):
            raise ApiError(400, "bad_qos", f"qos must be 0 or 1, got {qos_text[:20]!r}")
        qos = int(qos_text)
        if kind == "event" and qos == 0:
            raise ApiError(400, "bad_qos", "events are always sent at QoS 1 (Eclipse Hono accepts no other); "
                                           "omit qos or use /v1/telemetry")
    ttl: float | None = None
    ttl_text = query.get("ttl")
    if ttl_text is not None:
        try:
            ttl = float(ttl_text)
        except ValueError:
            ttl = math.nan
        if not (0 < ttl <= MAX_TTL):
            raise ApiError(400, "bad_ttl", f"ttl must be a number of seconds, 0 < ttl <= {MAX_TTL:g}, "
                                           f"got {ttl_text[:20]!r}")
    return _Options(device, qos, ttl)


def content_type_of(headers: Mapping[str, str]) -> str | None:
    value = headers.get("content-type")
    if value is None or value == "":
        return None
    if len(value) > MAX_CONTENT_TYPE_CHARS or _CONTROL.search(value):
        raise ApiError(400, "bad_content_type", f"Content-Type must be at most {MAX_CONTENT_TYPE_CHARS} "
                                                "printable characters")
    return value


def build_message(kind: str, payload: bytes, opts: _Options, content_type: str | None,
                  ctx: PublishContext, now: float) -> OutMessage:
    """One message for the upstream topic, checked against the MQTT size limit (413)."""
    bag: list[tuple[str, str]] = []
    if not ctx.v5:
        if content_type is not None:
            bag.append(("content-type", content_type))
        if kind == "event" and opts.ttl is not None:
            bag.append(("hono-ttl", str(max(1, math.ceil(opts.ttl)))))
    topic = _topic(kind, ctx.command_topic, opts.device, tuple(bag))
    limit = ctx.max_message_bytes()
    if limit:
        props = _v5_properties_len(content_type, opts.ttl) if ctx.v5 else None
        size = packet_size(topic, len(payload), opts.qos, props)
        if size > limit:
            raise ApiError(413, "message_too_large",
                           f"the message would be a {size}-byte MQTT packet, over the broker's limit of {limit} "
                           "bytes (a larger one would get the gateway disconnected); send less per message",
                           limit="mqtt.max_message_bytes", value=limit)
    return OutMessage(topic, payload, opts.qos, content_type=content_type if ctx.v5 else None, kind=kind,
                      expires=now + opts.ttl if opts.ttl is not None else None)


@functools.lru_cache(maxsize=256)
def _topic(kind: str, command_topic: str, device: str | None, bag: tuple[tuple[str, str], ...]) -> str:
    """publish_topic, remembered: an app sends the same few (device, content type, ttl) again and again,
    and URL-encoding the property bag was a tenth of the API's CPU per message. Bounded (LRU)."""
    return publish_topic(kind, command_topic, device, property_bag=bag)


def single(kind: str, query: str, headers: Mapping[str, str], body: bytes, ctx: PublishContext) -> OutMessage:
    """POST /v1/telemetry or /v1/events: the body is the payload."""
    opts = _options(kind, parse_query(query))
    return build_message(kind, body, opts, content_type_of(headers), ctx, ctx.wall())


def batch(query: str, headers: Mapping[str, str], body: bytes, ctx: PublishContext) -> list[OutMessage]:
    """POST /v1/telemetry/batch: a JSON array, or NDJSON (one JSON value per line); one message each."""
    opts = _options("telemetry", parse_query(query))
    text = _utf8(body)
    stripped = text.lstrip()
    payloads: list[bytes] = []
    if stripped.startswith("["):
        try:
            items = json.loads(stripped)
        except ValueError as exc:
            raise ApiError(400, "bad_batch", f"the body starts with '[' but is not a JSON array: {exc}") from exc
        if not isinstance(items, list):
            raise ApiError(400, "bad_batch", "the body must be a JSON array or NDJSON")
        _check_count(len(items), ctx)
        payloads = [json.dumps(item, separators=(",", ":"), ensure_ascii=False).encode("utf-8") for item in items]
    else:
        lines = [line for line in text.split("\n") if line.strip()]
        _check_count(len(lines), ctx)
        for n, line in enumerate(lines, 1):
            try:
                json.loads(line)
            except ValueError as exc:
                raise ApiError(400, "bad_batch", f"line {n} is not JSON ({exc}); NDJSON has one JSON value "
                                                 "per line") from exc
            payloads.append(line.strip().encode("utf-8"))
    if not payloads:
        raise ApiError(400, "bad_batch", "the batch is empty")
    now = ctx.wall()
    return [build_message("telemetry", p, opts, "application/json", ctx, now) for p in payloads]


def _check_count(n: int, ctx: PublishContext) -> None:
    if n > ctx.max_batch:
        raise ApiError(413, "batch_too_large", f"{n} messages in one batch, over publish.max_batch = {ctx.max_batch}",
                       limit="publish.max_batch", value=ctx.max_batch)


def _utf8(body: bytes) -> str:
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(400, "bad_batch", f"a batch must be UTF-8 JSON: {exc}") from exc
