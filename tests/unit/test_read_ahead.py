"""TrackedClient's read-ahead (`buffer_reads`, set by the network pump): paho reads a packet in several
small receives; one receive of up to RECV_CHUNK serves them, and `buffered()` tells the pump what select()
cannot see. Over a real socket pair (plain TCP: the TLS layer below is not what is tested here)."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.connection.adapter import RECV_CHUNK, TrackedClient
from agent.connection.pump import Pump


def publish_packet(topic: str, payload: bytes) -> bytes:
    """An MQTT 3.1.1 QoS 0 PUBLISH."""
    body = len(topic).to_bytes(2, "big") + topic.encode() + payload
    length, n = b"", len(body)
    while True:
        n, digit = divmod(n, 128)
        length += bytes([digit | (0x80 if n else 0)])
        if not n:
            break
    return bytes([0x30]) + length + body


class Counting(socket.socket):
    """A socket that counts its receives."""

    receives = 0

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        self.receives += 1
        return super().recv(bufsize, flags)


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, Counting]]:
    a, b = socket.socketpair()
    ours = Counting(fileno=b.detach())
    ours.setblocking(False)
    yield a, ours
    a.close()
    ours.close()


def client_on(sock: socket.socket, read_ahead: bool) -> tuple[TrackedClient, list[tuple[str, bytes]]]:
    c = TrackedClient(CallbackAPIVersion.VERSION2, client_id="t")
    c.buffer_reads = read_ahead
    c._sock = sock  # type: ignore[assignment]
    got: list[tuple[str, bytes]] = []
    c.on_message = lambda client, userdata, msg: got.append((msg.topic, msg.payload))
    return c, got


@pytest.mark.parametrize("read_ahead", [True, False])
def test_packets_that_arrive_together_are_all_delivered_in_order(pair: tuple[socket.socket, Counting],
                                                                 read_ahead: bool) -> None:
    peer, ours = pair
    sent = [(f"command///req/{i}/ping", b"x" * size) for i, size in enumerate((0, 5, 200, 3000))]
    peer.sendall(b"".join(publish_packet(t, p) for t, p in sent))
    c, got = client_on(ours, read_ahead)
    # paho's loop_read takes one packet per call when nothing is in flight; the pump calls it again while
    # buffered() says bytes are waiting, without waiting in select().
    for _ in range(10):
        assert c.loop_read() == mqtt.MQTT_ERR_SUCCESS
        if len(got) == len(sent):
            break
    assert got == sent
    assert c.buffered() == 0
    if read_ahead:
        assert ours.receives <= 3  # one read for all four (the rest: finding the socket empty)
    else:
        assert ours.receives >= 4 * 3  # command byte, length byte(s), body: for each packet


def test_buffered_counts_what_paho_has_not_taken_yet(pair: tuple[socket.socket, Counting]) -> None:
    peer, ours = pair
    first, second = publish_packet("a/b", b"1"), publish_packet("a/b", b"22")
    peer.sendall(first + second)
    c, got = client_on(ours, True)
    assert c.buffered() == 0
    c._packet_read()  # one packet
    assert got == [("a/b", b"1")]
    assert c.buffered() == len(second)
    c._packet_read()
    assert got == [("a/b", b"1"), ("a/b", b"22")]
    assert c.buffered() == 0


def test_a_body_larger_than_one_receive_is_read_whole(pair: tuple[socket.socket, Counting]) -> None:
    peer, ours = pair
    payload = bytes(range(256)) * (3 * RECV_CHUNK // 256)
    packet = publish_packet("big", payload)
    c, got = client_on(ours, True)
    peer.setblocking(False)
    view = memoryview(packet)
    for _ in range(1000):  # bounded: the socket buffer takes it in pieces
        if view:
            try:
                view = view[peer.send(view):]
            except BlockingIOError:
                pass
        c.loop_read()
        if got:
            break
    assert got == [("big", payload)]


def test_bytes_read_ahead_from_a_closed_link_never_reach_the_next_one(pair: tuple[socket.socket, Counting]) -> None:
    peer, ours = pair
    peer.sendall(publish_packet("old", b"1") + publish_packet("old", b"2"))
    c, got = client_on(ours, True)
    c._packet_read()
    assert c.buffered() > 0
    new_peer, new_sock = socket.socketpair()
    try:
        new_sock.setblocking(False)
        c._sock = new_sock  # type: ignore[assignment]  # what a reconnect does
        assert c.buffered() == 0
        new_peer.sendall(publish_packet("new", b"3"))
        c._packet_read()
        assert got == [("old", b"1"), ("new", b"3")]
    finally:
        new_peer.close()
        new_sock.close()


def test_the_peer_closing_is_still_seen_after_the_buffered_bytes(pair: tuple[socket.socket, Counting]) -> None:
    peer, ours = pair
    peer.sendall(publish_packet("last", b"words"))
    peer.shutdown(socket.SHUT_WR)
    c, got = client_on(ours, True)
    assert c._packet_read() == mqtt.MQTT_ERR_SUCCESS
    assert got == [("last", b"words")]
    assert c._packet_read() == mqtt.MQTT_ERR_CONN_LOST
    assert c.link_error == "closed by the peer"


def test_the_pump_does_not_wait_in_select_while_bytes_are_read_ahead(pair: tuple[socket.socket, Counting]) -> None:
    peer, ours = pair
    c, got = client_on(ours, False)
    pump = Pump(c, lambda owner: True)
    assert c.buffer_reads  # the pump turns read-ahead on
    peer.sendall(publish_packet("a", b"1") + publish_packet("a", b"2"))
    assert pump.turn(5.0) == mqtt.MQTT_ERR_SUCCESS  # the socket is readable: one packet (nothing in flight)
    assert got == [("a", b"1")]
    assert c.buffered() > 0  # the second is read ahead: select() would see nothing on the socket
    started = time.monotonic()
    assert pump.turn(5.0) == mqtt.MQTT_ERR_SUCCESS
    assert time.monotonic() - started < 1.0
    assert got == [("a", b"1"), ("a", b"2")]
