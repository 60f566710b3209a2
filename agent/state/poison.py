"""Pure rules for messages the broker will not take: the size limit, and poison messages.

Size: a broker closes the connection on a PUBLISH over its limit (mosquitto's `max_packet_size`,
announced as MQTT 5 Maximum Packet Size in CONNACK, which paho does not enforce; Eclipse Hono's
`maxPayloadSize`, 2048 bytes by default, not announced at all). The message is then re-sent at every
reconnect and blocks the queue behind it for good. So everything the agent publishes is measured
as the PUBLISH packet it becomes, against `mqtt.max_message_bytes` or the broker's announced
limit (the smaller). A response over it is replaced by a 500 that says so, and fits; anything else
that does not fit is set aside.

Poison: whatever the cause (a limit nobody announced, an ACL that disconnects), a message after
which the broker drops the connection every time it is sent is a poison message. A connection that
ends within POISON_WINDOW s of sending a message the broker has not acknowledged is a strike
against the oldest such message (brokers handle a client's packets in order, so the ones before
it were taken); after POISON_TRIES strikes it is set aside (a response is answered with a 500
instead, which gets the same treatment), and the queue moves on.

Plain data in, decisions out; no paho, no I/O.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from agent.topics import parse_response

POISON_TRIES = 3
POISON_WINDOW = 10.0  # s: a broker refusing a packet closes at once; a later drop says nothing about it

# Reasons a message is set aside (the `reason` label of mqtt_agent_messages_set_aside_total).
TOO_LARGE = "too_large"
POISON = "poison"
SET_ASIDE_REASONS = (TOO_LARGE, POISON)

MQTT_MAX_PACKET = 268_435_460  # the largest packet MQTT's 4-byte remaining length can describe


def varint_len(value: int) -> int:
    """Bytes of MQTT's variable-byte integer for `value` (remaining length, property length)."""
    n = 1
    while value >= 128:
        value //= 128
        n += 1
    return n


def publish_packet_size(topic: str, payload_len: int, qos: int, properties_len: int | None) -> int:
    """Bytes of the PUBLISH packet: fixed header, topic, packet id (QoS > 0), MQTT 5 properties
    (`properties_len`: their encoded length including its own length field; None on MQTT 3.1.1), payload."""
    remaining = 2 + len(topic.encode("utf-8")) + (2 if qos > 0 else 0) + (properties_len or 0) + payload_len
    return 1 + varint_len(remaining) + remaining


def effective_limit(configured: int | None, announced: int | None) -> int | None:
    """The size limit in force: the smaller of mqtt.max_message_bytes and the broker's CONNACK
    Maximum Packet Size; None if neither is known (unlimited)."""
    known = [v for v in (configured, announced) if v]
    return min(known) if known else None


def limit_source(configured: int | None, announced: int | None) -> str:
    """Which setting made the limit, in words an operator can act on."""
    if announced and (not configured or announced <= configured):
        return "the broker's Maximum Packet Size (CONNACK)"
    return "mqtt.max_message_bytes"


@dataclass(frozen=True)
class Replacement:
    """What goes out instead of a response that cannot: same request, status 500, a short body."""

    topic: str
    payload: bytes
    user_properties: tuple[tuple[str, str], ...]


def error_response(topic: str, user_properties: tuple[tuple[str, str], ...], message: str,
                   **extra: object) -> Replacement | None:
    """A 500 for the request a response to `topic` answers, or None if `topic` is not a response
    (a Hono response topic, or an MQTT 5 Response Topic with a `status` user property)."""
    body = json.dumps({"error": message, **extra}, separators=(",", ":"), sort_keys=True).encode()
    parsed = parse_response(topic)
    if parsed is not None:
        return Replacement(topic.rsplit("/", 1)[0] + "/500", body, user_properties)
    if any(k == "status" for k, _ in user_properties):
        props = tuple(("status", "500") if k == "status" else (k, v) for k, v in user_properties)
        return Replacement(topic, body, props)
    return None


def too_large_response(topic: str, user_properties: tuple[tuple[str, str], ...], size: int, limit: int,
                       source: str) -> Replacement | None:
    return error_response(
        topic, user_properties,
        f"the response ({size} bytes as an MQTT packet) is over the broker's message size limit of {limit} "
        f"bytes ({source}); it was not sent: make the command's output smaller", size=size, limit=limit)


def poison_response(topic: str, user_properties: tuple[tuple[str, str], ...], size: int,
                    tries: int) -> Replacement | None:
    return error_response(
        topic, user_properties,
        f"the broker closed the connection each time the response ({size} bytes) was sent ({tries} tries): it "
        "was set aside; the broker likely limits message size (set mqtt.max_message_bytes) or refuses the topic",
        size=size)


@dataclass(frozen=True)
class Strike:
    """The verdict on the oldest unacknowledged message when a connection ended."""

    suspect: bool  # the drop followed this message's sending closely enough to count against it
    set_aside: bool  # it has now failed POISON_TRIES times


def judge(sent_ago: float | None, tries_before: int, *, expected_end: bool, tries: int = POISON_TRIES,
          window: float = POISON_WINDOW) -> Strike:
    """A connection ended `sent_ago` s after the oldest unacknowledged message was (re)sent, which had
    `tries_before` strikes. An end the agent asked for (stop, reconnect) counts against nothing."""
    if expected_end or sent_ago is None or sent_ago > window:
        return Strike(False, False)
    return Strike(True, tries_before + 1 >= tries)


class Unsendable(Exception):
    """The session cannot send this message at all (raised at hand-off; the outbox sets it aside)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
