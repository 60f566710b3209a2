"""The network pump's PUBACK queue: acknowledgements leave in the order they became durable, only for the
connection that is still current, once each, and each one's delay reaches the metric (no broker: a client
without a socket stands in for paho)."""

from __future__ import annotations

from typing import Any

import paho.mqtt.client as mqtt

from agent.connection.pump import Pump
from tests.support.clock import FakeClock


class Client:
    """What the pump calls on a paho client, recorded."""

    on_socket_register_write: Any = None

    def __init__(self) -> None:
        self.acked: list[tuple[int, int]] = []

    def ack(self, mid: int, qos: int) -> None:
        self.acked.append((mid, qos))

    def socket(self) -> None:
        return None


def make(live: set[str]) -> tuple[Pump, Client, list[float], FakeClock]:
    client, delays, clock = Client(), [], FakeClock(100.0)
    pump = Pump(client, lambda owner: owner in live, clock=clock, on_ack_delay=delays.append)  # type: ignore[arg-type]
    return pump, client, delays, clock


def test_acks_of_the_live_connection_leave_in_order_with_their_delay() -> None:
    pump, client, delays, clock = make({"conn-2"})
    pump.queue_ack("conn-2", 7, 1, 99.0)
    pump.queue_ack("conn-1", 3, 1, 98.0)  # a connection that has ended: the broker redelivers instead
    pump.queue_ack("conn-2", 5, 1, 99.5)
    clock.t = 100.25
    assert pump.turn(0.0) == mqtt.MQTT_ERR_NO_CONN  # no socket: paho is not asked to read or write
    assert client.acked == [(7, 1), (5, 1)]
    assert delays == [1.25, 0.75]
    pump.turn(0.0)
    assert client.acked == [(7, 1), (5, 1)]  # each is sent once


def test_the_publishing_thread_writes_through_the_pump() -> None:
    pump, client, _, _ = make(set())
    assert client.on_socket_register_write == pump._write_now  # paho's "I have a packet" hook
    pump.wake()
    pump.wake()  # a pending wake-up is not an error
