"""The one durable state store: `agent.state_dir/state.sqlite3` (command journal + outbound queue).

Durability is a property of this module, not of its callers: every write goes through the group-commit
writer (agent/state/writer.py), and what a caller is told has been stored is on disk (WAL mode,
`synchronous=FULL` for those batches: one fsync of the WAL per batch, many rows per batch).

Command journal (table `commands`, key = tenant/device/req_id/command; see topics.dedupe_key):

    queued   received and durable (the PUBACK follows the commit), not started -> runs at the next start
    running  durable before the handler starts -> after a cut or crash: answered 500 "interrupted", never re-run
    done     the response, durable together with its outbound messages -> a re-sent id gets it again

Outbound queue (table `outbox`): every message the agent must not lose on its way to the broker.

    OutMessage(topic, payload, qos=1, kind="response"|"rejection"|"telemetry"|"event",
               correlation_data, user_properties, content_type, expires (wall clock, optional))
    enqueue(messages, then=None)   durable before `then` (or `enqueue_wait`'s return) reports success;
                                   the messages come back with their `id`s (ordered: ids grow)
    queued_messages(kind=None)     what waits, oldest first (per kind: ordered by id); expired ones are dropped
    delete_messages(ids)           the broker has them (not fsynced on its own: a cut re-sends, never loses)
    note_attempts(ids)             count send attempts (kept in the row; `attempts` survives restarts)
    set_aside(id, reason)          a poison message: kept (for an operator), never sent again; counted, logged
                                   at most once a minute (the outbox's poison check uses it: issue 17)
    replace_message(msg)           send msg instead of what row msg.id held (a 500 in place of a response)

Sick disks: a write that fails (disk full, read-only, I/O error) raises to its caller, who answers without
the disk; the next write simply tries again, so the agent serves again once space is free. A store that is
not a database at start is set aside as `<name>.corrupt-<timestamp>` and a fresh one is started (one log
line, `recovered["corrupt"]`). The file's identity (device, inode) is checked before every batch and once a
second while idle: a state_dir removed or replaced under the agent is noticed, logged, and a fresh store is
opened there before anything else is acknowledged (`recovered["replaced"]`).

Bounded: past `max_bytes` the oldest finished commands are forgotten first (their dedupe goes with them),
then the space is given back (incremental vacuum). `size_bytes` and `max_bytes` are metrics.

Migration: the files of earlier versions (`commands.sqlite3`, `outbox.sqlite3`) are read once at the first
start, their rows copied in, and removed once the copy is on disk.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from agent.protocol import Inbound, Response
from agent.state.files import fsync_dir, remove_stale_temps
from agent.state.writer import GroupWriter, Outcome
from agent.topics import parse_request

log = logging.getLogger(__name__)

STATE_FILE = "state.sqlite3"
LEGACY_JOURNAL = "commands.sqlite3"
LEGACY_OUTBOX = "outbox.sqlite3"
QUEUED = "queued"
RUNNING = "running"
DONE = "done"
KINDS = ("response", "rejection", "telemetry", "event")
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
# Small pages: a command's rows are a few hundred bytes, and the WAL writes whole pages (bytes on the SD card).
PAGE_SIZE = 1024
WAL_CHECKPOINT_FRAMES = 4096
WAL_SIZE_LIMIT = 8 * 1024 * 1024
# The WAL as it is between two checkpoints (header, frames of 24 + PAGE_SIZE bytes, a batch's worth over):
# written once at start, so that every commit rewrites blocks the file already has (see _presize_wal).
WAL_PRESIZE = 32 + (WAL_CHECKPOINT_FRAMES + 256) * (24 + PAGE_SIZE)
# ... only where the file system has this many times that free: never the last space on a small disk.
WAL_PRESIZE_FREE_FACTOR = 16
SET_ASIDE_LOG_INTERVAL = 60.0
# Check the size bound after this many commits (and at most every BOUND_CHECK_SECONDS).
BOUND_CHECK_EVERY = 64
PRUNE_CHUNK = 200

# The journal is keyed by its dedupe key alone (WITHOUT ROWID: one B-tree, not a table plus an index, so an
# insert dirties one leaf page instead of two; the WAL writes whole pages).
_SCHEMA = """
CREATE TABLE IF NOT EXISTS commands (
    key          TEXT PRIMARY KEY,
    state        TEXT NOT NULL,
    received     REAL NOT NULL,
    topic        TEXT NOT NULL,
    payload      BLOB,
    meta         TEXT NOT NULL,
    status       INTEGER,
    body         BLOB,
    content_type TEXT,
    finished     REAL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS outbox (
    id        INTEGER PRIMARY KEY,
    kind      TEXT NOT NULL,
    created   REAL NOT NULL,
    topic     TEXT NOT NULL,
    payload   BLOB NOT NULL,
    qos       INTEGER NOT NULL,
    props     TEXT,
    expires   REAL,
    attempts  INTEGER NOT NULL DEFAULT 0,
    set_aside TEXT
);
"""


class StateError(OSError):
    """The state store cannot take a write now (disk full, read-only, removed); the message says why."""


@dataclass(frozen=True)
class OutMessage:
    """A message to publish, in the agent's own terms (paho Properties are built at hand-off)."""

    topic: str
    payload: bytes
    qos: int = 1
    correlation_data: bytes | None = None
    user_properties: tuple[tuple[str, str], ...] = ()
    content_type: str | None = None
    kind: str = "response"
    expires: float | None = None  # wall clock; not sent after this
    id: int | None = None  # its row in the outbox; None: not stored (answered without the disk)
    attempts: int = 0
    created: float | None = None  # wall clock when it was queued (set when read back from the store)

    def stored_as(self, msg_id: int) -> OutMessage:
        """This message with its row id (dataclasses.replace, without its per-call introspection: every
        stored message takes this step on the state writer)."""
        new = object.__new__(OutMessage)
        new.__dict__.update(self.__dict__, id=msg_id)
        return new


@dataclass(frozen=True)
class Record:
    key: str
    state: str
    inbound: Inbound
    response: Response | None


@dataclass(frozen=True)
class Added:
    """The outcome of `add_command`: a new row, or the earlier one (a re-sent id) and what was queued for it."""

    inserted: bool
    record: Record | None = None
    queued: tuple[OutMessage, ...] = ()


def ensure_private_dir(path: Path) -> None:
    """Create `path` (mode 0700) if needed. Raises OSError with the reason."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)



def _props_to_json(msg: OutMessage | Inbound) -> dict[str, object]:
    """The MQTT properties both tables keep (outbox `props`, commands `meta`), as JSON values; only those set."""
    props: dict[str, object] = {}
    if msg.correlation_data is not None:
        props["correlation_data"] = msg.correlation_data.hex()
    if msg.user_properties:
        props["user_properties"] = [list(p) for p in msg.user_properties]
    if msg.content_type is not None:
        props["content_type"] = msg.content_type
    return props


def _props_from_json(props: Mapping[str, Any]) -> dict[str, Any]:
    """`_props_to_json` read back: keyword arguments for OutMessage and Inbound alike."""
    corr = props.get("correlation_data")
    return {"correlation_data": bytes.fromhex(corr) if corr is not None else None,
            "user_properties": tuple((str(k), str(v)) for k, v in props.get("user_properties", [])),
            "content_type": props.get("content_type")}


@functools.lru_cache(maxsize=64)
def _content_type_json(content_type: str) -> str:
    return json.dumps({"content_type": content_type})


def _props_json(msg: OutMessage) -> str | None:
    """The message's MQTT properties as the `props` column stores them (None when it has none)."""
    if msg.correlation_data is None and not msg.user_properties:
        # Most rows (a response on MQTT 3.1.1, telemetry): a content type at most; its JSON made once.
        return _content_type_json(msg.content_type) if msg.content_type is not None else None
    props = _props_to_json(msg)
    return json.dumps(props) if props else None

class StateStore:
    """Owns state.sqlite3: one connection, written only by its GroupWriter thread, read under a lock."""

    def __init__(self, state_dir: Path, *, max_bytes: int = DEFAULT_MAX_BYTES,
                 wall: Callable[[], float] = time.time, clock: Callable[[], float] = time.monotonic) -> None:
        self.state_dir = state_dir
        self.path = state_dir / STATE_FILE
        self._path_str = str(self.path)  # os.stat of a str: the identity check runs before every durable commit
        self.max_bytes = max_bytes
        self._wall = wall
        self._clock = clock
        self.recovered: Counter[str] = Counter()  # reason -> times the store was set aside and started fresh
        self.write_errors = 0
        self.fsyncs = 0
        self.set_aside_total = 0
        self.pruned_total = 0
        self.expired_at_load: Counter[str] = Counter()  # kind -> messages past their expiry when read back
        self._set_aside_unlogged = 0
        self._set_aside_logged_at: float | None = None
        self._lock = threading.Lock()
        self._commits_since_check = 0
        self._size = 0
        self._identity: tuple[int, int] | None = None
        self._lost = False
        self._next_id = 1
        self._db = self._open()
        self._size = self._measure()
        self._writer = GroupWriter(lambda: self._db, self._lock, before_batch=self._check_identity,
                                   on_idle=self._idle, on_fsync=self._committed)

    # --- opening, recovery, migration ------------------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        ensure_private_dir(self.state_dir)
        for stale in remove_stale_temps(self.state_dir):
            log.info("removed %s, a temporary file an interrupted write left behind", stale)
        try:
            db = self._connect()
        except sqlite3.OperationalError:
            raise  # locked by another process, unreadable, an I/O error: not a corrupt file, say so as it is
        except sqlite3.DatabaseError as exc:
            self._set_aside_corrupt(exc)
            db = self._connect()
        self._migrate(db)
        return db

    def _connect(self) -> sqlite3.Connection:
        fresh = not self.path.exists()
        # Create the file 0600 before SQLite opens it: it holds command payloads.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        os.close(fd)
        db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        try:
            if fresh or db.execute("PRAGMA page_count").fetchone()[0] == 0:
                db.execute(f"PRAGMA page_size={PAGE_SIZE}")
                db.execute("PRAGMA auto_vacuum=INCREMENTAL")  # space freed by pruning goes back to the disk
            # One process owns the store. Exclusive before WAL: the WAL index lives in the heap, not in a
            # mmapped -shm file whose header page every commit would dirty (4 KiB written per commit), and a
            # second agent on the same state_dir is refused ("database is locked") instead of sharing it.
            db.execute("PRAGMA locking_mode=EXCLUSIVE")
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA cache_size=-256")  # written, rarely read back: a big page cache only grows RSS
            # A checkpoint costs 3 fsyncs (WAL, database, truncation) and rewrites every page it copies; a
            # command adds ~4 WAL frames. 4096 frames (~4 MiB of WAL) make that one checkpoint per ~1,000
            # commands instead of ~250 (SQLite's default 1000 frames). The WAL file keeps its size after a
            # checkpoint (the limit is above it): rewriting it in place needs no file-system journal commit,
            # growing it again would.
            db.execute(f"PRAGMA wal_autocheckpoint={WAL_CHECKPOINT_FRAMES}")
            db.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")  # the WAL shrinks back after a burst
            db.executescript(_SCHEMA)
            check = db.execute("PRAGMA quick_check(1)").fetchone()
            if not check or check[0] != "ok":
                raise sqlite3.DatabaseError(f"integrity check failed: {check[0] if check else 'no answer'}")
            self._next_id = int(db.execute("SELECT COALESCE(MAX(id), 0) FROM outbox").fetchone()[0]) + 1
            # Rows left from an earlier run were probably sent once already: count that attempt.
            db.execute("UPDATE outbox SET attempts = attempts + 1 WHERE set_aside IS NULL")
        except BaseException:
            db.close()
            raise
        self._presize_wal()
        fsync_dir(self.state_dir)
        st = self.path.stat()
        self._identity = (st.st_dev, st.st_ino)
        return db

    def _presize_wal(self) -> None:
        """Give the WAL its working size: zeros after its last frame (SQLite reads no frame in them).

        A commit that grows a file costs its fsync a file-system journal commit too (the new size and
        blocks), and SQLite deletes the WAL at every clean stop, so without this each start would grow it
        again, commit by commit, up to the first checkpoint: measured here, 140-190 us per commit against
        100-115 us once the file has its size. Only bytes past the end are written: frames a crash or a cut
        left are kept (SQLite has read them already, and writes its next frames over the zeros). Best effort:
        skipped on a file system without WAL_PRESIZE_FREE_FACTOR times the size free; a failed write is
        undone."""
        wal = Path(f"{self.path}-wal")
        try:
            size = wal.stat().st_size
            st = os.statvfs(self.state_dir)
            if size >= WAL_PRESIZE or st.f_bavail * st.f_frsize < WAL_PRESIZE * WAL_PRESIZE_FREE_FACTOR:
                return
            fd = os.open(wal, os.O_WRONLY)
        except OSError:
            return
        try:
            # One page per write: the page cache keeps what one write brings in as one folio (large folios:
            # Linux 6.x), and a commit that dirties one byte of a folio writes all of it back. Written in
            # 256 KiB pieces, the WAL cost 80 KiB of writes per commit instead of 5 (bench/state_disk.py).
            page = bytes(4096)
            at = size
            while at < WAL_PRESIZE:
                at += os.pwrite(fd, page[:min(4096 - at % 4096, WAL_PRESIZE - at)], at)
            os.fsync(fd)
        except OSError as exc:
            log.debug("could not give %s its working size (%s); SQLite grows it instead", wal, exc)
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)
        finally:
            os.close(fd)

    def _set_aside_corrupt(self, exc: BaseException) -> None:
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(self._wall()))
        target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        for suffix in ("", "-wal", "-shm"):
            src = Path(str(self.path) + suffix)
            with contextlib.suppress(FileNotFoundError):
                src.rename(Path(str(target) + suffix))
        fsync_dir(self.state_dir)
        self.recovered["corrupt"] += 1
        log.error("%s is not a usable SQLite database (%s): set aside as %s and started a fresh state store; "
                  "commands it remembered may run again if re-sent, and responses waiting in it are not sent",
                  self.path, exc, target.name, extra={"STATE_RECOVERED": "corrupt"})

    def _migrate(self, db: sqlite3.Connection) -> None:
        """Copy the two files of earlier versions in, once; remove them when the copy is durable."""
        journal, outbox = self.state_dir / LEGACY_JOURNAL, self.state_dir / LEGACY_OUTBOX
        if not journal.exists() and not outbox.exists():
            return
        commands = messages = 0
        db.execute("BEGIN IMMEDIATE")
        try:
            if journal.exists():
                commands, messages = self._migrate_journal(db, journal)
            if outbox.exists():
                messages += self._migrate_outbox(db, outbox)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        for old in (journal, outbox):
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    Path(str(old) + suffix).unlink()
        fsync_dir(self.state_dir)
        log.info("migrated %d journalled command(s) and %d waiting message(s) from %s and %s into %s; the old "
                 "files were removed", commands, messages, LEGACY_JOURNAL, LEGACY_OUTBOX, self.path.name)

    def _legacy_rows(self, path: Path, sql: str) -> list[tuple[object, ...]]:
        try:
            old = sqlite3.connect(f"file:{path}?mode=rw", uri=True)
            try:
                return old.execute(sql).fetchall()
            finally:
                old.close()
        except sqlite3.DatabaseError as exc:
            log.error("%s from an earlier version is unreadable (%s); it is removed without migrating it", path, exc)
            return []

    def _migrate_journal(self, db: sqlite3.Connection, path: Path) -> tuple[int, int]:
        rows = self._legacy_rows(path, "SELECT * FROM commands")
        commands = messages = 0
        for row in rows:
            key, state, received, topic, payload, meta, status, body, content_type, finished, *rest = (
                *row, None, None)[:11]
            delivered = rest[0] if rest else 1
            parsed = parse_request(str(topic))
            new_key = parsed.dedupe_key if parsed is not None and not parsed.one_way else str(key)
            db.execute("INSERT OR IGNORE INTO commands VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (new_key, state, received, topic, payload, meta, status, body, content_type, finished))
            commands += 1
            if state == DONE and delivered == 0 and parsed is not None and status is not None:
                info = json.loads(str(meta))
                self._insert(db, OutMessage(f"{parsed.response_base}/{int(status)}", _as_bytes(body),  # type: ignore[call-overload]
                                            content_type=content_type if content_type is None else str(content_type)))
                messages += 1
                if info.get("response_topic"):
                    corr = info.get("correlation_data")
                    self._insert(db, OutMessage(str(info["response_topic"]), _as_bytes(body),
                                                correlation_data=bytes.fromhex(corr) if corr else None,
                                                user_properties=(("status", str(status)),)))
                    messages += 1
        return commands, messages

    def _migrate_outbox(self, db: sqlite3.Connection, path: Path) -> int:
        rows = self._legacy_rows(path, "SELECT topic, payload, qos, content_type, correlation, user_props FROM outbox"
                                       " ORDER BY seq")
        for topic, payload, qos, content_type, correlation, user_props in rows:
            self._insert(db, OutMessage(
                str(topic), _as_bytes(payload), int(qos), kind="rejection",  # type: ignore[call-overload]
                correlation_data=_as_bytes(correlation) if correlation is not None else None,
                user_properties=tuple((str(k), str(v)) for k, v in json.loads(str(user_props))) if user_props else (),
                content_type=str(content_type) if content_type is not None else None))
        return len(rows)

    # --- health of the file (writer thread) -------------------------------------------------------

    def _check_identity(self) -> None:
        """Before a durable batch: is state.sqlite3 still the file we opened? If not, open a fresh one first."""
        try:
            st = os.stat(self._path_str)  # noqa: PTH116 - a str: no pathlib work per commit
            same = (st.st_dev, st.st_ino) == self._identity
        except FileNotFoundError:
            same = False
        if same:
            return
        if not self._lost:
            self._lost = True  # one line per loss, however long the directory stays unusable
            self.recovered["replaced"] += 1
            log.error("%s was removed or replaced while the agent ran; what it held is lost; opening a fresh "
                      "state store there before anything else is acknowledged", self.path,
                      extra={"STATE_RECOVERED": "replaced"})
        with self._lock:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
            self._identity = None
            try:
                self._db = self._open()
            except (OSError, sqlite3.Error) as exc:
                # Keep a closed connection: every write fails (answered 503) until a later retry succeeds.
                self._db = sqlite3.connect(":memory:", check_same_thread=False, isolation_level=None)
                self._db.close()
                raise StateError(f"cannot open a fresh state store in {self.state_dir}: {exc}") from exc
        self._lost = False
        log.info("opened a fresh state store at %s", self.path)

    def _idle(self) -> None:
        try:
            self._check_identity()
        except StateError:
            pass  # retried at the next tick or write; said once already

    def _committed(self, ops: int) -> None:
        self.fsyncs += 1
        self._commits_since_check += 1
        if self._commits_since_check >= BOUND_CHECK_EVERY:
            self._commits_since_check = 0
            self._size = self._measure()
            if self._size > self.max_bytes:
                self._writer.submit(self._prune_to_bound, durable=False)

    def _measure(self) -> int:
        with self._lock:
            return self._measure_locked()

    def _measure_locked(self) -> int:
        total = 0
        for suffix in ("", "-wal"):
            with contextlib.suppress(OSError):
                total += Path(str(self.path) + suffix).stat().st_size
        return total

    def set_callback_scope(self, scope: Callable[[], contextlib.AbstractContextManager[Any]]) -> None:
        """What the callbacks of each commit run inside (GroupWriter.callback_scope)."""
        self._writer.callback_scope = scope

    @property
    def size_bytes(self) -> int:
        return self._size

    def refresh_size(self) -> int:
        self._size = self._measure()
        return self._size

    # --- writes ----------------------------------------------------------------------------------

    def _insert(self, db: sqlite3.Connection, msg: OutMessage) -> OutMessage:
        if msg.kind not in KINDS:
            raise ValueError(f"unknown message kind {msg.kind!r}")
        msg_id = self._next_id
        db.execute("INSERT INTO outbox (id, kind, created, topic, payload, qos, props, expires)"
                   " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                   (msg_id, msg.kind, self._wall(), msg.topic, msg.payload, msg.qos,
                    _props_json(msg), msg.expires))
        self._next_id += 1
        return msg.stored_as(msg_id)

    def add_command(self, key: str, msg: Inbound, *, running: bool,
                    answer: Callable[[Record], Sequence[OutMessage]],
                    then: Callable[[Outcome[Added]], None]) -> None:
        """Journal a received command (as running if it starts at once); `then` once durable.

        If `key` is journalled already (a re-sent id), nothing is replaced: the messages `answer(record)`
        returns are queued in the same transaction, so the "already executed" answer is durable too."""
        meta = _meta(msg)

        def op(db: sqlite3.Connection) -> Added:
            cur = db.execute(
                "INSERT OR IGNORE INTO commands (key, state, received, topic, payload, meta) VALUES (?, ?, ?, ?, ?, ?)",
                (key, RUNNING if running else QUEUED, msg.received_wall, msg.topic, msg.payload, meta))
            if cur.rowcount == 1:
                return Added(True)
            record = self._lookup(db, key)
            if record is None:
                return Added(False)
            return Added(False, record, tuple(self._insert(db, m) for m in answer(record)))

        self._writer.submit(op, then=then)

    def add_done(self, key: str, msg: Inbound, produce: Callable[[], tuple[Response, Sequence[OutMessage]]], *,
                 answer: Callable[[Record], Sequence[OutMessage]],
                 then: Callable[[Outcome[Added]], None], lead: bool = False) -> None:
        """Journal a command that has run (a pure handler: running it again is harmless) as done, with its
        response and the messages that carry it, in one durable transaction; `then` once durable.

        `produce()` gives (response, messages); it is called inside the transaction, on the committing
        thread (an inline handler runs there), and again should the batch be retried one operation at a time:
        it must give the same answer each time. `queued` of the outcome holds the stored messages. If `key`
        is journalled already (a re-sent id), nothing is replaced: the messages `answer(record)` returns are
        queued instead, as `add_command` does. `lead`: commit on the calling thread if the writer is idle
        (GroupWriter.lead; the caller may block for the fsync)."""
        meta = _meta(msg)

        def op(db: sqlite3.Connection) -> Added:
            response, messages = produce()
            cur = db.execute(
                "INSERT OR IGNORE INTO commands (key, state, received, topic, payload, meta, status, body,"
                " content_type, finished) VALUES (?, ?, ?, ?, NULL, ?, ?, ?, ?, ?)",
                (key, DONE, msg.received_wall, msg.topic, meta, response.status, response.body,
                 response.content_type, self._wall()))
            if cur.rowcount == 1:
                return Added(True, None, tuple(self._insert(db, m) for m in messages))
            record = self._lookup(db, key)
            if record is None:
                return Added(False)
            return Added(False, record, tuple(self._insert(db, m) for m in answer(record)))

        self._writer.submit(op, then=then, lead=lead)

    def mark_running(self, key: str) -> None:
        """Durable before the handler starts (a cut after this answers 500 "interrupted", never re-runs).
        Called on a worker, which commits it itself when the writer is idle."""
        self._writer.call(lambda db: db.execute("UPDATE commands SET state = ? WHERE key = ?", (RUNNING, key)),
                          lead=True)

    def mark_queued(self, key: str) -> None:
        """Undo a running mark for a command that did not start after all (agent stopping). Not waited for:
        the writer commits it before it closes."""
        self._writer.submit(lambda db: db.execute(
            "UPDATE commands SET state = ? WHERE key = ? AND state = ?", (QUEUED, key, RUNNING)))

    def finish(self, key: str, response: Response, messages: Sequence[OutMessage]) -> list[OutMessage]:
        """Store the response and queue its messages in one durable transaction; the messages with ids."""
        def op(db: sqlite3.Connection) -> list[OutMessage]:
            db.execute("UPDATE commands SET state = ?, payload = NULL, status = ?, body = ?, content_type = ?,"
                       " finished = ? WHERE key = ?",
                       (DONE, response.status, response.body, response.content_type, self._wall(), key))
            return [self._insert(db, m) for m in messages]

        return self._writer.call(op)

    def finish_async(self, key: str, response: Response, messages: Sequence[OutMessage],
                     then: Callable[[Outcome[list[OutMessage]]], None], *, lead: bool = False) -> None:
        """`finish` without waiting: `then` hears (with the messages' ids) once it is on disk. `lead`: commit
        on the calling thread if the writer is idle (GroupWriter.lead; the caller may block for the fsync)."""
        def op(db: sqlite3.Connection) -> list[OutMessage]:
            db.execute("UPDATE commands SET state = ?, payload = NULL, status = ?, body = ?, content_type = ?,"
                       " finished = ? WHERE key = ?",
                       (DONE, response.status, response.body, response.content_type, self._wall(), key))
            return [self._insert(db, m) for m in messages]

        self._writer.submit(op, then=then, lead=lead)

    def discard(self, key: str) -> None:
        self._writer.call(lambda db: db.execute("DELETE FROM commands WHERE key = ?", (key,)))

    def enqueue(self, messages: Sequence[OutMessage],
                then: Callable[[Outcome[list[OutMessage]]], None] | None = None, *, lead: bool = False) -> None:
        """Queue `messages`; `then` hears (with their ids) once they are on disk. `lead`: commit on the calling
        thread if the writer is idle (GroupWriter.lead; the caller may block for the fsync)."""
        def op(db: sqlite3.Connection) -> list[OutMessage]:
            return [self._insert(db, m) for m in messages]

        self._writer.submit(op, then=then, lead=lead)

    def enqueue_wait(self, messages: Sequence[OutMessage]) -> list[OutMessage]:
        return self._writer.call(lambda db: [self._insert(db, m) for m in messages])

    def delete_messages(self, ids: Iterable[int]) -> None:
        rows = [(i,) for i in ids]
        if rows:
            self._writer.submit(lambda db: db.executemany("DELETE FROM outbox WHERE id = ?", rows), durable=False)

    def note_attempts(self, ids: Iterable[int]) -> None:
        rows = [(i,) for i in ids]
        if rows:
            self._writer.submit(lambda db: db.executemany(
                "UPDATE outbox SET attempts = attempts + 1 WHERE id = ?", rows), durable=False)

    def replace_message(self, msg: OutMessage) -> None:
        """Send `msg` instead of what row `msg.id` held (a 500 in place of a response that cannot be sent)."""
        self._writer.submit(lambda db: db.execute(
            "UPDATE outbox SET topic = ?, payload = ?, props = ? WHERE id = ?",
            (msg.topic, msg.payload, _props_json(msg), msg.id)))

    def set_aside(self, msg_id: int, reason: str, topic: str = "", *, quiet: bool = False) -> None:
        """Never send message `msg_id` again (a poison message); it stays in the store for an operator.
        `quiet`: the caller logs it (the outbox does, with its own rate limit)."""
        self._writer.submit(lambda db: db.execute("UPDATE outbox SET set_aside = ? WHERE id = ?",
                                                  (reason[:500], msg_id)))
        self.set_aside_total += 1
        if quiet:
            return
        self._set_aside_unlogged += 1
        now = self._clock()
        if self._set_aside_logged_at is None or now - self._set_aside_logged_at >= SET_ASIDE_LOG_INTERVAL:
            log.warning("set aside %d message(s) that cannot be sent (latest: id %d to %s: %s); they stay in %s "
                        "and are not sent again", self._set_aside_unlogged, msg_id, topic[:200], reason[:200],
                        self.path.name)
            self._set_aside_unlogged = 0
            self._set_aside_logged_at = now

    def prune(self, retention: float) -> int:
        """Forget finished commands older than `retention` seconds; returns how many."""
        cutoff = self._wall() - retention
        return int(self._writer.call(lambda db: db.execute(
            "DELETE FROM commands WHERE state = ? AND finished < ?", (DONE, cutoff)).rowcount))

    def enforce_bound(self) -> int:
        """Forget the oldest finished commands until the store fits `max_bytes`; returns how many."""
        return int(self._writer.call(self._prune_to_bound))

    def housekeeping(self, retention: float, max_bytes: int) -> None:
        """The periodic round (once a minute): forget finished commands older than `retention` s (their
        dedupe goes with them), take `max_bytes` as the bound (a reload may change it), and enforce it."""
        pruned = self.prune(retention)
        if pruned:
            log.debug("forgot %d finished commands older than limits.dedupe_retention", pruned)
        self.max_bytes = max_bytes
        if self.refresh_size() > self.max_bytes:
            self.enforce_bound()
            self.refresh_size()

    def _prune_to_bound(self, db: sqlite3.Connection) -> int:
        page_size = int(db.execute("PRAGMA page_size").fetchone()[0])
        removed = 0
        target = int(self.max_bytes * 0.8)
        while True:
            used = (int(db.execute("PRAGMA page_count").fetchone()[0])
                    - int(db.execute("PRAGMA freelist_count").fetchone()[0])) * page_size
            if used <= target:
                break
            cur = db.execute("DELETE FROM commands WHERE key IN (SELECT key FROM commands WHERE state = ?"
                             " ORDER BY finished LIMIT ?)", (DONE, PRUNE_CHUNK))
            if cur.rowcount <= 0:
                break
            removed += cur.rowcount
        if removed:
            # Python's sqlite3 steps this pragma once per execute, and each step frees one page.
            free = int(db.execute("PRAGMA freelist_count").fetchone()[0])
            for _ in range(free):
                db.execute("PRAGMA incremental_vacuum")
            self.pruned_total += removed
            log.info("the state store reached limits.max_state_bytes (%d bytes): forgot the %d oldest finished "
                     "command(s)", self.max_bytes, removed)
        return removed

    # --- reads ---------------------------------------------------------------------------------------

    def _lookup(self, db: sqlite3.Connection, key: str) -> Record | None:
        row = db.execute("SELECT key, state, received, topic, payload, meta, status, body, content_type"
                         " FROM commands WHERE key = ?", (key,)).fetchone()
        return _record(row) if row else None

    def lookup(self, key: str) -> Record | None:
        with self._lock:
            return self._lookup(self._db, key)

    def pending(self) -> list[Record]:
        """Commands not finished, oldest first (after a restart: queued ones to run, running ones interrupted)."""
        with self._lock:
            rows = self._db.execute("SELECT key, state, received, topic, payload, meta, status, body, content_type"
                                    " FROM commands WHERE state != ? ORDER BY received", (DONE,)).fetchall()
        return [_record(r) for r in rows]

    def queued_messages(self, kind: str | None = None) -> list[OutMessage]:
        """Messages waiting for the broker, oldest first; expired ones are deleted instead."""
        now = self._wall()
        sql = ("SELECT id, kind, topic, payload, qos, props, expires, attempts, created FROM outbox"
               " WHERE set_aside IS NULL"
               + (" AND kind = ?" if kind else "") + " ORDER BY id")
        with self._lock:
            rows = self._db.execute(sql, (kind,) if kind else ()).fetchall()
        out: list[OutMessage] = []
        expired: list[int] = []
        for msg_id, kind_, topic, payload, qos, props_text, expires, attempts, created in rows:
            if expires is not None and float(expires) < now:
                expired.append(int(msg_id))
                self.expired_at_load[str(kind_)] += 1
                continue
            props = json.loads(str(props_text)) if props_text else {}
            out.append(OutMessage(
                topic=str(topic), payload=bytes(payload), qos=int(qos), kind=str(kind_), **_props_from_json(props),
                expires=float(expires) if expires is not None else None,
                id=int(msg_id), attempts=int(attempts), created=float(created)))
        if expired:
            log.info("%d queued message(s) expired before they could be sent; dropped", len(expired))
            self.delete_messages(expired)
        return out

    def close(self) -> None:
        self._writer.close()
        with self._lock:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._db.close()


