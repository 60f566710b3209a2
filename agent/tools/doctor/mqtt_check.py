"""Checks 7 and 8: CONNACK in words (MQTT 3.1.1 and 5), and the command subscription: the SUBACK,
then a delivery probe, because some brokers (mosquitto's acl_file) grant every subscription and
withhold the messages instead.
"""

from __future__ import annotations

import ssl
from dataclasses import replace

from agent.config import Config, HostPort, MqttConfig
from agent.connection import probe
from agent.connection.subscriptions import RC_SHARED_UNSUPPORTED
from agent.tools.doctor.report import CheckResult, Finding, fail, result
from agent.topics import MAX_SHARED_GROUP, shared_filter

UNTESTED = "untested"  # the delivery probe could not run
MAX_V311_CLIENT_ID = 23  # MQTT 3.1.1 brokers must accept 1..23 characters and may refuse longer ids
# MQTT 3.1.1 CONNACK return codes as paho maps them onto MQTT 5 reason codes.
V311_RC = {0x84: 1, 0x85: 2, 0x88: 3, 0x86: 4, 0x87: 5}


def connack_finding(code: int, text: str, mqtt_cfg: MqttConfig, probe_id: str,
                    properties: dict[str, object] | None = None) -> Finding:
    """A refused CONNACK in words, with the setting to change."""
    v5 = mqtt_cfg.is_v5
    label = f"MQTT 5 CONNACK 0x{code:02X} {text}" if v5 else f"MQTT 3.1.1 CONNACK {V311_RC.get(code, code)} ({text})"
    user = mqtt_cfg.username
    secret = (f"mqtt.password_file ({mqtt_cfg.password_file})" if mqtt_cfg.password_file
              else "mqtt.password" if mqtt_cfg.password else "mqtt.password_file (not set)")
    if code == 0x86:
        if not user:
            return fail("bad_credentials", f"the broker wants a user name and password ({label})",
                        "set mqtt.username and mqtt.password_file (Hono: user name DEVICE-AUTH-ID@TENANT)")
        return fail("bad_credentials", f"the broker rejected user name {user!r} or its password ({label})",
                    f"check mqtt.username ({user!r}) and the password in {secret}; "
                    "Hono expects the user name as DEVICE-AUTH-ID@TENANT")
    if code == 0x87:
        if user:
            return fail(
                "not_authorized",
                f"the broker refused user {user!r}: not authorized ({label}); mosquitto and other brokers answer "
                "a wrong user name or password this way too",
                f"check mqtt.username ({user!r}) and the password in {secret}; if both are right, the broker's "
                "configuration does not allow this user to connect",
            )
        return fail("not_authorized", f"the broker refused the connection: not authorized ({label}); it does not "
                    "accept this client without credentials",
                    "set mqtt.username and mqtt.password_file to the device's credentials, or have the broker accept "
                    "the client certificate as identity (mosquitto: use_identity_as_username true)")
    if code == 0x85:
        long_probe = not v5 and len(probe_id) > MAX_V311_CLIENT_ID >= len(mqtt_cfg.client_id)
        why = (f"the probe id has {len(probe_id)} characters and MQTT 3.1.1 brokers may refuse more than "
               f"{MAX_V311_CLIENT_ID}; the agent's own id {mqtt_cfg.client_id!r} is short enough and not affected"
               if long_probe else
               "if the broker ties client ids to users or certificates, it accepts only the production id, which "
               "the doctor never uses; otherwise check the broker's client-id rules for mqtt.client_id")
        return fail("client_id_rejected", f"the broker rejected the client id {probe_id!r} ({label})", why)
    if code == 0x84:
        other = "3.1.1" if v5 else "5"
        return fail("protocol_unsupported", f"the broker does not speak MQTT {mqtt_cfg.protocol} ({label})",
                    f'set mqtt.protocol = "{other}" (Eclipse Hono speaks 3.1.1 only)')
    if code in (0x88, 0x89):
        return fail("broker_unavailable", f"the broker is up but cannot serve logins now ({label})",
                    "retry later and check the broker's log (Hono: its device registry or auth service may be down)")
    if code in (0x9C, 0x9D):
        ref = (properties or {}).get("ServerReference")
        return fail("server_moved", f"the broker sends this client elsewhere ({label}){f': {ref}' if ref else ''}",
                    f"put {ref} in mqtt.hosts" if ref else "ask the broker operator for the new address")
    if code == 0x8A:
        return fail("banned", f"the broker has banned this client ({label})", "ask the broker operator")
    if code == 0x80 and not v5:
        # MQTT 3.1.1 knows return codes 0-5 only; paho shows any other as "Unspecified error".
        return fail("keepalive_over_limit",
                    f"the broker refused the connection with a non-standard CONNACK code ({label}); aedes does "
                    f"this when the keepalive ({mqtt_cfg.keepalive} s) is over its keepaliveLimit",
                    f"the keepalive may be over the broker's limit: lower mqtt.keepalive (now {mqtt_cfg.keepalive}), "
                    "or ask the broker operator for the limit")
    if code in (0x97, 0x9F):
        return fail("rate_limited", f"the broker limits connections ({label})",
                    "retry later; if many gateways share one account, give each its own credentials")
    return fail("connect_refused", f"the broker refused the connection ({label})",
                "check the broker's log for this client")


