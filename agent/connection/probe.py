"""The doctor's network probes: fetch the broker's certificate chain, and connect, subscribe and
publish through paho exactly as the agent does (same client factory, same CONNECT), under a probe
client id and with every wait bounded.

This module moves bytes and records what happened; broker.py turns the records into findings.
"""

from __future__ import annotations

import re
import ssl
import time
from dataclasses import dataclass, field, replace
from typing import Any

import paho.mqtt.client as mqtt

from agent.config import HostPort, MqttConfig
from agent.connection.adapter import TrackedClient, connect_properties, new_client

# How an attempt ended.
TCP_FAILED = "tcp"  # the socket could not be opened


TLS_FAILED = "tls"  # the handshake failed (our verification, or an alert from the broker)


TLS_REJECTED = "tls_rejected"  # handshake done, then the broker sent an alert (TLS 1.3 client-cert rejection)


CONNACK = "connack"  # the broker answered CONNECT (accepted or refused: see Attempt.connack)


CLOSED = "closed"  # the broker closed the connection before CONNACK, without a TLS alert


TIMEOUT = "timeout"  # no CONNACK within the timeout


_SSL_REASON = re.compile(r"\[SSL: ([A-Z0-9_]+)\]")


_LOOP_STEP = 0.05


@dataclass
class _Recorder:
    """paho callbacks -> plain records. Every callback only appends (a raising callback kills paho's loop)."""

    connack: tuple[int, str, bool, dict[str, Any]] | None = None
    disconnected: tuple[int, str] | None = None
    tls_alert: str | None = None
    tls_alert_text: str = ""
    subacks: dict[int, list[tuple[int, str]]] = field(default_factory=dict)
    pubacks: dict[int, tuple[int, str]] = field(default_factory=dict)
    messages: list[str] = field(default_factory=list)

    def attach(self, client: mqtt.Client) -> None:
        client.on_connect = self.on_connect
        client.on_disconnect = self.on_disconnect
        client.on_subscribe = self.on_subscribe
        client.on_publish = self.on_publish
        client.on_message = self.on_message
        client.on_log = self.on_log

    def on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        props = {}
        for name in ("ServerKeepAlive", "AssignedClientIdentifier", "ServerReference", "ReasonString",
                     "MaximumPacketSize", "ReceiveMaximum", "SharedSubscriptionAvailable"):
            value = getattr(properties, name, None)
            if value is not None:
                props[name] = value
        props["session_present"] = bool(getattr(flags, "session_present", False))
        if self.connack is None:
            self.connack = (int(reason.value), str(reason), bool(reason.is_failure), props)

    def on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if self.disconnected is None:
            self.disconnected = (int(reason.value), str(reason))

    def on_subscribe(self, client: Any, userdata: Any, mid: int, codes: list[Any], properties: Any) -> None:
        self.subacks[mid] = [(int(c.value), str(c)) for c in codes]

    def on_publish(self, client: Any, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        self.pubacks[mid] = (int(reason.value), str(reason))

    def on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        self.messages.append(str(msg.topic))  # the topic only: payloads may hold secrets

    def on_log(self, client: Any, userdata: Any, level: int, buf: str) -> None:
        # paho turns an SSL error on a read into "connection lost" and only logs the reason. In TLS 1.3
        # the broker checks the client certificate after our handshake is done, so a rejected certificate
        # surfaces here, as an alert on the first read.
        if level == mqtt.MQTT_LOG_ERR and self.tls_alert is None:
            match = _SSL_REASON.search(buf)
            if match:
                self.tls_alert = match.group(1)
                self.tls_alert_text = buf.split(": ", 1)[-1]


@dataclass
class Attempt:
    """One connection attempt up to CONNACK. `client` stays open only for an accepted connection."""

    label: str
    stage: str
    error: BaseException | None = None
    connack: int | None = None
    connack_text: str = ""
    properties: dict[str, Any] = field(default_factory=dict)
    tls_version: str | None = None
    cipher: str | None = None
    seconds: float = 0.0
    client: TrackedClient | None = None
    recorder: _Recorder | None = None

    @property
    def tls_ok(self) -> bool:
        """The TLS session was established and the broker did not reject it."""
        return self.stage in (CONNACK, CLOSED, TIMEOUT)

    @property
    def accepted(self) -> bool:
        return self.stage == CONNACK and self.connack is not None and self.connack < 0x80

    def close(self) -> None:
        if self.client is not None:
            close(self.client)
            self.client = None


def _alert_error(reason: str, text: str) -> ssl.SSLError:
    # An exception object shaped like the one ssl raises, so agent.tls.explain_handshake_error words it.
    err = ssl.SSLError(1, text or reason)
    err.reason = reason
    return err


def connect_attempt(mqtt_cfg: MqttConfig, ctx: ssl.SSLContext | None, host: HostPort, client_id: str,
                    timeout: float, *, label: str = "as configured", credentials: bool = True,
                    keep_open: bool = False) -> Attempt:
    """Connect like the agent does (clean session, probe id) and wait up to `timeout` for CONNACK.

    credentials=False leaves user name and password out: diagnostic retries with relaxed TLS settings
    must never hand the password to a broker whose certificate was not verified.
    """
    cfg = replace(mqtt_cfg, clean_session=True, connect_timeout=timeout)
    if not credentials:
        cfg = replace(cfg, username=None, password=None, password_file=None)
    client = new_client(cfg, client_id, ctx)
    client.manual_ack_set(True)  # never acknowledge a command that reaches the probe: it is not ours to take
    rec = _Recorder()
    rec.attach(client)
    start = time.monotonic()
    try:
        client.connect(host.host, host.port, keepalive=cfg.keepalive,
                       clean_start=True if cfg.is_v5 else mqtt.MQTT_CLEAN_START_FIRST_ONLY,
                       properties=connect_properties(cfg))
    except (ssl.SSLError, ssl.CertificateError) as exc:
        close(client)
        return Attempt(label, TLS_FAILED, exc, seconds=time.monotonic() - start)
    except (ConnectionResetError, ConnectionAbortedError, BrokenPipeError) as exc:
        # The TCP connect itself succeeded; a reset now means the peer hung up on our ClientHello.
        close(client)
        return Attempt(label, TLS_FAILED if ctx is not None else TCP_FAILED, exc, seconds=time.monotonic() - start)
    except (OSError, ValueError) as exc:
        close(client)
        return Attempt(label, TCP_FAILED, exc, seconds=time.monotonic() - start)
    sock = client.socket()
    tls_version = sock.version() if isinstance(sock, ssl.SSLSocket) else None
    suite = sock.cipher() if isinstance(sock, ssl.SSLSocket) else None
    cipher = suite[0] if suite else None
    deadline = start + timeout
    while rec.connack is None and rec.disconnected is None and time.monotonic() < deadline:
        client.loop(_LOOP_STEP)
    attempt = Attempt(label, TIMEOUT, tls_version=tls_version, cipher=cipher, seconds=time.monotonic() - start,
                      recorder=rec)
    if rec.connack is not None:
        attempt.stage = CONNACK
        attempt.connack, attempt.connack_text, _, attempt.properties = rec.connack
    elif rec.tls_alert is not None:
        attempt.stage = TLS_REJECTED
        attempt.error = _alert_error(rec.tls_alert, rec.tls_alert_text)
    elif rec.disconnected is not None:
        attempt.stage = CLOSED
    if attempt.accepted and keep_open:
        attempt.client = client
    else:
        close(client)
    return attempt


def close(client: TrackedClient) -> None:
    """Send DISCONNECT if connected, then close the socket. Bounded: a few loop turns at most."""
    try:
        if client.is_connected():
            client.disconnect()
            for _ in range(10):
                if client.socket() is None:
                    break
                client.loop(_LOOP_STEP)
    except Exception:  # noqa: BLE001 - best effort; the socket is closed below either way
        pass
    if client.socket() is not None:
        client.close_socket()  # a TrackedClient (new_client)


def wait_for(client: mqtt.Client, rec: _Recorder, done: Any, timeout: float) -> bool:
    """Run the paho loop until done() or the connection ends or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while not done():
        if rec.disconnected is not None or time.monotonic() >= deadline:
            return bool(done())
        client.loop(_LOOP_STEP)
    return True


@dataclass(frozen=True)
class SubscribeOutcome:
    granted: bool | None  # None: no SUBACK (timeout or the broker closed the connection)
    code: int | None
    text: str


def subscribe(attempt: Attempt, topic: str, qos: int, timeout: float) -> SubscribeOutcome:
    """SUBSCRIBE on an accepted probe connection and wait up to `timeout` for the SUBACK."""
    client, rec = attempt.client, attempt.recorder
    assert client is not None and rec is not None
    rc, mid = client.subscribe(topic, qos=qos)
    if rc != mqtt.MQTT_ERR_SUCCESS or mid is None:
        return SubscribeOutcome(None, None, mqtt.error_string(rc))
    if not wait_for(client, rec, lambda: mid in rec.subacks, timeout):
        closed = rec.disconnected is not None
        return SubscribeOutcome(None, None, "the broker closed the connection" if closed else
                                f"no SUBACK within {timeout:g} s")
    code, text = rec.subacks[mid][0]
    return SubscribeOutcome(code < 0x80, code, text)


# Delivery probe outcomes.
DELIVERED = "delivered"


PUBLISH_REFUSED = "publish_refused"  # MQTT 5 PUBACK with a failure code: we may not publish there


NO_SUBSCRIBERS = "no_subscribers"  # MQTT 5 PUBACK 0x10: not even our own subscription matched


NOT_DELIVERED = "not_delivered"  # accepted, but never delivered back to us


CLOSED_ON_PUBLISH = "closed"  # the broker dropped the connection on the publish (e.g. Hono)


@dataclass(frozen=True)
class DeliveryOutcome:
    outcome: str
    code: int | None = None
    text: str = ""
    other_topics: tuple[str, ...] = ()


def delivery_probe(attempt: Attempt, topic: str, timeout: float) -> DeliveryOutcome:
    """Publish one QoS 1 message on `topic` (which our subscription matches) and wait for it to come back."""
    client, rec = attempt.client, attempt.recorder
    assert client is not None and rec is not None
    info = client.publish(topic, b"mqtt-agent doctor delivery probe", qos=1)
    mid = info.mid

    def settled() -> bool:
        if topic in rec.messages:
            return True
        ack = rec.pubacks.get(mid)
        # With MQTT 3.1.1 a PUBACK carries no verdict; keep waiting for the message itself.
        return ack is not None and ack[0] >= 0x10

    wait_for(client, rec, settled, timeout)
    others = tuple(t for t in rec.messages if t != topic)
    if topic in rec.messages:
        return DeliveryOutcome(DELIVERED, other_topics=others)
    ack = rec.pubacks.get(mid)
    if ack is not None and ack[0] == 0x10:
        return DeliveryOutcome(NO_SUBSCRIBERS, ack[0], ack[1], others)
    if ack is not None and ack[0] >= 0x80:
        return DeliveryOutcome(PUBLISH_REFUSED, ack[0], ack[1], others)
    if rec.disconnected is not None:
        return DeliveryOutcome(CLOSED_ON_PUBLISH, rec.disconnected[0], rec.disconnected[1], others)
    return DeliveryOutcome(NOT_DELIVERED, ack[0] if ack else None, ack[1] if ack else "", others)

