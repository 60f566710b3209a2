"""The paho adapter: a paho client that the rest of the connection package drives, and paho's types turned
into the agent's own (Inbound, connect/publish properties).

`TrackedClient` keeps the link's times (last byte in and out, the longest quiet spell, an unanswered
PINGREQ) that the classifier and the dead-link check need and paho does not expose. `guarded` wraps every
callback: an exception in a paho callback kills its loop thread, so none may escape.
"""

from __future__ import annotations

import functools
import logging
import socket
import ssl
import time
from collections.abc import Sequence
from typing import Any, Callable, TypeVar

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.config import MqttConfig, read_secret
from agent.protocol import Inbound

log = logging.getLogger(__name__)


F = TypeVar("F", bound=Callable[..., None])


# MQTT 5 reason codes (paho maps MQTT 3.1.1 CONNACK codes onto these as well).
RC_CONNECTION_LOST = 0x80  # paho: "Unspecified error", the socket closed without a DISCONNECT


# Gaps in traffic shorter than this are not tracked as link silences (they say nothing about idle limits).
QUIET_RESOLUTION = 1.0
# Packets waiting together are written with one send of at most this many bytes (see _packet_write).
COALESCE_BYTES = 64 * 1024
# With `buffer_reads`, one receive takes up to this many bytes (a whole TLS record's plaintext is at most 16 KiB).
RECV_CHUNK = 16 * 1024


# What an MQTT 3.1.1 PUBACK tells on_publish (it carries nothing but the message id): made once, not per PUBACK.
_PUBACK_SUCCESS = ReasonCode(PacketTypes.PUBACK)
_NO_PROPERTIES = Properties(PacketTypes.PUBACK)  # type: ignore[no-untyped-call]


def _plain(packet: Any) -> bool:
    """A queued packet paho has nothing to do for once it is written (it has for a QoS 0 PUBLISH: on_publish;
    and for a DISCONNECT: the close): such packets may share a send."""
    command = packet["command"] & 0xF0
    return command != mqtt.DISCONNECT and not (command == mqtt.PUBLISH and packet["qos"] == 0)


