"""Dispatch: limits, dedupe, a bounded worker pool, timeouts, and outcomes turned into responses.

`accept(msg, ack)` runs on the MQTT network thread: it parses and checks limits, and hands the command
to the state store's writer. Once its row is on disk (the writer's callback, in commit order) the
command is acknowledged (`ack()`: the PUBACK) and given to a worker. Handlers only run on workers.
Every answer goes through the store's outbound queue (durable before it is handed to the session),
except a 503 for a command the store could not take: that one is sent from memory, since the disk is
what failed.

Pure handlers (`pure = True`: no effect but their answer, e.g. `ping`, `info`) take a shorter path
with one durable point instead of two: the command goes straight to a worker, the handler runs, and
its row is journalled as done together with the response in one commit (led by the worker itself when
the writer is idle); only then is it acknowledged and the response published. A cut before that commit
leaves no PUBACK: the broker delivers the command again and it runs again, which for a pure handler
changes nothing. The short path is taken only by a command that finds nothing else in flight, so a
PUBACK never waits in a queue; otherwise a pure command is journalled and acknowledged first, as any
other, but starts without a durable running mark. An inline handler (`inline = True` as well: `ping`,
which answers from memory at once) always takes the short path, without a worker: it runs on the
writer's thread inside the transaction that journals it with its answer, so under load one commit
covers many pings and each costs one row, no thread hand-off and no second commit.

PUBACKs (and responses) are sent by the thread that committed, straight onto the socket when the
network thread is not using it (agent/connection/pump.py): no wake-up of the network thread either.

PUBACKs go out in the order the commands arrived (MQTT 3.1.1, 4.6), whichever becomes durable first.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Callable, Protocol

from agent.commands.handlers import Handler
from agent.config import LimitsConfig
from agent.logtext import LogSummary, untrusted
from agent.protocol import (
    GONE,
    INTERNAL_ERROR,
    NOT_FOUND,
    PAYLOAD_TOO_LARGE,
    TIMEOUT,
    TOO_MANY_REQUESTS,
    UNAVAILABLE,
    CommandError,
    Inbound,
    ReplyRoute,
    Request,
    Response,
    is_valid_status,
)
from agent.state.store import QUEUED, RUNNING, Added, OutMessage, Record, StateStore
from agent.state.writer import Outcome
from agent.topics import CommandTopic, is_delivery_probe, parse_request, response_topic

log = logging.getLogger(__name__)

# Past its timeout, a handler that stops itself (exec) gets this long to report before the
# dispatcher answers 504 on its behalf and writes its worker off.
ENFORCED_TIMEOUT_GRACE = 2.0
# The timeout monitor looks at the running commands at least this often (seconds).
TIMEOUT_POLL = 1.0


class Responder(Protocol):
    """Where answers go (agent.state.outbox.Outbox): stored messages, or one sent without the disk."""

    def adopt(self, messages: list[OutMessage]) -> None: ...

    def put_volatile(self, msg: OutMessage) -> None: ...


class AckFn(Protocol):
    def __call__(self) -> None: ...


def _no_ack() -> None:
    pass


# A journal that cannot be written is logged at most this often (every command would log it otherwise).
JOURNAL_ERROR_LOG_INTERVAL = 30.0


class DispatchObserver:
    """Hooks for metrics and logs; the default does nothing. Must not block or raise."""

    def command_started(self, command: str) -> None:
        pass

    def command_finished(self, command: str, status: int, seconds: float) -> None:
        pass

    def command_rejected(self, command: str, reason: str, status: int | None = None) -> None:
        """`status`: the response published for it (None: no response, or one counted by command_finished)."""


def response_messages(route: ReplyRoute, response: Response, kind: str = "response") -> list[OutMessage]:
    """The messages that answer a command: the Hono response topic and, for MQTT 5 requests, their
    Response Topic."""
    out: list[OutMessage] = []
    if route.topic_base is not None:
        out.append(OutMessage(response_topic(route.topic_base, response.status), response.body, 1,
                              content_type=response.content_type, kind=kind))
    if route.response_topic:
        out.append(OutMessage(route.response_topic, response.body, 1, correlation_data=route.correlation_data,
                              user_properties=(("status", str(response.status)), *response.headers),
                              content_type=response.content_type, kind=kind))
    return out


@dataclass(eq=False)
class _AckSlot:
    ack: AckFn
    ready: bool = False


class _AckOrder:
    """Releases acknowledgements in arrival order: `wrap` (network thread, in arrival order) returns the
    ack to call when a command is durable; the PUBACKs of earlier arrivals go first."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._slots: deque[_AckSlot] = deque()  # oldest first

    def wrap(self, ack: AckFn) -> AckFn:
        slot = _AckSlot(ack)
        with self._lock:
            self._slots.append(slot)

        def ready() -> None:
            with self._lock:  # held while calling: two threads releasing at once keep the order
                if slot.ready:
                    return
                slot.ready = True
                slots = self._slots
                while slots and slots[0].ready:
                    release = slots.popleft().ack
                    try:
                        release()
                    except Exception:
                        log.exception("internal error while acknowledging a command")

        return ready


