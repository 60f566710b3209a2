"""The pure parts of publishing: Hono topics, request parsing and size limits, queue bounds and policies."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.state.outbox import Outbox, PublishLimits, QueueFull
from agent.state.publish import ApiError, PublishContext, batch, packet_size, single
from agent.state.store import OutMessage, StateStore
from agent.topics import error_filter, parse_error, publish_topic
from tests.support.link import FakeLink


def ctx(command_topic: str = "command///req/#", v5: bool = False, limit: int | None = None,
        max_batch: int = 100) -> PublishContext:
    return PublishContext(command_topic, v5, lambda: limit, max_batch, lambda: 1000.0)


@pytest.mark.parametrize(("kind", "sub", "device", "bag", "topic"), [
    ("telemetry", "command///req/#", None, (), "telemetry"),
    ("event", "command///req/#", None, (), "event"),
    ("telemetry", "c///q/#", None, (), "t"),
    ("event", "c///q/#", None, (), "e"),
    ("telemetry", "command//+/req/#", "child-7", (), "telemetry//child-7"),
    ("event", "command//+/req/#", "child-7", (), "event//child-7"),
    ("telemetry", "c/acme/+/q/#", "child-7", (), "t/acme/child-7"),
    ("event", "command///req/#", None, (("content-type", "application/json"), ("hono-ttl", "30")),
     "event/?content-type=application%2Fjson&hono-ttl=30"),
])
def test_publish_topics_follow_hono_and_the_command_spelling(kind, sub, device, bag, topic):
    assert publish_topic(kind, sub, device, property_bag=bag) == topic


def test_error_topics():
    assert error_filter("command///req/#") == "error///#"
    assert error_filter("command//+/req/#") == "error//+/#"
    facts = parse_error("error//child-7/abc/413", json.dumps({"code": 413, "message": "too big" * 100}).encode())
    assert facts["device"] == "child-7" and facts["code"] == "413" and len(facts["message"]) == 200
    assert parse_error("error///x/500", b"\xff not json")["message"].endswith("not json")


def test_single_messages_carry_content_type_and_ttl_in_the_property_bag_on_311():
    msg = single("event", "ttl=29.5&device=child-7", {"content-type": "text/plain"}, b"hi", ctx("command//+/req/#"))
    assert msg.topic == "event//child-7/?content-type=text%2Fplain&hono-ttl=30"
    assert (msg.kind, msg.qos, msg.payload, msg.content_type, msg.expires) == ("event", 1, b"hi", None, 1029.5)
    tele = single("telemetry", "qos=0&ttl=5", {}, b"{}", ctx())
    assert (tele.topic, tele.qos, tele.expires) == ("telemetry", 0, 1005.0)  # telemetry ttl: local only


def test_on_v5_they_are_mqtt_properties():
    msg = single("event", "ttl=10", {"content-type": "application/json"}, b"{}", ctx(v5=True))
    assert (msg.topic, msg.content_type, msg.expires) == ("event", "application/json", 1010.0)


@pytest.mark.parametrize(("kind", "query", "error"), [
    ("event", "qos=0", "bad_qos"), ("telemetry", "qos=2", "bad_qos"), ("telemetry", "ttl=0", "bad_ttl"),
    ("telemetry", "ttl=abc", "bad_ttl"), ("telemetry", "ttl=nan", "bad_ttl"), ("telemetry", "device=a/b", "bad_device"),
    ("telemetry", "device=", "bad_device"), ("telemetry", "device=%23", "bad_device"),
    ("telemetry", "foo=1", "bad_query"),
    ("telemetry", "qos=1&qos=0", "bad_query"),
])
def test_bad_requests_are_400_with_a_reason(kind, query, error):
    with pytest.raises(ApiError) as info:
        single(kind, query, {}, b"{}", ctx())
    assert info.value.status == 400 and info.value.error == error and info.value.message


def test_over_the_mqtt_limit_is_413_naming_it():
    ok = single("telemetry", "", {}, b"x" * 100, ctx(limit=200))
    assert packet_size(ok.topic, 100, 1, None) <= 200
    with pytest.raises(ApiError) as info:
        single("telemetry", "", {}, b"x" * 200, ctx(limit=200))
    assert info.value.status == 413 and info.value.body()["limit"] == "mqtt.max_message_bytes"
    assert info.value.body()["value"] == 200


def test_packet_size_counts_every_byte_of_the_publish_packet():
    # fixed header 1 + remaining-length varint + topic length 2 + topic + packet id 2 + payload
    assert packet_size("telemetry", 10, 1, None) == 1 + 1 + 2 + 9 + 2 + 10
    assert packet_size("telemetry", 200, 1, None) == 1 + 2 + 2 + 9 + 2 + 200  # 213 needs two varint bytes
    assert packet_size("telemetry", 10, 0, None) == 1 + 1 + 2 + 9 + 10
    assert packet_size("t", 10, 1, 3) == 1 + 1 + 2 + 1 + 2 + 3 + 10  # MQTT 5: properties with their length


def test_batches_ndjson_and_arrays():
    got = batch("device=d1", {}, b'{"a":1}\n\n{"a": 2}\n', ctx("command//+/req/#"))
    assert [m.payload for m in got] == [b'{"a":1}', b'{"a": 2}'] and {m.topic for m in got} == {
        "telemetry//d1/?content-type=application%2Fjson"}
    got = batch("", {}, b'[{"a":1}, 2, "x"]', ctx())
    assert [m.payload for m in got] == [b'{"a":1}', b"2", b'"x"']
    for body, error in ((b"[1,", "bad_batch"), (b"{}\nnope", "bad_batch"), (b"", "bad_batch"),
                        (b"\xff", "bad_batch")):
        with pytest.raises(ApiError) as info:
            batch("", {}, body, ctx())
        assert info.value.error == error
    with pytest.raises(ApiError) as info:
        batch("", {}, b"1\n" * 101, ctx(max_batch=100))
    assert info.value.status == 413 and info.value.limit == "publish.max_batch"


# --- queue bounds and policies (a real store in a temp dir, a recording link) ---------------------


def tele(n: int, payload: bytes | None = None, **kw: object) -> OutMessage:
    return OutMessage("telemetry", payload or str(n).encode(), kind="telemetry", **kw)  # type: ignore[arg-type]


def event(n: int, payload: bytes | None = None, **kw: object) -> OutMessage:
    return OutMessage("event", payload or str(n).encode(), kind="event", **kw)  # type: ignore[arg-type]


def make(tmp_path: Path, limits: PublishLimits, wall=None) -> tuple[Outbox, FakeLink]:
    kw = {"wall": wall} if wall else {}
    box = Outbox(StateStore(tmp_path / "state", **kw), 100, window=5, limits=limits, report_interval=0, **kw)
    link = FakeLink()
    box.bind(link)
    return box, link


def test_telemetry_drops_the_oldest_events_refuse(tmp_path):
    box, link = make(tmp_path, PublishLimits(max_messages=4))
    box.admit([event(1), tele(1), tele(2), event(2)])
    box.admit([tele(3)])  # full: the oldest telemetry goes
    assert box.dropped[("telemetry", "queue_full")] == 1
    box.admit([event(3)])  # an event makes room from telemetry too
    box.admit([event(4)])
    with pytest.raises(QueueFull) as info:
        box.admit([event(5)])  # only events left: never dropped for a new one
    assert info.value.limit == "publish.max_messages" and info.value.value == 4
    with pytest.raises(QueueFull):
        box.admit([tele(4)])
    assert box.publish_stats()[0] == 4 and box.dropped[("telemetry", "queue_full")] == 3
    box.link_up()
    box.pump()
    assert [(m.kind, m.payload) for m in link.sent] == [("event", b"1"), ("event", b"2"), ("event", b"3"),
                                                        ("event", b"4")]
    assert box.accepted == {"event": 4, "telemetry": 3}
    box.close()
    box.store.close()  # type: ignore[union-attr]


def test_a_batch_is_all_or_nothing_and_bytes_count(tmp_path):
    box, _ = make(tmp_path, PublishLimits(max_messages=100, max_bytes=40))
    box.admit([event(1, payload=b"x" * 20)])
    with pytest.raises(QueueFull) as info:
        box.admit([event(2, payload=b"y" * 20)])
    assert info.value.limit == "publish.max_bytes"
    assert box.publish_stats()[:2] == (1, 25)
    box.close()
    box.store.close()  # type: ignore[union-attr]


def test_expired_messages_are_dropped_before_sending_and_counted(tmp_path):
    now = [1000.0]
    box, link = make(tmp_path, PublishLimits(max_age=100.0), wall=lambda: now[0])
    box.admit([tele(1, expires=1010.0), event(1), tele(2)])
    now[0] = 1050.0
    box.admit([tele(3)])
    now[0] = 1120.0  # tele1: ttl passed; event1, tele2: older than max_age; tele3 fine
    box.link_up()
    box.pump()
    assert [m.payload for m in link.sent] == [b"3"]
    assert box.dropped == {("telemetry", "ttl"): 1, ("event", "max_age"): 1, ("telemetry", "max_age"): 1}
    box.close()
    box.store.close()  # type: ignore[union-attr]


def test_the_queue_survives_a_restart_in_order_with_its_age(tmp_path):
    now = [1000.0]
    box, _ = make(tmp_path, PublishLimits(), wall=lambda: now[0])
    box.admit([event(1), tele(1), event(2)])
    box.close()
    box.store.close()  # type: ignore[union-attr]
    now[0] = 1030.0
    again, link = make(tmp_path, PublishLimits(max_messages=2), wall=lambda: now[0])
    count, _, oldest = again.publish_stats()
    assert (count, oldest) == (2, 1000.0)  # the smaller bound dropped the oldest telemetry at start
    again.link_up()
    again.pump()
    assert [(m.kind, m.payload) for m in link.sent] == [("event", b"1"), ("event", b"2")]
    for mid in link.mids:
        again.acked(mid)
    again.pump(force_flush=True)
    assert again.publish_stats() == (0, 0, None) and again.sent == {"event": 2}
    again.close()
    again.store.close()  # type: ignore[union-attr]


def test_an_unsendable_telemetry_message_is_set_aside_and_leaves_the_bounds(tmp_path):
    from agent.state import poison

    class Picky(FakeLink):
        def __call__(self, msg: OutMessage) -> int | None:
            if msg.payload == b"huge":
                raise poison.Unsendable(poison.TOO_LARGE, "over the limit")
            return super().__call__(msg)

    box = Outbox(StateStore(tmp_path / "state"), 100, window=5, limits=PublishLimits(max_messages=3),
                 report_interval=0)
    link = Picky()
    box.bind(link)
    box.admit([tele(1), tele(2, payload=b"huge"), event(1)])
    box.link_up()
    box.pump()
    assert [m.payload for m in link.sent] == [b"1", b"1"] and box.set_aside_total == 1
    assert box.publish_stats()[0] == 2  # the set-aside one no longer counts against publish.max_messages
    box.admit([event(2)])  # room again without dropping anything
    assert box.dropped == {}
    box.close()
    box.store.close()  # type: ignore[union-attr]


def test_admit_many_judges_each_request_on_its_own_and_stores_the_rest_in_one_commit(tmp_path):
    import threading

    box, link = make(tmp_path, PublishLimits(max_messages=3))
    store = box.store
    assert store is not None
    box.admit([event(0)])
    fsyncs = store.fsyncs
    done = threading.Event()
    got: list = []

    def then(results):
        got.extend(results)
        done.set()

    # The second request (3 events) does not fit next to the first; the third (1 event) still does.
    box.admit_many([[event(1)], [event(2), event(3), event(4)], [event(5)]], then)
    assert done.wait(10)
    first, refused, third = got
    assert [m.payload for m in first] == [b"1"] and [m.payload for m in third] == [b"5"]
    assert isinstance(refused, QueueFull) and refused.limit == "publish.max_messages"
    assert first[0].id is not None and third[0].id == first[0].id + 1  # ids in request order
    assert store.fsyncs == fsyncs + 1  # one durable commit for both accepted requests
    assert box.accepted == {"event": 3} and box.publish_stats()[0] == 3
    box.link_up()
    box.pump()
    assert [m.payload for m in link.sent] == [b"0", b"1", b"5"]
    box.close()
    store.close()


def test_admit_many_with_a_failing_store_accepts_nothing_and_gives_the_room_back(tmp_path):
    import threading

    box, _ = make(tmp_path, PublishLimits(max_messages=2))
    store = box.store
    assert store is not None
    store.close()  # every write fails from here on
    done = threading.Event()
    got: list = []
    box.admit_many([[event(1)], [event(2)]], lambda results: (got.extend(results), done.set()))
    assert done.wait(10)
    assert all(isinstance(r, RuntimeError) for r in got)
    assert box.publish_stats()[0] == 0 and box.accepted == {}
