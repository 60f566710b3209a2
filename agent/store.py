"""Persistent command journal in `state_dir` (SQLite).

Every two-way command is recorded before the broker gets its PUBACK (paho acknowledges when
`on_message` returns), so neither a crash nor a stop loses it, and a redelivered REQ_ID is
recognised after an agent restart:

    queued   received, not started          -> executed at the next start
    running  handler started                -> if the agent died: answered 500 "interrupted", not re-run
    done     response stored                -> a duplicate gets the stored response again

A finished command's row also holds its response until the broker has acknowledged it
(`delivered` = 0): the outbox keeps such responses in memory only, and after a crash the
dispatcher sends them again from here. One write per response instead of two.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from agent.protocol import Inbound, Response

QUEUED = "queued"
RUNNING = "running"
DONE = "done"

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
    finished     REAL,
    delivered    INTEGER NOT NULL DEFAULT 1
);
DROP INDEX IF EXISTS commands_finished;
"""


@dataclass(frozen=True)
class Record:
    key: str
    state: str
    inbound: Inbound
    response: Response | None


def ensure_private_dir(path: Path) -> None:
    """Create `path` (mode 0700) if needed. Raises OSError with the reason."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)


class CommandStore:
    """Thread-safe; one connection guarded by a lock (writes are tiny, WAL keeps them cheap)."""

    def __init__(self, path: Path, *, wall: Callable[[], float] = time.time) -> None:
        self.path = path
        self._wall = wall
        ensure_private_dir(path.parent)
        # Create the file 0600 before SQLite opens it: it holds command payloads.
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        os.close(fd)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode: a commit survives a process crash; only an OS crash may lose the last ones.
            self._db.execute("PRAGMA synchronous=NORMAL")
            # A small page cache: the journal is written, rarely read back; the default 2 MB only grows RSS.
            self._db.execute("PRAGMA cache_size=-256")
            self._db.executescript(_SCHEMA)
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(commands)")}
            if "delivered" not in columns:  # a journal written by an earlier version
                self._db.execute("ALTER TABLE commands ADD COLUMN delivered INTEGER NOT NULL DEFAULT 1")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def lookup(self, key: str) -> Record | None:
        with self._lock:  # a plain lock: a generator context manager costs more than the write
            db = self._db
            row = db.execute(
                "SELECT key, state, received, topic, payload, meta, status, body, content_type"
                " FROM commands WHERE key = ?",
                (key,),
            ).fetchone()
        return _record(row) if row else None

    def add(self, key: str, msg: Inbound, *, running: bool = False) -> bool:
        """Record a newly received command (as running if it starts at once). False if `key` is
        journalled already (a redelivery): nothing is replaced."""
        meta: dict[str, object] = {"qos": msg.qos} if msg.qos != 1 else {}
        # Only what a request carries beyond the usual: most (MQTT 3.1.1) commands store "{}".
        if msg.response_topic is not None:
            meta["response_topic"] = msg.response_topic
        if msg.correlation_data is not None:
            meta["correlation_data"] = msg.correlation_data.hex()
        if msg.user_properties:
            meta["user_properties"] = [list(p) for p in msg.user_properties]
        if msg.message_expiry is not None:
            meta["message_expiry"] = msg.message_expiry
        if msg.content_type is not None:
            meta["content_type"] = msg.content_type
        with self._lock:
            db = self._db
            cur = db.execute(
                "INSERT OR IGNORE INTO commands (key, state, received, topic, payload, meta)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (key, RUNNING if running else QUEUED, msg.received_wall, msg.topic, msg.payload,
                 json.dumps(meta) if meta else "{}"),
            )
            return cur.rowcount == 1

    def mark_running(self, key: str) -> None:
        with self._lock:
            db = self._db
            db.execute("UPDATE commands SET state = ? WHERE key = ?", (RUNNING, key))

    def mark_queued(self, key: str) -> None:
        """Undo a running mark for a command that did not start after all (agent stopping)."""
        with self._lock:
            db = self._db
            db.execute("UPDATE commands SET state = ? WHERE key = ? AND state = ?", (QUEUED, key, RUNNING))

    def finish(self, key: str, response: Response, *, deliver: bool = False) -> None:
        """Store the response; the payload is no longer needed and is dropped. `deliver`: the response is
        being published and stays pending here until `mark_delivered`."""
        with self._lock:
            db = self._db
            db.execute(
                "UPDATE commands SET state = ?, payload = NULL, status = ?, body = ?, content_type = ?,"
                " finished = ?, delivered = ? WHERE key = ?",
                (DONE, response.status, response.body, response.content_type, self._wall(), 0 if deliver else 1, key),
            )

    def mark_delivered(self, keys: Sequence[str]) -> None:
        """The broker acknowledged (or the outbox gave up on) the responses of these commands."""
        with self._lock:
            db = self._db
            db.execute("BEGIN")
            db.executemany("UPDATE commands SET delivered = 1 WHERE key = ?", [(k,) for k in keys])
            db.execute("COMMIT")

    def undelivered(self) -> list[Record]:
        """Finished commands whose response the broker never acknowledged (the agent died), oldest first."""
        with self._lock:
            db = self._db
            rows = db.execute(
                "SELECT key, state, received, topic, payload, meta, status, body, content_type"
                " FROM commands WHERE state = ? AND delivered = 0 ORDER BY finished",
                (DONE,),
            ).fetchall()
        return [_record(r) for r in rows]

    def discard(self, key: str) -> None:
        with self._lock:
            db = self._db
            db.execute("DELETE FROM commands WHERE key = ?", (key,))

    def pending(self) -> list[Record]:
        """Commands not finished, oldest first (after a restart: queued ones to run, running ones interrupted)."""
        with self._lock:
            db = self._db
            rows = db.execute(
                "SELECT key, state, received, topic, payload, meta, status, body, content_type"
                " FROM commands WHERE state != ? ORDER BY received",
                (DONE,),
            ).fetchall()
        return [_record(r) for r in rows]

    def prune(self, retention: float) -> int:
        """Forget finished commands older than `retention` seconds; returns how many."""
        with self._lock:
            db = self._db
            cur = db.execute("DELETE FROM commands WHERE state = ? AND finished < ?", (DONE, self._wall() - retention))
            return cur.rowcount


def _record(row: tuple[object, ...]) -> Record:
    key, state, received, topic, payload, meta_text, status, body, content_type = row
    meta = json.loads(str(meta_text))
    corr = meta.get("correlation_data")
    inbound = Inbound(
        topic=str(topic),
        payload=bytes(payload) if isinstance(payload, (bytes, bytearray, memoryview)) else b"",
        qos=int(meta.get("qos", 1)),
        received_wall=float(received),  # type: ignore[arg-type]
        response_topic=meta.get("response_topic"),
        correlation_data=bytes.fromhex(corr) if corr is not None else None,
        user_properties=tuple((str(k), str(v)) for k, v in meta.get("user_properties", [])),
        message_expiry=meta.get("message_expiry"),
        content_type=meta.get("content_type"),
    )
    response = None
    if state == DONE and status is not None:
        response = Response(int(status), bytes(body) if body is not None else b"",  # type: ignore[call-overload]
                            str(content_type) if content_type is not None else None)
    return Record(str(key), str(state), inbound, response)
