"""Dispatcher (pure core with a recording responder and a real state store): limits, dedupe,
timeouts, restart recovery, and a fuzz run showing that no input makes an exception escape."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.commands.dispatch import Dispatcher
from agent.commands.handlers import HandlerRegistry
from agent.commands.handlers.builtin import PingHandler
from agent.config import LimitsConfig
from agent.protocol import BadRequest, Inbound, Request, Response
from agent.state.store import OutMessage, StateStore
from agent.state.writer import Outcome


class Recorder:
    """A Responder that records what would go to the broker (and whether it was stored first)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, dict[str, Any]]] = []
        self.cond = threading.Condition()

    def adopt(self, messages: list[OutMessage]) -> None:
        for m in messages:
            self._record(m)

    def put_volatile(self, msg: OutMessage) -> None:
        self._record(msg)

    def _record(self, m: OutMessage) -> None:
        with self.cond:
            self.sent.append((m.topic, m.payload, {"correlation_data": m.correlation_data, "id": m.id,
                                                   "user_properties": m.user_properties, "kind": m.kind}))
            self.cond.notify_all()

    def wait(self, n: int, timeout: float = 5.0) -> list[tuple[str, bytes, dict[str, Any]]]:
        end = time.monotonic() + timeout
        with self.cond:
            while len(self.sent) < n:
                left = end - time.monotonic()
                assert left > 0, f"expected {n} publishes, got {self.sent}"
                self.cond.wait(left)
            return list(self.sent)

    def statuses(self) -> list[int]:
        return [int(t.rsplit("/", 1)[1]) for t, _, _ in self.sent if t.startswith(("command/", "c/"))]


class Gate:
    """A handler that blocks until released, counting its runs."""

    def __init__(self, timeout: float | None = None) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()
        self.runs = 0
        if timeout is not None:
            self.timeout = timeout

    def handle(self, request: Request) -> Response:
        self.runs += 1
        self.entered.set()
        self.release.wait(10)
        return Response.ok({"runs": self.runs})


class Counter:
    def __init__(self) -> None:
        self.runs = 0

    def handle(self, request: Request) -> Response:
        self.runs += 1
        return Response.ok({"device": request.device_id, "gateway": request.via_gateway,
                            "props": [list(p) for p in request.user_properties]})


class Boom:
    def handle(self, request: Request) -> Response:
        raise RuntimeError("handler bug with secret payload")


class Picky:
    def handle(self, request: Request) -> Response:
        if request.json() is None:
            raise BadRequest("needs a payload")
        return Response(299, b"odd but valid")


class WrongStatus:
    def handle(self, request: Request) -> Response:
        return Response(302, b"")


def msg(topic: str, payload: bytes = b"", **kw: Any) -> Inbound:
    kw.setdefault("received_wall", time.time())
    return Inbound(topic=topic, payload=payload, **kw)


@pytest.fixture
def parts(tmp_path: Path) -> Iterator[dict[str, Any]]:
    made: list[Dispatcher] = []
    store = StateStore(tmp_path / "state")

    def make(limits: LimitsConfig | None = None, handlers: dict[str, Any] | None = None,
             wall: Any = time.time) -> tuple[Dispatcher, Recorder]:
        reg = HandlerRegistry()
        reg.register("ping", PingHandler(), "built-in")
        for name, h in (handlers or {}).items():
            reg.register(name, h, "test")
        rec = Recorder()
        d = Dispatcher(registry=reg, limits=limits or LimitsConfig(), responder=rec, store=store,
                       device_id="gw", wall=wall)
        d.start()
        made.append(d)
        return d, rec

    yield {"make": make, "store": store}
    for d in made:
        d.close()
    store.close()


def test_ping_is_answered_on_the_mirrored_topic(parts: dict[str, Any]) -> None:
    d, rec = parts["make"]()
    d.accept(msg("command///req/r1/ping"))
    topic, body, _ = rec.wait(1)[0]
    assert topic == "command///res/r1/200"
    assert json.loads(body)["device_id"] == "gw"


