"""The send window between the stored outbound queue (agent/state/store.py) and the MQTT client.

Every QoS 1 message is on disk in the store's outbound queue before it is handed over (the store says
so by giving it an id) and deleted there once the broker's PUBACK arrives, so neither a crash nor a power
cut loses one: at the next start every row left is sent again, oldest first (a message re-sent after a
crash is harmless, a lost one is not). Messages published while the link is down are not handed to paho
at all (paho would keep them in memory and re-send them itself after the reconnect, and they would go a
second time); they wait and go out oldest first after the next CONNACK, at most `window` in flight.
Messages without an id were not stored (the disk failed: a 503 is answered without it); they live in
memory only. The window is bounded: on overflow the oldest waiting messages are dropped, with a log line.

Poison messages (agent/state/poison.py): a message the session cannot send at all (over the
size limit, no 500 fits in its place) is set aside at hand-off; one after which the broker drops
the connection each time is set aside after a few tries (`poison_check`, at each connection's end).
A response is answered with a 500 in its place (its stored row is replaced); anything else is marked
set aside in the store (kept for an operator, never sent again). Both are logged (at most one line per
LOG_EVERY s) and counted (`on_set_aside`).

Telemetry and events (from the local API and [forward.local]) share this window with the command
responses, in one order, but have their own bounds (`PublishLimits`: [publish] max_messages,
max_bytes, max_age) and policies: `admit` checks them before anything is written, so a message is
either refused (`QueueFull`, answered 507) or durable before its caller hears "accepted". Telemetry
makes room by dropping the oldest waiting telemetry (counted per reason); events are never dropped to
make room (a new event is refused instead). Messages past their ttl or past max_age are dropped before
they are handed to the client, counted. Responses keep their own bound (limits.max_outbox_messages).

Threads: `put`/`adopt`/`admit` run on worker threads (`admit_many`'s callback and `adopt` also on the
store's writer thread), everything else on the network thread. `acked` is called
from inside paho's on_publish (paho holds its own locks there), so it only appends to a deque;
`pump`, called by the network loop between paho calls, does the bookkeeping.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Callable

from agent.logtext import untrusted
from agent.state import poison
from agent.state.store import OutMessage, StateStore
from agent.state.writer import Outcome

log = logging.getLogger(__name__)

# Acknowledged rows are deleted in batches: the hot path stays one durable write per message, and a
# deletion lost in a cut only sends a message once more.
DELETE_BATCH = 64
DELETE_DELAY = 0.25
DROP_LOG_INTERVAL = 60.0
# While the size keeps changing, listeners hear of it at most this often (changes to/from 0 at once).
REPORT_INTERVAL = 1.0
ADMIT_TIMEOUT = 60.0  # s: `admit` waits this long for the store's commit
LOG_EVERY = 10.0  # set-aside messages: at most one log line per this many seconds (the rest are counted)


PUBLISH_KINDS = ("telemetry", "event")
# Why a telemetry message or event was not sent (the `reason` label of mqtt_agent_publish_dropped_total).
DROP_REASONS = ("queue_full", "ttl", "max_age")
_PENDING, _HANDED, _GONE = 0, 1, 2


@dataclass(frozen=True)
class PublishLimits:
    """[publish] bounds of the telemetry/event queue (together: both kinds count)."""

    max_messages: int = 100_000
    max_bytes: int = 32 * 1024 * 1024
    max_age: float = 7 * 86400.0


class QueueFull(Exception):
    """The queue cannot take these messages under its policy; `limit` names the bound (a config key)."""

    def __init__(self, limit: str, value: int, message: str) -> None:
        super().__init__(message)
        self.limit = limit
        self.value = value


@dataclass(eq=False)
class _Entry:
    msg: OutMessage  # msg.id: its row in the store; None: memory only
    created: float
    state: int = _PENDING
    size: int = field(default=0)
    sent_at: float | None = None  # monotonic: last handed to the client, or re-sent by it at a CONNACK
    tries: int = 0  # connections that ended right after this message was sent (poison strikes)
    replaced: bool = False  # msg is the 500 sent in place of a response that was set aside


def _klass(kind: str) -> str:
    """Bound classes: each publish kind on its own queue of entries, the command answers together."""
    return kind if kind in PUBLISH_KINDS else "command"


def message_bytes(msg: OutMessage) -> int:
    """What a message counts against [publish] max_bytes: its payload and topic."""
    return len(msg.payload) + len(msg.topic)


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
        limits: PublishLimits | None = None,
    ) -> None:
        self.store = store
        self.limits = limits or PublishLimits()
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
        self._stats_lock = threading.Lock()  # the drop counters and their summary log line (any thread)
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
        # Per bound class, the entries not yet with the broker (waiting or in flight), oldest first;
        # entries that went (acknowledged, dropped) are removed lazily from the front.
        self._classes: dict[str, deque[_Entry]] = {k: deque() for k in ("command", *PUBLISH_KINDS)}
        self._count: Counter[str] = Counter()  # class -> entries not yet with the broker
        self._bytes: Counter[str] = Counter()
        self.accepted: Counter[str] = Counter()  # kind -> telemetry/events accepted (durable)
        self.sent: Counter[str] = Counter()  # kind -> acknowledged by the broker (QoS 0: handed over)
        self.dropped: Counter[tuple[str, str]] = Counter()  # (kind, reason) -> not sent
        self._publish_drops_unlogged: Counter[tuple[str, str]] = Counter()
        self._publish_drop_logged_at: float | None = None
        self.set_aside_total = 0
        self._link_up_at = 0.0
        self._withdraw: Callable[[int], None] = _noop
        self._on_set_aside: Callable[[str], None] = _noop_reason
        self._set_aside_logged_at: float | None = None
        self._set_aside_unlogged = 0
        if store is not None:
            for msg in store.queued_messages():
                self._track(_Entry(msg, msg.created if msg.created is not None else wall()))
            for kind, n in store.expired_at_load.items():
                self.dropped[(kind, "ttl")] += n
            store.expired_at_load.clear()
        self._size = sum(self._count.values())
        if self._over_publish_bounds():
            self._make_room(0, 0)  # the bounds shrank across a restart: the oldest telemetry goes
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
        """Messages not yet handed to the client."""
        return sum(1 for e in self._pending if e.state == _PENDING)

    def publish_stats(self) -> tuple[int, int, float | None]:
        """(telemetry+events not yet with the broker, their bytes, the oldest one's wall-clock time)."""
        with self._lock:
            count = sum(self._count[k] for k in PUBLISH_KINDS)
            size = sum(self._bytes[k] for k in PUBLISH_KINDS)
            oldest = [q[0].created for q in (self._front(k) for k in PUBLISH_KINDS) if q]
        return count, size, min(oldest) if oldest else None

    def _front(self, klass: str) -> deque[_Entry]:
        """The class's queue with gone entries removed from its front (lock held)."""
        q = self._classes[klass]
        while q and q[0].state == _GONE:
            q.popleft()
        return q

    # --- telemetry and events ----------------------------------------------------------------

    def admit(self, messages: Sequence[OutMessage]) -> list[OutMessage]:
        """Accept telemetry/events under the [publish] bounds, durably: returns them with their ids once
        they are on disk. Raises QueueFull (nothing written) or the store's error (nothing accepted).

        All or nothing: a batch that does not fit is refused whole."""
        done = threading.Event()
        box: list[list[OutMessage] | BaseException] = []

        def then(results: list[list[OutMessage] | BaseException]) -> None:
            box.extend(results)
            done.set()

        self.admit_many([messages], then)
        if not done.wait(ADMIT_TIMEOUT):
            raise TimeoutError(f"the state store did not commit within {ADMIT_TIMEOUT:g} s")
        result = box[0]
        if isinstance(result, BaseException):
            raise result
        return result

    def admit_many(self, groups: Sequence[Sequence[OutMessage]],
                   then: Callable[[list[list[OutMessage] | BaseException]], None], *, lead: bool = False) -> None:
        """`admit` for several requests at once, without waiting: one durable write (one fsync) for all.

        Each group is judged on its own, in order (all or nothing per group, as `admit`). `then(results)`
        hears, per group, the messages with their ids once they are on disk, or why not (QueueFull: nothing
        written; the store's error: nothing accepted). It runs on the store's writer thread (or at once
        when nothing is to be written; or, with `lead`, on the calling thread when the writer was idle and
        this thread committed itself: StateStore.enqueue): it must be quick."""
        results: list[list[OutMessage] | BaseException] = [[] for _ in groups]
        taken: list[int] = []
        victims: list[_Entry] = []
        with self._lock:
            for i, messages in enumerate(groups):
                need_count = len(messages)
                need_bytes = sum(message_bytes(m) for m in messages)
                made = self._make_room(need_count, need_bytes)
                if made is None:
                    results[i] = self._full(need_count, need_bytes)
                    continue
                victims += made
                for m in messages:  # reserved: a concurrent caller sees them as taken
                    self._count[m.kind] += 1
                    self._bytes[m.kind] += message_bytes(m)
                taken.append(i)
        if victims:
            self._account_drops(victims, "queue_full")
        flat = [m for i in taken for m in groups[i]]

        def unreserve() -> None:
            with self._lock:
                for m in flat:
                    self._count[m.kind] -= 1
                    self._bytes[m.kind] -= message_bytes(m)

        def stored(outcome: Outcome[list[OutMessage]]) -> None:
            if outcome.error is not None or outcome.value is None:
                unreserve()
                error = outcome.error or RuntimeError("the state store returned nothing")
                for i in taken:
                    results[i] = error
            else:
                with self._lock:
                    for m in outcome.value:
                        self.accepted[m.kind] += 1
                at = 0
                for i in taken:
                    results[i] = outcome.value[at:at + len(groups[i])]
                    at += len(groups[i])
                # The callers hear first (their 202 need not wait while the messages are handed to the client:
                # they are durable already), then the messages go into the send window.
                then(results)
                self.adopt(outcome.value, reserved=True)
                return
            then(results)

        if not flat:
            then(results)
        elif self.store is None:
            stored(Outcome(value=flat))
        else:
            try:
                self.store.enqueue(flat, then=stored, lead=lead)
            except BaseException:
                unreserve()
                raise

    def _over_publish_bounds(self, count: int = 0, size: int = 0) -> bool:
        lim = self.limits
        return (sum(self._count[k] for k in PUBLISH_KINDS) + count > lim.max_messages
                or sum(self._bytes[k] for k in PUBLISH_KINDS) + size > lim.max_bytes)

    def _make_room(self, count: int, size: int) -> list[_Entry] | None:
        """Drop the oldest waiting telemetry until `count` more messages of `size` bytes fit (lock held).
        The dropped entries, or None if even that would not make room (nothing is dropped then)."""
        if not self._over_publish_bounds(count, size):
            return []
        total_count = sum(self._count[k] for k in PUBLISH_KINDS) + count
        total_bytes = sum(self._bytes[k] for k in PUBLISH_KINDS) + size
        victims: list[_Entry] = []
        for entry in self._front("telemetry"):
            if total_count <= self.limits.max_messages and total_bytes <= self.limits.max_bytes:
                break
            if entry.state != _PENDING:
                continue  # in flight: the broker has it, or will have it, soon
            victims.append(entry)
            total_count -= 1
            total_bytes -= entry.size
        if (total_count > self.limits.max_messages or total_bytes > self.limits.max_bytes) and count:
            return None
        for entry in victims:
            self._forget(entry)
        return victims

    def _full(self, count: int, size: int) -> QueueFull:
        lim = self.limits
        queued = sum(self._count[k] for k in PUBLISH_KINDS)
        if queued + count > lim.max_messages:
            return QueueFull("publish.max_messages", lim.max_messages,
                             f"the queue holds {queued} message(s) (publish.max_messages = {lim.max_messages}) "
                             "and none that may be dropped to make room; retry later")
        return QueueFull("publish.max_bytes", lim.max_bytes,
                         f"the queue holds {sum(self._bytes[k] for k in PUBLISH_KINDS)} bytes "
                         f"(publish.max_bytes = {lim.max_bytes}) and none that may be dropped for {size} more; "
                         "retry later")

    def _expired(self, entry: _Entry, now: float) -> str | None:
        msg = entry.msg
        if msg.expires is not None and msg.expires < now:
            return "ttl"
        if msg.kind in PUBLISH_KINDS and entry.created + self.limits.max_age < now:
            return "max_age"
        return None

    def _track(self, entry: _Entry) -> None:
        """A new entry not yet with the broker (lock held, or not yet shared)."""
        entry.size = message_bytes(entry.msg)
        klass = _klass(entry.msg.kind)
        self._classes[klass].append(entry)
        self._count[klass] += 1
        self._bytes[klass] += entry.size
        self._pending.append(entry)

    def _forget(self, entry: _Entry) -> None:
        """`entry` will not be sent (dropped): out of every count, its row deleted (lock held)."""
        entry.state = _GONE
        klass = _klass(entry.msg.kind)
        self._count[klass] -= 1
        self._bytes[klass] -= entry.size
        self._size -= 1
        if entry.msg.id is not None and self.store is not None:
            self.store.delete_messages([entry.msg.id])

    def _account_drops(self, dropped: list[_Entry], reason: str) -> None:
        """Count and (in summary, at most once a minute) log telemetry/events that were not sent."""
        with self._stats_lock:
            self._account_drops_locked(dropped, reason)

    def _account_drops_locked(self, dropped: list[_Entry], reason: str) -> None:
        for entry in dropped:
            key = (entry.msg.kind, reason)
            self.dropped[key] += 1
            self._publish_drops_unlogged[key] += 1
        now = self._clock()
        if self._publish_drop_logged_at is None or now - self._publish_drop_logged_at >= DROP_LOG_INTERVAL:
            summary = ", ".join(f"{n} {kind} ({reason})" for (kind, reason), n
                                in sorted(self._publish_drops_unlogged.items()))
            log.warning("dropped messages that were not sent: %s; reasons: queue_full = publish.max_messages or "
                        "publish.max_bytes reached (the oldest telemetry goes first), ttl = the message's ttl "
                        "passed, max_age = older than publish.max_age", summary,
                        extra={"PUBLISH_DROPPED": sum(self._publish_drops_unlogged.values())})
            self._publish_drops_unlogged.clear()
            self._publish_drop_logged_at = now

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

    def adopt(self, messages: list[OutMessage], *, reserved: bool = False) -> None:
        """Take messages the store already holds (or none should: id None) into the send window.
        `reserved`: `admit` has counted them already."""
        dropped: list[_Entry] = []
        expired: list[tuple[_Entry, str]] = []
        with self._lock:
            created = self._wall()
            for msg in messages:
                entry = _Entry(msg, created)
                klass = _klass(msg.kind)
                if klass == "command":
                    overflow = self._count["command"] + 1 - self.max_messages
                    for old in self._front("command"):
                        if overflow <= 0:
                            break
                        if old.state == _PENDING:
                            dropped.append(old)
                            self._forget(old)
                            overflow -= 1
                if reserved:
                    self._count[klass] -= 1
                    self._bytes[klass] -= message_bytes(msg)
                nothing_older = not self._waiting_front()
                self._track(entry)
                self._size += 1
                if self._link_up and nothing_older:
                    reason = self._expired(entry, created)
                    if reason is not None:
                        self._forget(entry)
                        expired.append((entry, reason))
                    elif len(self._handed) < self.window:
                        self._hand(entry)
            self._compact()
        if dropped:
            self._log_dropped(dropped)
        for entry, reason in expired:
            self._account_drops([entry], reason)
        self._report()

    def _waiting_front(self) -> deque[_Entry]:
        """`_pending` without entries that went or were handed over at its front (lock held)."""
        while self._pending and self._pending[0].state != _PENDING:
            self._pending.popleft()
        return self._pending

    def _compact(self) -> None:
        """Keep `_pending` from growing with entries that went (lock held): clean its front, and
        rebuild it when most of it is gone (drops in the middle)."""
        self._waiting_front()
        if len(self._pending) > 64 and len(self._pending) > 2 * (self._size + 1):
            self._pending = deque(e for e in self._pending if e.state == _PENDING)

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
        """Account for acknowledgements, delete acknowledged rows in batches, hand waiting messages over
        (dropping those past their ttl or publish.max_age first)."""
        if (not self._acks and not self._to_delete and not (self._link_up and self._pending)
                and not force_flush):
            if self._size != self._reported:
                self._report()  # a change held back while busy
            return
        expired: list[tuple[_Entry, str]] = []
        with self._lock:
            while self._acks:
                entry = self._handed.pop(self._acks.popleft(), None)
                if entry is not None:
                    self._done(entry)
            if self._to_delete and (
                    force_flush or len(self._to_delete) >= DELETE_BATCH
                    or self._clock() - self._delete_since >= DELETE_DELAY):
                self._flush()
            now = self._wall()
            while self._link_up and self._waiting_front() and len(self._handed) < self.window:
                entry = self._pending[0]
                reason = self._expired(entry, now)
                if reason is not None:
                    self._forget(entry)
                    expired.append((entry, reason))
                    continue
                if not self._hand(entry):
                    break
            self._compact()
        by_reason: dict[str, list[_Entry]] = {}
        for entry, reason in expired:
            by_reason.setdefault(reason, []).append(entry)
        for reason, entries in by_reason.items():
            self._account_drops(entries, reason)
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
        entry.state = _HANDED
        entry.sent_at = self._clock()
        if entry.msg.qos == 0:
            self._done(entry)  # no PUBACK will come; paho sends QoS 0 once
            return True
        self._handed[mid] = entry
        return True

    def _done(self, entry: _Entry) -> None:
        """`entry` is with the broker (lock held): forget it, in the next batch."""
        if entry.state == _GONE:
            return
        entry.state = _GONE
        if entry.msg.id is not None:
            if not self._to_delete:
                self._delete_since = self._clock()
            self._to_delete.append(entry.msg.id)
        klass = _klass(entry.msg.kind)
        self._count[klass] -= 1
        self._bytes[klass] -= entry.size
        if klass != "command":
            self.sent[entry.msg.kind] += 1
        self._size -= 1
        self._front(klass)  # acknowledgements come oldest first: this keeps the class queue short

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
            if entry.state != _PENDING:  # it was in flight: first in line again (if waiting, it is first already)
                entry.state = _PENDING
                self._pending.appendleft(entry)
            outcome = f"answered with a 500 on '{untrusted(entry.msg.topic, 120)}' instead"
        else:
            if msg.id is not None and self.store is not None:
                self.store.set_aside(msg.id, f"{reason}: {detail}", msg.topic, quiet=True)
            if entry.state != _GONE:
                entry.state = _GONE
                klass = _klass(msg.kind)
                self._count[klass] -= 1
                self._bytes[klass] -= entry.size
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
