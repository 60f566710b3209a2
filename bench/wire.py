"""A minimal MQTT 3.1.1 client over TLS, written for load generation.

The benchmark's measuring side must not be the bottleneck it measures: paho spends tens of
microseconds per message in callbacks, locks and message objects, which on a 2-core machine caps
both the agent and the baseline at the same figure. This client does only what the benchmark
needs (CONNECT, SUBSCRIBE, QoS 1 PUBLISH, PUBACK) on one blocking socket in the caller's thread,
with incoming PUBACKs for received messages sent in one write per batch.

It is not a general MQTT client: no QoS 2, no MQTT 5, no keepalive (CONNECT says 0), no retries.
"""

from __future__ import annotations

import select
import socket
import ssl
import struct
import time
from dataclasses import dataclass

CONNECT, CONNACK, PUBLISH, PUBACK, SUBSCRIBE, SUBACK, DISCONNECT = 1, 2, 3, 4, 8, 9, 14


class WireError(Exception):
    """The broker refused, closed or did not answer in time."""


@dataclass(frozen=True)
class Message:
    """A received PUBLISH, stamped with time.perf_counter() when its bytes were parsed."""

    topic: str
    payload: bytes
    received: float


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _utf8(text: str) -> bytes:
    data = text.encode()
    return struct.pack("!H", len(data)) + data


def packet(kind: int, flags: int, body: bytes) -> bytes:
    """One MQTT control packet: fixed header (type, flags, remaining length) and body."""
    return bytes([(kind << 4) | flags]) + _varint(len(body)) + body


def connect_packet(client_id: str, clean: bool = True) -> bytes:
    flags = 0x02 if clean else 0x00
    return packet(CONNECT, 0, _utf8("MQTT") + bytes([4, flags]) + struct.pack("!H", 0) + _utf8(client_id))


def publish_packet(topic: str, payload: bytes, packet_id: int) -> bytes:
    """A QoS 1 PUBLISH."""
    return packet(PUBLISH, 0x02, _utf8(topic) + struct.pack("!H", packet_id) + payload)


def parse_packets(buf: bytearray) -> list[tuple[int, int, bytes]]:
    """Remove every complete packet from `buf`; returns (type, flags, body) for each."""
    out: list[tuple[int, int, bytes]] = []
    pos = 0
    n = len(buf)
    while pos + 2 <= n:
        first = buf[pos]
        length = 0
        mult = 1
        i = pos + 1
        while True:
            if i >= n:
                del buf[:pos]
                return out
            byte = buf[i]
            length += (byte & 0x7F) * mult
            mult *= 128
            i += 1
            if not byte & 0x80:
                break
            if mult > 128**3:
                raise WireError("malformed remaining length from the broker")
        if i + length > n:
            break
        out.append((first >> 4, first & 0x0F, bytes(buf[i : i + length])))
        pos = i + length
    del buf[:pos]
    return out


