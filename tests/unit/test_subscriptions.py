"""The session's subscriptions (agent/connection/subscriptions.py), pure with a fake clock: subscribed after
each CONNACK, a refusal retried after 2, 4 ... 60 s with the fix in words, granted only when every topic is."""

from __future__ import annotations

import logging

import pytest

from agent.connection.events import SessionEvent, Subscribed
from agent.connection.subscriptions import SHARED_UNSUPPORTED_FIX, SubAck, Subscriptions
from tests.support.clock import FakeClock

COMMANDS, ERRORS = "command///req/#", "error//#"
GRANTED, REFUSED = SubAck(1, "Granted QoS 1", False), SubAck(0x87, "Not authorized", True)


class Broker:
    """Hands out message ids for SUBSCRIBE, as paho would; None when it cannot queue one."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, int]] = []
        self.offline = False

    def __call__(self, topic: str) -> int | None:
        if self.offline:
            return None
        self.sent.append((topic, len(self.sent) + 1))
        return len(self.sent)

    def mid(self, topic: str) -> int:
        return [m for t, m in self.sent if t == topic][-1]


def make() -> tuple[Subscriptions, Broker, list[SessionEvent], FakeClock]:
    broker, events, clock = Broker(), [], FakeClock(100.0)
    subs = Subscriptions([COMMANDS, ERRORS], broker, client_id="dev-1", notify=events.append, clock=clock)
    subs.new_connection()
    return subs, broker, events, clock


def test_every_topic_is_subscribed_and_granted_only_when_all_are() -> None:
    subs, broker, events, _ = make()
    subs.subscribe_all()
    assert [t for t, _ in broker.sent] == [COMMANDS, ERRORS]
    subs.answered(broker.mid(COMMANDS), GRANTED)
    assert not subs.granted
    subs.answered(99, GRANTED)  # a SUBACK for no pending SUBSCRIBE changes nothing
    assert not subs.granted
    subs.answered(broker.mid(ERRORS), GRANTED)
    assert subs.granted
    assert events == [Subscribed(COMMANDS, True, "Granted QoS 1"), Subscribed(ERRORS, True, "Granted QoS 1")]
    subs.new_connection()
    assert not subs.granted  # each connection is granted afresh


def test_a_refusal_is_retried_after_2_4_8_seconds_and_names_the_acl(caplog: pytest.LogCaptureFixture) -> None:
    subs, broker, events, clock = make()
    subs.subscribe_all()
    subs.answered(broker.mid(ERRORS), GRANTED)
    retries = []
    with caplog.at_level(logging.INFO, logger="agent.connection.subscriptions"):
        for _ in range(3):
            subs.answered(broker.mid(COMMANDS), REFUSED)
            start, sent = clock.t, len(broker.sent)
            while len(broker.sent) == sent:
                clock.advance(0.5)
                subs.retry_due(clock.t)
            retries.append(clock.t - start)
    assert retries == [2.0, 4.0, 8.0]
    assert events[1] == Subscribed(COMMANDS, False, "Not authorized")
    assert "check the broker ACL for client dev-1" in caplog.text and "retrying in 2 s" in caplog.text
    subs.answered(broker.mid(COMMANDS), GRANTED)
    assert subs.granted
    subs.answered(broker.mid(COMMANDS), GRANTED)  # repeated: no pending SUBSCRIBE any more
    subs.retry_due(clock.t + 1000)
    assert len(broker.sent) == 5  # 2 first, 3 retries; nothing more once granted


def test_a_broker_without_shared_subscriptions_gets_the_shared_group_fix(caplog: pytest.LogCaptureFixture) -> None:
    subs, broker, events, _ = make()
    subs.subscribe_all()
    with caplog.at_level(logging.ERROR, logger="agent.connection.subscriptions"):
        subs.answered(broker.mid(COMMANDS), SubAck(0x9E, "Shared Subscriptions not supported", True))
        subs.answered(broker.mid(ERRORS), None)  # no reason code at all: refused too
    assert SHARED_UNSUPPORTED_FIX in caplog.text and "(SUBACK missing)" in caplog.text
    assert [e.granted for e in events if isinstance(e, Subscribed)] == [False, False]
    assert not subs.granted


def test_a_subscribe_paho_could_not_queue_waits_for_the_next_connection() -> None:
    subs, broker, _, _ = make()
    broker.offline = True
    subs.subscribe_all()
    subs.answered(1, GRANTED)
    assert not subs.granted and broker.sent == []