def test_gateway_child_gets_its_own_device_id(parts: dict[str, Any]) -> None:
    counter = Counter()
    d, rec = parts["make"](handlers={"count": counter})
    d.accept(msg("command//child-9/req/r1/count"))
    topic, body, _ = rec.wait(1)[0]
    assert topic == "command//child-9/res/r1/200"
    assert json.loads(body) == {"device": "child-9", "gateway": True, "props": []}


def test_one_way_command_runs_and_publishes_nothing(parts: dict[str, Any]) -> None:
    counter = Counter()
    d, rec = parts["make"](handlers={"count": counter})
    d.accept(msg("command///req//count"))
    assert d.drain(5)
    deadline = time.monotonic() + 5
    while counter.runs == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)
    assert counter.runs == 1
    assert rec.sent == []


@pytest.mark.parametrize(
    ("topic", "payload", "status", "error"),
    [
        ("command///req/r/nope", b"", 404, "unknown command 'nope'; this agent serves: boom, picky, ping, wrong"),
        ("command///req/r/ping", b"x" * 11, 413, "payload is 11 bytes, over limits.max_payload_bytes (10)"),
        ("command///req/r/ping", b"[1]", 400, 'ping takes no payload or a JSON object such as {"echo": "hello"}'),
        ("command///req/r/picky", b"", 400, "needs a payload"),
        ("command///req/r/wrong", b"", 500, "internal error in command 'wrong'"),
        ("command///req/r/boom", b"", 500, "internal error in command 'boom'"),
    ],
)
def test_error_statuses(parts: dict[str, Any], caplog: pytest.LogCaptureFixture, topic: str, payload: bytes,
                        status: int, error: str) -> None:
    d, rec = parts["make"](LimitsConfig(max_payload_bytes=10),
                           handlers={"boom": Boom(), "picky": Picky(), "wrong": WrongStatus()})
    d.accept(msg(topic, payload))
    sent_topic, body, _ = rec.wait(1)[0]
    assert sent_topic == f"command///res/r/{status}"
    data = json.loads(body)
    assert data["error"] == error
    if "boom" in topic:
        assert data["error_id"] in caplog.text  # the id in the response is also in the log
        assert "secret payload" not in body.decode()


def test_handler_status_299_passes_through(parts: dict[str, Any]) -> None:
    d, rec = parts["make"](handlers={"picky": Picky()})
    d.accept(msg("command///req/r/picky", b"{}"))
    assert rec.wait(1)[0][0] == "command///res/r/299"


def test_queue_limit_answers_429(parts: dict[str, Any]) -> None:
    gate = Gate()
    d, rec = parts["make"](LimitsConfig(max_concurrent_commands=1, max_queued_commands=1), handlers={"slow": gate})
    d.accept(msg("command///req/a/slow"))
    assert gate.entered.wait(5)
    d.accept(msg("command///req/b/slow"))  # queued
    d.accept(msg("command///req/c/slow"))  # over the limit
    topic, body, _ = rec.wait(1)[0]
    assert topic == "command///res/c/429"
    assert "limits.max_queued_commands" in json.loads(body)["error"]
    gate.release.set()
    rec.wait(3)
    assert sorted(rec.statuses()) == [200, 200, 429]


def test_timeout_answers_504_and_the_pool_keeps_serving(parts: dict[str, Any]) -> None:
    stuck = Gate(timeout=0.3)
    d, rec = parts["make"](LimitsConfig(max_concurrent_commands=1), handlers={"stuck": stuck})
    d.accept(msg("command///req/a/stuck"))
    topic, body, _ = rec.wait(1)[0]
    assert topic == "command///res/a/504"
    assert json.loads(body)["error"] == "command 'stuck' did not finish within 0.3 s"
    d.accept(msg("command///req/b/ping"))  # the only worker is stuck: a replacement serves this
    assert rec.wait(2)[1][0] == "command///res/b/200"
    stuck.release.set()
    time.sleep(0.2)
    assert len(rec.sent) == 2  # the late result is discarded, not sent


