"""The state store (real SQLite in a temp dir): group commit, the outbound queue's API, recovery, migration,
the size bound."""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from agent.protocol import Inbound, Response
from agent.state.store import STATE_FILE, Added, OutMessage, StateStore
from agent.state.writer import Outcome


def inbound(req: str, command: str = "echo", payload: bytes = b"") -> Inbound:
    return Inbound(topic=f"command///req/{req}/{command}", payload=payload, received_wall=time.time())


def add(store: StateStore, key: str, msg: Inbound, running: bool = False) -> Added:
    box: list[Outcome[Added]] = []
    done = threading.Event()
    store.add_command(key, msg, running=running, answer=lambda r: [OutMessage("again", b"x")],
                      then=lambda o: (box.append(o), done.set()))
    assert done.wait(5)
    assert box[0].error is None and box[0].value is not None
    return box[0].value


def test_many_commands_share_one_commit_and_are_acknowledged_in_order(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    order: list[int] = []
    done = threading.Event()
    fsyncs_before = store.fsyncs
    for n in range(200):
        store.add_command(f"k{n}", inbound(str(n)), running=False, answer=lambda r: [],
                          then=lambda o, n=n: (order.append(n), n == 199 and done.set()))
    assert done.wait(10)
    assert order == list(range(200))
    assert store.fsyncs - fsyncs_before < 200  # group commit: fewer durable commits than commands
    assert len(store.pending()) == 200
    store.close()


def test_a_re_sent_id_gets_its_stored_answer_queued_in_the_same_commit(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    assert add(store, "a", inbound("1")).inserted
    store.finish("a", Response(200, b"done"), [OutMessage("command///res/1/200", b"done")])
    again = add(store, "a", inbound("1"))
    assert not again.inserted and again.record is not None and again.record.response == Response(200, b"done")
    assert [m.topic for m in again.queued] == ["again"]
    assert [m.topic for m in store.queued_messages()] == ["command///res/1/200", "again"]
    store.close()


def test_outbound_queue_kinds_order_expiry_attempts_and_set_aside(tmp_path: Path, caplog: pytest.LogCaptureFixture
                                                                  ) -> None:
    store = StateStore(tmp_path)
    stored = store.enqueue_wait([
        OutMessage("t/1", b"1", kind="telemetry"),
        OutMessage("e/1", b"1", kind="event", user_properties=(("a", "b"),), correlation_data=b"\x00"),
        OutMessage("t/2", b"2", kind="telemetry", qos=0),
        OutMessage("t/old", b"", kind="telemetry", expires=time.time() - 1),
    ])
    assert [m.id for m in stored] == sorted(m.id for m in stored)
    assert [m.topic for m in store.queued_messages("telemetry")] == ["t/1", "t/2"]
    event = store.queued_messages("event")[0]
    assert (event.user_properties, event.correlation_data) == ((("a", "b"),), b"\x00")
    assert stored[0].id is not None and stored[1].id is not None
    store.note_attempts([stored[0].id, stored[0].id])
    with caplog.at_level(logging.WARNING):
        store.set_aside(stored[1].id, "broker refuses it: 0x97")
        store.set_aside(stored[2].id, "too large")  # within the minute: counted, not logged again
    store.enqueue_wait([])
    assert store.set_aside_total == 2
    assert len([r for r in caplog.records if "set aside" in r.getMessage()]) == 1
    assert [(m.topic, m.attempts) for m in store.queued_messages()] == [("t/1", 2)]
    with pytest.raises(ValueError, match="unknown message kind"):
        store.enqueue_wait([OutMessage("x", b"", kind="gossip")])
    store.close()
    again = StateStore(tmp_path)
    assert [(m.topic, m.attempts) for m in again.queued_messages()] == [("t/1", 3)]  # one more: the restart
    again.close()


@pytest.mark.parametrize("garbage", [b"\x00garbage\xff" * 500, b"SQLite format 3\x00" + b"\xff" * 4000])
def test_a_corrupt_store_is_set_aside_and_a_fresh_one_started(tmp_path: Path, garbage: bytes,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / STATE_FILE).write_bytes(garbage)
    with caplog.at_level(logging.ERROR):
        store = StateStore(tmp_path)
    assert store.recovered["corrupt"] == 1
    aside = list(tmp_path.glob(f"{STATE_FILE}.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == garbage
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "set aside as" in errors[0].getMessage() and not errors[0].exc_info
    assert add(store, "k", inbound("1")).inserted  # and it works
    store.close()


def test_garbage_in_the_wal_is_ignored(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    add(store, "k", inbound("1"))
    store.close()
    (tmp_path / f"{STATE_FILE}-wal").write_bytes(b"\xde\xad" * 2000)
    (tmp_path / f"{STATE_FILE}-shm").write_bytes(b"\xbe\xef" * 2000)
    again = StateStore(tmp_path)
    assert [r.key for r in again.pending()] == ["k"] and again.recovered["corrupt"] == 0
    again.close()


def test_a_removed_state_dir_is_noticed_before_the_next_commit(tmp_path: Path) -> None:
    state = tmp_path / "state"
    store = StateStore(state)
    add(store, "old", inbound("1"))
    for p in state.iterdir():
        p.unlink()
    state.rmdir()
    assert add(store, "new", inbound("2")).inserted
    assert store.recovered["replaced"] == 1
    assert (state / STATE_FILE).exists()
    store.close()
    again = StateStore(state)
    assert [r.key for r in again.pending()] == ["new"]  # committed into the fresh file, not the deleted one
    again.close()


def test_a_removed_state_dir_is_noticed_while_idle(tmp_path: Path) -> None:
    state = tmp_path / "state"
    store = StateStore(state)
    for p in state.iterdir():
        p.unlink()
    state.rmdir()
    end = time.monotonic() + 5
    while not (state / STATE_FILE).exists() and time.monotonic() < end:
        time.sleep(0.05)  # the writer's idle tick (1 s) notices and opens a fresh store
    assert store.recovered["replaced"] == 1 and (state / STATE_FILE).exists()
    store.close()


def test_old_files_are_migrated_once(tmp_path: Path) -> None:
    old = sqlite3.connect(str(tmp_path / "commands.sqlite3"))
    old.executescript("""CREATE TABLE commands (key TEXT PRIMARY KEY, state TEXT NOT NULL, received REAL NOT NULL,
        topic TEXT NOT NULL, payload BLOB, meta TEXT NOT NULL, status INTEGER, body BLOB, content_type TEXT,
        finished REAL, delivered INTEGER NOT NULL DEFAULT 1);""")
    old.execute("INSERT INTO commands VALUES ('//7', 'done', 1, 'command///req/7/ping', NULL, ?, 200, 'pong', NULL,"
                " 2, 0)", (json.dumps({"response_topic": "r/7", "correlation_data": "0102"}),))
    old.execute("INSERT INTO commands VALUES ('//8', 'queued', 1, 'command///req/8/echo', 'hi', '{}', NULL, NULL,"
                " NULL, NULL, 1)")
    old.commit()
    old.close()
    ob = sqlite3.connect(str(tmp_path / "outbox.sqlite3"))
    ob.executescript("""CREATE TABLE outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, created REAL NOT NULL,
        topic TEXT NOT NULL, payload BLOB NOT NULL, qos INTEGER NOT NULL, content_type TEXT, correlation BLOB,
        user_props TEXT);
        INSERT INTO outbox (created, topic, payload, qos) VALUES (1, 'command///res/9/404', 'no', 1);""")
    ob.commit()
    ob.close()
    store = StateStore(tmp_path)
    assert not (tmp_path / "commands.sqlite3").exists() and not (tmp_path / "outbox.sqlite3").exists()
    assert [r.key for r in store.pending()] == ["//8/echo"]  # the new key: with the command name
    assert store.lookup("//7/ping") is not None
    msgs = store.queued_messages()
    assert [(m.topic, m.kind) for m in msgs] == [("command///res/7/200", "response"), ("r/7", "response"),
                                                 ("command///res/9/404", "rejection")]
    assert msgs[1].correlation_data == b"\x01\x02"
    store.close()


def test_the_size_bound_forgets_the_oldest_finished_commands_first(tmp_path: Path) -> None:
    store = StateStore(tmp_path, max_bytes=1024 * 1024)
    body = b"x" * 60000
    for n in range(40):
        add(store, f"k{n:02d}", inbound(str(n)))
        store.finish(f"k{n:02d}", Response(200, body), [])
    add(store, "waiting", inbound("w"))
    store.enforce_bound()  # also done by itself every BOUND_CHECK_EVERY commits
    assert store.pruned_total > 0
    assert store.lookup("k00") is None and store.lookup("k39") is not None
    assert store.lookup("waiting") is not None  # unfinished commands are never pruned
    store.close()
    size = (tmp_path / STATE_FILE).stat().st_size
    assert size <= 1024 * 1024, size  # the space went back to the disk (incremental vacuum)


def test_a_second_agent_on_the_same_state_dir_is_refused_not_treated_as_corrupt(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    add(store, "k", inbound("1"))
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        StateStore(tmp_path)
    assert list(tmp_path.glob("*.corrupt-*")) == []
    store.close()
    assert [r.key for r in StateStore(tmp_path).pending()] == ["k"]


def test_stored_as_is_the_message_with_its_row_id() -> None:
    import dataclasses

    msg = OutMessage("t/1", b"p", 1, correlation_data=b"c", user_properties=(("k", "v"),), content_type="a/b",
                     kind="event", expires=5.0, attempts=2, created=1.0)
    stored = msg.stored_as(42)
    assert stored == dataclasses.replace(msg, id=42)
    assert msg.id is None  # the original is unchanged
    with pytest.raises(dataclasses.FrozenInstanceError):
        stored.id = 1  # type: ignore[misc]
