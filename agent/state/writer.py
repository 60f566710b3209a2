"""Group commit: one thread writes the state store, many rows per transaction, one fsync per batch.

Callers hand the writer an operation (a function of the SQLite connection) and, for a durable one, a
callback. The writer takes every operation that is waiting, runs them in one transaction, commits
(with `synchronous=FULL` in WAL mode that commit is one fsync of the WAL) and only then calls the
callbacks, in submission order. While one batch is being fsynced the next one gathers, so at one
command in flight a command waits for one fsync and at 64 in flight one fsync covers many commands;
no artificial delay is added (the batching delay is bounded by one fsync plus the batch's own work).

Operations that need not be durable (deleting an acknowledged message, counting an attempt) are
committed with `synchronous=NORMAL` when a batch holds nothing else: their WAL frames are made
durable by the next FULL commit, and losing them in a cut only means a message is sent once more.

The callbacks run on the thread that committed the batch: they must be quick and must not wait for
the writer. They run inside `callback_scope()` (set by the owner: the session's `writes_together`, so
that the PUBACKs and responses a batch releases leave in one write to the socket, not one each).

Leader commit (`lead`): a thread that may block (a worker or the local API's thread, never the network
thread) and finds no batch being committed commits its operation itself, together with whatever else
waits, and runs the callbacks on its own thread: an isolated command then costs no wake-up of the writer
thread and no hand-off back.
If a batch is being committed, the operation waits for the next one like any other (the caller returns
at once). Batches never overlap, and their callbacks run in commit order whoever commits them.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable, Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
# At most this many operations share one transaction (bounds the time the connection lock is held).
MAX_BATCH = 256
# While idle the writer wakes this often to let its owner check the store (state_dir replaced).
IDLE_TICK = 1.0


@dataclass
class Outcome(Generic[T]):
    """What an operation returned, or the error that prevented its commit."""

    value: T | None = None
    error: BaseException | None = None


@dataclass
class _Op:
    fn: Callable[[sqlite3.Connection], Any]
    durable: bool
    then: Callable[[Outcome[Any]], None] | None


class GroupWriter:
    """The only thread that writes the store. `conn_lock` guards the connection for readers too."""

    def __init__(
        self,
        connection: Callable[[], sqlite3.Connection],
        conn_lock: threading.Lock,
        *,
        before_batch: Callable[[], None] = lambda: None,
        on_idle: Callable[[], None] = lambda: None,
        on_fsync: Callable[[int], None] = lambda n: None,
    ) -> None:
        self._connection = connection  # the current connection (it is replaced when the store is reopened)
        self._lock = conn_lock
        self._before_batch = before_batch
        self._on_idle = on_idle
        self._on_fsync = on_fsync
        self._cond = threading.Condition(threading.Lock())  # guards _ops, _busy, _stopping
        self._ops: deque[_Op] = deque()
        self._busy = False  # a batch (or the idle check) is in progress, on the writer thread or a leader
        self._stopping = False
        self._sync_mode = ""
        self.callback_scope: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext
        self._thread = threading.Thread(target=self._run, name="state-writer", daemon=True)
        self._closed = False
        self.batches = 0
        self.durable_batches = 0
        self._thread.start()

    # --- any thread ----------------------------------------------------------------------------

    def submit(self, fn: Callable[[sqlite3.Connection], T], *, durable: bool = True,
               then: Callable[[Outcome[T]], None] | None = None, lead: bool = False) -> None:
        """Run `fn` in the next batch; `then(outcome)` once that batch is committed (or failed). `lead`: commit
        it on this thread if no batch is being committed (see `lead`)."""
        if lead:
            self.lead(fn, durable=durable, then=then)
            return
        if self._closed:
            if then is not None:
                then(Outcome(error=RuntimeError("the state store is closed")))
            return
        with self._cond:
            self._ops.append(_Op(fn, durable, then))
            if not self._busy:
                self._cond.notify()

    def lead(self, fn: Callable[[sqlite3.Connection], T], *, durable: bool = True,
             then: Callable[[Outcome[T]], None] | None = None) -> bool:
        """`submit`, but if no batch is being committed, commit it now on this thread (with what else
        waits) and call the callbacks here. True if this thread committed it. Blocks for the commit (an
        fsync): only for threads that may wait for the disk."""
        if self._closed:
            if then is not None:
                then(Outcome(error=RuntimeError("the state store is closed")))
            return False
        op = _Op(fn, durable, then)
        with self._cond:
            if self._busy:
                self._ops.append(op)
                return False
            self._busy = True
            batch = self._take()
            batch.append(op)
        try:
            self._commit(batch)
        finally:
            self._release()
        return True

    def call(self, fn: Callable[[sqlite3.Connection], T], *, timeout: float = 60.0, lead: bool = False) -> T:
        """Run `fn` durably and wait until it is on disk; raises what prevented that. `lead`: commit on this
        thread if no batch is being committed (see `lead`)."""
        done = threading.Event()
        box: list[Outcome[T]] = []

        def then(outcome: Outcome[T]) -> None:
            box.append(outcome)
            done.set()

        self.submit(fn, then=then, lead=lead)
        if not done.wait(timeout):
            raise TimeoutError(f"the state store did not commit within {timeout:g} s")
        outcome = box[0]
        if outcome.error is not None:
            raise outcome.error
        return outcome.value  # type: ignore[return-value]

    def close(self, timeout: float = 10.0) -> None:
        """Commit what is queued, then end the thread."""
        self._closed = True
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout)

    # --- writer thread -------------------------------------------------------------------------

    def _take(self) -> list[_Op]:
        """Up to MAX_BATCH waiting operations, oldest first (condition held)."""
        batch: list[_Op] = []
        while self._ops and len(batch) < MAX_BATCH:
            batch.append(self._ops.popleft())
        return batch

    def _release(self) -> None:
        with self._cond:
            self._busy = False
            if self._ops or self._stopping:
                self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._ops and not self._stopping:
                    self._cond.wait(IDLE_TICK)
                while self._busy:  # a leader is committing: its successor batch is ours
                    self._cond.wait(IDLE_TICK)
                if not self._ops and self._stopping:
                    return
                self._busy = True
                batch = self._take()
            try:
                if batch:
                    self._commit(batch)
                else:
                    self._safe(self._on_idle)
            finally:
                self._release()

    def _commit(self, batch: Sequence[_Op]) -> None:
        outcomes: list[Outcome[Any]] = [Outcome() for _ in batch]
        durable = any(op.durable for op in batch)
        try:
            if durable:  # (what a batch that acknowledges nothing writes may go to a replaced file: it is lost)
                self._before_batch()
            with self._lock:
                failed = self._transaction(batch, outcomes, durable)
                if failed:
                    # One operation failed (a bug, a constraint): run each alone, so that only it fails.
                    outcomes = [Outcome() for _ in batch]
                    for op, outcome in zip(batch, outcomes):
                        if self._transaction([op], [outcome], op.durable):
                            outcome.value = None
        except Exception as exc:  # noqa: BLE001 - every caller hears why its write failed
            self._sync_mode = ""  # a reopened connection starts with its own setting
            for outcome in outcomes:
                outcome.value, outcome.error = None, exc
        else:
            self.batches += 1
            if durable:
                self.durable_batches += 1
                self._safe(lambda: self._on_fsync(len(batch)))
        try:
            with self.callback_scope():
                for op, outcome in zip(batch, outcomes):
                    if op.then is not None:
                        try:
                            op.then(outcome)
                        except Exception:
                            log.exception("internal error in a state store callback")
        except Exception:
            log.exception("internal error around the state store's callbacks")

    def _transaction(self, batch: Sequence[_Op], outcomes: list[Outcome[Any]], durable: bool) -> bool:
        """Run `batch` in one transaction and commit it (lock held). True if an operation raised: then
        nothing was committed and that operation's outcome holds its error. A failing commit raises."""
        db = self._connection()
        mode = "FULL" if durable else "NORMAL"
        if mode != self._sync_mode:
            db.execute(f"PRAGMA synchronous={mode}")
            self._sync_mode = mode
        db.execute("BEGIN IMMEDIATE")
        try:
            for op, outcome in zip(batch, outcomes):
                try:
                    outcome.value = op.fn(db)
                except Exception as exc:
                    if not db.in_transaction:
                        raise  # the whole transaction is gone (disk full, I/O error): the batch fails
                    outcome.error = exc
                    db.execute("ROLLBACK")
                    return True
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                try:
                    db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            raise
        return False

    @staticmethod
    def _safe(fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception:
            log.exception("internal error in the state store's writer")
