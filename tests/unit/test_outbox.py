"""The outbox over the state store's outbound queue: ordered, bounded, crash-safe, never a double send."""

from __future__ import annotations

import logging
import sqlite3
import stat

from agent.state.outbox import DELETE_BATCH, Outbox
from agent.state.store import OutMessage, StateStore
from tests.support.link import FakeLink


def same(a: OutMessage, b: OutMessage) -> bool:
    """Equal but for what the store adds (id, attempts)."""
    return (a.topic, a.payload, a.qos, a.correlation_data, a.user_properties, a.content_type) == (
        b.topic, b.payload, b.qos, b.correlation_data, b.user_properties, b.content_type)


def msg(n: int, **kw: object) -> OutMessage:
    return OutMessage(f"command///res/req{n}/200", f'{{"n":{n}}}'.encode(), **kw)  # type: ignore[arg-type]


def make(tmp_path, max_messages: int = 100, window: int = 10) -> tuple[Outbox, FakeLink, list[int], list[int]]:
    sizes: list[int] = []
    dropped: list[int] = []
    box = Outbox(StateStore(tmp_path / "state"), max_messages, window=window, report_interval=0)
    link = FakeLink()
    box.bind(link, sizes.append, dropped.append)
    return box, link, sizes, dropped


def rows(tmp_path, box: Outbox | None = None) -> list[str]:
    """What the store holds (read through its own connection: it locks the file exclusively)."""
    if box is not None and box.store is not None:
        box.store.enqueue_wait([])  # a barrier: deletions handed to the writer are committed
        return [m.topic for m in box.store.queued_messages()]
    db = sqlite3.connect(str(tmp_path / "state" / "state.sqlite3"))
    try:
        return [r[0] for r in db.execute("SELECT topic FROM outbox ORDER BY id")]
    finally:
        db.close()


def ack_all(box: Outbox, link: FakeLink) -> None:
    for mid in list(link.mids):
        box.acked(mid)
    link.mids.clear()
    box.pump(force_flush=True)


def test_link_up_sends_at_once_and_the_ack_empties_it(tmp_path):
    box, link, sizes, _ = make(tmp_path)
    box.link_up()
    box.put(msg(1))
    assert [m.topic for m in link.sent] == ["command///res/req1/200"]
    assert box.size == 1 and rows(tmp_path, box) == ["command///res/req1/200"]  # on disk until acknowledged
    ack_all(box, link)
    assert box.size == 0 and rows(tmp_path, box) == []
    assert sizes == [0, 1, 0]
    box.close()


def test_responses_wait_while_the_link_is_down_and_go_oldest_first(tmp_path):
    box, link, sizes, _ = make(tmp_path)
    for n in range(5):
        box.put(msg(n))
    assert link.sent == [] and box.waiting == 5 and sizes[-1] == 5
    box.link_up()
    box.put(msg(5))  # newer than the backlog: must not overtake it
    assert link.sent == []
    box.pump()
    assert [m.payload for m in link.sent] == [f'{{"n":{n}}}'.encode() for n in range(6)]
    ack_all(box, link)
    assert box.size == 0 and sizes[-1] == 0
    box.close()


def test_a_reconnect_does_not_send_a_handed_response_twice(tmp_path):
    """paho keeps unacknowledged QoS 1 messages and re-sends them itself after the reconnect."""
    box, link, _, _ = make(tmp_path)
    box.link_up()
    box.put(msg(1))
    box.link_down()
    box.put(msg(2))
    box.link_up()
    box.pump()
    assert [m.topic for m in link.sent] == ["command///res/req1/200", "command///res/req2/200"]
    box.close()


def test_at_most_window_in_flight(tmp_path):
    box, link, _, _ = make(tmp_path, window=3)
    for n in range(7):
        box.put(msg(n))
    box.link_up()
    box.pump()
    assert len(link.sent) == 3
    first = min(link.mids)
    box.acked(first)
    del link.mids[first]
    box.pump()
    assert len(link.sent) == 4
    ack_all(box, link)
    box.pump()
    ack_all(box, link)
    assert len(link.sent) == 7 and box.size == 0
    box.close()


def test_overflow_drops_the_oldest_waiting_with_a_log_line(tmp_path, caplog):
    box, link, sizes, dropped = make(tmp_path, max_messages=3)
    with caplog.at_level(logging.WARNING):
        for n in range(5):
            box.put(msg(n))
    assert dropped == [1, 1]
    assert box.dropped_total == 2 and box.size == 3
    assert rows(tmp_path, box) == [f"command///res/req{n}/200" for n in (2, 3, 4)]
    lines = [r.getMessage() for r in caplog.records if "outbox full" in r.getMessage()]
    assert len(lines) == 1  # rate-limited: one line per minute, with the count
    assert "limits.max_outbox_messages = 3" in lines[0] and "command///res/req0/200" in lines[0]
    assert max(sizes) == 3
    box.link_up()
    box.pump()
    assert [m.topic for m in link.sent] == [f"command///res/req{n}/200" for n in (2, 3, 4)]
    box.close()


def test_the_outbox_survives_a_crash(tmp_path):
    box, _, _, _ = make(tmp_path)
    for n in range(3):
        box.put(msg(n, correlation_data=b"\x01\x02", user_properties=(("status", "200"),), content_type="x/y"))
    # The process dies here: no outbox close, no checkpoint; the connection (and its file lock) just goes.
    # Each put was committed before it returned.
    assert box.store is not None
    box.store._writer.close()
    box.store._db.close()
    again, link, sizes, _ = make(tmp_path)
    assert again.size == 3 and sizes == [3]
    again.link_up()
    again.pump()
    assert [m.topic for m in link.sent] == [f"command///res/req{n}/200" for n in range(3)]
    assert same(link.sent[0], msg(0, correlation_data=b"\x01\x02", user_properties=(("status", "200"),),
                                  content_type="x/y"))
    assert link.sent[0].attempts == 1  # sent (probably) once by the run that died
    ack_all(again, link)
    assert rows(tmp_path, again) == []
    again.close()


