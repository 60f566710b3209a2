"""Poison messages and the size limit (issue 17, point 1): pure rules, and the outbox that applies
them with a fake client and a fake clock (no broker)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.state import poison
from agent.state.outbox import Outbox
from agent.state.store import OutMessage, StateStore
from tests.support.clock import FakeClock
from tests.support.link import FakeLink

# --- sizes ------------------------------------------------------------------------------------------

def test_publish_packet_size_counts_every_byte_of_the_packet():
    # 3.1.1, QoS 1: fixed header 2 + topic length 2 + "a/b" 3 + packet id 2 + payload 10
    assert poison.publish_packet_size("a/b", 10, 1, None) == 19
    assert poison.publish_packet_size("a/b", 10, 0, None) == 17  # no packet id at QoS 0
    assert poison.publish_packet_size("a/b", 10, 1, 1) == 20  # MQTT 5: the (empty) properties' length byte
    assert poison.publish_packet_size("ä", 0, 0, None) == 6  # the topic counts in UTF-8


@pytest.mark.parametrize(("remaining", "header"), [(127, 2), (128, 3), (16383, 3), (16384, 4), (2097152, 5)])
def test_the_remaining_length_field_grows_at_the_varint_boundaries(remaining, header):
    payload = remaining - 2 - 1  # topic "t" without packet id
    assert poison.publish_packet_size("t", payload, 0, None) == remaining + header


def test_the_limit_is_the_smaller_of_configured_and_announced():
    assert poison.effective_limit(None, None) is None
    assert poison.effective_limit(2048, None) == 2048
    assert poison.effective_limit(None, 16384) == 16384
    assert poison.effective_limit(2048, 16384) == 2048
    assert poison.effective_limit(65536, 16384) == 16384
    assert poison.limit_source(65536, 16384) == "the broker's Maximum Packet Size (CONNACK)"
    assert poison.limit_source(2048, 16384) == "mqtt.max_message_bytes"


def test_a_hono_response_is_replaced_by_a_500_on_the_same_request():
    sub = poison.too_large_response("command//kid/res/r1/200", (), 50000, 16384, "mqtt.max_message_bytes")
    assert sub is not None and sub.topic == "command//kid/res/r1/500"
    body = json.loads(sub.payload)
    assert body["size"] == 50000 and body["limit"] == 16384 and "mqtt.max_message_bytes" in body["error"]
    assert len(sub.payload) < 400


def test_an_mqtt5_response_topic_keeps_its_topic_and_gets_status_500():
    sub = poison.too_large_response("replies/me", (("status", "200"), ("x", "y")), 50000, 1024, "broker")
    assert sub is not None and sub.topic == "replies/me" and sub.user_properties == (("status", "500"), ("x", "y"))


def test_a_message_that_is_no_response_has_no_replacement():
    assert poison.too_large_response("events/telemetry", (), 50000, 1024, "broker") is None


# --- strikes ----------------------------------------------------------------------------------------

def test_a_drop_right_after_sending_is_a_strike_and_the_third_sets_aside():
    assert poison.judge(0.1, 0, expected_end=False) == poison.Strike(True, False)
    assert poison.judge(0.1, 1, expected_end=False) == poison.Strike(True, False)
    assert poison.judge(0.1, 2, expected_end=False) == poison.Strike(True, True)


@pytest.mark.parametrize(("sent_ago", "expected"), [(None, False), (poison.POISON_WINDOW + 0.1, False),
                                                    (0.0, True)])
def test_late_drops_and_our_own_disconnects_count_against_nothing(sent_ago, expected):
    assert not poison.judge(sent_ago, 5, expected_end=True).suspect
    assert poison.judge(sent_ago, 0, expected_end=False).suspect is expected


@given(st.lists(st.one_of(st.none(), st.floats(0, 100)), max_size=20))
def test_never_set_aside_before_the_last_try(drops):
    tries = 0
    for sent_ago in drops:
        strike = poison.judge(sent_ago, tries, expected_end=False)
        if strike.suspect:
            tries += 1
        assert strike.set_aside == (strike.suspect and tries >= poison.POISON_TRIES)


# --- the outbox applying them -----------------------------------------------------------------------



def make(tmp_path: Path) -> tuple[Outbox, FakeLink, FakeClock]:
    clock = FakeClock(100.0)
    box = Outbox(StateStore(tmp_path / "state"), 100, clock=clock, report_interval=0)
    link = FakeLink(unsendable=b"unsendable")
    box.bind(link, withdraw=link.withdrawn.append, on_set_aside=link.set_aside.append)
    return box, link, clock


def reconnect(box: Outbox, clock: FakeClock) -> None:
    box.link_down()
    clock.t += 1.0
    box.link_up()
    box.pump()


def test_a_message_the_broker_drops_the_connection_for_is_answered_500_after_three_tries(tmp_path, caplog):
    box, link, clock = make(tmp_path)
    box.link_up()
    box.put(OutMessage("command///res/r1/200", b"x" * 50000))
    box.put(OutMessage("command///res/r2/200", b"small"))
    suspects = []
    for _ in range(poison.POISON_TRIES):
        clock.t += 0.05
        suspects.append(box.poison_check(expected_end=False))
        reconnect(box, clock)
    assert all("50000-byte message to 'command///res/r1/200'" in s for s in suspects)
    assert link.withdrawn == [1]  # the client must not re-send it at the next CONNACK
    assert link.set_aside == [poison.POISON]
    replacement = link.sent[-1]
    assert replacement.topic == "command///res/r1/500" and b"set aside" in replacement.payload
    assert box.store is not None
    box.store.enqueue_wait([])  # a barrier: the replacement is committed
    assert [m.topic for m in box.store.queued_messages()] == [
        "command///res/r1/500", "command///res/r2/200"]  # a restart sends the 500, not the poison again
    assert caplog.text.count("set aside a 50000-byte message") == 1
    box.close()


def test_a_drop_long_after_sending_or_one_the_agent_asked_for_is_no_strike(tmp_path):
    box, link, clock = make(tmp_path)
    box.link_up()
    box.put(OutMessage("command///res/r1/200", b"x"))
    clock.t += poison.POISON_WINDOW + 1
    assert box.poison_check(expected_end=False) == ""
    for _ in range(5):
        clock.t += 0.1
        assert box.poison_check(expected_end=True) == ""
    assert link.set_aside == [] and link.withdrawn == []
    box.close()


def test_acknowledged_messages_are_not_suspects(tmp_path):
    box, _, _ = make(tmp_path)
    box.link_up()
    box.put(OutMessage("command///res/r1/200", b"x"))
    box.acked(1)  # the PUBACK arrived just before the drop (not yet pumped)
    assert box.poison_check(expected_end=False) == ""
    box.close()


def test_a_replacement_that_is_poison_too_is_dropped_not_replaced_again(tmp_path):
    box, link, clock = make(tmp_path)
    box.link_up()
    box.put(OutMessage("command///res/r1/200", b"x" * 100))
    for _ in range(2 * poison.POISON_TRIES):
        clock.t += 0.05
        box.poison_check(expected_end=False)
        reconnect(box, clock)
    assert link.set_aside == [poison.POISON, poison.POISON]
    assert box.size == 0
    box.close()


def test_an_unsendable_message_is_set_aside_and_the_queue_moves_on(tmp_path):
    box, link, _ = make(tmp_path)
    box.link_up()
    box.put(OutMessage("events/x", b"unsendable"))
    box.put(OutMessage("command///res/r2/200", b"ok"))
    assert [m.topic for m in link.sent] == ["command///res/r2/200"]
    assert link.set_aside == [poison.TOO_LARGE] and box.size == 1
    assert box.store is not None
    box.store.enqueue_wait([])
    assert [m.topic for m in box.store.queued_messages()] == ["command///res/r2/200"]  # kept aside, never sent
    box.close()
