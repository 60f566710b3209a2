"""TrackedClient reads an MQTT 3.1.1 PUBACK without paho's per-packet ReasonCode and Properties: on_publish
still hears each acknowledged message once, with success; MQTT 5 PUBACKs (which carry a reason) and
malformed ones still go through paho. Over a real socket pair."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.connection.adapter import TrackedClient


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    b.setblocking(False)
    yield a, b
    a.close()
    b.close()


def client_on(sock: socket.socket, protocol: int) -> tuple[TrackedClient, list[tuple[int, int, str]], list[int]]:
    c = TrackedClient(CallbackAPIVersion.VERSION2, client_id="t", protocol=protocol)
    heard: list[tuple[int, int, str]] = []

    def on_publish(client: Any, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        heard.append((mid, int(reason.value), str(reason)))

    c.on_publish = on_publish
    mids = [c.publish(f"command///res/{i}/200", b"{}", qos=1).mid for i in range(3)]  # held until acknowledged
    c._sock = sock  # type: ignore[assignment]
    return c, heard, mids


def read_all(c: TrackedClient) -> None:
    for _ in range(10):
        c.loop_read()


def test_a_311_puback_tells_on_publish_once_with_success(pair: tuple[socket.socket, socket.socket]) -> None:
    peer, ours = pair
    c, heard, mids = client_on(ours, mqtt.MQTTv311)
    peer.sendall(b"".join(b"\x40\x02" + m.to_bytes(2, "big") for m in (mids[1], mids[0], mids[1], 999)))
    read_all(c)
    assert heard == [(mids[1], 0, "Success"), (mids[0], 0, "Success")]  # a repeat and an unknown id: nothing
    assert sorted(c._out_messages) == [mids[2]]


def test_a_malformed_311_puback_is_paho_s_to_refuse(pair: tuple[socket.socket, socket.socket]) -> None:
    peer, ours = pair
    c, heard, mids = client_on(ours, mqtt.MQTTv311)
    peer.sendall(b"\x40\x03" + mids[0].to_bytes(2, "big") + b"\x00")
    assert c._packet_read() == mqtt.MQTT_ERR_PROTOCOL
    assert heard == []


def test_an_mqtt5_puback_keeps_its_reason(pair: tuple[socket.socket, socket.socket]) -> None:
    peer, ours = pair
    c, heard, mids = client_on(ours, mqtt.MQTTv5)
    peer.sendall(b"\x40\x03" + mids[0].to_bytes(2, "big") + b"\x87"  # Not authorized
                 + b"\x40\x02" + mids[1].to_bytes(2, "big"))
    read_all(c)
    assert heard == [(mids[0], 0x87, "Not authorized"), (mids[1], 0, "Success")]