@dataclass(eq=False)
class _Job:
    journal_key: str
    dedupe_key: str | None
    topic: CommandTopic
    msg: Inbound
    handler: Handler
    route: ReplyRoute
    device_id: str
    waiters: list[ReplyRoute] = field(default_factory=list)
    claimed: bool = False  # journalled as running when received (a worker was free)
    pure: bool = False  # the handler declares itself side-effect free: it need not be durable before it runs
    ack: AckFn | None = None  # short path (pure, not journalled yet): the PUBACK, once the answer is durable
    waiter_acks: list[AckFn] = field(default_factory=list)  # redeliveries that arrived meanwhile (short path)
    done: bool = False
    counted: bool = False  # included in Dispatcher._running
    started: float = 0.0
    seconds: float = 0.0  # how long the handler took
    answer: tuple[Response, list[OutMessage]] | None = None  # inline: what the handler answered (kept for a retry)
    lock: threading.Lock = field(default_factory=threading.Lock)


class _WorkerPool:
    """N threads taking jobs from one queue. A worker stuck in a timed-out handler is replaced,
    and retires when (if ever) its handler returns, so the pool keeps serving at full width."""

    def __init__(self, size: int, run: Callable[[_Job], None]) -> None:
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._run = run
        self._lock = threading.Lock()
        self._excess = 0
        self._threads: list[threading.Thread] = []
        self._seq = itertools.count(1)
        for _ in range(size):
            self._spawn()

    def _spawn(self) -> None:
        t = threading.Thread(target=self._loop, name=f"worker-{next(self._seq)}", daemon=True)
        self._threads.append(t)
        t.start()

    def submit(self, job: _Job) -> None:
        self._queue.put(job)

    def replace_stuck(self) -> None:
        with self._lock:
            self._excess += 1
            self._threads = [t for t in self._threads if t.is_alive()]
            self._spawn()

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            self._run(job)
            with self._lock:
                if self._excess:
                    self._excess -= 1
                    return

    def stop(self) -> None:
        with self._lock:
            threads = [t for t in self._threads if t.is_alive()]
        for _ in threads:
            self._queue.put(None)


@dataclass
class DispatchStats:
    received: int = 0
    executed: int = 0
    duplicates: int = 0
    by_status: Counter[int] = field(default_factory=Counter)
    rejected: Counter[str] = field(default_factory=Counter)