class WireClient:
    """One connection; every method runs in the caller's thread."""

    def __init__(self, host: str, port: int, context: ssl.SSLContext | None, client_id: str) -> None:
        self.host = host
        self.port = port
        self.context = context
        self.client_id = client_id
        self.sock: socket.socket | None = None
        self._buf = bytearray()
        self._next_id = 0
        self._pending_acks = bytearray()
        self._backlog: list[tuple[int, int, bytes]] = []  # packets parsed while waiting for another

    # --- connection -------------------------------------------------------------------------------

    def connect(self, timeout: float = 10.0) -> None:
        """TCP + TLS + CONNECT/CONNACK. Raises OSError/ssl.SSLError/WireError."""
        raw = socket.create_connection((self.host, self.port), timeout=timeout)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            sock = self.context.wrap_socket(raw, server_hostname=self.host) if self.context else raw
        except BaseException:
            raw.close()
            raise
        self.sock = sock
        self._buf.clear()
        sock.sendall(connect_packet(self.client_id))
        _, _, body = self._expect((CONNACK,), timeout)
        if len(body) < 2 or body[1] != 0:
            self.close()
            raise WireError(f"CONNACK refused: {body!r}")

    def subscribe(self, topic: str, qos: int = 1, timeout: float = 10.0) -> None:
        assert self.sock is not None
        pid = self._packet_id()
        self.sock.sendall(packet(SUBSCRIBE, 0x02, struct.pack("!H", pid) + _utf8(topic) + bytes([qos])))
        _, _, body = self._expect((SUBACK,), timeout)
        if body[2:3] == b"\x80":
            raise WireError(f"SUBSCRIBE to {topic} refused")

    def close(self) -> None:
        if self.sock is None:
            return
        try:
            self.sock.settimeout(1.0)
            self.sock.sendall(packet(DISCONNECT, 0, b""))
        except OSError:
            pass
        try:
            self.sock.close()
        except OSError:
            pass
        self.sock = None

    def __enter__(self) -> WireClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- traffic ----------------------------------------------------------------------------------

    def _packet_id(self) -> int:
        self._next_id = self._next_id % 65535 + 1
        return self._next_id

    def publish(self, topic: str, payload: bytes) -> None:
        """Send a QoS 1 PUBLISH (its PUBACK is read and ignored by poll())."""
        assert self.sock is not None
        self.sock.sendall(publish_packet(topic, payload, self._packet_id()))

    def publish_many(self, items: list[tuple[str, bytes]]) -> None:
        """Several QoS 1 PUBLISHes in one write."""
        assert self.sock is not None
        self.sock.sendall(b"".join(publish_packet(t, p, self._packet_id()) for t, p in items))

    def poll(self, timeout: float) -> list[Message]:
        """Wait up to `timeout` s for data; return the PUBLISHes received (QoS 1 ones are acknowledged)."""
        sock = self.sock
        if sock is None:
            raise WireError("not connected")
        if self._backlog:
            return self._messages(time.perf_counter())
        pending = sock.pending() if isinstance(sock, ssl.SSLSocket) else 0
        if not pending:
            ready, _, _ = select.select([sock], [], [], max(timeout, 0.0))
            if not ready:
                return []
        try:
            data = sock.recv(262144)
        except (ssl.SSLWantReadError, BlockingIOError, socket.timeout):
            return []
        if not data:
            raise WireError("the broker closed the connection")
        self._buf += data
        return self._messages(time.perf_counter())

    def _messages(self, now: float) -> list[Message]:
        sock = self.sock
        assert sock is not None
        out: list[Message] = []
        packets, self._backlog = self._backlog + parse_packets(self._buf), []
        for kind, flags, body in packets:
            if kind != PUBLISH:
                continue  # PUBACKs for our publishes, PINGRESP, ...
            tlen = (body[0] << 8) | body[1]
            topic = body[2 : 2 + tlen].decode()
            qos = (flags >> 1) & 0x03
            pos = 2 + tlen
            if qos:
                self._pending_acks += packet(PUBACK, 0, body[pos : pos + 2])
                pos += 2
            out.append(Message(topic, body[pos:], now))
        if self._pending_acks:
            sock.sendall(bytes(self._pending_acks))
            self._pending_acks.clear()
        return out

    def _expect(self, kinds: tuple[int, ...], timeout: float) -> tuple[int, int, bytes]:
        assert self.sock is not None
        end = time.monotonic() + timeout
        while True:
            packets = parse_packets(self._buf)
            for i, (kind, flags, body) in enumerate(packets):
                if kind in kinds:
                    self._backlog += packets[i + 1 :]  # an early PUBLISH is kept for poll()
                    return kind, flags, body
            left = end - time.monotonic()
            if left <= 0:
                raise WireError(f"no packet of type {kinds} from {self.host}:{self.port} within {timeout:g} s")
            self.sock.settimeout(left)
            data = self.sock.recv(65536)
            if not data:
                raise WireError("the broker closed the connection")
            self._buf += data
