"""Pure parsing and building of Eclipse Hono command topics.

Request:  command/TENANT/DEVICE/req/REQ_ID/COMMAND   (short form c/TENANT/DEVICE/q/REQ_ID/COMMAND)
Response: command/TENANT/DEVICE/res/REQ_ID/STATUS    (short form c/TENANT/DEVICE/s/REQ_ID/STATUS)

TENANT and DEVICE are empty for an authenticated device (`command///req/...`); a gateway receives
`command//CHILD/req/...` for the devices behind it. An empty REQ_ID marks a one-way command.

Hono's full form is `command///req/REQ_ID/COMMAND[/*][/property-bag]`:
- `/*`: further segments after the command name stay part of the command name a handler is chosen
  by and sees in `Request.command` (`command///req/r1/fw/update` runs the handler named
  `fw/update`). They are not split off as arguments: a handler that wants arguments reads the payload.
- property bag: a last segment `?k=v&k2=v2` (URL-encoded, as Hono's adapter appends the message's
  application properties) is parsed into `CommandTopic.properties` and handed to the handler in
  `Request.user_properties`, before any MQTT 5 user properties, exactly as those are. It is not part
  of the command name. At most MAX_BAG_PROPERTIES pairs are kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote_plus

_RESPONSE_ACTION = {"req": "res", "q": "s"}
SHARE_PREFIX = "$share/"
# A group name travels in every SUBSCRIBE and in broker logs and dashboards: keep it short.
MAX_SHARED_GROUP = 64
_PREFIXES = ("command", "c")
MAX_BAG_PROPERTIES = 64  # a property bag is untrusted input: bounded, like the payload


@dataclass(frozen=True)
class CommandTopic:
    """A parsed request topic. `response_base + "/" + status` is where the response goes."""

    prefix: str
    tenant: str
    device: str
    action: str
    req_id: str
    command: str
    properties: tuple[tuple[str, str], ...] = ()  # from a trailing property bag, URL-decoded

    @property
    def one_way(self) -> bool:
        return self.req_id == ""

    @property
    def response_base(self) -> str:
        return "/".join((self.prefix, self.tenant, self.device, _RESPONSE_ACTION[self.action], self.req_id))

    def response_topic(self, status: int) -> str:
        return response_topic(self.response_base, status)

    @property
    def dedupe_key(self) -> str:
        """Identifies a request across redeliveries: the same REQ_ID for another child, or for another
        command (a backend that numbers its requests from 1 again after a restart), is another request."""
        return f"{self.tenant}/{self.device}/{self.req_id}/{self.command}"


def parse_request(topic: str) -> CommandTopic | None:
    """Parse a command request topic; None if it is not one (the message cannot be answered)."""
    parts = topic.split("/")
    if len(parts) < 6:
        return None
    prefix, tenant, device, action, req_id = parts[:5]
    rest = parts[5:]
    properties: tuple[tuple[str, str], ...] = ()
    if len(rest) > 1 and rest[-1].startswith("?"):
        properties = parse_property_bag(rest.pop())
    command = "/".join(rest)
    if prefix not in _PREFIXES or action not in _RESPONSE_ACTION or not command:
        return None
    if any(ch in topic for ch in "+#\x00"):
        return None
    return CommandTopic(prefix, tenant, device, action, req_id, command, properties)


def parse_property_bag(segment: str) -> tuple[tuple[str, str], ...]:
    """`?k=v&k2=v%20x` -> (("k", "v"), ("k2", "v x")); a pair without `=` has an empty value, empty
    pairs are skipped, repeated keys are kept in order (as MQTT 5 user properties allow)."""
    pairs: list[tuple[str, str]] = []
    for item in segment[1:].split("&"):
        if not item:
            continue
        key, _, value = item.partition("=")
        pairs.append((unquote_plus(key), unquote_plus(value)))
        if len(pairs) >= MAX_BAG_PROPERTIES:
            break
    return tuple(pairs)


def request_topic(subscription: str, req_id: str, command: str, device: str | None = None) -> str:
    """The topic an operator publishes to so that an agent subscribed with `subscription` receives it.

    `device` fills a `+` device segment (gateway subscriptions) and must be given for those.
    """
    prefix, tenant, sub_device, action, _ = subscription.split("/")
    if sub_device == "+":
        if not device:
            raise ValueError(f"the agent subscribes to {subscription!r} (gateway mode): name the device")
        sub_device = device
    elif device and device != sub_device:
        if sub_device:
            raise ValueError(f"the agent subscribes to {subscription!r}, which serves device {sub_device!r} only")
        raise ValueError(f"the agent subscribes to {subscription!r}, which is not a gateway subscription; "
                         "use the agent's own device (omit --device)")
    return "/".join((prefix, tenant, sub_device, action, req_id, command))


def response_filter(request: str) -> str:
    """The subscription that receives every status of the response to `request`."""
    parsed = parse_request(request)
    if parsed is None or parsed.one_way:
        raise ValueError(f"{request!r} is not a two-way command request topic")
    return parsed.response_base + "/+"


def parse_response(topic: str) -> tuple[str, int] | None:
    """(req_id, status) from a response topic, or None."""
    parts = topic.split("/")
    if len(parts) != 6 or parts[0] not in _PREFIXES or parts[3] not in ("res", "s"):
        return None
    if not parts[5].isdigit():
        return None
    return parts[4], int(parts[5])


# --- telemetry and events (Hono's MQTT adapter, device -> cloud) -----------------------------

_PUBLISH_PREFIX = {("telemetry", False): "telemetry", ("telemetry", True): "t",
                   ("event", False): "event", ("event", True): "e"}


def uses_short_form(command_topic: str) -> bool:
    """The spelling the agent's command subscription uses (`c///q/#`): its publish topics follow it."""
    return command_topic.split("/", 1)[0] == "c"