class Dispatcher:
    """Turns inbound command messages into executed handlers and published responses."""

    def __init__(
        self,
        *,
        registry: Mapping[str, Handler],
        limits: LimitsConfig,
        responder: Responder,
        store: StateStore,
        device_id: str,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        observer: DispatchObserver | None = None,
    ) -> None:
        self._registry = registry
        self.limits = limits
        self._responder = responder
        self._store = store
        self._journal_error_logged_at: float | None = None
        self._journal_errors_unlogged = 0
        self._device_id = device_id
        self._clock = clock
        self._wall = wall
        self.observer = observer or DispatchObserver()
        self._lock = threading.Lock()
        self._active: dict[str, _Job] = {}  # dedupe key -> job queued or running
        self._pending = 0  # queued + running
        self._running = 0
        self._committing = 0  # finished, response not yet on disk
        self._unjournalled = 0  # short-path (pure) commands received, answer not yet on disk
        self._ack_order = _AckOrder()
        self._accepting = False
        self._idle = threading.Condition(self._lock)
        self._deadlines: dict[_Job, float] = {}  # running job -> when the monitor answers 504 for it
        self._monitor_wake = 0.0
        self._timeout_cond = threading.Condition()
        self._stopped = False
        self.stats = DispatchStats()
        self._reject_log = LogSummary(log, clock=clock)
        self.last_progress = clock()
        self._pool: _WorkerPool | None = None
        self._monitor: threading.Thread | None = None

    # --- lifecycle -----------------------------------------------------------------------------

    def set_registry(self, registry: Mapping[str, Handler]) -> None:
        """Swap the handler table (config reload): new commands apply to the next message."""
        self._registry = registry

    def start(self) -> None:
        """Start workers, then resume what the journal says was left unfinished."""
        self._pool = _WorkerPool(self.limits.max_concurrent_commands, self._run_safely)
        self._monitor = threading.Thread(target=self._watch_timeouts, name="command-timeouts", daemon=True)
        self._monitor.start()
        self._accepting = True
        self._recover()

    def stop_accepting(self) -> None:
        """New commands are journalled but not started: they run at the next start."""
        self._accepting = False

    def drain(self, timeout: float) -> bool:
        """Wait until no handler is running and their responses are stored (queued ones are deferred). True if
        drained in time."""
        end = self._clock() + timeout
        with self._idle:
            while self._running or self._committing or self._unjournalled:
                left = end - self._clock()
                if left <= 0:
                    return False
                self._idle.wait(min(left, 0.5))
        return True

    def close(self) -> None:
        self._stopped = True
        self._reject_log.flush()  # the counts still held back by the rate limit
        if self._pool:
            self._pool.stop()
        with self._timeout_cond:
            self._timeout_cond.notify_all()

    @property
    def in_flight(self) -> int:
        return self._running

    @property
    def queued(self) -> int:
        return self._pending - self._running

    # --- intake (MQTT thread) --------------------------------------------------------------------

    def accept(self, msg: Inbound, ack: AckFn = _no_ack) -> None:
        """Called for every message on the command subscription. Never raises; `ack` is called exactly
        once, when the command (or its answer) is durable."""
        ack = self._ack_order.wrap(ack)
        try:
            self._accept(msg, ack)
        except Exception:
            log.exception("internal error while accepting a command on %s; it was dropped", untrusted(msg.topic))
            ack()

    def _reply(self, route: ReplyRoute, response: Response, kind: str = "response") -> None:
        """Answer durably and wait for it (worker threads)."""
        messages = response_messages(route, response, kind)
        if not messages:
            return
        try:
            self._responder.adopt(self._store.enqueue_wait(messages))
        except Exception as exc:  # noqa: BLE001 - the disk failed: send it from memory rather than not at all
            self._journal_failed(exc, "queue a response")
            for m in messages:
                self._responder.put_volatile(m)

    def _reply_async(self, route: ReplyRoute, response: Response, ack: AckFn, kind: str = "rejection") -> None:
        """Answer durably without waiting (network thread); PUBACK the command once the answer is stored."""
        messages = response_messages(route, response, kind)
        if not messages:
            ack()
            return

        def stored(outcome: Outcome[list[OutMessage]]) -> None:
            if outcome.error is None and outcome.value is not None:
                self._responder.adopt(outcome.value)
            else:
                self._journal_failed(outcome.error, "queue a response")
                for m in messages:
                    self._responder.put_volatile(m)
            ack()

        self._store.enqueue(messages, then=stored)

    def _journal_failed(self, exc: BaseException | None, what: str) -> None:
        """Rate-limited: on a full disk every command would say it."""
        self._journal_errors_unlogged += 1
        now = self._clock()
        if self._journal_error_logged_at is None or now - self._journal_error_logged_at >= JOURNAL_ERROR_LOG_INTERVAL:
            log.error("the state store (agent.state_dir) cannot %s: %s; %d such failure(s) since the last report; "
                      "commands are answered 503 and not run until it can be written again",
                      what, exc, self._journal_errors_unlogged, extra={"STATE_ERROR": str(exc)[:200]})
            self._journal_errors_unlogged = 0
            self._journal_error_logged_at = now

    def _reject(self, topic: CommandTopic, route: ReplyRoute, status: int, reason: str, message: str,
                ack: AckFn) -> None:
        with self._lock:
            self.stats.rejected[reason] += 1
            self.stats.by_status[status] += 1
        self.observer.command_rejected(topic.command, reason, None if route.silent else status)
        # One line per reason per minute: a flood of 429s or hostile names must not fill the journal.
        self._reject_log.log(reason, logging.WARNING, "command %s (req %s) rejected with %d: %s",
                             untrusted(topic.command), untrusted(topic.req_id or "-"), status,
                             untrusted(message, 300),
                             extra={"COMMAND": untrusted(topic.command), "REQ_ID": untrusted(topic.req_id),
                                    "STATUS": status, "REJECT_REASON": reason})
        self._reply_async(route, Response.error(status, message), ack)

    def _route(self, topic: CommandTopic, msg: Inbound) -> ReplyRoute:
        if topic.one_way:
            return ReplyRoute(None)
        return ReplyRoute(topic.response_base, msg.response_topic, msg.correlation_data)

    def _accept(self, msg: Inbound, ack: AckFn) -> None:
        topic = parse_request(msg.topic)
        if topic is None:
            ack()
            if is_delivery_probe(msg.topic):
                # `mqtt-agent doctor` proves delivery with a 5-segment probe message: expected, not a problem.
                log.debug("ignored the delivery probe of mqtt-agent doctor on %s", untrusted(msg.topic))
                return
            self.stats.rejected["malformed_topic"] += 1
            self.observer.command_rejected("", "malformed_topic")
            self._reject_log.log("malformed_topic", logging.WARNING, "ignored a message on %s: not a command "
                                 "request topic (command/TENANT/DEVICE/req/REQ_ID/NAME)", untrusted(msg.topic))
            return
        self.stats.received += 1
        route = self._route(topic, msg)
        if len(msg.payload) > self.limits.max_payload_bytes:
            self._reject(topic, route, PAYLOAD_TOO_LARGE, "payload_too_large",
                         f"payload is {len(msg.payload)} bytes, over limits.max_payload_bytes "
                         f"({self.limits.max_payload_bytes})", ack)
            return
        handler = self._registry.get(topic.command)
        if handler is None:
            self._reject(topic, route, NOT_FOUND, "unknown_command",
                         f"unknown command '{untrusted(topic.command)}'; this agent serves: "
                         + ", ".join(sorted(self._registry)), ack)
            return
        dedupe_key = None if topic.one_way else topic.dedupe_key
        if dedupe_key:
            deferred = False
            with self._lock:
                running = self._active.get(dedupe_key)
                if running is not None:
                    running.waiters.append(route)
                    if running.ack is not None:  # not durable yet (short path): acknowledged with it
                        running.waiter_acks.append(ack)
                        deferred = True
            if running is not None:
                self.stats.duplicates += 1
                if not deferred:
                    ack()  # the command is durable already (it runs); the waiter is answered with it
                log.info("command %s req %s redelivered while it runs: it will be answered, not run again",
                         topic.command, untrusted(topic.req_id),
                         extra={"COMMAND": topic.command, "REQ_ID": untrusted(topic.req_id)})
                return
        journal_key = dedupe_key or f"one-way:{uuid.uuid4().hex}"
        capacity = self.limits.max_concurrent_commands + self.limits.max_queued_commands
        pure = getattr(handler, "pure", False) is True
        inline = pure and getattr(handler, "inline", False) is True
        with self._lock:
            full = self._pending >= capacity
            # A pure command runs first and is journalled with its answer (one durable point) when nothing
            # else is in flight: its PUBACK waits for the handler, and the PUBACKs of commands arriving
            # meanwhile wait for it (they go out in order), so it must not wait for a worker or a batch.
            # Otherwise it takes the ordinary path: journalled and acknowledged at once, no running mark,
            # the answer in a second commit that the group commit shares with the other commands.
            # An inline handler (ping) always takes the short path: it runs inside the writer's transaction,
            # so its PUBACK waits for nothing but the commit it shares with the commands around it.
            short = pure and self._accepting and (inline or self._pending == 0)
            # With a worker free the command starts at once: journal it as running in the same write
            # (one commit instead of two on the hot path). Should the agent die in the moment before the
            # handler starts, the command is answered "interrupted", never run twice.
            claimed = (not pure and not full and self._accepting
                       and self._pending < self.limits.max_concurrent_commands)
            if not full:
                self._pending += 1  # reserved now: commits in flight must not overbook the workers
            if short:
                self._unjournalled += 1
        if full:
            # A redelivery gets its stored answer even when the queue is full, never a 429.
            record = self._store.lookup(dedupe_key) if dedupe_key else None
            if record is not None and record.response is not None:
                self.stats.duplicates += 1
                self._reply_async(route, record.response, ack, "response")
                return
            self._reject(topic, route, TOO_MANY_REQUESTS, "queue_full",
                         f"too many commands waiting ({self.limits.max_queued_commands} queued, "
                         f"limits.max_queued_commands); retry later", ack)
            return

        if short:
            job = _Job(journal_key, dedupe_key, topic, msg, handler, route,
                       device_id=topic.device or self._device_id, pure=True, ack=ack)
            if dedupe_key:
                with self._lock:
                    self._active[dedupe_key] = job
            if inline:
                self._run_inline(job)
                return
            assert self._pool is not None
            self._pool.submit(job)
            return

        def added(outcome: Outcome[Added]) -> None:
            # Writer thread, in commit order: the row (or the re-sent id's answer) is on disk.
            try:
                self._added(outcome, topic, msg, handler, route, journal_key, dedupe_key, claimed, ack)
            finally:
                ack()

        self._store.add_command(journal_key, msg, running=claimed, answer=self._answer_for(route), then=added)

    def _added(self, outcome: Outcome[Added], topic: CommandTopic, msg: Inbound, handler: Handler,
               route: ReplyRoute, journal_key: str, dedupe_key: str | None, claimed: bool, ack: AckFn) -> None:
        result = outcome.value
        if outcome.error is not None or result is None:
            with self._lock:
                self._pending -= 1
                self.stats.rejected["journal_error"] += 1
                self.stats.by_status[UNAVAILABLE] += 1
            self._journal_failed(outcome.error, "record a command")
            self.observer.command_rejected(topic.command, "journal_error", None if route.silent else UNAVAILABLE)
            response = Response.error(UNAVAILABLE, "the agent cannot record the command in its journal "
                                                   "(agent.state_dir); it was not run")
            for m in response_messages(route, response, "rejection"):
                self._responder.put_volatile(m)  # not through the disk: the disk is what failed
            return
        ack()  # durable: PUBACK now, before the handler runs
        if not result.inserted:
            with self._lock:
                self._pending -= 1
                job = self._active.get(dedupe_key) if dedupe_key else None
                if job is not None and result.record is not None and result.record.response is None:
                    job.waiters.append(route)
            self.stats.duplicates += 1
            if result.queued:
                assert result.record is not None and result.record.response is not None
                log.info("command %s req %s was already executed: re-sending its %d response",
                         topic.command, untrusted(topic.req_id), result.record.response.status,
                         extra={"COMMAND": topic.command, "REQ_ID": untrusted(topic.req_id)})
                self._responder.adopt(list(result.queued))
            elif job is not None:
                log.info("command %s req %s redelivered while it runs: it will be answered, not run again",
                         topic.command, untrusted(topic.req_id),
                         extra={"COMMAND": topic.command, "REQ_ID": untrusted(topic.req_id)})
            else:
                log.info("command %s req %s is already journalled and will run at the next start",
                         topic.command, untrusted(topic.req_id))
            return
        self._start(topic, msg, handler, route, journal_key, dedupe_key, claimed, reserved=True)

    def _start(self, topic: CommandTopic, msg: Inbound, handler: Handler, route: ReplyRoute, journal_key: str,
               dedupe_key: str | None, claimed: bool, reserved: bool = False) -> None:
        job = _Job(journal_key, dedupe_key, topic, msg, handler, route,
                   device_id=topic.device or self._device_id, claimed=claimed,
                   pure=getattr(handler, "pure", False) is True)
        if not self._accepting:
            if reserved:
                with self._lock:
                    self._pending -= 1
            if claimed:
                self._store.mark_queued(journal_key)
            log.info("command %s req %s received during shutdown: journalled, runs at the next start",
                     topic.command, untrusted(topic.req_id or "-"))
            return
        with self._lock:
            if dedupe_key:
                self._active[dedupe_key] = job
            if not reserved:
                self._pending += 1
        assert self._pool is not None
        self._pool.submit(job)

    def _recover(self) -> None:
        """Finish what the journal says an earlier run left: queued commands run, interrupted ones are
        answered 500. (Responses not yet acknowledged wait in the outbound queue: the outbox loaded them.)"""
        for record in self._store.pending():
            topic = parse_request(record.inbound.topic)
            handler = self._registry.get(topic.command) if topic is not None else None
            if topic is None:
                self._store.discard(record.key)
                continue
            route = self._route(topic, record.inbound)
            if record.state == RUNNING or handler is None:
                response = Response.error(
                    INTERNAL_ERROR,
                    "the agent stopped while this command was running; it may or may not have taken effect, "
                    "and it is not run again", interrupted=True,
                ) if record.state == RUNNING else Response.error(
                    NOT_FOUND, f"unknown command {topic.command!r}; it is no longer configured")
                if record.state == RUNNING:
                    log.warning("command %s req %s was interrupted by an agent stop; answering 500",
                                topic.command, untrusted(topic.req_id or "-"))
                self._responder.adopt(self._store.finish(record.key, response, response_messages(route, response)))
            elif record.state == QUEUED:
                log.info("resuming command %s req %s received before the last stop", topic.command,
                         untrusted(topic.req_id or "-"))
                self._start(topic, record.inbound, handler, route, record.key,
                            None if topic.one_way else topic.dedupe_key, claimed=False)

    # --- execution (worker threads) --------------------------------------------------------------

    def _run_safely(self, job: _Job) -> None:
        """A failure outside the handler (e.g. the journal's disk) still answers the command and frees its
        slot: a worker that died here would leave the in-flight count up forever."""
        try:
            self._run(job)
        except Exception:  # noqa: BLE001 - logged with its traceback (_internal_error)
            response = self._internal_error(job, "; it is answered 500 without running")
            with self._lock:
                if not job.counted:
                    self._running += 1
                    job.counted = True
            self._complete(job, response)

    @staticmethod
    def _internal_error(job: _Job, note: str = "") -> Response:
        """A failure of the agent's own around a command (logged with its traceback): the 500 it answers."""
        error_id = uuid.uuid4().hex[:12]
        log.exception("internal error while running command %s req %s (error id %s)%s", job.topic.command,
                      untrusted(job.topic.req_id or "-"), error_id, note)
        return Response.error(INTERNAL_ERROR, "internal error in the agent", error_id=error_id)

    def _expired(self, job: _Job) -> str | None:
        now = self._wall()
        age = now - job.msg.received_wall
        if self.limits.max_command_age and age > self.limits.max_command_age:
            return f"command is {age:.1f} s old, older than limits.max_command_age ({self.limits.max_command_age:g} s)"
        if job.msg.message_expiry is not None and age > job.msg.message_expiry:
            return f"the request's message expiry ({job.msg.message_expiry} s) passed before it could run"
        return None

    def _run(self, job: _Job) -> None:
        self.last_progress = self._clock()
        if not self._accepting and job.ack is None:  # (a short-path job is not journalled: it runs, briefly)
            with self._lock:
                self._pending -= 1
                if job.dedupe_key:
                    self._active.pop(job.dedupe_key, None)
            if job.claimed:
                self._store.mark_queued(job.journal_key)
            return  # stays queued in the journal; runs at the next start
        expired = self._expired(job)
        if expired:
            self._begin(job)
            self._complete(job, self._expired_response(job, expired))
            return
        self._begin(job)
        deadline = job.started + self._timeout(job)
        grace = ENFORCED_TIMEOUT_GRACE if getattr(job.handler, "enforces_timeout", False) else 0.0
        if not job.claimed and not job.pure:  # a pure handler may run again after a cut: no mark needed
            self._store.mark_running(job.journal_key)
        self._schedule_timeout(deadline + grace, job)
        self.observer.command_started(job.topic.command)
        if not self._complete(job, self._call(job, deadline)):
            log.warning("command %s req %s finished after it had been answered 504; its result is discarded",
                        job.topic.command, untrusted(job.topic.req_id or "-"))

    def _run_inline(self, job: _Job) -> None:
        """An inline handler (ping: it answers from memory at once) runs on the state writer's thread, inside
        the transaction that journals it as done with its answer: no worker, no second commit, and its
        PUBACK goes out with those of the other commands of that commit, in arrival order."""
        def produce() -> tuple[Response, list[OutMessage]]:
            if job.answer is None:  # (a batch retried one operation at a time asks again: same answer)
                if not job.counted:
                    self._begin(job)
                try:
                    expired = self._expired(job)
                    if expired:
                        response = self._expired_response(job, expired)
                    else:
                        self.observer.command_started(job.topic.command)
                        response = self._call(job, job.started + self._timeout(job))
                except Exception:  # noqa: BLE001 - logged (_internal_error); never fail the shared transaction
                    response = self._internal_error(job)
                self._finish(job, response)
                job.answer = (response, response_messages(job.route, response))
            return job.answer

        def journalled(outcome: Outcome[Added]) -> None:
            if job.answer is None:  # the store failed before the handler ran (closed, or being reopened)
                with self._lock:
                    self._committing += 1
                self._settle(job, Response.error(UNAVAILABLE, "not run"), [], None,
                             outcome.error or RuntimeError("the state store did not run the command"), None)
                return
            self._journalled(job, *job.answer, outcome)

        self._store.add_done(job.journal_key, job.msg, produce, answer=self._answer_for(job.route), then=journalled)

    def _timeout(self, job: _Job) -> float:
        """The handler's own timeout, or limits.command_timeout."""
        return float(getattr(job.handler, "timeout", None) or self.limits.command_timeout)

    def _begin(self, job: _Job) -> None:
        job.started = self._clock()
        with self._lock:
            self._running += 1
            job.counted = True

    def _expired_response(self, job: _Job, reason: str) -> Response:
        with self._lock:
            self.stats.rejected["expired"] += 1
        self.observer.command_rejected(job.topic.command, "expired")
        return Response.error(GONE, reason)

    def _call(self, job: _Job, deadline: float) -> Response:
        """Run the handler; what it answered, or the error response for how it failed."""
        request = Request(
            command=job.topic.command,
            req_id=job.topic.req_id,
            device_id=job.device_id,
            payload=job.msg.payload,
            via_gateway=bool(job.topic.device),
            content_type=job.msg.content_type,
            # Hono's property bag (from the topic) first, then MQTT 5 user properties: both are properties.
            user_properties=(*job.topic.properties, *job.msg.user_properties),
            deadline=deadline,
        )
        try:
            response = job.handler.handle(request)
            if not isinstance(response, Response) or not is_valid_status(response.status):
                raise TypeError(f"handler returned {response!r}; expected a Response with status 2xx/4xx/5xx")
        except CommandError as exc:
            response = exc.response()
        except Exception as exc:
            error_id = uuid.uuid4().hex[:12]
            log.error("command %s req %s failed with an internal error (error id %s): %s: %s",
                      job.topic.command, untrusted(job.topic.req_id or "-"), error_id, type(exc).__name__,
                      untrusted(exc, 500), exc_info=True,
                      extra={"COMMAND": job.topic.command, "REQ_ID": untrusted(job.topic.req_id), "ERROR_ID": error_id})
            response = Response.error(INTERNAL_ERROR, f"internal error in command {job.topic.command!r}",
                                      error_id=error_id)
        return response

    def _finish(self, job: _Job, response: Response) -> bool:
        """The handler's outcome is in (or a timeout answers for it): count it, once. False if the job was
        answered already (timeout)."""
        with job.lock:
            if job.done:
                return False
            job.done = True
        self._unschedule_timeout(job)
        job.seconds = self._clock() - job.started
        with self._lock:
            self._running -= 1
            self._committing += 1
            self.stats.executed += 1
            self.stats.by_status[response.status] += 1
        self.last_progress = self._clock()
        self.observer.command_finished(job.topic.command, response.status, job.seconds)
        return True

    def _complete(self, job: _Job, response: Response) -> bool:
        """Record and send the outcome once; False if the job was already answered (timeout).

        The response is stored (with its messages, one durable commit that the writer shares with other
        commands; the worker leads that commit itself when the writer is idle) and published from the
        commit's callback. A short-path (pure) command is journalled here for the first time, as done, and
        acknowledged once that commit is on disk."""
        if not self._finish(job, response):
            return False
        messages = response_messages(job.route, response)
        if job.ack is None:
            def finished(outcome: Outcome[list[OutMessage]]) -> None:
                self._settle(job, response, messages, outcome.value, outcome.error, response)

            self._store.finish_async(job.journal_key, response, messages, then=finished, lead=True)
            return True
        self._store.add_done(job.journal_key, job.msg, lambda: (response, messages), answer=self._answer_for(job.route),
                             then=lambda outcome: self._journalled(job, response, messages, outcome), lead=True)
        return True

    @staticmethod
    def _answer_for(route: ReplyRoute) -> Callable[[Record], list[OutMessage]]:
        """What a re-sent id is answered with on `route`: its journalled response."""
        def answer(record: Record) -> list[OutMessage]:
            return response_messages(route, record.response) if record.response is not None else []

        return answer

    def _journalled(self, job: _Job, response: Response, messages: list[OutMessage],
                    outcome: Outcome[Added]) -> None:
        """A short-path command's row (done, with its answer) is on disk, or could not be written."""
        added = outcome.value
        if outcome.error is not None or added is None:
            self._settle(job, response, messages, None, outcome.error or RuntimeError("no outcome"), None)
            return
        if added.inserted:
            self._settle(job, response, messages, list(added.queued), None, response)
            return
        # Journalled already (a re-sent id whose first delivery was recorded before): its answer stands.
        record = added.record
        if record is not None and record.response is not None:
            log.info("command %s req %s was already executed: re-sending its %d response",
                     job.topic.command, untrusted(job.topic.req_id), record.response.status,
                     extra={"COMMAND": job.topic.command, "REQ_ID": untrusted(job.topic.req_id)})
            self._settle(job, response, messages, list(added.queued), None, record.response, duplicate=True)
        else:
            log.info("command %s req %s is already journalled and will run at the next start",
                     job.topic.command, untrusted(job.topic.req_id))
            self._settle(job, response, messages, None, None, None, duplicate=True)

    def _settle(self, job: _Job, response: Response, messages: list[OutMessage], stored: list[OutMessage] | None,
                error: BaseException | None, answered: Response | None, duplicate: bool = False) -> None:
        """The commit's thread: the response is on disk (or the disk failed: answer from memory rather than
        not at all). `answered`: what the waiters get (None: nothing to send yet)."""
        if error is None:
            if stored:
                # Published before the PUBACK: both follow the commit, and the response need not wait for it.
                self._responder.adopt(stored)
        else:
            self._journal_failed(error, "store a response" if job.ack is None else "record a command")
            volatile = messages
            if job.ack is not None:  # a short-path command was not journalled: as for any such command
                answered = Response.error(UNAVAILABLE, "the agent cannot record the command in its journal "
                                                       "(agent.state_dir)")
                volatile = response_messages(job.route, answered, "rejection")
            for m in volatile:
                self._responder.put_volatile(m)
        with self._lock:
            # Only now: a re-sent id that arrived meanwhile waited on the job, or finds the stored response.
            if job.dedupe_key and self._active.get(job.dedupe_key) is job:
                del self._active[job.dedupe_key]
            waiters, job.waiters = job.waiters, []
            waiter_acks, job.waiter_acks = job.waiter_acks, []
            self._pending -= 1
            self._committing -= 1
            if job.ack is not None:
                self._unjournalled -= 1
                if error is not None:
                    self.stats.rejected["journal_error"] += 1
            if duplicate:
                self.stats.duplicates += 1
            self._idle.notify_all()
        if job.ack is not None:
            job.ack()  # durable (or answered without the disk): PUBACK now
            for ack in waiter_acks:
                ack()
            if error is not None:
                self.observer.command_rejected(job.topic.command, "journal_error",
                                               None if job.route.silent else UNAVAILABLE)
        if answered is not None:
            for route in waiters:
                self._reply_async(route, answered, _no_ack, "response")
        if response.status >= 500:
            level = logging.WARNING
        elif getattr(job.handler, "quiet", False):
            level = logging.DEBUG  # health probes (ping, info) every minute from a fleet monitor: no log flood
        else:
            level = logging.INFO
        if log.isEnabledFor(level):
            log.log(level, "command %s req %s -> %d in %.1f ms%s", job.topic.command,
                    untrusted(job.topic.req_id or "-"), response.status, job.seconds * 1000,
                    f" (+{len(waiters)} duplicate)" if waiters else "",
                    extra={"COMMAND": job.topic.command, "REQ_ID": untrusted(job.topic.req_id),
                           "STATUS": response.status})

    # --- timeouts --------------------------------------------------------------------------------

    def _schedule_timeout(self, when: float, job: _Job) -> None:
        with self._timeout_cond:
            self._deadlines[job] = when
            # The monitor polls at least every TIMEOUT_POLL s, so a usual deadline (seconds away) needs no
            # wake-up: only one earlier than its next turn does. Waking it for every command would put a
            # thread switch on every command's path.
            if when < self._monitor_wake:
                self._monitor_wake = when
                self._timeout_cond.notify()

    def _unschedule_timeout(self, job: _Job) -> None:
        with self._timeout_cond:
            self._deadlines.pop(job, None)

    def _watch_timeouts(self) -> None:
        while not self._stopped:
            with self._timeout_cond:
                now = self._clock()
                expired = [job for job, when in self._deadlines.items() if when <= now]
                for job in expired:
                    del self._deadlines[job]
                self._monitor_wake = min(min(self._deadlines.values(), default=now + TIMEOUT_POLL),
                                         now + TIMEOUT_POLL)
                if not expired:
                    self._timeout_cond.wait(max(self._monitor_wake - now, 0.0))
                    continue
            for job in expired:
                self._time_out(job)

    def _time_out(self, job: _Job) -> None:
        if job.done:
            return
        timeout = self._timeout(job)
        if self._complete(job, Response.error(TIMEOUT, f"command {job.topic.command!r} did not finish "
                                                       f"within {timeout:g} s")):
            log.error("command %s req %s is still running past its %g s timeout: answered 504; "
                      "its worker is written off and replaced", job.topic.command, untrusted(job.topic.req_id or "-"),
                      timeout)
            assert self._pool is not None
            self._pool.replace_stuck()