def guarded(fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            fn(*args, **kwargs)
        except Exception:
            log.exception("internal error in MQTT callback %s (the connection keeps running)", fn.__name__)

    return wrapper  # type: ignore[return-value]


class TrackedClient(mqtt.Client):
    """paho client that records when bytes last went in and out: the idle time at a drop is the
    evidence the keepalive tuner needs, and paho's own timestamps are reset by its ping logic.

    It also records the longest quiet the link carried (a quiet period that ended with our send
    counts once an answer arrives: a NAT that had forgotten the flow would have reset it instead),
    and how the link ended (EOF or reset), for the disconnect classifier."""

    last_in = 0.0
    last_out = 0.0
    longest_quiet = 0.0
    link_error = ""
    _since = 0.0
    _unconfirmed_quiet = 0.0
    # Read ahead (set by the owner of an external loop that asks `buffered()` before it waits in select():
    # the network pump). paho reads a packet in three or more receives (the command byte, each byte of the
    # remaining length, the body): each a call into the TLS layer that drops and retakes the GIL, which the
    # state writer holds much of the time under load. One receive of up to RECV_CHUNK serves them all.
    # Off by default: paho's own loop (loop_forever, used by `mqtt-agent send`) cannot see this buffer.
    buffer_reads = False
    _rbuf = b""
    _rpos = 0
    _rsock: Any = None  # the socket _rbuf came from (a reconnect must not see the old link's bytes)

    def begin_connection(self) -> None:
        self._since = time.monotonic()
        self.longest_quiet = 0.0
        self._unconfirmed_quiet = 0.0
        self.link_error = ""

    def _quiet(self, now: float) -> float:
        return now - max(self.last_in, self.last_out, self._since)

    def buffered(self) -> int:
        """Bytes read ahead from the current socket and not yet taken by paho (select() cannot see them)."""
        if self._rsock is not self._sock:
            return 0
        return len(self._rbuf) - self._rpos

    def _sock_recv(self, bufsize: int) -> bytes:
        if not self.buffer_reads:
            return self._recv(bufsize)
        pos = self._rpos
        buf = self._rbuf
        if pos < len(buf) and self._rsock is self._sock:
            end = min(pos + bufsize, len(buf))  # (a body that goes on past the buffer: paho asks again)
            self._rpos = end
            return buf[pos:end]
        self._rbuf, self._rpos, self._rsock = b"", 0, None
        data = self._recv(max(bufsize, RECV_CHUNK))
        if len(data) <= bufsize:
            return data
        self._rbuf, self._rpos, self._rsock = data, bufsize, self._sock
        return data[:bufsize]

    def _recv(self, bufsize: int) -> bytes:
        try:
            data: bytes = super()._sock_recv(bufsize)
        except ConnectionError as exc:
            self.link_error = "reset by the peer" if isinstance(exc, ConnectionResetError) else str(exc)
            raise
        if data:
            now = time.monotonic()
            # Only silences of a second or more are evidence for the idle-limit estimate; skipping the
            # bookkeeping for the many short gaps of a busy link keeps every read cheap.
            if self._unconfirmed_quiet or now - self.last_in >= QUIET_RESOLUTION:
                self.longest_quiet = max(self.longest_quiet, self._unconfirmed_quiet, self._quiet(now))
                self._unconfirmed_quiet = 0.0
            self.last_in = now
        else:
            self.link_error = "closed by the peer"
        return data

    def _packet_write(self) -> MQTTErrorCode:
        """paho's, except that packets waiting together go out together: one TLS record and one system call
        for a run of PUBACKs and QoS 1 PUBLISHes (a group commit releases many at once), instead of one
        each; on the broker's side too, one read takes them all. A partial write puts back what is left, in
        order, as paho does; anything else (QoS 0, DISCONNECT) is written by paho itself, one by one."""
        out = self._out_packet
        while len(out) > 1 and _plain(out[0]) and _plain(out[1]):
            run: list[Any] = []
            size = 0
            while out and size < COALESCE_BYTES and _plain(out[0]):
                packet = out.popleft()
                run.append(packet)
                size += packet["to_process"]
            data = b"".join(memoryview(p["packet"])[p["pos"]:] for p in run)
            try:
                sent = self._sock_send(data)
            except (AttributeError, ValueError):
                out.extendleft(reversed(run))
                return MQTTErrorCode.MQTT_ERR_SUCCESS
            except BlockingIOError:
                out.extendleft(reversed(run))
                return MQTTErrorCode.MQTT_ERR_AGAIN
            except OSError as err:
                out.extendleft(reversed(run))
                self._easy_log(mqtt.MQTT_LOG_ERR, "failed to receive on socket: %s", err)
                return MQTTErrorCode.MQTT_ERR_CONN_LOST
            if sent <= 0:
                out.extendleft(reversed(run))
                break
            for i, packet in enumerate(run):
                if sent < packet["to_process"]:  # the rest of the run waits, from this byte on
                    packet["pos"] += sent
                    packet["to_process"] -= sent
                    out.extendleft(reversed(run[i:]))
                    break
                sent -= packet["to_process"]
                packet["pos"] += packet["to_process"]
                packet["to_process"] = 0
        return super()._packet_write()

    def _handle_pubackcomp(self, cmd: Any) -> MQTTErrorCode:
        """paho's, without a fresh ReasonCode and Properties for every MQTT 3.1.1 PUBACK (28 us of the network
        thread's time per response on a Pi-class core, which the state writer waits for under load): such a
        PUBACK is its message id only, and always means success. MQTT 5, PUBCOMP and malformed packets: paho."""
        packet = self._in_packet["packet"]
        if cmd != "PUBACK" or self._protocol == mqtt.MQTTv5 or len(packet) != 2:
            result: MQTTErrorCode = super()._handle_pubackcomp(cmd)
            return result
        mid = int.from_bytes(packet, "big")
        self._easy_log(mqtt.MQTT_LOG_DEBUG, "Received %s (Mid: %d)", cmd, mid)
        with self._out_message_mutex:
            if mid in self._out_messages:
                rc: MQTTErrorCode = self._do_on_publish(mid, _PUBACK_SUCCESS, _NO_PROPERTIES)
                return rc
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def _sock_send(self, buf: bytes | bytearray) -> int:
        sent: int = super()._sock_send(buf)
        now = time.monotonic()
        if now - self.last_out >= QUIET_RESOLUTION:
            self._unconfirmed_quiet = max(self._unconfirmed_quiet, self._quiet(now))
        self.last_out = now
        return sent

    def ping_outstanding_since(self) -> float | None:
        """When the unanswered PINGREQ was sent (time.monotonic), or None."""
        return self._ping_t or None

    def use_credentials(self, mqtt_cfg: MqttConfig) -> None:
        """User name and password for the next CONNECT (the password read from mqtt.password_file now)."""
        password = read_secret(mqtt_cfg.password_file) if mqtt_cfg.password_file else mqtt_cfg.password
        self.username_pw_set(mqtt_cfg.username, password)

    # paho has no public way to do these; its private state is touched here only, in one place, with the
    # reason each is safe.

    def replace_tls_context(self, ctx: ssl.SSLContext | None) -> None:
        """Use `ctx` from the next connection on. paho refuses a second tls_set_context(); the caller has
        closed the socket, so clearing paho's record of the first one is safe."""
        self._ssl_context = None
        self._ssl = False
        if ctx is not None:
            self.tls_set_context(ctx)

    def held_messages(self) -> int:
        """QoS 1 messages paho holds until the broker acknowledges them."""
        return len(self._out_messages)

    def forget_messages(self, mids: list[int]) -> None:
        """Make paho forget these messages (set aside) before it re-sends what it holds at the next CONNACK."""
        with self._out_message_mutex:
            for mid in mids:
                self._out_messages.pop(mid, None)

    def close_socket(self) -> None:
        """Close the socket without a DISCONNECT (a dead link, or recovery after an internal error)."""
        self._sock_close()



def new_client(mqtt_cfg: MqttConfig, client_id: str, ssl_context: ssl.SSLContext | None) -> TrackedClient:
    """A configured paho client (used by the session and by `mqtt-agent send`)."""
    protocol = mqtt.MQTTv5 if mqtt_cfg.is_v5 else mqtt.MQTTv311
    kwargs: dict[str, Any] = {}
    if not mqtt_cfg.is_v5:
        kwargs["clean_session"] = mqtt_cfg.clean_session
    client = TrackedClient(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol, **kwargs)
    client.connect_timeout = mqtt_cfg.connect_timeout
    client.max_inflight_messages_set(mqtt_cfg.max_inflight)
    if mqtt_cfg.username:
        client.use_credentials(mqtt_cfg)
    if ssl_context is not None:
        client.tls_set_context(ssl_context)
    # With a register-write callback set, paho never writes to the socket from the publishing thread
    # by itself: the Session decides (under its I/O lock) who writes; loop_start() users (send, doctor)
    # have paho's own thread do it.
    client.on_socket_register_write = lambda *_: None
    client.on_socket_unregister_write = lambda *_: None
    client.on_socket_open = _set_nodelay
    return client


@guarded
def _set_nodelay(client: mqtt.Client, userdata: Any, sock: Any) -> None:
    # paho leaves Nagle on: with it, a command round trip on loopback costs ~44-88 ms instead of ~0.5 ms.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def connect_properties(mqtt_cfg: MqttConfig) -> Properties | None:
    if not mqtt_cfg.is_v5:
        return None
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = 0 if mqtt_cfg.clean_session else mqtt_cfg.session_expiry
    return props


def publish_properties(
    correlation_data: bytes | None, user_properties: Sequence[tuple[str, str]], content_type: str | None
) -> Properties | None:
    if correlation_data is None and not user_properties and content_type is None:
        return None
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    if correlation_data is not None:
        props.CorrelationData = correlation_data
    if user_properties:
        props.UserProperty = list(user_properties)
    if content_type is not None:
        props.ContentType = content_type
    return props


def inbound_from(msg: mqtt.MQTTMessage, wall: float, mono: float) -> Inbound:
    props = getattr(msg, "properties", None)
    user = getattr(props, "UserProperty", None) or []
    return Inbound(
        topic=msg.topic,
        payload=bytes(msg.payload),
        qos=msg.qos,
        dup=bool(msg.dup),
        received_wall=wall,
        received_mono=mono,
        response_topic=getattr(props, "ResponseTopic", None),
        correlation_data=getattr(props, "CorrelationData", None),
        user_properties=tuple((str(k), str(v)) for k, v in user),
        message_expiry=getattr(props, "MessageExpiryInterval", None),
        content_type=getattr(props, "ContentType", None),
    )

