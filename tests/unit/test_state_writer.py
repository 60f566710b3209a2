"""GroupWriter.lead: the caller commits itself when no batch is in progress, queues behind one otherwise;
batches never overlap and callbacks keep the commit order."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Any

from agent.state.writer import GroupWriter, Outcome


def writer(tmp_path: Path) -> tuple[GroupWriter, sqlite3.Connection]:
    db = sqlite3.connect(str(tmp_path / "w.db"), check_same_thread=False, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE t (n INTEGER)")
    return GroupWriter(lambda: db, threading.Lock()), db


def test_an_idle_writer_lets_the_caller_commit_on_its_own_thread(tmp_path: Path) -> None:
    w, db = writer(tmp_path)
    seen: list[Any] = []
    try:
        led = w.lead(lambda c: c.execute("INSERT INTO t VALUES (1)").rowcount,
                     then=lambda o: seen.append((threading.get_ident(), o.value, o.error)))
        assert led is True
        assert seen == [(threading.get_ident(), 1, None)]  # committed and called back before lead returned
        assert db.execute("SELECT n FROM t").fetchall() == [(1,)]
        assert w.call(lambda c: c.execute("SELECT count(*) FROM t").fetchone()[0], lead=True) == 1
    finally:
        w.close()


def test_a_busy_writer_takes_the_led_operation_into_its_next_batch_in_order(tmp_path: Path) -> None:
    w, db = writer(tmp_path)
    entered, release = threading.Event(), threading.Event()
    order: list[tuple[str, int]] = []

    def slow(c: sqlite3.Connection) -> None:
        entered.set()
        release.wait(5)
        c.execute("INSERT INTO t VALUES (0)")

    try:
        w.submit(slow, then=lambda o: order.append(("slow", threading.get_ident())))
        assert entered.wait(5)
        led = w.lead(lambda c: c.execute("INSERT INTO t VALUES (2)"),
                     then=lambda o: order.append(("led", threading.get_ident())))
        assert led is False and order == []  # queued: the caller did not wait for the busy batch
        release.set()
        w.call(lambda c: None)  # a barrier: everything before it is committed
        assert [name for name, _ in order] == ["slow", "led"]
        assert order[0][1] == order[1][1] != threading.get_ident()  # both on the writer thread
        assert db.execute("SELECT n FROM t ORDER BY rowid").fetchall() == [(0,), (2,)]
    finally:
        w.close()


def test_a_closed_writer_tells_the_leader(tmp_path: Path) -> None:
    w, _ = writer(tmp_path)
    w.close()
    got: list[Outcome[Any]] = []
    assert w.lead(lambda c: None, then=got.append) is False
    assert got and isinstance(got[0].error, RuntimeError)