def test_an_earlier_deadline_behind_a_later_one_still_times_out_on_time(parts: dict[str, Any]) -> None:
    # The timeout monitor is only woken when a new deadline is the earliest; this one is, although
    # a command with a later deadline is already waiting (the monitor sleeps up to 5 s otherwise).
    slow, short = Gate(timeout=30.0), Gate(timeout=0.3)
    d, rec = parts["make"](handlers={"slow": slow, "short": short})
    d.accept(msg("command///req/a/slow"))
    assert slow.entered.wait(5)
    started = time.monotonic()
    d.accept(msg("command///req/b/short"))
    topic, _, _ = rec.wait(1, timeout=3.0)[0]
    assert topic == "command///res/b/504"
    assert time.monotonic() - started < 3.0
    slow.release.set()
    short.release.set()
    assert [t for t, _, _ in rec.wait(2)][1] == "command///res/a/200"


def test_duplicate_while_running_waits_and_both_are_answered(parts: dict[str, Any]) -> None:
    gate = Gate()
    d, rec = parts["make"](handlers={"slow": gate})
    d.accept(msg("command///req/same/slow"))
    assert gate.entered.wait(5)
    d.accept(msg("command///req/same/slow", dup=True))
    time.sleep(0.1)
    assert rec.sent == []
    gate.release.set()
    sent = rec.wait(2)
    assert [t for t, _, _ in sent] == ["command///res/same/200", "command///res/same/200"]
    assert gate.runs == 1


def test_duplicate_after_completion_gets_the_stored_response(parts: dict[str, Any]) -> None:
    counter = Counter()
    d, rec = parts["make"](handlers={"count": counter})
    d.accept(msg("command///req/same/count"))
    rec.wait(1)
    d.accept(msg("command///req/same/count", dup=True))
    sent = rec.wait(2)
    assert sent[0][1] == sent[1][1]
    assert counter.runs == 1
    assert d.stats.duplicates == 1


def test_journal_survives_a_restart(parts: dict[str, Any]) -> None:
    """A command journalled during shutdown runs at the next start; a finished one is not re-run."""
    counter = Counter()
    d1, rec1 = parts["make"](handlers={"count": counter})
    d1.accept(msg("command///req/done/count"))
    rec1.wait(1)
    d1.stop_accepting()
    d1.accept(msg("command///req/later/count"))
    assert counter.runs == 1 and len(rec1.sent) == 1
    d1.close()
    # A real restart comes after the previous run's writes are on disk (the agent closes the store on exit);
    # here both runs share one store object, so wait for the group writer to commit the row of the command
    # accepted last (the new run's recovery read raced that commit: 1 failure in ~10 full runs).
    deadline = time.monotonic() + 5
    while not parts["store"].pending() and time.monotonic() < deadline:
        time.sleep(0.01)
    d2, rec2 = parts["make"](handlers={"count": counter})  # same journal
    assert rec2.wait(1)[0][0] == "command///res/later/200"
    d2.accept(msg("command///req/done/count", dup=True))
    assert rec2.wait(2)[1][0] == "command///res/done/200"
    assert counter.runs == 2


def journal(store: StateStore, key: str, m: Inbound, running: bool = False) -> None:
    done = threading.Event()
    store.add_command(key, m, running=running, answer=lambda r: [], then=lambda o: done.set())
    assert done.wait(5)


def test_interrupted_command_is_answered_500_and_not_rerun(parts: dict[str, Any]) -> None:
    store: StateStore = parts["store"]
    journal(store, "//crashed/ping", msg("command///req/crashed/ping"))
    store.mark_running("//crashed/ping")
    _, rec = parts["make"]()
    topic, body, _ = rec.wait(1)[0]
    assert topic == "command///res/crashed/500"
    assert "may or may not have taken effect" in json.loads(body)["error"]


def test_too_old_command_is_answered_410(parts: dict[str, Any]) -> None:
    now = [1000.0]
    d, rec = parts["make"](LimitsConfig(max_command_age=5), wall=lambda: now[0])
    now[0] = 1010.0
    d.accept(msg("command///req/old/ping", received_wall=1000.0))
    topic, body, _ = rec.wait(1)[0]
    assert topic == "command///res/old/410"
    assert json.loads(body)["error"] == (
        "command is 10.0 s old, older than limits.max_command_age (5 s)")


