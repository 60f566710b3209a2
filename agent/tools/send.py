"""`mqtt-agent send`: publish one command where the agent listens and wait for its response.

An operator and test tool for brokers such as mosquitto. (With Eclipse Hono, commands are sent
through Hono's northbound API instead; the agent's side is the same.)
"""

from __future__ import annotations

import queue
import secrets
import ssl
import threading
import time
import uuid
from dataclasses import dataclass, replace
from typing import Any

from agent.config import Config
from agent.connection.adapter import new_client
from agent.connection.classify import PROTOCOL_HINT, UNSUPPORTED_HINT, UNSUPPORTED_VERSION, keepalive_hint
from agent.errors import AgentError
from agent.tls.context import build_context
from agent.tls.explain import explain_handshake_error, fetch_peer_certificate
from agent.topics import parse_response, request_topic, response_filter


@dataclass(frozen=True)
class SendResult:
    status: int | None  # None: no response within the timeout (or one-way)
    body: bytes
    topic: str


def send_command(
    cfg: Config,
    command: str,
    payload: bytes = b"",
    *,
    device: str | None = None,
    timeout: float = 10.0,
    req_id: str | None = None,
    one_way: bool = False,
) -> SendResult:
    """Send one command and wait up to `timeout` s for its response. Raises AgentError if the
    broker cannot be reached."""
    ctx = build_context(cfg.tls) if cfg.tls.enabled else None
    mqtt_cfg = replace(cfg.mqtt, clean_session=True)
    client_id = f"{cfg.mqtt.client_id}-send-{secrets.token_hex(4)}"
    client = new_client(mqtt_cfg, client_id, ctx)
    rid = "" if one_way else (req_id or uuid.uuid4().hex[:16])
    try:
        topic = request_topic(cfg.mqtt.command_topic, rid, command, device)
    except ValueError as exc:
        raise AgentError(str(exc)) from exc
    results: queue.Queue[tuple[str, Any]] = queue.Queue()
    connected = threading.Event()
    v5 = cfg.mqtt.is_v5
    keepalive = 30
    # Connection failures are reported as such, with the likely setting, not as "no response".
    no_connack_hint = PROTOCOL_HINT if v5 else ""

    def on_connect(c: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            code = int(reason.value)
            hint = (keepalive_hint(keepalive) if not v5 and code == 0x80
                    else UNSUPPORTED_HINT if v5 and code == UNSUPPORTED_VERSION else "")
            results.put(("error", f"the broker refused the connection: {reason}{hint}"))
            return
        connected.set()
        if one_way:
            c.publish(topic, payload, qos=1)
        else:
            c.subscribe(response_filter(topic), qos=1)

    def on_subscribe(c: Any, userdata: Any, mid: int, codes: list[Any], props: Any) -> None:
        if codes and codes[0].is_failure:
            results.put(("error", f"the broker refused the subscription to {response_filter(topic)}: {codes[0]}"))
        else:
            c.publish(topic, payload, qos=1)

    def on_publish(c: Any, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        if one_way:
            results.put(("sent", None))

    def on_message(c: Any, userdata: Any, msg: Any) -> None:
        parsed = parse_response(msg.topic)
        if parsed and parsed[0] == rid:
            results.put(("response", (parsed[1], bytes(msg.payload), msg.topic)))

    def on_disconnect(c: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if not connected.is_set():
            results.put(("error", f"the connection closed before the broker's CONNACK{no_connack_hint}"))

    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    client.on_subscribe = on_subscribe
    client.on_publish = on_publish
    client.on_message = on_message
    last_error = ""
    for host in cfg.mqtt.hosts:
        try:
            client.connect(host.host, host.port, keepalive=keepalive)
            break
        except (ssl.SSLError, ssl.CertificateError) as exc:
            peer = fetch_peer_certificate(host, cfg.tls) if getattr(exc, "verify_code", None) else None
            last_error = str(explain_handshake_error(exc, host, cfg.tls, peer))
        except OSError as exc:
            last_error = f"cannot connect to {host}: {exc.strerror or exc}"
    else:
        raise AgentError(last_error)
    client.loop_start()
    started = time.monotonic()
    connect_wait = min(timeout, cfg.mqtt.connect_timeout)
    try:
        try:
            kind, value = results.get(timeout=connect_wait)
        except queue.Empty:
            if not connected.is_set():
                kind, value = "error", f"no CONNACK from {host} within {connect_wait:g} s{no_connack_hint}"
            else:
                kind, value = results.get(timeout=max(0.0, timeout - (time.monotonic() - started)))
    except queue.Empty:
        return SendResult(None, b"", topic)
    finally:
        client.disconnect()
        client.loop_stop()
    if kind == "error":
        raise AgentError(str(value))
    if kind == "sent":
        return SendResult(None, b"", topic)
    status, body, resp_topic = value
    return SendResult(int(status), body, resp_topic)
