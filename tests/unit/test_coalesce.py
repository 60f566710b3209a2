"""TrackedClient._packet_write: packets waiting together leave in one send (a group commit's PUBACKs and
responses), partial writes keep the rest in order, and what paho must finish itself (QoS 0 PUBLISH,
DISCONNECT) still goes through paho. A fake socket stands in for the TLS socket."""

from __future__ import annotations

from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from agent.connection.adapter import COALESCE_BYTES, TrackedClient


class Sock:
    """Records each send; `limits` caps what the next sends take (None: all), `full` raises EAGAIN."""

    def __init__(self, limits: list[int | None] | None = None) -> None:
        self.sent: list[bytes] = []
        self.limits = list(limits or [])
        self.full = False

    def send(self, data: bytes) -> int:
        if self.full:
            raise BlockingIOError
        limit = self.limits.pop(0) if self.limits else None
        taken = bytes(data[:limit]) if limit is not None else bytes(data)
        self.sent.append(taken)
        return len(taken)

    def close(self) -> None:
        pass


def client_with(sock: Sock) -> TrackedClient:
    c = TrackedClient(CallbackAPIVersion.VERSION2, client_id="t")
    c._sock = sock  # type: ignore[assignment]
    return c


def queue(c: TrackedClient, command: int, data: bytes, qos: int = 1) -> None:
    c._out_packet.append({"command": command, "mid": 1, "qos": qos, "pos": 0, "to_process": len(data),
                          "packet": bytearray(data), "info": None})


def test_waiting_packets_leave_in_one_send() -> None:
    sock = Sock()
    c = client_with(sock)
    for n in range(5):
        queue(c, mqtt.PUBACK, bytes([0x40, 2, 0, n]))
    queue(c, mqtt.PUBLISH | 2, b"\x32\x05\x00\x01t\x00\x09")
    assert c._packet_write() == MQTTErrorCode.MQTT_ERR_SUCCESS
    assert sock.sent == [b"".join(bytes([0x40, 2, 0, n]) for n in range(5)) + b"\x32\x05\x00\x01t\x00\x09"]
    assert not c.want_write()


def test_a_partial_write_keeps_the_rest_in_order() -> None:
    sock = Sock(limits=[6])  # the first send takes one packet and a half
    c = client_with(sock)
    for n in range(3):
        queue(c, mqtt.PUBACK, bytes([0x40, 2, 0, n]))
    assert c._packet_write() == MQTTErrorCode.MQTT_ERR_SUCCESS  # the next try took the rest
    assert b"".join(sock.sent) == b"".join(bytes([0x40, 2, 0, n]) for n in range(3))
    assert sock.sent[0] == b"\x40\x02\x00\x00\x40\x02"


def test_a_full_socket_puts_everything_back() -> None:
    sock = Sock()
    sock.full = True
    c = client_with(sock)
    packets = [bytes([0x40, 2, 0, n]) for n in range(3)]
    for p in packets:
        queue(c, mqtt.PUBACK, p)
    assert c._packet_write() == MQTTErrorCode.MQTT_ERR_AGAIN
    assert [bytes(p["packet"][p["pos"]:]) for p in c._out_packet] == packets
    sock.full = False
    c._packet_write()
    assert b"".join(sock.sent) == b"".join(packets)


def test_qos0_and_disconnect_are_written_by_paho_one_by_one() -> None:
    sock = Sock()
    c = client_with(sock)
    published: list[int] = []
    c.on_publish = lambda *args: published.append(args[2])
    queue(c, mqtt.PUBACK, b"\x40\x02\x00\x01")
    queue(c, mqtt.PUBACK, b"\x40\x02\x00\x02")
    info = mqtt.MQTTMessageInfo(9)
    c._out_packet.append({"command": mqtt.PUBLISH, "mid": 9, "qos": 0, "pos": 0, "to_process": 5,
                          "packet": bytearray(b"\x30\x03\x00\x01t"), "info": info})
    queue(c, mqtt.PUBACK, b"\x40\x02\x00\x03")
    c._packet_write()
    assert sock.sent == [b"\x40\x02\x00\x01\x40\x02\x00\x02", b"\x30\x03\x00\x01t", b"\x40\x02\x00\x03"]
    assert published == [9] and info.is_published()


def test_one_send_is_bounded() -> None:
    sock = Sock()
    c = client_with(sock)
    body = b"x" * 1000
    packet = bytes([0x32, 0xEE, 0x07]) + body[:1006 - 3] + b"\x00\x01"  # ~1 KB each
    for _ in range(200):
        queue(c, mqtt.PUBLISH | 2, packet)
    c._packet_write()
    assert b"".join(sock.sent) == packet * 200
    assert len(sock.sent) > 1 and max(len(s) for s in sock.sent) <= COALESCE_BYTES + len(packet)


def test_sends_count_as_traffic_for_the_link_tracking() -> None:
    sock = Sock()
    c = client_with(sock)
    queue(c, mqtt.PUBACK, b"\x40\x02\x00\x01")
    queue(c, mqtt.PUBACK, b"\x40\x02\x00\x02")
    before: Any = c.last_out
    c._packet_write()
    assert c.last_out > before
