"""The network pump: who touches the socket, and when.

The session owns the network thread; each turn of its loop calls `Pump.turn`, which waits in select()
for the socket or a wake-up, then lets paho read, write and keep time under the I/O lock. One thread
at a time touches the TLS socket (an SSL object is not safe for concurrent use): a worker that publishes
while the network thread sleeps in select() writes the packet itself, under the same lock, which saves
waking that thread (a cross-CPU wake-up) for every response.

PUBACKs go through here too: `send_ack` (any thread; in practice the thread that made the command
durable, the state writer) hands paho the PUBACK of a connection that `live` says is still the current
one and writes it at once if the network thread is not using the socket, as a publish does; the rest are
dropped (a message id belongs to one connection: after a reconnect the broker redelivers, and the journal
answers the redelivery). Calls are serialised, so PUBACKs leave in the order they were sent; no wake-up
of the network thread is needed for them.

`batched()` (a context, per thread): what the thread queues inside it is written when it ends, together
(the client writes waiting packets in one send: TrackedClient._packet_write). The state writer runs a
commit's callbacks inside it, so the PUBACKs and responses of a group commit leave in one TLS record.
"""

from __future__ import annotations

import contextlib
import logging
import select
import ssl
import threading
import time
from collections.abc import Iterator
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
        self._ack_lock = threading.Lock()  # PUBACKs enter paho's queue in the order they were sent
        self._io_lock = threading.Lock()
        self._batching = threading.local()  # .depth: inside batched() on this thread
        self._wakeup = WakeUp()
        client.on_socket_register_write = self._write_now
        # A client that can read ahead (TrackedClient) does so: this loop asks it what it holds before select().
        self._buffered: Callable[[], int] = getattr(client, "buffered", lambda: 0)
        if hasattr(client, "buffer_reads"):
            client.buffer_reads = True

    def wake(self) -> None:
        """Any thread: make the network thread's select() return now."""
        self._wakeup.set()

    def send_ack(self, conn: object, mid: int, qos: int, received: float) -> None:
        """Any thread: acknowledge `mid` of `conn` now (written by this thread if the socket is free, else by
        the network thread before it sleeps again); nothing if `conn` is no longer the live connection."""
        with self._ack_lock:
            if not self._live(conn):
                return
            self._client.ack(mid, qos)
        if self._on_ack_delay is not None:
            self._on_ack_delay(self._clock() - received)

    def turn(self, timeout: float) -> int:
        """Network thread: wait up to `timeout` for the socket (or a wake-up), let paho do its part. paho's
        result code of the turn (MQTT_ERR_SUCCESS, or why the socket is gone)."""
        return self._loop_once(timeout)

    def _loop_once(self, timeout: float) -> int:
        """Wait for the socket (or a wake-up), then let paho read, write and keep time, under the I/O
        lock. The same steps as paho's loop(), on paho's external-loop API."""
        client = self._client
        sock = client.socket()
        if sock is None:
            return int(mqtt.MQTT_ERR_NO_CONN)
        # Bytes select() cannot see: read ahead by the client, or decrypted and held by the TLS layer.
        pending = self._buffered() or (sock.pending() if isinstance(sock, ssl.SSLSocket) else 0)
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

    @contextlib.contextmanager
    def batched(self) -> Iterator[None]:
        """Any thread: packets queued inside are written when the (outermost) block ends, in one send."""
        depth = getattr(self._batching, "depth", 0)
        self._batching.depth = depth + 1
        try:
            yield
        finally:
            self._batching.depth = depth
            if depth == 0 and self._client.want_write():
                self._write(self._client)

    def _write_now(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        """paho has a packet to write (called in the publishing thread): write it now if the network
        thread is not using the socket; otherwise that thread writes it before it sleeps again. Inside
        `batched()`, when the block ends."""
        if getattr(self._batching, "depth", 0):
            return
        self._write(client)

    def _write(self, client: mqtt.Client) -> None:
        if self._io_lock.acquire(blocking=False):
            try:
                client.loop_write()
            except Exception:
                log.debug("writing from the publishing thread failed", exc_info=True)
            finally:
                self._io_lock.release()
