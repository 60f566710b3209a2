"""The network pump: who touches the socket, and when.

The session owns the network thread; each turn of its loop calls `Pump.turn`, which waits in select()
for the socket or a wake-up, then lets paho read, write and keep time under the I/O lock. One thread
at a time touches the TLS socket (an SSL object is not safe for concurrent use): a worker that publishes
while the network thread sleeps in select() writes the packet itself, under the same lock, which saves
waking that thread (a cross-CPU wake-up) for every response.

PUBACKs are sent from here too, on the network thread: `queue_ack` (any thread) hands over
(connection, mid); `turn` sends, in the order they became durable, those of a connection that `live`
says is still the current one, and drops the rest (a message id belongs to one connection: after a reconnect the broker
redelivers, and the journal answers the redelivery).
"""

from __future__ import annotations

import logging
import select
import ssl
import threading
import time
from collections import deque
from typing import Any, Callable

import paho.mqtt.client as mqtt

from agent.wakeup import WakeUp

log = logging.getLogger(__name__)


class Pump:
    """select(), the I/O lock, the wake-up pipe and the PUBACK queue of one paho client."""

    def __init__(self, client: mqtt.Client, live: Callable[[object], bool], *,
                 clock: Callable[[], float] = time.monotonic,
                 on_ack_delay: Callable[[float], None] | None = None) -> None:
        self._client = client
        self._live = live  # is this connection (an Ack's owner) the current one, and not ended?
        self._clock = clock
        self._on_ack_delay = on_ack_delay  # seconds from a command's receipt to its PUBACK (a metric)
        self._acks: deque[tuple[object, int, int, float]] = deque()  # (connection, mid, qos, received)
        self._ack_wake_pending = False  # a wake-up for queued acks is on its way: later acks need none
        self._io_lock = threading.Lock()
        self._wakeup = WakeUp()
        client.on_socket_register_write = self._write_now

    def wake(self) -> None:
        """Any thread: make the network thread's select() return now."""
        self._wakeup.set()

    def queue_ack(self, conn: object, mid: int, qos: int, received: float) -> None:
        """Any thread: acknowledge `mid` of `conn` from the network thread, soon."""
        self._acks.append((conn, mid, qos, received))
        if not self._ack_wake_pending:  # a batch of commits acks many commands: one wake-up (a syscall) for all
            self._ack_wake_pending = True
            self.wake()

    def turn(self, timeout: float) -> int:
        """Network thread: send the PUBACKs that are due, wait up to `timeout` for the socket, let paho do
        its part, and send what became durable meanwhile. paho's result code of the turn (MQTT_ERR_SUCCESS,
        or why the socket is gone)."""
        self._send_acks()
        rc = self._loop_once(timeout)
        self._send_acks()
        return rc

    def _send_acks(self) -> None:
        """PUBACK the commands that are durable now, in the order they became so."""
        observe = self._on_ack_delay
        self._ack_wake_pending = False  # before draining: an ack queued after this line wakes the loop again
        while self._acks:
            owner, mid, qos, received = self._acks.popleft()
            if self._live(owner):
                self._client.ack(mid, qos)
                if observe is not None:
                    observe(self._clock() - received)

    def _loop_once(self, timeout: float) -> int:
        """Wait for the socket (or a wake-up), then let paho read, write and keep time, under the I/O
        lock. The same steps as paho's loop(), on paho's external-loop API."""
        client = self._client
        sock = client.socket()
        if sock is None:
            return int(mqtt.MQTT_ERR_NO_CONN)
        pending = sock.pending() if isinstance(sock, ssl.SSLSocket) else 0  # decrypted bytes select() cannot see
        try:
            watched: list[Any] = [sock, self._wakeup]  # anything with fileno()
            readable, _, _ = select.select(watched, [sock] if client.want_write() else [], [],
                                           0.0 if pending else timeout)
        except (OSError, ValueError):
            readable = [sock]  # closed under us: the read below reports it
        if self._wakeup in readable:
            self._wakeup.drain()
        with self._io_lock:
            if sock in readable or pending:
                rc = client.loop_read()
                if rc or client.socket() is None:
                    return int(rc)
            if client.want_write():
                rc = client.loop_write()
                if rc or client.socket() is None:
                    return int(rc)
            return int(client.loop_misc())

    def _write_now(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        """paho has a packet to write (called in the publishing thread): write it now if the network
        thread is not using the socket; otherwise that thread writes it before it sleeps again."""
        if self._io_lock.acquire(blocking=False):
            try:
                client.loop_write()
            except Exception:
                log.debug("writing from the publishing thread failed", exc_info=True)
            finally:
                self._io_lock.release()
