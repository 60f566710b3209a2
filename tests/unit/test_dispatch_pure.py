"""The short path of pure handlers (`pure = True`: ping, info): run first, journalled as done together with
the answer in one durable commit, acknowledged after it; and PUBACKs in arrival order for every command."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

from agent.config import LimitsConfig
from agent.protocol import Inbound, Request, Response
from agent.state.store import DONE, StateStore
from agent.state.writer import Outcome
from tests.unit.test_dispatch import Counter, Gate, msg, parts  # `parts`: the fixture

__all__ = ["parts"]


class PureGate(Gate):
    pure = True


class PureCounter(Counter):
    pure = True


def wait_for(cond: Any, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.005)


def with_the_only_worker_busy(parts: dict[str, Any], name: str, handler: Any) -> tuple[Any, Any, StateStore, Gate]:
    """A dispatcher with one worker, held by a `slow` command (released through the returned Gate)."""
    gate = Gate()
    d, rec = parts["make"](LimitsConfig(max_concurrent_commands=1), handlers={"slow": gate, name: handler})
    d.accept(msg("command///req/s1/slow"))
    assert gate.entered.wait(5)
    return d, rec, parts["store"], gate


def test_a_pure_command_costs_one_durable_commit_and_is_acknowledged_after_it(parts: dict[str, Any]) -> None:
    d, rec = parts["make"]()
    store: StateStore = parts["store"]
    store.enqueue_wait([])  # start from a quiet writer
    commits = store.fsyncs
    seen: list[Any] = []
    acked = threading.Event()

    def ack() -> None:  # what the journal holds when the PUBACK is sent
        seen.append(store.lookup("//r1/ping"))
        acked.set()

    d.accept(msg("command///req/r1/ping"), ack)
    assert acked.wait(5)
    topic, body, meta = rec.wait(1)[0]
    assert topic == "command///res/r1/200" and json.loads(body)["device_id"] == "gw"
    assert meta["id"] is not None  # the response was stored before it was handed over
    record = seen[0]
    assert record is not None and record.state == DONE and record.response is not None
    assert record.response.body == body
    assert store.fsyncs - commits == 1


def test_an_effectful_command_keeps_two_durable_points(parts: dict[str, Any]) -> None:
    counter = Counter()
    d, rec = parts["make"](handlers={"count": counter})
    store: StateStore = parts["store"]
    store.enqueue_wait([])
    commits = store.fsyncs
    seen: list[Any] = []
    d.accept(msg("command///req/e1/count"), lambda: seen.append(store.lookup("//e1/count")))
    rec.wait(1)
    wait_for(lambda: store.fsyncs - commits >= 2)
    assert seen and seen[0] is not None and seen[0].state == "running"  # durable (as running) before the PUBACK
    assert counter.runs == 1 and store.fsyncs - commits == 2


def test_a_pure_handler_needs_no_running_mark(parts: dict[str, Any]) -> None:
    """Queued behind busy workers, a pure command is journalled first (the ordinary path) but starts without
    a durable running mark: running it again after a cut is harmless."""
    pure = PureCounter()
    d, rec, store, gate = with_the_only_worker_busy(parts, "look", pure)

    def failing(key: str) -> None:
        raise AssertionError("a pure command was marked running")

    store.mark_running = failing  # type: ignore[method-assign]
    acked = threading.Event()
    d.accept(msg("command///req/p1/look"), acked.set)
    assert acked.wait(5)  # journalled (queued) and acknowledged while the effectful command holds the worker
    assert pure.runs == 0
    gate.release.set()
    topics = {t for t, _, _ in rec.wait(2)}
    assert topics == {"command///res/s1/200", "command///res/p1/200"}
    assert pure.runs == 1


def test_pubacks_go_out_in_arrival_order(parts: dict[str, Any]) -> None:
    """A later command that is durable first waits for the PUBACK of an earlier one (MQTT 3.1.1, 4.6)."""
    gate = PureGate()
    counter = Counter()
    d, rec = parts["make"](handlers={"look": gate, "count": counter})
    acks: list[str] = []
    d.accept(msg("command///req/a/look"), lambda: acks.append("a"))
    assert gate.entered.wait(5)
    d.accept(msg("command///req/b/count"), lambda: acks.append("b"))
    rec.wait(1)  # b ran and was answered: its row was durable long ago
    assert acks == []
    gate.release.set()
    wait_for(lambda: len(acks) == 2)
    assert acks == ["a", "b"]


def test_a_pure_command_redelivered_while_it_runs_is_acknowledged_with_it_and_runs_once(
        parts: dict[str, Any]) -> None:
    gate = PureGate()
    d, rec = parts["make"](handlers={"look": gate})
    acks: list[str] = []
    d.accept(msg("command///req/same/look"), lambda: acks.append("first"))
    assert gate.entered.wait(5)
    d.accept(msg("command///req/same/look", dup=True), lambda: acks.append("again"))
    time.sleep(0.1)
    assert acks == [] and rec.sent == []  # nothing durable yet: no PUBACK for either
    gate.release.set()
    sent = rec.wait(2)
    wait_for(lambda: len(acks) == 2)
    assert [t for t, _, _ in sent] == ["command///res/same/200"] * 2
    assert gate.runs == 1 and acks == ["first", "again"]


def test_a_pure_command_delivered_again_after_its_commit_is_answered_from_the_journal(
        parts: dict[str, Any]) -> None:
    """It may run again (harmless), but the answer that goes out is the stored one."""
    pure = PureCounter()
    d, rec = parts["make"](handlers={"look": pure})
    d.accept(msg("command///req/r/look"))
    first = rec.wait(1)[0]
    d.accept(msg("command///req/r/look", dup=True))
    second = rec.wait(2)[1]
    assert second[0] == first[0] and second[1] == first[1]
    assert d.stats.duplicates == 1


def test_a_pure_command_that_cannot_be_journalled_is_answered_503_and_acknowledged(
        parts: dict[str, Any]) -> None:
    d, rec = parts["make"]()
    store: StateStore = parts["store"]

    def failing(key: str, m: Inbound, produce: Any, *, answer: Any, then: Any,
                lead: bool = False) -> None:
        then(Outcome(error=OSError(28, "No space left on device")))

    store.add_done = failing  # type: ignore[method-assign]
    acked = threading.Event()
    d.accept(msg("command///req/full/ping"), acked.set)
    assert acked.wait(5)
    topic, body, meta = rec.wait(1)[0]
    assert topic == "command///res/full/503" and meta["id"] is None
    assert "cannot record the command in its journal" in json.loads(body)["error"]
    assert d.stats.rejected["journal_error"] == 1
    wait_for(lambda: d.queued == 0 and d.in_flight == 0)


def test_drain_waits_for_pure_commands_not_yet_journalled(parts: dict[str, Any]) -> None:
    gate = PureGate()
    d, rec = parts["make"](handlers={"look": gate})
    d.accept(msg("command///req/x/look"))
    assert gate.entered.wait(5)
    d.stop_accepting()
    assert not d.drain(0.2)
    gate.release.set()
    assert d.drain(5)
    assert [t for t, _, _ in rec.sent] == ["command///res/x/200"]


class Reader:
    pure = True

    def handle(self, request: Request) -> Response:
        return Response.ok({"ok": True})


def test_a_plugin_declares_itself_pure_with_an_attribute(parts: dict[str, Any]) -> None:
    d, rec = parts["make"](handlers={"read": Reader()})
    store: StateStore = parts["store"]
    store.enqueue_wait([])
    commits = store.fsyncs
    d.accept(msg("command///req/p/read"))
    rec.wait(1)
    wait_for(lambda: store.fsyncs > commits)
    time.sleep(0.05)
    assert store.fsyncs - commits == 1


class InlineCounter(PureCounter):
    inline = True

    def __init__(self) -> None:
        super().__init__()
        self.threads: list[str] = []

    def handle(self, request: Request) -> Response:
        self.threads.append(threading.current_thread().name)
        return super().handle(request)


def test_an_inline_command_runs_in_the_commit_that_journals_it_even_with_every_worker_busy(
        parts: dict[str, Any]) -> None:
    """`ping` under load: no worker, no second commit; journalled as done with its answer before its PUBACK."""
    inline = InlineCounter()
    d, rec, store, gate = with_the_only_worker_busy(parts, "quick", inline)
    wait_for(lambda: d.in_flight == 1)
    commits = store.fsyncs
    seen: list[Any] = []
    acked = threading.Event()

    def ack() -> None:
        seen.append(store.lookup("//q1/quick"))
        acked.set()

    d.accept(msg("command///req/q1/quick"), ack)
    assert acked.wait(5)  # answered while the only worker is still held by the slow command
    topic, body, meta = rec.wait(1)[0]
    assert topic == "command///res/q1/200" and meta["id"] is not None
    assert seen[0] is not None and seen[0].state == DONE and seen[0].response.body == body
    assert inline.threads == ["state-writer"] and store.fsyncs - commits == 1
    gate.release.set()
    assert {t for t, _, _ in rec.wait(2)} == {"command///res/q1/200", "command///res/s1/200"}


def test_inline_commands_share_a_commit_and_are_acknowledged_in_arrival_order(parts: dict[str, Any]) -> None:
    inline = InlineCounter()
    counter = Counter()
    d, rec = parts["make"](handlers={"quick": inline, "count": counter})
    store: StateStore = parts["store"]
    store.enqueue_wait([])
    commits = store.fsyncs
    acks: list[str] = []
    names = [f"q{n}" if n % 3 else f"c{n}" for n in range(60)]
    for name in names:
        d.accept(msg(f"command///req/{name}/{'quick' if name[0] == 'q' else 'count'}"),
                 lambda name=name: acks.append(name))
    wait_for(lambda: len(acks) == len(names))
    assert acks == names
    rec.wait(len(names))
    assert inline.runs == 40 and counter.runs == 20
    assert store.fsyncs - commits < len(names)  # group commit: far fewer fsyncs than commands


def test_an_inline_handler_that_raises_is_answered_500_and_the_others_of_its_commit_still_land(
        parts: dict[str, Any]) -> None:
    class Broken(InlineCounter):
        def handle(self, request: Request) -> Response:
            raise RuntimeError("boom")

    d, rec = parts["make"](handlers={"broken": Broken()})
    d.accept(msg("command///req/b1/broken"))
    d.accept(msg("command///req/p1/ping"))
    sent = {t: json.loads(b) for t, b, _ in rec.wait(2)}
    assert set(sent) == {"command///res/b1/500", "command///res/p1/200"}
    assert parts["store"].lookup("//b1/broken").response.status == 500
    wait_for(lambda: d.queued == 0 and d.in_flight == 0)