def _as_bytes(value: object) -> bytes:
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    return b""


def _meta(msg: Inbound) -> str:
    meta: dict[str, object] = {"qos": msg.qos} if msg.qos != 1 else {}
    # Only what a request carries beyond the usual: most (MQTT 3.1.1) commands store "{}".
    if msg.response_topic is not None:
        meta["response_topic"] = msg.response_topic
    if msg.message_expiry is not None:
        meta["message_expiry"] = msg.message_expiry
    meta.update(_props_to_json(msg))
    return json.dumps(meta) if meta else "{}"


def _record(row: tuple[object, ...]) -> Record:
    key, state, received, topic, payload, meta_text, status, body, content_type = row
    meta = json.loads(str(meta_text))
    inbound = Inbound(
        topic=str(topic),
        payload=_as_bytes(payload),
        qos=int(meta.get("qos", 1)),
        received_wall=float(received),  # type: ignore[arg-type]
        response_topic=meta.get("response_topic"),
        message_expiry=meta.get("message_expiry"),
        **_props_from_json(meta),
    )
    response = None
    if state == DONE and status is not None:
        response = Response(int(status), _as_bytes(body),  # type: ignore[call-overload]
                            str(content_type) if content_type is not None else None)
    return Record(str(key), str(state), inbound, response)