def connect_result(cfg: Config, host: HostPort, attempt: probe.Attempt, probe_id: str,
                   timeout: float) -> CheckResult:
    """Check 7 from the probe connection's outcome (TLS, if any, was established)."""
    target = str(host)
    proto = f"MQTT {cfg.mqtt.protocol}"
    details: dict[str, object] = {"protocol": cfg.mqtt.protocol, "client_id": probe_id, "stage": attempt.stage,
                                  "connack": attempt.connack, "properties": attempt.properties}
    if attempt.accepted:
        ka = attempt.properties.get("ServerKeepAlive")
        extra = f", the broker sets keepalive {ka} s" if ka is not None else ""
        return result(7, target, f"accepted {probe_id} ({proto}) in {attempt.seconds * 1000:.0f} ms{extra}",
                      details=details)
    if attempt.stage == probe.CONNACK:
        assert attempt.connack is not None
        finding = connack_finding(attempt.connack, attempt.connack_text, cfg.mqtt, probe_id, attempt.properties)
        return result(7, target, f"refused: {attempt.connack_text}", [finding], details)
    v311_fix = ('the broker likely speaks only MQTT 3.1.1 (RabbitMQ 3.x, Eclipse Hono, amqtt do this to an MQTT 5 '
                'CONNECT): set mqtt.protocol = "3.1.1"; ')
    if attempt.stage == probe.CLOSED:
        return result(7, target, "closed without CONNACK", [fail(
            "closed_before_connack",
            f"the broker closed the connection without answering CONNECT ({proto}, client id {probe_id})",
            (v311_fix + "otherwise " if cfg.mqtt.is_v5 else "") +
            "check the broker's log for this client: it may want the other MQTT version (mqtt.protocol), "
            "refuse this certificate or user, or limit connections",
        )], details)
    return result(7, target, f"no CONNACK within {timeout:g} s", [fail(
        "no_connack", f"the broker did not answer CONNECT within {timeout:g} s",
        (v311_fix + "otherwise " if cfg.mqtt.is_v5 else "") +
        f"check that {host} serves MQTT ({'TLS' if cfg.tls.enabled else 'plain'}); the broker may be overloaded; "
        "retry with a larger --timeout",
    )], details)


def delivery_topic(command_topic: str, probe_id: str) -> str:
    """A topic the command subscription matches but the agent does not parse as a command (5 segments)."""
    prefix, tenant, device, action, _ = command_topic.split("/")
    return "/".join((prefix, tenant, "doctor-probe" if device == "+" else device, action, probe_id))


_SUBACK_WORDS = {
    0x80: "failure: the broker's ACL does not allow this client to subscribe to it",
    0x87: "not authorized: the broker's ACL does not allow this client to subscribe to it",
    0x8F: "the broker considers the topic filter invalid",
    0x97: "the broker's subscription quota is exhausted",
    0x9E: "the broker does not support shared subscriptions",
    0xA2: "the broker does not support wildcard subscriptions",
}


def _identity(cfg: Config) -> str:
    if cfg.mqtt.username:
        return f"user {cfg.mqtt.username!r}"
    if cfg.tls.enabled and cfg.tls.cert_file:
        return "this client (identified by its certificate)"
    return "anonymous clients"


def _acl_hint(cfg: Config) -> str:
    user = f"`user {cfg.mqtt.username}` then " if cfg.mqtt.username else ""
    return f"mosquitto acl_file: {user}`topic read {cfg.mqtt.command_topic}`"


def probe_subscription(mqtt_cfg: MqttConfig, probe_id: str) -> str:
    """What the doctor subscribes to. In a shared group it never joins the agents' own group: the broker
    would hand it a share of the real commands, which the probe neither runs nor acknowledges, and which
    mosquitto then discards with the probe's session. A group of its own asks the same questions (are shared
    subscriptions granted, are they delivered) and takes nothing from the members."""
    if not mqtt_cfg.shared_group:
        return mqtt_cfg.command_topic
    return shared_filter(f"{mqtt_cfg.shared_group}.{probe_id}"[:MAX_SHARED_GROUP], mqtt_cfg.command_topic)


def subscribe_refused(cfg: Config, topic: str, code: int, text: str,
                      connack: dict[str, object] | None = None) -> Finding:
    """A SUBACK failure code in words, with the setting to change."""
    if code == RC_SHARED_UNSUPPORTED:
        said = (" (its CONNACK said so too: Shared Subscription Available = 0)"
                if (connack or {}).get("SharedSubscriptionAvailable") == 0 else "")
        return fail(
            "shared_subscriptions_unsupported",
            f"the broker refused the subscription to {topic} (SUBACK 0x9E Shared Subscriptions not supported)"
            f"{said}: with mqtt.shared_group = {cfg.mqtt.shared_group!r} no command can arrive",
            "remove mqtt.shared_group (each gateway then gets its own copy of every command), or use a broker "
            "that supports MQTT 5 shared subscriptions (mosquitto 2, EMQX, HiveMQ)",
        )
    words = _SUBACK_WORDS.get(code, text)
    return fail(
        "subscribe_refused",
        f"the broker refused the subscription to {topic} (SUBACK 0x{code:02X}, {words}): commands cannot "
        "arrive",
        f"allow {_identity(cfg)} to subscribe to {topic} in the broker's ACL ({_acl_hint(cfg)}; "
        "mosquitto dynamic security: a subscribePattern ACL)",
    )


