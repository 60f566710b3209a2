"""Check 8 (topics): does the broker keep a '.' in a topic? RabbitMQ's MQTT plugin does not: it
maps MQTT's '/' to AMQP's '.' and back, so `fw.update` reaches the agent as `fw/update` (a 404) and a
request id with a dot is split in two. No CONNACK field tells RabbitMQ apart (MQTT 3.1.1 has none,
and its MQTT 5 CONNACK looks like others'), so the doctor asks the broker by behaviour: it publishes
one message on a topic with a dot, on a topic of its own, and looks at the topic it comes back on.
"""

from __future__ import annotations

import secrets
import ssl
from collections.abc import Iterable

from agent.config import Config, HostPort
from agent.connection import probe
from agent.tools.doctor.report import CheckResult, result, warn

PROBE_PREFIX = "mqtt-agent-doctor"
KEPT = "kept"
MAPPED = "mapped"  # '.' came back as '/': RabbitMQ
UNKNOWN = "unknown"  # not allowed, not delivered: says nothing


def probe_topics(token: str) -> tuple[str, str, str]:
    """(subscription, topic published, the topic a '.'-to-'/' broker delivers it on)."""
    base = f"{PROBE_PREFIX}/{token}"
    return f"{base}/#", f"{base}/dot.probe", f"{base}/dot/probe"


def classify(published: str, mapped: str, received: Iterable[str]) -> str:
    got = set(received)
    if published in got:
        return KEPT
    if mapped in got:
        return MAPPED
    return UNKNOWN


def assess(outcome: str, target: str, command_names: Iterable[str]) -> CheckResult | None:
    """The finding for a broker that maps '.' to '/' (None if it keeps dots or the probe said nothing)."""
    if outcome != MAPPED:
        return None
    dotted = sorted(n for n in command_names if "." in n)
    findings = []
    if dotted:
        findings.append(warn(
            "dotted_command_names",
            f"this broker maps '.' in topics to '/' (RabbitMQ's MQTT plugin does): the command(s) "
            f"{', '.join(dotted)} arrive as {', '.join(n.replace('.', '/') for n in dotted)} and are answered 404",
            "rename them without '.' (e.g. fw_update) in [commands] or the plugin, and in the applications that send "
            "them",
        ))
    notes = ["request ids must not contain '.' on this broker: RabbitMQ splits such an id into two topic levels, "
             "and the response goes to a topic the sender does not expect"]
    return result(8, f"{target} topics", "the broker maps '.' in topics to '/' (RabbitMQ)", findings,
                  {"dot_mapping": outcome, "dotted_commands": dotted}, notes)


def command_names(cfg: Config) -> list[str]:
    """Configured exec commands and installed plugins (by entry-point name: nothing is imported)."""
    names = list(cfg.commands)
    try:
        from agent.commands.handlers.registry import _entry_points

        names += [str(ep.name) for ep in _entry_points()]
    except Exception:  # noqa: BLE001 - a broken plugin installation is check 2's business, not this one's
        pass
    return names


def probe_dot_mapping(cfg: Config, host: HostPort, ctx: ssl.SSLContext | None, probe_id: str,
                      timeout: float) -> str:
    """KEPT, MAPPED or UNKNOWN: publish on a dotted topic of the doctor's own and see how it comes back."""
    attempt = probe.connect_attempt(cfg.mqtt, ctx, host, probe_id, timeout, label="topic mapping probe",
                                    keep_open=True)
    if not attempt.accepted or attempt.client is None or attempt.recorder is None:
        attempt.close()
        return UNKNOWN
    try:
        subscription, published, mapped = probe_topics(secrets.token_hex(4))
        if not probe.subscribe(attempt, subscription, 0, timeout).granted:
            return UNKNOWN
        client, rec = attempt.client, attempt.recorder
        client.publish(published, b"mqtt-agent doctor topic mapping probe", qos=0)
        probe.wait_for(client, rec, lambda: bool({published, mapped} & set(rec.messages)), min(timeout, 3.0))
        return classify(published, mapped, rec.messages)
    finally:
        attempt.close()


def check_dot_mapping(cfg: Config, host: HostPort, ctx: ssl.SSLContext | None, probe_id: str,
                      timeout: float, names: Iterable[str]) -> CheckResult | None:
    """Check 8 (topics) for one broker; None when there is nothing to say (dots kept, or no answer)."""
    return assess(probe_dot_mapping(cfg, host, ctx, probe_id, timeout), str(host), names)
