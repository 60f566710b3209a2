"""Persistent outbox for responses (SQLite in `state_dir`): nothing is lost while the link is down.

Every QoS 1 response is written here before it is handed to the MQTT client and deleted when the
broker's PUBACK arrives, so a crash or restart of the agent loses none: at the next start every
row left is sent again, oldest first (a response re-sent after a crash is harmless, a lost one is
not). Responses published while the link is down are not handed to paho at all (paho would keep
them in memory and re-send them itself after the reconnect, and the outbox would send them a second
time); they wait here and go out oldest first after the next CONNACK, at most `window` in flight.
The outbox is bounded: on overflow the oldest waiting responses are dropped, with a log line.

Responses to journalled commands are not written here a second time: the command journal already
holds them (agent/store.py, `delivered` = 0 until acknowledged), so they live here in memory only,
the journal is told when the broker has them, and after a crash the dispatcher re-sends them from
the journal. Everything else (rejections such as 404 or 429) is stored in this file.

Poison messages (agent/connection/poison.py): a message the session cannot send at all (over the
size limit, no 500 fits in its place) is set aside at hand-off; one after which the broker drops
the connection each time is set aside after a few tries (`poison_check`, at each connection's end).
Both are logged (at most one line per LOG_EVERY s) and counted (`on_set_aside`).

Threads: `put` runs on worker threads, everything else on the network thread. `acked` is called
from inside paho's on_publish (paho holds its own locks there), so it only appends to a deque;
`pump`, called by the network loop between paho calls, does the bookkeeping.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Protocol

from agent.connection import poison
from agent.logs import untrusted

log = logging.getLogger(__name__)

# Acknowledged rows are deleted in batches: after a crash at most this many responses (or this
# much time's worth) are sent a second time, and the hot path stays one INSERT per response.
DELETE_BATCH = 64
DELETE_DELAY = 0.25
DROP_LOG_INTERVAL = 60.0
# While the size keeps changing, listeners hear of it at most this often (changes to/from 0 at once).
REPORT_INTERVAL = 1.0
LOG_EVERY = 10.0  # set-aside messages: at most one log line per this many seconds (the rest are counted)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq      INTEGER PRIMARY KEY AUTOINCREMENT,
    created  REAL NOT NULL,
    topic    TEXT NOT NULL,
    payload  BLOB NOT NULL,
    qos      INTEGER NOT NULL,
    content_type TEXT,
    correlation  BLOB,
    user_props   TEXT
);
"""


@dataclass(frozen=True)
class OutMessage:
    """A message to publish, in the agent's own terms (paho Properties are built at hand-off)."""

    topic: str
    payload: bytes
    qos: int = 1
    correlation_data: bytes | None = None
    user_properties: tuple[tuple[str, str], ...] = ()
    content_type: str | None = None
    journal_key: str | None = None  # the command journal holds this response durably


class Journal(Protocol):
    """Where journal-backed responses are recorded as acknowledged (agent.store.CommandStore)."""

    def mark_delivered(self, keys: list[str]) -> None: ...


