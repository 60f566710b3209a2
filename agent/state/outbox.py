"""The send window between the stored outbound queue (agent/state/store.py) and the MQTT client.

Every QoS 1 message is on disk in the store's outbound queue before it is handed over (the store says
so by giving it an id) and deleted there once the broker's PUBACK arrives, so neither a crash nor a power
cut loses one: at the next start every row left is sent again, oldest first (a message re-sent after a
crash is harmless, a lost one is not). Messages published while the link is down are not handed to paho
at all (paho would keep them in memory and re-send them itself after the reconnect, and they would go a
second time); they wait and go out oldest first after the next CONNACK, at most `window` in flight.
Messages without an id were not stored (the disk failed: a 503 is answered without it); they live in
memory only. The window is bounded: on overflow the oldest waiting messages are dropped, with a log line.

Poison messages (agent/connection/poison.py): a message the session cannot send at all (over the
size limit, no 500 fits in its place) is set aside at hand-off; one after which the broker drops
the connection each time is set aside after a few tries (`poison_check`, at each connection's end).
A response is answered with a 500 in its place (its stored row is replaced); anything else is marked
set aside in the store (kept for an operator, never sent again). Both are logged (at most one line per
LOG_EVERY s) and counted (`on_set_aside`).

Threads: `put`/`adopt` run on worker threads, everything else on the network thread. `acked` is called
from inside paho's on_publish (paho holds its own locks there), so it only appends to a deque;
`pump`, called by the network loop between paho calls, does the bookkeeping.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, replace
from typing import Callable

from agent.connection import poison
from agent.logs import untrusted
from agent.state.store import OutMessage, StateStore

log = logging.getLogger(__name__)

# Acknowledged rows are deleted in batches: the hot path stays one durable write per message, and a
# deletion lost in a cut only sends a message once more.
DELETE_BATCH = 64
DELETE_DELAY = 0.25
DROP_LOG_INTERVAL = 60.0
# While the size keeps changing, listeners hear of it at most this often (changes to/from 0 at once).
REPORT_INTERVAL = 1.0
LOG_EVERY = 10.0  # set-aside messages: at most one log line per this many seconds (the rest are counted)


@dataclass
class _Entry:
    msg: OutMessage  # msg.id: its row in the store; None: memory only
    created: float
    sent_at: float | None = None  # monotonic: last handed to the client, or re-sent by it at a CONNACK
    tries: int = 0  # connections that ended right after this message was sent (poison strikes)
    replaced: bool = False  # msg is the 500 sent in place of a response that was set aside


def _noop(_: int) -> None:
    pass


def _noop_reason(_: str) -> None:
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
        self.set_aside_total = 0
        self._link_up_at = 0.0
        self._withdraw: Callable[[int], None] = _noop
        self._on_set_aside: Callable[[str], None] = _noop_reason
        self._set_aside_logged_at: float | None = None
        self._set_aside_unlogged = 0
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
        *,
        withdraw: Callable[[int], None] = _noop,
        on_set_aside: Callable[[str], None] = _noop_reason,
    ) -> None:
        """Connect the outbox to the MQTT client: `send` hands a message over and returns its
        message id (None if the client refused it; raises poison.Unsendable if it can never be sent);
        `withdraw(mid)` makes the client forget a message it holds (set aside: not to be re-sent)."""
        self._send = send
        self._on_size = on_size
        self._on_dropped = on_dropped
        self._withdraw = withdraw
        self._on_set_aside = on_set_aside
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
        # Called inside paho's on_connect: no lock here (see `acked`). The client re-sends what it holds
        # right after the CONNACK, so that is when those messages were last sent.
        self._link_up_at = self._clock()
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
        try:
            mid = self._send(entry.msg)
        except poison.Unsendable as exc:
            self._set_aside(entry, exc.reason, exc.detail)
            return True
        if mid is None:
            return False
        entry.sent_at = self._clock()
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

    # --- poison messages (issue 17): `tries`/`sent_at` count strikes, poison.judge decides ------------

    def poison_check(self, expected_end: bool) -> str:
        """The connection ended (network thread, outside paho's callbacks, before the next connect):
        count a strike against the oldest message the broker has not acknowledged if it was sent just before,
        and set it aside after poison.POISON_TRIES. Returns a description of the suspect for the classifier
        ("" if none: then the end had nothing to do with a message)."""
        with self._lock:
            while self._acks:
                done = self._handed.pop(self._acks.popleft(), None)
                if done is not None:
                    self._done(done)
            oldest = next(iter(self._handed.items()), None)
            if oldest is None:
                return ""
            mid, entry = oldest
            sent_ago = None if entry.sent_at is None else self._clock() - max(entry.sent_at, self._link_up_at)
            strike = poison.judge(sent_ago, entry.tries, expected_end=expected_end)
            if not strike.suspect:
                return ""
            entry.tries += 1
            if entry.msg.id is not None and self.store is not None:
                self.store.note_attempts([entry.msg.id])
            described = (f"a {len(entry.msg.payload)}-byte message to '{untrusted(entry.msg.topic, 120)}', sent "
                         f"{sent_ago or 0.0:.1f} s before and not acknowledged (try {entry.tries} of "
                         f"{poison.POISON_TRIES})")
            if strike.set_aside:
                del self._handed[mid]
                self._withdraw(mid)
                self._set_aside(entry, poison.POISON, f"the broker closed the connection each time it was sent "
                                                      f"({entry.tries} tries)", tries=entry.tries)
        return described

    def _set_aside(self, entry: _Entry, reason: str, detail: str, tries: int = 0) -> None:
        """Give up on sending `entry` as it is (lock held): a response is answered with a 500 in its place
        (once, its stored row replaced), anything else is set aside in the store (kept, never sent again)."""
        msg = entry.msg
        self.set_aside_total += 1
        substitute = None
        if not entry.replaced and reason == poison.POISON:
            substitute = poison.poison_response(msg.topic, msg.user_properties, len(msg.payload), tries)
        if substitute is not None:
            entry.msg = replace(msg, topic=substitute.topic, payload=substitute.payload,
                                user_properties=substitute.user_properties, content_type="application/json")
            entry.replaced, entry.tries, entry.sent_at = True, 0, None
            if entry.msg.id is not None and self.store is not None:
                self.store.replace_message(entry.msg)
            self._pending.appendleft(entry)
            outcome = f"answered with a 500 on '{untrusted(entry.msg.topic, 120)}' instead"
        else:
            if msg.id is not None and self.store is not None:
                self.store.set_aside(msg.id, f"{reason}: {detail}", msg.topic, quiet=True)
            self._size -= 1
            outcome = "dropped"
        self._log_set_aside(reason, f"set aside a {len(msg.payload)}-byte message to '{untrusted(msg.topic, 120)}': "
                                    f"{detail}; {outcome}")
        try:
            self._on_set_aside(reason)
        except Exception:
            log.exception("outbox listener failed")

    def _log_set_aside(self, reason: str, text: str) -> None:
        now = self._clock()
        if self._set_aside_logged_at is not None and now - self._set_aside_logged_at < LOG_EVERY:
            self._set_aside_unlogged += 1
            return
        more = f" ({self._set_aside_unlogged} more since the last such line)" if self._set_aside_unlogged else ""
        log.warning("%s%s", text, more, extra={"MQTT_SET_ASIDE": reason})
        self._set_aside_logged_at = now
        self._set_aside_unlogged = 0

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