def test_acks_are_deleted_in_batches_and_all_of_them_on_close(tmp_path):
    box, link, _, _ = make(tmp_path, window=1000, max_messages=1000)
    box.link_up()
    for n in range(DELETE_BATCH + 5):
        box.put(msg(n))
    for mid in list(link.mids)[:DELETE_BATCH - 1]:
        box.acked(mid)
    box.pump()
    assert len(rows(tmp_path, box)) == DELETE_BATCH + 5  # below the batch and within the delay: not yet deleted
    box.acked(DELETE_BATCH)
    box.pump()
    assert len(rows(tmp_path, box)) == 5
    for mid in range(DELETE_BATCH + 1, DELETE_BATCH + 4):
        box.acked(mid)
    box.close()
    assert len(rows(tmp_path, box)) == 2


def test_a_refused_hand_over_keeps_the_response_waiting(tmp_path):
    box, link, _, _ = make(tmp_path)
    link.refuse = True
    box.link_up()
    box.put(msg(1))
    assert box.waiting == 1
    link.refuse = False
    box.pump()
    assert box.waiting == 0 and len(link.sent) == 1
    box.close()


def test_qos0_needs_no_ack(tmp_path):
    box, link, _, _ = make(tmp_path)
    box.link_up()
    box.put(msg(1, qos=0))
    box.pump(force_flush=True)
    assert box.size == 0 and rows(tmp_path, box) == [] and len(link.sent) == 1
    box.close()


def test_the_file_is_private(tmp_path):
    box, _, _, _ = make(tmp_path)
    assert stat.S_IMODE((tmp_path / "state" / "state.sqlite3").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "state").stat().st_mode) == 0o700
    box.close()


def _config(limits: dict[str, object]) -> dict[str, object]:
    return {"agent": {"device_id": "dev-1"}, "mqtt": {"hosts": ["broker:8883"]}, "tls": {"enabled": False},
            "limits": limits}


def test_config_bounds_the_outbox():
    import pytest

    from agent.config import parse_config, render_config
    from agent.errors import ConfigError

    assert parse_config(_config({})).limits.max_outbox_messages == 10000
    cfg = parse_config(_config({"max_outbox_messages": 500}))
    assert cfg.limits.max_outbox_messages == 500
    assert "max_outbox_messages = 500" in render_config(cfg)
    for bad, message in ((0, "must be 1..10000000, got 0"), ("many", "must be an integer, got string 'many'"),
                         (True, "must be an integer, got boolean true")):
        with pytest.raises(ConfigError) as err:
            parse_config(_config({"max_outbox_messages": bad}))
        assert err.value.problems == [f"limits.max_outbox_messages: {message}"]
    with pytest.raises(ConfigError) as err:
        parse_config(_config({"max_outbox_message": 5}))
    assert "max_outbox_messages" in str(err.value)  # did-you-mean


def test_a_volatile_message_is_sent_but_never_stored(tmp_path):
    """The 503 for a command the store could not take goes out without the disk."""
    box, link, _, _ = make(tmp_path)
    box.link_up()
    box.put_volatile(OutMessage("command///res/x/503", b"{}"))
    assert [m.topic for m in link.sent] == ["command///res/x/503"] and rows(tmp_path, box) == []
    ack_all(box, link)
    assert box.size == 0
    box.close()


def test_size_reports_are_throttled_while_busy_but_never_lost(tmp_path):
    """Each response moves the size twice; listeners hear every change to or from empty at once and
    the rest at most once per report_interval, the latest value included."""
    now = [100.0]
    sizes: list[int] = []
    box = Outbox(StateStore(tmp_path / "state"), 100, clock=lambda: now[0], report_interval=1.0)
    link = FakeLink()
    box.bind(link, sizes.append)
    box.link_up()
    for n in range(5):
        box.put(msg(n))
    assert sizes == [0, 1]  # the change from empty at once, the rest held back
    now[0] += 1.5
    box.pump()
    assert sizes == [0, 1, 5]  # the held-back latest value, once the interval has passed
    ack_all(box, link)
    assert sizes == [0, 1, 5, 0]  # back to empty at once


def test_admit_many_with_lead_commits_on_the_calling_thread_when_the_writer_is_idle(tmp_path):
    """The local API's thread: no hand-off to the writer and back; the caller hears before it returns."""
    import threading

    box, link, _, _ = make(tmp_path)
    box.link_up()
    assert box.store is not None
    box.store.enqueue_wait([])  # a quiet writer
    heard: list[tuple[str, list[int]]] = []

    def then(results):
        heard.append((threading.current_thread().name, [len(r) for r in results]))

    box.admit_many([[msg(1, kind="telemetry")], [msg(2, kind="telemetry"), msg(3, kind="telemetry")]], then,
                   lead=True)
    assert heard == [(threading.current_thread().name, [1, 2])]  # on disk, answered, before the call returned
    assert [m.topic for m in link.sent] == [msg(n).topic for n in (1, 2, 3)]
    box.admit_many([[msg(4, kind="telemetry")]], then)  # without lead: the writer's thread
    box.store.enqueue_wait([])
    assert heard[1] == ("state-writer", [1])
    box.close()
