"""The network pump's PUBACKs: sent at once by the calling thread, in call order, only for the connection
that is still current, and each one's delay reaches the metric (no broker: a client without a socket stands
in for paho)."""

from __future__ import annotations

import threading
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
    clock.t = 100.25
    pump.send_ack("conn-2", 7, 1, 99.0)
    pump.send_ack("conn-1", 3, 1, 98.0)  # a connection that has ended: the broker redelivers instead
    pump.send_ack("conn-2", 5, 1, 99.5)
    assert client.acked == [(7, 1), (5, 1)]  # handed to paho at once: no turn of the network loop needed
    assert delays == [1.25, 0.75]
    assert pump.turn(0.0) == mqtt.MQTT_ERR_NO_CONN  # no socket: paho is not asked to read or write
    assert client.acked == [(7, 1), (5, 1)]  # each is sent once


def test_acks_from_two_threads_are_each_sent_once_in_the_order_of_the_calls() -> None:
    pump, client, _, _ = make({"c"})
    order: list[int] = []
    lock = threading.Lock()

    def sender(first: int) -> None:
        for mid in range(first, first + 2000, 2):
            with lock:  # the caller's order (the dispatcher releases acks in arrival order under its lock)
                order.append(mid)
                pump.send_ack("c", mid, 1, 0.0)

    threads = [threading.Thread(target=sender, args=(n,)) for n in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [mid for mid, _ in client.acked] == order and len(order) == 2000


def test_the_publishing_thread_writes_through_the_pump() -> None:
    pump, client, _, _ = make(set())
    assert client.on_socket_register_write == pump._write_now  # paho's "I have a packet" hook
    pump.wake()
    pump.wake()  # a pending wake-up is not an error


class Writer(Client):
    """A client whose packets wait in a queue until loop_write, as paho's do."""

    def __init__(self) -> None:
        super().__init__()
        self.queued: list[int] = []
        self.writes: list[list[int]] = []

    def ack(self, mid: int, qos: int) -> None:
        self.queued.append(mid)
        self.on_socket_register_write(self, None, None)  # paho: "a packet waits"

    def want_write(self) -> bool:
        return bool(self.queued)

    def loop_write(self) -> int:
        self.writes.append(self.queued)
        self.queued = []
        return 0


def test_inside_batched_packets_wait_and_leave_together() -> None:
    client = Writer()
    pump = Pump(client, lambda owner: True)  # type: ignore[arg-type]
    pump.send_ack("c", 1, 1, 0.0)
    assert client.writes == [[1]]  # outside a batch: written at once
    with pump.batched():
        for mid in (2, 3, 4):
            pump.send_ack("c", mid, 1, 0.0)
        with pump.batched():  # nested: only the outermost block writes
            pump.send_ack("c", 5, 1, 0.0)
        assert client.writes == [[1]]
    assert client.writes == [[1], [2, 3, 4, 5]]
    seen: list[list[int]] = []

    def other_thread() -> None:  # the batch is per thread: another thread still writes at once
        pump.send_ack("c", 7, 1, 0.0)
        seen.append(client.writes[-1])

    with pump.batched():
        t = threading.Thread(target=other_thread)
        t.start()
        t.join()
    assert seen == [[7]]
