"""The send window between the stored outbound queue (agent/state/store.py) and the MQTT client.

Every QoS 1 message is on disk in the store's outbound queue before it is handed over (the store says
so by giving it an id) and deleted there once the broker's PUBACK arrives, so neither a crash nor a power
cut loses one: at the next start every row left is sent again, oldest first (a message re-sent after a
crash is harmless, a lost one is not). Messages published while the link is down are not handed to paho
at all (paho would keep them in memory and re-send them itself after the reconnect, and they would go a
second time); they wait and go out oldest first after the next CONNACK, at most `window` in flight.
Messages without an id were not stored (the disk failed: a 503 is answered without it); they live in
memory only. The window is bounded: on overflow the oldest waiting messages are dropped, with a log line.

Threads: `put`/`adopt` run on worker threads, everything else on the network thread. `acked` is called
from inside paho's on_publish (paho holds its own locks there), so it only appends to a deque;
`pump`, called by the network loop between paho calls, does the bookkeeping.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

from agent.state.store import OutMessage, StateStore

log = logging.getLogger(__name__)

# Acknowledged rows are deleted in batches: the hot path stays one durable write per message, and a
# deletion lost in a cut only sends a message once more.
DELETE_BATCH = 64
DELETE_DELAY = 0.25
DROP_LOG_INTERVAL = 60.0
# While the size keeps changing, listeners hear of it at most this often (changes to/from 0 at once).
REPORT_INTERVAL = 1.0


@dataclass
class _Entry:
    msg: OutMessage  # msg.id: its row in the store; None: memory only
    created: float


def _noop(_: int) -> None:
    pass


class Outbox:
    """Bounded, persistent, ordered queue of responses between the dispatcher and the MQTT client."""

    def __init__(
        self,
        store: StateStore | None,
        max_messages: int,
        *,
        window: int = 100,
        wall: Callable[[], float] = time.time,
        clock: Callable[[], float] = time.monotonic,
        report_interval: float = REPORT_INTERVAL,
    ) -> None:
        self.store = store
        self.report_interval = report_interval
        self.max_messages = max_messages
        self.window = max(1, window)
        self._wall = wall
        self._clock = clock
        self._send: Callable[[OutMessage], int | None] | None = None
        self._on_size: Callable[[int], None] = _noop
        self._on_dropped: Callable[[int], None] = _noop
        self._lock = threading.Lock()
        self._report_lock = threading.Lock()
        self._pending: deque[_Entry] = deque()  # not yet handed to the client, oldest first
        self._handed: dict[int, _Entry] = {}  # message id -> entry the client holds until PUBACK
        self._acks: deque[int] = deque()
        self._to_delete: list[int] = []
        self._delete_since = 0.0
        self._link_up = False
        self._size = 0
        self._reported = -1
        self._reported_at = 0.0
        self._dropped_unlogged = 0
        self._drop_logged_at: float | None = None
        self.dropped_total = 0
        if store is not None:
            for msg in store.queued_messages():
                self._pending.append(_Entry(msg, wall()))
        self._size = len(self._pending)
        if self._size:
            log.info("%d message(s) from an earlier run wait in the outbound queue; they are sent after the connect",
                     self._size)

    # --- wiring --------------------------------------------------------------------------------

    def bind(
        self,
        send: Callable[[OutMessage], int | None],
        on_size: Callable[[int], None] = _noop,
        on_dropped: Callable[[int], None] = _noop,
    ) -> None:
        """Connect the outbox to the MQTT client: `send` hands a message over and returns its
        message id (None if the client refused it)."""
        self._send = send
        self._on_size = on_size
        self._on_dropped = on_dropped
        self._report()

    @property
    def size(self) -> int:
        """Responses not yet acknowledged by the broker (waiting or in flight)."""
        return self._size

    @property
    def waiting(self) -> int:
        """Responses not yet handed to the client."""
        return len(self._pending)

    # --- any thread ----------------------------------------------------------------------------

    def put(self, msg: OutMessage) -> OutMessage:
        """Store `msg` durably (raises if the disk fails), then send it now if the link is up and nothing
        older waits. Returns it with its id."""
        stored = self.store.enqueue_wait([msg])[0] if self.store is not None else msg
        self.adopt([stored])
        return stored

    def put_volatile(self, msg: OutMessage) -> None:
        """Send `msg` without the disk (a 503 when the store cannot take a write): lost if the agent dies."""
        self.adopt([msg])

    def adopt(self, messages: list[OutMessage]) -> None:
        """Take messages the store already holds (or none should: id None) into the send window."""
        dropped: list[_Entry] = []
        with self._lock:
            created = self._wall()
            for msg in messages:
                entry = _Entry(msg, created)
                overflow = self._size + 1 - self.max_messages
                while overflow > 0 and self._pending:
                    dropped.append(self._pending.popleft())
                    overflow -= 1
                self._size += 1
                if not (self._link_up and not self._pending and len(self._handed) < self.window
                        and self._hand(entry)):
                    self._pending.append(entry)
            if dropped:
                self._size -= len(dropped)
                ids = [e.msg.id for e in dropped if e.msg.id is not None]
                if ids and self.store is not None:
                    self.store.delete_messages(ids)  # given up on: not to be sent again after a restart
        if dropped:
            self._log_dropped(dropped)
        self._report()

    # --- network thread ------------------------------------------------------------------------

    def acked(self, mid: int) -> None:
        """The broker acknowledged message `mid` (called inside paho's on_publish: no locks here)."""
        self._acks.append(mid)

    def link_up(self) -> None:
        self._link_up = True

    def link_down(self) -> None:
        self._link_up = False

    def pump(self, force_flush: bool = False) -> None:
        """Account for acknowledgements, delete acknowledged rows in batches, hand waiting responses over."""
        if (not self._acks and not self._to_delete and not (self._link_up and self._pending)
                and not force_flush):
            if self._size != self._reported:
                self._report()  # a change held back while busy
            return
        with self._lock:
            while self._acks:
                entry = self._handed.pop(self._acks.popleft(), None)
                if entry is not None:
                    self._done(entry)
            if self._to_delete and (
                    force_flush or len(self._to_delete) >= DELETE_BATCH
                    or self._clock() - self._delete_since >= DELETE_DELAY):
                self._flush()
            while self._link_up and self._pending and len(self._handed) < self.window:
                if not self._hand(self._pending[0]):
                    break
                self._pending.popleft()
        self._report()

    def close(self) -> None:
        """Write the pending deletions (rows left are sent at the next start)."""
        self.pump(force_flush=True)

    # --- internals -----------------------------------------------------------------------------

    def _hand(self, entry: _Entry) -> bool:
        """Give `entry` to the client (lock held). False if it did not take it (it stays waiting)."""
        if self._send is None:
            return False
        mid = self._send(entry.msg)
        if mid is None:
            return False
        if entry.msg.qos == 0:
            self._done(entry)  # no PUBACK will come; paho sends QoS 0 once
            return True
        self._handed[mid] = entry
        return True

    def _done(self, entry: _Entry) -> None:
        """`entry` is with the broker (lock held): forget it, in the next batch."""
        if entry.msg.id is not None:
            if not self._to_delete:
                self._delete_since = self._clock()
            self._to_delete.append(entry.msg.id)
        self._size -= 1

    def _flush(self) -> None:
        """Hand the batched deletions to the store (lock held)."""
        if self._to_delete and self.store is not None:
            self.store.delete_messages(self._to_delete)
        self._to_delete = []

    def _log_dropped(self, dropped: list[_Entry]) -> None:
        self.dropped_total += len(dropped)
        self._dropped_unlogged += len(dropped)
        now = self._clock()
        if self._drop_logged_at is None or now - self._drop_logged_at >= DROP_LOG_INTERVAL:
            oldest = dropped[0]
            log.warning("outbox full (limits.max_outbox_messages = %d): dropped the %d oldest message(s) waiting "
                        "for the broker, the oldest to %s from %s; the link has been down too long for the backlog",
                        self.max_messages, self._dropped_unlogged, oldest.msg.topic,
                        time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(oldest.created)),
                        extra={"OUTBOX_DROPPED": self._dropped_unlogged})
            self._dropped_unlogged = 0
            self._drop_logged_at = now
        try:
            self._on_dropped(len(dropped))
        except Exception:
            log.exception("outbox listener failed")

    def _report(self) -> None:
        # The report lock makes the last reported value the latest size, whichever thread reports last.
        with self._report_lock:
            size = self._size
            if size == self._reported:
                return
            now = self._clock()
            if size and self._reported > 0 and now - self._reported_at < self.report_interval:
                # Busy: every response moves the size twice; listeners (a gauge, a status line) need the
                # change to and from empty at once and the rest about once a second (the pump reports it).
                return
            self._reported = size
            self._reported_at = now
            try:
                self._on_size(size)
            except Exception:
                log.exception("outbox listener failed")