@dataclass
class _Entry:
    seq: int | None  # row in this file; None for a journal-backed response
    msg: OutMessage
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
        path: Path,
        max_messages: int,
        *,
        window: int = 100,
        wall: Callable[[], float] = time.time,
        clock: Callable[[], float] = time.monotonic,
        journal: Journal | None = None,
        report_interval: float = REPORT_INTERVAL,
    ) -> None:
        self.path = path
        self.report_interval = report_interval
        self._journal = journal
        self._journal_refs: dict[str, int] = {}  # journal key -> its messages not yet acknowledged
        self._to_mark: list[str] = []  # journal keys acknowledged, to record in a batch
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
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)  # responses may carry device data: 0600
        os.close(fd)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a commit survives a process crash; only an OS crash may lose the last ones.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA cache_size=-256")  # rows live briefly; a big page cache only grows RSS
        self._db.executescript(_SCHEMA)
        for seq, created, *fields in self._db.execute(
            "SELECT seq, created, topic, payload, qos, content_type, correlation, user_props FROM outbox ORDER BY seq"
        ):
            self._pending.append(_Entry(int(seq), _message(*fields), float(created)))
        self._size = len(self._pending)
        if self._size:
            log.info("%d response(s) from an earlier run wait in the outbox; they are sent after the connect",
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

    def put(self, msg: OutMessage) -> None:
        """Store `msg` and send it now if the link is up and nothing older waits."""
        dropped: list[_Entry] = []
        with self._lock:
            created = self._wall()
            if msg.journal_key is not None and self._journal is not None:
                entry = _Entry(None, msg, created)
                self._journal_refs[msg.journal_key] = self._journal_refs.get(msg.journal_key, 0) + 1
            else:
                cur = self._db.execute(
                    "INSERT INTO outbox (created, topic, payload, qos, content_type, correlation, user_props)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (created, msg.topic, msg.payload, msg.qos, msg.content_type, msg.correlation_data,
                     json.dumps(msg.user_properties) if msg.user_properties else None),
                )
                entry = _Entry(int(cur.lastrowid or 0), msg, created)
            overflow = self._size + 1 - self.max_messages
            while overflow > 0 and self._pending:
                dropped.append(self._pending.popleft())
                overflow -= 1
            if dropped:
                stored = [(e.seq,) for e in dropped if e.seq is not None]
                if stored:
                    self._db.executemany("DELETE FROM outbox WHERE seq = ?", stored)
                for e in dropped:
                    self._settle_journal(e)  # given up on: not to be sent again after a restart
            self._size += 1 - len(dropped)
            if not (self._link_up and not self._pending and len(self._handed) < self.window and self._hand(entry)):
                self._pending.append(entry)
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
        if (not self._acks and not self._to_delete and not self._to_mark and not (self._link_up and self._pending)
                and not force_flush):
            if self._size != self._reported:
                self._report()  # a change held back while busy
            return
        with self._lock:
            while self._acks:
                entry = self._handed.pop(self._acks.popleft(), None)
                if entry is not None:
                    self._done(entry)
            if (self._to_delete or self._to_mark) and (
                    force_flush or len(self._to_delete) + len(self._to_mark) >= DELETE_BATCH
                    or self._clock() - self._delete_since >= DELETE_DELAY):
                self._flush()
            while self._link_up and self._pending and len(self._handed) < self.window:
                if not self._hand(self._pending[0]):
                    break
                self._pending.popleft()
        self._report()

    def close(self) -> None:
        """Write the pending deletions and close the database (rows left are sent at the next start)."""
        self.pump(force_flush=True)
        with self._lock:
            self._db.close()

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
        if not self._to_delete and not self._to_mark:
            self._delete_since = self._clock()
        if entry.seq is not None:
            self._to_delete.append(entry.seq)
        else:
            self._settle_journal(entry)
        self._size -= 1

    # --- poison messages (issue 17): the only part that knows about strikes -------------------------
    # (When the outbox becomes agent/state's outbound queue, `tries`/`sent_at` become its attempts
    # counter and `_set_aside` its set_aside(id, reason); poison.judge stays the decision.)

    def poison_check(self, expected_end: bool) -> str:
        """The connection ended (network thread, outside paho's callbacks, before the next connect):
        count a strike against the oldest message the broker has not acknowledged if it was sent just before, and set it
        aside after poison.POISON_TRIES. Returns a description of the suspect for the classifier
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
        (once), anything else is dropped."""
        msg = entry.msg
        self.set_aside_total += 1
        substitute = None
        if not entry.replaced and reason == poison.POISON:
            substitute = poison.poison_response(msg.topic, msg.user_properties, len(msg.payload), tries)
        if substitute is not None:
            entry.msg = replace(msg, topic=substitute.topic, payload=substitute.payload,
                                user_properties=substitute.user_properties, content_type="application/json")
            entry.replaced, entry.tries, entry.sent_at = True, 0, None
            if entry.seq is not None:
                props = json.dumps(entry.msg.user_properties) if entry.msg.user_properties else None
                self._db.execute("UPDATE outbox SET topic = ?, payload = ?, content_type = ?, user_props = ? "
                                 "WHERE seq = ?", (entry.msg.topic, entry.msg.payload, entry.msg.content_type,
                                                   props, entry.seq))
            self._pending.appendleft(entry)
            outcome = f"answered with a 500 on '{untrusted(entry.msg.topic, 120)}' instead"
        else:
            self._done(entry)
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

    def _settle_journal(self, entry: _Entry) -> None:
        key = entry.msg.journal_key
        if entry.seq is not None or key is None:
            return
        left = self._journal_refs.get(key, 1) - 1
        if left > 0:
            self._journal_refs[key] = left  # an MQTT 5 request is answered on two topics
            return
        self._journal_refs.pop(key, None)
        if not self._to_delete and not self._to_mark:
            self._delete_since = self._clock()
        self._to_mark.append(key)

    def _flush(self) -> None:
        """Write the batched deletions and journal acknowledgements (lock held)."""
        if self._to_delete:
            self._db.execute("BEGIN")
            self._db.executemany("DELETE FROM outbox WHERE seq = ?", [(s,) for s in self._to_delete])
            self._db.execute("COMMIT")
            self._to_delete.clear()
        if self._to_mark and self._journal is not None:
            try:
                self._journal.mark_delivered(self._to_mark)
            except Exception:
                log.exception("could not record %d acknowledged response(s) in the journal", len(self._to_mark))
            self._to_mark.clear()

    def _log_dropped(self, dropped: list[_Entry]) -> None:
        self.dropped_total += len(dropped)
        self._dropped_unlogged += len(dropped)
        now = self._clock()
        if self._drop_logged_at is None or now - self._drop_logged_at >= DROP_LOG_INTERVAL:
            oldest = dropped[0]
            log.warning("outbox full (limits.max_outbox_messages = %d): dropped the %d oldest response(s) waiting "
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


def _message(topic: object, payload: object, qos: object, content_type: object, correlation: object,
             user_props: object) -> OutMessage:
    def blob(value: object) -> bytes | None:
        return bytes(value) if isinstance(value, (bytes, bytearray, memoryview)) else None

    return OutMessage(
        topic=str(topic),
        payload=blob(payload) or b"",
        qos=int(qos),  # type: ignore[call-overload]
        correlation_data=blob(correlation),
        user_properties=tuple((str(k), str(v)) for k, v in json.loads(str(user_props))) if user_props else (),
        content_type=str(content_type) if content_type is not None else None,
    )
