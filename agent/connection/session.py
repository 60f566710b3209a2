"""The MQTT session: one connection at a time, driven on the agent's own network thread (the paho client
itself comes from adapter.py).

The agent owns the network thread (a loop of its own, each turn through pump.py's select and I/O lock)
instead of paho's loop_start(), so that the reconnect policy, failover and keepalive are the agent's
decisions. This module is the connection's lifecycle: connect, serve, end, back off, reconnect.
Every paho callback only translates into the agent's own types and hands off; each is guarded,
because an exception in a paho callback kills the network thread.

Commands are acknowledged by hand (paho's manual_ack): `on_message` gets the message and an `Ack`, and
the PUBACK is sent only when the owner calls it, once the command is on disk (the state store's writer
calls it after its fsync). paho's `ack()` only queues a packet and is safe from another thread, but a
message id belongs to one connection: the Ack hands (connection, mid) to the pump on the network
thread, which sends it only if that connection is still the current one (after a reconnect the broker
redelivers, and the journal answers the redelivery).
"""

from __future__ import annotations

import contextlib
import logging
import ssl
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Callable

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.config import HostPort, MqttConfig, TlsConfig
from agent.connection.adapter import (
    connect_properties,
    guarded,
    inbound_from,
    new_client,
    publish_properties,
)
from agent.connection.backoff import HostRotation
from agent.connection.classify import (
    CONNECTION_LOST,
    KEEPALIVE_TIMEOUT,
    NETWORK_ERROR,
    RECONNECT_REQUESTED,
    SHUTDOWN,
    TLS_ERROR,
)
from agent.connection.ends import (
    HOST_PROVEN_AFTER,
    RC_KEEPALIVE_TIMEOUT,
    TlsExplanations,
    connect_failure,
    end_cause,
    end_log_line,
    explained,
    host_failure,
)
from agent.connection.events import (
    Connected,
    Connecting,
    ConnectionEnded,
    Ended,
    MessageSetAside,
    OutboxChanged,
    OutboxDropped,
    ReconnectScheduled,
    SessionEvent,
    SessionListener,
    SessionState,
)
from agent.connection.monitor import ConnectionMonitor
from agent.connection.pump import Pump
from agent.connection.subscriptions import SubAck, Subscriptions
from agent.logtext import LogSummary, untrusted
from agent.protocol import Inbound
from agent.state import poison
from agent.state.outbox import Outbox
from agent.state.store import OutMessage

# A publisher that retains commands would otherwise cost one warning per message.
log = logging.getLogger(__name__)
_RETAINED_LOG = LogSummary(log)


# paho needs about 2 x keepalive to notice a link that stopped carrying traffic (PINGREQ after one
# keepalive, gives up one keepalive later). The session closes the link itself once a PINGREQ has
# waited this share of the keepalive (at least PING_GRACE_MIN s, for slow cellular round trips).
PING_GRACE = 0.5


PING_GRACE_MIN = 2.0


# After an unexpected internal error in the network loop, wait this long before connecting again.
INTERNAL_ERROR_RETRY = 5.0


@dataclass
class _Conn:
    host: HostPort
    attempt_started: float
    keepalive: int
    connected_at: float | None = None
    session_present: bool | None = None
    ended: ConnectionEnded | None = None
    refused: tuple[int, str] | None = None
    asked_keepalive: int | None = None  # set when the broker's Server Keep Alive replaced it
    close_reason: tuple[str, str] | None = None  # set when the agent closes the socket itself