def test_mqtt5_response_topic_gets_correlation_data_and_status(parts: dict[str, Any]) -> None:
    d, rec = parts["make"]()
    d.accept(msg("command///req/r5/ping", response_topic="replies/me", correlation_data=b"\x01\x02"))
    sent = rec.wait(2)
    assert [t for t, _, _ in sent] == ["command///res/r5/200", "replies/me"]
    assert sent[1][2]["correlation_data"] == b"\x01\x02"
    assert ("status", "200") in sent[1][2]["user_properties"]


def test_user_properties_reach_the_handler(parts: dict[str, Any]) -> None:
    d, rec = parts["make"](handlers={"count": Counter()})
    d.accept(msg("command///req/u/count", user_properties=(("trace", "abc"),)))
    assert json.loads(rec.wait(1)[0][1])["props"] == [["trace", "abc"]]


def test_a_hono_property_bag_reaches_the_handler_as_properties(parts: dict[str, Any]) -> None:
    """Issue 17, point 6: `ping/?foo=bar` was the command name `ping/?foo=bar` (404)."""
    d, rec = parts["make"](handlers={"count": Counter()})
    d.accept(msg("command///req/pb/count/?foo=bar&path=%2Ftmp%2Fx", user_properties=(("trace", "abc"),)))
    topic, body, _ = rec.wait(1)[0]
    assert topic == "command///res/pb/200"
    assert json.loads(body)["props"] == [["foo", "bar"], ["path", "/tmp/x"], ["trace", "abc"]]


def test_malformed_topics_are_dropped_without_reply(parts: dict[str, Any]) -> None:
    d, rec = parts["make"]()
    d.accept(msg("command///req/only-id"))
    d.accept(msg("something/else"))
    time.sleep(0.05)
    assert rec.sent == []
    assert d.stats.rejected["malformed_topic"] == 2