def check_subscribe(cfg: Config, host: HostPort, attempt: probe.Attempt, ctx: ssl.SSLContext | None,
                    probe_id: str, timeout: float) -> CheckResult:
    """Check 8 on an accepted probe connection (which it closes)."""
    topic, qos = probe_subscription(cfg.mqtt, probe_id), cfg.mqtt.qos
    sub = probe.subscribe(attempt, topic, qos, timeout)
    target = str(host)
    if sub.granted is None:
        attempt.close()
        return result(8, target, f"no answer to SUBSCRIBE {topic}", [fail(
            "no_suback", f"the broker did not acknowledge the subscription to {topic}: {sub.text}",
            "check the broker's log for this client; some brokers drop a client whose subscription they refuse")])
    if not sub.granted:
        attempt.close()
        assert sub.code is not None
        return result(8, target, f"refused: SUBACK 0x{sub.code:02X}",
                      [subscribe_refused(cfg, topic, sub.code, sub.text, attempt.properties)],
                      {"suback": sub.code, "subscription": topic})
    granted = f"granted QoS {sub.code} (SUBACK 0x{sub.code:02X})"
    if cfg.mqtt.shared_group:
        granted = f"shared subscription {topic} {granted}"
    details: dict[str, object] = {"suback": sub.code, "subscription": topic}
    delivery, note = _probe_delivery(cfg, host, attempt, ctx, probe_id, timeout)
    details["delivery"] = delivery.outcome
    notes = []
    if delivery.other_topics:
        notes.append(f"{len(delivery.other_topics)} command(s) arrived during the probe ({delivery.other_topics[0]}"
                     f"{', ...' if len(delivery.other_topics) > 1 else ''}): the doctor neither ran nor "
                     "acknowledged them; a running agent receives its own copy")
    if delivery.outcome in (probe.NOT_DELIVERED, probe.NO_SUBSCRIBERS):
        return result(8, target, f"{granted}, but messages are not delivered", [fail(
            "command_topic_not_readable",
            f"the broker granted the subscription to {topic} but did not deliver a probe message published "
            f"there{f' (PUBACK: {delivery.text})' if delivery.text else ''}: its ACL does not let {_identity(cfg)} "
            "read the command topic, so commands never arrive",
            f"allow {_identity(cfg)} to read {topic} in the broker's ACL ({_acl_hint(cfg)}); mosquitto's "
            "acl_file never refuses a subscription, it withholds the messages",
        )], details, notes)
    return result(8, target, f"{granted}; {note}", (), details, notes)


def _probe_delivery(cfg: Config, host: HostPort, attempt: probe.Attempt, ctx: ssl.SSLContext | None,
                    probe_id: str, timeout: float) -> tuple[probe.DeliveryOutcome, str]:
    """Publish on the command topic and see whether it comes back. With MQTT 3.1.1 a PUBACK cannot say
    "not allowed to publish", so that question goes over an MQTT 5 connection (same TLS and credentials)."""
    topic = delivery_topic(cfg.mqtt.command_topic, probe_id)
    if not cfg.mqtt.is_v5:
        attempt.close()
        attempt = probe.connect_attempt(replace(cfg.mqtt, protocol="5"), ctx, host, probe_id, timeout,
                                        label="MQTT 5 delivery probe", keep_open=True)
        if not attempt.accepted:
            reason = attempt.connack_text or attempt.stage
            return probe.DeliveryOutcome(UNTESTED), f"delivery not tested (the broker does not accept MQTT 5: {reason})"
        sub = probe.subscribe(attempt, cfg.mqtt.command_topic, cfg.mqtt.qos, timeout)
        if not sub.granted:
            attempt.close()
            return probe.DeliveryOutcome(UNTESTED), f"delivery not tested (MQTT 5 subscription: {sub.text})"
    try:
        outcome = probe.delivery_probe(attempt, topic, timeout)
    finally:
        attempt.close()
    if outcome.outcome == probe.DELIVERED:
        return outcome, f"a probe message on {topic} came back: commands can arrive"
    if outcome.outcome == probe.PUBLISH_REFUSED:
        return outcome, ("delivery not tested: this client may not publish on the command topic (PUBACK "
                         f"{outcome.text}), as it should be")
    if outcome.outcome == probe.CLOSED_ON_PUBLISH:
        return outcome, "delivery not tested: the broker closed the connection on the probe publish (Hono does)"
    return outcome, ""