def publish_topic(kind: str, command_topic: str, device: str | None = None, *,
                  property_bag: tuple[tuple[str, str], ...] = ()) -> str:
    """Where a telemetry message or event goes.

    The agent's own device: `telemetry` (`t`); a device behind the gateway: `telemetry/TENANT/DEVICE`,
    TENANT being the command subscription's (empty for an authenticated gateway). `property_bag`
    (MQTT 3.1.1: content type, hono-ttl) becomes a last segment `?k=v&..`, URL-encoded.
    """
    from urllib.parse import quote

    prefix = _PUBLISH_PREFIX[(kind, uses_short_form(command_topic))]
    if device:
        tenant = command_topic.split("/")[1]
        topic = f"{prefix}/{tenant}/{device}"
    else:
        topic = prefix
    if property_bag:
        topic += "/?" + "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in property_bag)
    return topic


def error_filter(command_topic: str) -> str:
    """Hono's error topic for this agent: `error///#`, or `error//+/#` for a gateway."""
    parts = command_topic.split("/")
    device = "+" if parts[2] == "+" else parts[2]
    return f"error/{parts[1]}/{device}/#"


def parse_error(topic: str, payload: bytes) -> dict[str, str]:
    """The facts of a Hono error message (`error/TENANT/DEVICE/CORRELATION/CODE`, JSON payload), bounded."""
    parts = topic.split("/")
    out = {"device": parts[2] if len(parts) > 2 else "", "code": parts[-1] if len(parts) > 3 else ""}
    try:
        import json

        data = json.loads(payload.decode("utf-8", "replace")[:4096])
        if isinstance(data, dict):
            for key in ("code", "message", "message-id", "correlation-id"):
                if key in data:
                    out[key] = str(data[key])[:200]
    except ValueError:
        out["message"] = payload[:200].decode("utf-8", "replace")
    return out
def check_shared_group(group: str) -> str | None:
    """A problem with an MQTT 5 shared subscription group name (section 4.8.2), or None."""
    if not group:
        return "must not be empty (remove the key to subscribe without a group)"
    if len(group) > MAX_SHARED_GROUP:
        return f"must be at most {MAX_SHARED_GROUP} characters, got {len(group)}"
    bad = sorted({ch for ch in group if ch in "/+#" or ord(ch) < 0x20 or ord(ch) == 0x7F})
    if bad:
        shown = ", ".join(repr(ch) for ch in bad)
        return f"must not contain '/', '+', '#' or control characters (MQTT 5 section 4.8.2), found {shown}"
    return None


def shared_filter(group: str, topic_filter: str) -> str:
    """`$share/GROUP/FILTER`: the broker hands each matching message to one member of GROUP.
    Messages still arrive on their own topic, so nothing downstream of the subscription changes."""
    return f"{SHARE_PREFIX}{group}/{topic_filter}"


def response_topic(base: str, status: int) -> str:
    """The Hono response topic for a request answered with `status` (`base`: CommandTopic.response_base)."""
    return f"{base}/{status}"


# `mqtt-agent doctor` proves delivery by publishing a message on a topic under the command subscription whose
# last segment carries this mark (its probe client id, CLIENT_ID-doctor-RANDOM). The agent ignores it quietly.
PROBE_MARK = "-doctor-"


def is_delivery_probe(topic: str) -> bool:
    """True for the doctor's delivery probe (not a command, not worth a warning)."""
    return PROBE_MARK in topic.rsplit("/", 1)[-1]