class Session:
    """Keeps one MQTT session up, subscribed to the command topic, and hands messages to `on_message`."""

    def __init__(
        self,
        mqtt_cfg: MqttConfig,
        tls_cfg: TlsConfig,
        *,
        monitor: ConnectionMonitor,
        ssl_context: ssl.SSLContext | None,
        on_message: Callable[[Inbound, Ack], None],
        keepalive: Callable[[], int] | None = None,
        listeners: Sequence[SessionListener] = (),
        client_id: str | None = None,
        topics: Sequence[str] | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        outbox: Outbox | None = None,
        on_ack_delay: Callable[[float], None] | None = None,
    ) -> None:
        self.cfg = mqtt_cfg
        self.tls_cfg = tls_cfg
        self._ssl_context = ssl_context
        self._on_message = on_message
        self.client_id = client_id or mqtt_cfg.client_id
        self.monitor = monitor  # classification, keepalive tuning and the reconnect backoff (built by the caller)
        self._keepalive = keepalive or self.monitor.keepalive
        self.backoff = self.monitor.backoff
        self.listeners = list(listeners)
        self.outbox = outbox
        self._clock = clock
        self._wall = wall
        self._hosts = HostRotation(mqtt_cfg.hosts)
        self._client = new_client(mqtt_cfg, self.client_id, ssl_context)
        self._client.on_connect = self._handle_connect
        self._client.on_disconnect = self._handle_disconnect
        self._client.on_message = self._handle_message
        self._client.on_subscribe = self._handle_subscribe
        self._client.on_publish = self._handle_publish
        self._client.manual_ack_set(True)
        self._pump = Pump(self._client, self._is_live, clock=clock, on_ack_delay=on_ack_delay)
        self._withdrawn: list[int] = []  # message ids paho must not re-send (set aside), dropped before a connect
        self._broker_max_packet: int | None = None  # MQTT 5 CONNACK Maximum Packet Size of this connection
        if outbox is not None:
            outbox.bind(self._send_now, lambda size: self._notify(OutboxChanged(size)),
                        lambda count: self._notify(OutboxDropped(count)),
                        withdraw=self._withdrawn.append,
                        on_set_aside=lambda reason: self._notify(MessageSetAside(reason)))
        self._next_check = 0.0
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._reconnect_reason: str | None = None
        self._thread: threading.Thread | None = None
        self._conn: _Conn | None = None
        self._subs = Subscriptions(topics if topics is not None else [mqtt_cfg.subscription], self._subscribe,
                                   client_id=self.client_id, notify=self._notify, clock=clock)
        self._connects = 0
        self._attempts = 0
        self._last_end: ConnectionEnded | None = None
        self._tls_explained = TlsExplanations()
        self._pending_config: tuple[MqttConfig, TlsConfig, ssl.SSLContext | None] | None = None
        self.heartbeat = clock()  # updated by every turn of the network loop (watchdog evidence)

    # --- public API (any thread) -----------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="mqtt-network", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Disconnect cleanly (DISCONNECT sent) and end the network thread."""
        self._stop.set()
        self._wake.set()
        self._pump.wake()
        if self._thread:
            self._thread.join(timeout)

    def request_reconnect(self, reason: str) -> None:
        """Close the current connection cleanly and connect again now (e.g. after a config reload)."""
        self._reconnect_reason = reason
        self._wake.set()
        self._pump.wake()

    def reconfigure(self, mqtt_cfg: MqttConfig, tls_cfg: TlsConfig, ssl_context: ssl.SSLContext | None,
                    reason: str) -> None:
        """Use new hosts, credentials and TLS context (config reload): the current connection is closed
        cleanly and the next one uses them. Client id, protocol and session settings stay as they are."""
        self._pending_config = (mqtt_cfg, tls_cfg, ssl_context)
        self.request_reconnect(reason)

    def _apply_pending_config(self) -> None:
        """On the network thread, between connections: swap in what `reconfigure` left."""
        pending, self._pending_config = self._pending_config, None
        if pending is None:
            return
        mqtt_cfg, tls_cfg, ssl_context = pending
        if mqtt_cfg.hosts != self.cfg.hosts:
            self._hosts = HostRotation(mqtt_cfg.hosts)
        self.cfg, self.tls_cfg = mqtt_cfg, tls_cfg
        self._client.use_credentials(mqtt_cfg)
        self._client.replace_tls_context(ssl_context)  # the socket is closed here
        self._ssl_context = ssl_context
        self._tls_explained.clear()

    @property
    def thread_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 1,
        *,
        correlation_data: bytes | None = None,
        user_properties: tuple[tuple[str, str], ...] = (),
        content_type: str | None = None,
    ) -> None:
        """Queue a message. With an outbox it is stored first and survives a disconnect or a crash;
        without one, QoS 1 messages published while offline are sent after the next CONNACK."""
        msg = OutMessage(topic, payload, qos, correlation_data, user_properties, content_type)
        if self.outbox is not None:
            self.outbox.put(msg)
            return
        try:
            self._send_now(msg)
        except poison.Unsendable as exc:
            log.warning("did not send a %d-byte message to '%s': %s", len(payload), untrusted(topic, 120), exc.detail)
            self._notify(MessageSetAside(exc.reason))

    def max_message_bytes(self) -> int | None:
        """The size limit in force for what the agent publishes (None: unlimited)."""
        return poison.effective_limit(self.cfg.max_message_bytes, self._broker_max_packet)

    def _packet_size(self, msg: OutMessage, props: Properties | None) -> int:
        props_len = len(props.pack()) if props is not None else (1 if self.cfg.is_v5 else None)  # type: ignore[no-untyped-call]
        return poison.publish_packet_size(msg.topic, len(msg.payload), msg.qos, props_len)

    def _fit(self, msg: OutMessage) -> tuple[OutMessage, Properties | None]:
        """`msg` as it may go out under the size limit: itself, or the 500 that replaces an oversized
        response. Raises poison.Unsendable if neither fits."""
        props = (publish_properties(msg.correlation_data, msg.user_properties, msg.content_type)
                 if self.cfg.is_v5 else None)
        if self.cfg.is_v5 and msg.expires is not None and msg.kind in ("telemetry", "event"):
            # The time left of the message's ttl, as MQTT 5 Message Expiry Interval (Hono: hono-ttl).
            if props is None:
                props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.MessageExpiryInterval = max(1, int(msg.expires - self._wall() + 0.999))
        limit = self.max_message_bytes()
        if limit is None:
            return msg, props
        size = self._packet_size(msg, props)
        if size <= limit:
            return msg, props
        source = poison.limit_source(self.cfg.max_message_bytes, self._broker_max_packet)
        sub = poison.too_large_response(msg.topic, msg.user_properties, size, limit, source)
        if sub is not None:
            fitted = replace(msg, topic=sub.topic, payload=sub.payload, user_properties=sub.user_properties,
                             content_type="application/json")
            fitted_props = (publish_properties(fitted.correlation_data, fitted.user_properties, fitted.content_type)
                            if self.cfg.is_v5 else None)
            if self._packet_size(fitted, fitted_props) <= limit:
                log.warning("a response to '%s' is %d bytes as an MQTT packet, over the limit of %d bytes (%s): "
                            "answered 500 instead", untrusted(msg.topic, 120), size, limit, source,
                            extra={"MQTT_SET_ASIDE": poison.TOO_LARGE})
                self._notify(MessageSetAside(poison.TOO_LARGE))
                return fitted, fitted_props
        raise poison.Unsendable(poison.TOO_LARGE, f"{size} bytes as an MQTT packet, over the limit of {limit} bytes "
                                                  f"({source}), and no shorter error response fits")

    def _send_now(self, msg: OutMessage) -> int | None:
        """Hand `msg` to paho; its message id, or None if paho did not take it. Raises
        poison.Unsendable for a message over the size limit that has no replacement."""
        msg, props = self._fit(msg)
        info = self._client.publish(msg.topic, msg.payload, msg.qos, properties=props)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            log.error("could not queue a message for %s: %s", untrusted(msg.topic), mqtt.error_string(info.rc))
            return None
        return int(info.mid)

    def unacknowledged(self) -> int:
        """Messages not yet acknowledged by the broker (in the outbox, or held by paho)."""
        if self.outbox is not None:
            return self.outbox.size
        return self._client.held_messages()

    def flush(self, timeout: float) -> bool:
        """Wait until every queued QoS 1 message is acknowledged, or `timeout` passes."""
        end = self._clock() + timeout
        while self.unacknowledged():
            if self._clock() >= end or not self.state().connected:
                return False
            time.sleep(0.02)
        return True

    def state(self) -> SessionState:
        conn = self._conn
        connected = bool(conn and conn.connected_at is not None and conn.ended is None)
        return SessionState(
            connected=connected,
            host=conn.host if conn else None,
            protocol="5" if self.cfg.is_v5 else "3.1.1",
            keepalive=conn.keepalive if conn else None,
            connected_since=conn.connected_at if connected and conn else None,
            connects=self._connects,
            attempts=self._attempts,
            last_end=self._last_end,
            subscribed=connected and self._subs.granted,
            keepalive_set_by_broker=bool(conn and conn.asked_keepalive is not None),
            max_message_bytes=self.max_message_bytes(),
        )

    # --- network thread --------------------------------------------------------------------------

    def _notify(self, event: SessionEvent) -> None:
        for listener in self.listeners:
            try:
                event.deliver(listener)
            except Exception:
                log.exception("session listener %r failed on %s", listener, type(event).__name__)

    def _emit(self, events: Sequence[SessionEvent]) -> None:
        for event in events:
            self._notify(event)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._cycle()
            except Exception:
                log.exception("internal error in the MQTT network loop; the connection is reset and retried in "
                              "%g s", INTERNAL_ERROR_RETRY)
                self._recover_from_internal_error()
                self._wake.wait(INTERNAL_ERROR_RETRY)

    def _recover_from_internal_error(self) -> None:
        conn = self._conn
        try:
            self._client.close_socket()
            if conn is not None and conn.ended is None:
                conn.close_reason = (NETWORK_ERROR, "internal error in the network loop")
                ended = self._end(conn, False, None, "internal error")
                self._last_end = ended
                self._notify(Ended(ended))
        except Exception:
            log.exception("could not reset the connection after an internal error")

    def _cycle(self) -> None:
        """One connection: connect, serve until it ends, account for the end, wait before the next."""
        self._wake.clear()
        self._reconnect_reason = None
        self._apply_pending_config()
        raw = self._connect_and_serve()
        if self.outbox is not None and raw.connected_at is not None:
            # Here, not in _end: _end may run inside a paho callback, and the outbox lock must never be
            # taken under paho's locks (a worker holding it may be waiting for them in publish()).
            suspect = self.outbox.poison_check(expected_end=explained(raw.kind))
            raw = replace(raw, message_suspect=suspect)
        try:
            ended = self.monitor.classify(raw)
        except Exception:
            log.exception("internal error while classifying a disconnect")
            ended = replace(raw, kind={CONNECTION_LOST: NETWORK_ERROR, RECONNECT_REQUESTED: SHUTDOWN}.get(
                raw.kind, raw.kind))
        self._last_end = ended
        self._log_end(ended, raw.kind, raw.reason)
        self._notify(Ended(ended))
        try:
            self._emit(self.monitor.account(ended))
        except Exception:
            log.exception("internal error while accounting for a disconnect")
        if self._stop.is_set():
            return
        if raw.kind == RECONNECT_REQUESTED:
            return
        failed_over = False
        counts, refused = host_failure(ended)
        if counts:
            failed_over = self._hosts.failed(definite=refused)
            if failed_over:
                log.warning("%s %s; failing over to %s", ended.host, "refused the connection" if refused
                            else "failed repeatedly", self._hosts.current)
        # After a failover the next host is tried at once (reconnect.min_delay, jittered), not after the
        # backoff built against the host that failed; the failure count stays, so if every host is down
        # the delays still grow.
        delay = self.backoff.failover_delay() if failed_over else self.backoff.next_delay()
        self._notify(ReconnectScheduled(delay, ended))
        log.info("reconnecting in %.1f s (%s; random delay up to %g s%s)", delay, ended.kind,
                 self.backoff.ceiling(), ", damped: duplicate client id" if self.backoff.damped else "",
                 extra={"MQTT_REASON": ended.kind})
        self._wake.wait(delay)

    def _log_end(self, ended: ConnectionEnded, raw_kind: str, raw_reason: str = "") -> None:
        line = end_log_line(ended, raw_kind, raw_reason)
        if line is not None:
            level, text, fields = line
            log.log(level, "%s", text, extra=fields)

    def _drop_withdrawn(self) -> None:
        """Make paho forget set-aside messages before it re-sends what it holds at the next CONNACK."""
        if not self._withdrawn:
            return
        self._client.forget_messages(self._withdrawn)
        self._withdrawn.clear()

    def _connect_and_serve(self) -> ConnectionEnded:
        self._drop_withdrawn()
        self._broker_max_packet = None
        host = self._hosts.current
        keepalive = self._keepalive()
        self._attempts += 1
        conn = self._conn = _Conn(host, self._clock(), keepalive)
        self._subs.new_connection()
        self._client.begin_connection()
        self._notify(Connecting(host, self._attempts))
        log.debug("connecting to %s as %s (keepalive %d s)", host, self.client_id, keepalive)
        try:
            self._client.connect(
                host.host,
                host.port,
                keepalive=keepalive,
                clean_start=self.cfg.clean_session if self.cfg.is_v5 else mqtt.MQTT_CLEAN_START_FIRST_ONLY,
                properties=connect_properties(self.cfg),
            )
        except Exception as exc:  # noqa: BLE001 - every failure to connect is classified, none is fatal
            return self._connect_failed(conn, exc)
        self._serve(conn)
        assert conn.ended is not None
        return conn.ended

    def _serve(self, conn: _Conn) -> None:
        disconnect_deadline: float | None = None
        while conn.ended is None:
            now = self._clock()
            self.heartbeat = now
            if disconnect_deadline is None and (self._stop.is_set() or self._reconnect_reason):
                conn.close_reason = (
                    (SHUTDOWN, "agent stopping") if self._stop.is_set()
                    else (RECONNECT_REQUESTED, self._reconnect_reason or "")
                )
                disconnect_deadline = now + 2.0
                if conn.connected_at is None:
                    self._close(conn)
                    break
                self._client.disconnect()
            elif disconnect_deadline is not None and now > disconnect_deadline:
                self._close(conn)
                break
            if conn.connected_at is None and now - conn.attempt_started > self.cfg.connect_timeout:
                conn.close_reason = (NETWORK_ERROR, f"no CONNACK within {self.cfg.connect_timeout:g} s")
                self._close(conn)
                break
            self._subs.retry_due(now)
            if disconnect_deadline is None and conn.connected_at is not None and self._check_link(conn, now):
                break
            rc = self._pump.turn(0.5)
            if rc != mqtt.MQTT_ERR_SUCCESS and conn.ended is None and self._client.socket() is None:
                self._end(conn, False, None, mqtt.error_string(rc))
            if self.outbox is not None:
                self.outbox.pump()

    def _is_live(self, owner: object) -> bool:
        """The pump asks before each PUBACK: is the Ack's connection the current one, still up?"""
        conn = self._conn
        return owner is conn and conn is not None and conn.ended is None

    def writes_together(self) -> contextlib.AbstractContextManager[None]:
        """Any thread: what this thread publishes and acknowledges inside goes out in one write when it ends."""
        return self._pump.batched()

    def _send_ack(self, conn: _Conn, mid: int, qos: int, received: float) -> None:
        """Any thread: acknowledge `mid` of `conn` now (see Pump.send_ack)."""
        self._pump.send_ack(conn, mid, qos, received)

    def _check_link(self, conn: _Conn, now: float) -> bool:
        """Close a link that stopped answering (True if it did); once a second, note the uptime and
        whether a longer keepalive is due for a probe."""
        since = self._client.ping_outstanding_since()
        if since is not None:
            waited = time.monotonic() - since  # paho stamps its PINGREQ with time.monotonic()
            limit = max(PING_GRACE * conn.keepalive, PING_GRACE_MIN)
            if waited >= limit:
                conn.close_reason = (KEEPALIVE_TIMEOUT, f"no PINGRESP {waited:.1f} s after our PINGREQ (keepalive "
                                                        f"{conn.keepalive} s): the link stopped carrying traffic")
                self._close(conn, RC_KEEPALIVE_TIMEOUT)
                return True
        if now < self._next_check or conn.connected_at is None:
            return False
        self._next_check = now + 1.0
        if now - conn.connected_at >= HOST_PROVEN_AFTER:
            self._hosts.succeeded()
        self.monitor.connection_up_for(now - conn.connected_at, conn.keepalive)
        events = self.monitor.probe()
        if events:
            self._emit(events)
            self.request_reconnect("applying a longer keepalive (probe)")
        return False

    def _close(self, conn: _Conn, code: int | None = None) -> None:
        """Close the socket ourselves; paho calls no on_disconnect for that, so end the record here."""
        self._client.close_socket()
        if conn.ended is None:
            self._end(conn, False, code, "closed by the agent")

    def _connect_failed(self, conn: _Conn, exc: Exception) -> ConnectionEnded:
        host = conn.host
        kind, reason = connect_failure(host, exc, self.cfg.connect_timeout)
        if kind == TLS_ERROR:
            reason, again = self._tls_explained.explain(host, exc, self.tls_cfg, self.cfg.connect_timeout)
            log.error("TLS handshake with %s failed%s: %s", host, " again" if again else "", reason,
                      extra={"MQTT_REASON": TLS_ERROR})
        try:
            self._client.close_socket()
        except Exception:  # noqa: BLE001 - best effort cleanup of a half-open socket
            pass
        ended = ConnectionEnded(host=host, kind=kind, reason=reason, attempt_started=conn.attempt_started,
                                ended_at=self._clock(), keepalive=conn.keepalive, error=repr(exc))
        conn.ended = ended
        if kind != TLS_ERROR:
            log.warning("%s", reason, extra={"MQTT_REASON": kind})
        return ended

    def _end(self, conn: _Conn, from_server: bool, code: int | None, text: str) -> ConnectionEnded:
        """Record the end of `conn` once (paho may report one disconnect twice)."""
        if conn.ended is not None:
            return conn.ended
        if self.outbox is not None:
            self.outbox.link_down()
        link_error = self._client.link_error
        kind, reason, code = end_cause(close_reason=conn.close_reason, refused=conn.refused, from_server=from_server,
                                       code=code, text=text, keepalive=conn.keepalive, link_error=link_error)
        last_in, last_out = self._client.last_in, self._client.last_out
        conn.ended = ConnectionEnded(
            host=conn.host,
            kind=kind,
            reason=reason,
            attempt_started=conn.attempt_started,
            ended_at=self._clock(),
            connected_at=conn.connected_at,
            last_in=last_in if last_in >= conn.attempt_started else None,
            last_out=last_out if last_out >= conn.attempt_started else None,
            reason_code=code,
            from_server=from_server,
            keepalive=conn.keepalive,
            session_present=conn.session_present,
            longest_quiet=self._client.longest_quiet if conn.connected_at is not None else None,
            link_error=link_error,
        )
        return conn.ended

    # --- paho callbacks (network thread) ---------------------------------------------------------

    @guarded
    def _handle_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode,
                        properties: Any) -> None:
        conn = self._conn
        if conn is None or conn.ended is not None:
            return
        if reason.is_failure:
            conn.refused = (int(reason.value), str(reason))
            return
        if conn.connected_at is not None:
            return  # tolerate a repeated callback
        conn.connected_at = self._clock()
        server_keepalive = getattr(properties, "ServerKeepAlive", None)
        if server_keepalive is not None and int(server_keepalive) != conn.keepalive:
            # MQTT 5: the broker's Server Keep Alive is the one in force (paho pings by it too).
            conn.asked_keepalive, conn.keepalive = conn.keepalive, int(server_keepalive)
        max_packet = getattr(properties, "MaximumPacketSize", None)
        self._broker_max_packet = int(max_packet) if max_packet else None
        self._connects += 1
        present = bool(getattr(flags, "session_present", False))
        conn.session_present = present
        if self.outbox is not None:
            self.outbox.link_up()
        by_broker = (f" set by the broker's Server Keep Alive (we asked for {conn.asked_keepalive} s)"
                     if conn.asked_keepalive is not None else "")
        limit = f", messages up to {self._broker_max_packet} bytes" if self._broker_max_packet else ""
        log.info("connected to %s as %s (MQTT %s, keepalive %d s%s, session %s%s)", conn.host, self.client_id,
                 "5" if self.cfg.is_v5 else "3.1.1", conn.keepalive, by_broker, "resumed" if present else "new",
                 limit, extra={"KEEPALIVE": conn.keepalive})
        self._subs.subscribe_all()
        self._notify(Connected(conn.host, conn.keepalive, present))

    def _subscribe(self, topic: str) -> int | None:
        rc, mid = self._client.subscribe(topic, qos=self.cfg.qos)
        return mid if rc == mqtt.MQTT_ERR_SUCCESS else None

    @guarded
    def _handle_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reason_codes: list[ReasonCode],
                          properties: Any) -> None:
        code = reason_codes[0] if reason_codes else None
        self._subs.answered(mid, None if code is None else SubAck(int(code.value), str(code), code.is_failure))

    @guarded
    def _handle_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode,
                           properties: Any) -> None:
        conn = self._conn
        if conn is None:
            return
        from_server = bool(getattr(flags, "is_disconnect_packet_from_server", False))
        self._end(conn, from_server, int(reason.value), str(reason))

    @guarded
    def _handle_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: ReasonCode,
                        properties: Any) -> None:
        if reason is not None and getattr(reason, "is_failure", False):
            log.warning("the broker refused a response (PUBACK %s); it is not sent again: check the broker ACL "
                        "for client %s", reason, self.client_id)
        if self.outbox is not None:
            self.outbox.acked(mid)

    @guarded
    def _handle_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        conn = self._conn
        now = self._clock()
        ack = Ack(self, conn, msg.mid, msg.qos, now) if conn is not None and msg.qos > 0 else Ack(None, None, 0, 0)
        if msg.retain:
            _RETAINED_LOG.log("retained", logging.WARNING, "ignored a retained message on %s: a retained command "
                              "would run again at every reconnect; publish commands without the retain flag",
                              untrusted(msg.topic))
            ack()
            return
        try:
            self._on_message(inbound_from(msg, self._wall(), now), ack)
        except BaseException:
            ack()  # never leave a message unacknowledged: the broker would stop sending (receive maximum)
            raise


class Ack:
    """The PUBACK of one received message, sent at most once, on its connection."""

    __slots__ = ("_conn", "_session", "done", "mid", "qos", "received")

    def __init__(self, session: Session | None, conn: _Conn | None, mid: int, qos: int,
                 received: float = 0.0) -> None:
        self._session = session
        self._conn = conn
        self.mid = mid
        self.qos = qos
        self.received = received
        self.done = False

    def __call__(self) -> None:
        if self.done:
            return
        self.done = True
        if self._session is not None and self._conn is not None:
            self._session._send_ack(self._conn, self.mid, self.qos, self.received)


def no_ack() -> Ack:
    """An Ack that sends nothing (a message taken from the journal, a test)."""
    return Ack(None, None, 0, 0)