_segment = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12)
_topics = st.one_of(
    st.text(max_size=60),
    st.builds(lambda *s: "/".join(s), st.sampled_from(["command", "c", "x", ""]), _segment, _segment,
              st.sampled_from(["req", "q", "res", ""]), _segment,
              st.sampled_from(["ping", "info", "nope", "boom", "", "ping/x"])),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(topic=_topics, payload=st.binary(max_size=64), expiry=st.one_of(st.none(), st.integers(0, 5)),
       corr=st.one_of(st.none(), st.binary(max_size=8)), rt=st.one_of(st.none(), _segment))
def test_fuzzed_topics_and_payloads_never_raise(parts: dict[str, Any], caplog: pytest.LogCaptureFixture, topic: str,
                                                payload: bytes, expiry: int | None, corr: bytes | None,
                                                rt: str | None) -> None:
    """accept() swallows internal errors to protect paho's thread, so assert that none happened."""
    if "fuzz" not in parts:
        parts["fuzz"] = parts["make"](LimitsConfig(max_payload_bytes=32), handlers={"boom": Boom()})
    d, rec = parts["fuzz"]
    before = len(rec.sent)
    d.accept(msg(topic, payload, message_expiry=expiry, correlation_data=corr, response_topic=rt or None))
    assert d.drain(5)
    assert "internal error while accepting" not in caplog.text
    assert "could not publish" not in caplog.text
    assert all(200 <= s <= 299 or 400 <= s <= 599 for s in rec.statuses())
    from agent.topics import parse_request

    parsed = parse_request(topic)
    if parsed is not None and not parsed.one_way and parsed.command in ("ping", "nope", "boom"):
        rec.wait(before + 1)  # every answerable request got an answer


def test_expired_mqtt5_message_is_answered_410(parts: dict[str, Any]) -> None:
    d, rec = parts["make"](LimitsConfig(max_command_age=0))
    d.accept(msg("command///req/exp/ping", message_expiry=2, received_wall=time.time() - 5))
    topic, body, _ = rec.wait(1)[0]
    assert topic == "command///res/exp/410"
    assert json.loads(body)["error"] == "the request's message expiry (2 s) passed before it could run"


def test_doctor_probe_is_ignored_quietly(parts: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    d, rec = parts["make"]()
    with caplog.at_level("DEBUG", logger="agent.commands.dispatch"):
        d.accept(msg("command///req/dev-1-doctor-abc123"))
        d.accept(msg("command///req/not-a-probe"))
    assert rec.sent == []
    assert d.stats.rejected["malformed_topic"] == 1
    assert "ignored the delivery probe of mqtt-agent doctor" in caplog.text
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "not-a-probe" in warnings[0].getMessage()


def test_journal_failure_answers_500_and_frees_the_worker(parts: dict[str, Any], tmp_path: Path) -> None:
    """A journal write that fails (disk full, locked) must not kill the worker or leak its slot."""
    gate = Gate()
    d, rec = parts["make"](LimitsConfig(max_concurrent_commands=1), handlers={"count": Counter(), "slow": gate})
    store: StateStore = parts["store"]
    real = store.mark_running

    def failing(key: str) -> None:
        raise OSError(28, "No space left on device")

    store.mark_running = failing  # type: ignore[method-assign]
    try:
        d.accept(msg("command///req/first/slow"))  # takes the only worker
        assert gate.entered.wait(5)
        d.accept(msg("command///req/a/count"))  # queued: marked running when it starts, which fails
        gate.release.set()
        sent = rec.wait(2)
    finally:
        store.mark_running = real  # type: ignore[method-assign]
    by_topic = {t: json.loads(b) for t, b, _ in sent}
    assert by_topic["command///res/a/500"]["error"] == "internal error in the agent"
    assert "command///res/first/200" in by_topic
    assert d.in_flight == 0 and d.queued == 0
    d.accept(msg("command///req/b/count"))
    assert rec.wait(3)[2][0] == "command///res/b/200"


def test_journal_failure_at_receipt_answers_503(parts: dict[str, Any]) -> None:
    counter = Counter()
    d, rec = parts["make"](handlers={"count": counter})
    store: StateStore = parts["store"]

    def failing(key: str, msg: Inbound, *, running: bool, answer: Any, then: Any) -> None:
        then(Outcome(error=OSError(30, "Read-only file system")))

    store.add_command = failing  # type: ignore[method-assign]
    d.accept(msg("command///req/ro/count"))
    topic, body, _ = rec.wait(1)[0]
    assert topic == "command///res/ro/503"
    assert "cannot record the command in its journal" in json.loads(body)["error"]
    assert counter.runs == 0 and d.in_flight == 0


def test_unacknowledged_responses_stay_queued_in_the_store(parts: dict[str, Any]) -> None:
    """A response is durable in the outbound queue before it is handed over; it stays there (and is sent
    again by the next run's outbox) until the broker's PUBACK deletes it. The command does not run again."""
    counter = Counter()
    d1, rec1 = parts["make"](handlers={"count": counter})
    d1.accept(msg("command///req/lost/count"))
    sent = rec1.wait(1)
    assert sent[0][2]["id"] is not None  # stored before it was handed over
    d1.close()
    store: StateStore = parts["store"]
    assert [m.topic for m in store.queued_messages()] == ["command///res/lost/200"]
    _, rec2 = parts["make"](handlers={"count": counter})
    d_dup = rec2
    time.sleep(0.1)
    assert d_dup.sent == [] and counter.runs == 1
    store.delete_messages([m.id for m in store.queued_messages() if m.id is not None])
    store.enqueue_wait([])  # a barrier: the deletion is committed
    assert store.queued_messages() == []


def test_a_reused_request_id_for_another_command_runs_it(parts: dict[str, Any]) -> None:
    """A backend that numbers requests from 1 again after its restart: same id, other command -> it runs."""
    counter = Counter()
    d, rec = parts["make"](handlers={"count": counter})
    d.accept(msg("command///req/7/ping"))
    rec.wait(1)
    d.accept(msg("command///req/7/count"))
    sent = rec.wait(2)
    assert counter.runs == 1
    assert json.loads(sent[1][1]) == {"device": "gw", "gateway": False, "props": []}
    assert d.stats.duplicates == 0
