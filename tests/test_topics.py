"""Hono command topics: parsing requests, building responses and the operator's request topics."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.topics import parse_request, parse_response, request_topic, response_filter


@pytest.mark.parametrize(
    ("topic", "response", "device", "one_way"),
    [
        ("command///req/r1/ping", "command///res/r1/200", "", False),
        ("c///q/r1/ping", "c///s/r1/200", "", False),
        ("command//child-7/req/r1/ping", "command//child-7/res/r1/200", "child-7", False),
        ("command/tenant/dev/req/r1/ping", "command/tenant/dev/res/r1/200", "dev", False),
        ("command///req//reboot", "command///res//200", "", True),
    ],
)
def test_parse_request_and_mirror_the_response(topic: str, response: str, device: str, one_way: bool) -> None:
    parsed = parse_request(topic)
    assert parsed is not None
    assert parsed.response_topic(200) == response
    assert parsed.device == device
    assert parsed.one_way is one_way


@pytest.mark.parametrize(
    "topic",
    ["command///req/r1", "command///req/r1/", "cmd///req/r1/ping", "command///res/r1/ping", "command///req/+/x",
     "", "command", "c///q/r1/#"],
)
def test_not_a_request(topic: str) -> None:
    assert parse_request(topic) is None


def test_command_names_keep_their_slashes() -> None:
    parsed = parse_request("command///req/r1/fw/update")
    assert parsed is not None and parsed.command == "fw/update"


def test_dedupe_key_separates_children() -> None:
    a = parse_request("command//a/req/1/ping")
    b = parse_request("command//b/req/1/ping")
    assert a and b and a.dedupe_key != b.dedupe_key


def test_request_topic_for_each_subscription_form() -> None:
    assert request_topic("command///req/#", "r1", "ping") == "command///req/r1/ping"
    assert request_topic("c///q/#", "r1", "ping") == "c///q/r1/ping"
    assert request_topic("command//+/req/#", "r1", "ping", "kid") == "command//kid/req/r1/ping"
    assert request_topic("command/t/d/req/#", "r1", "ping") == "command/t/d/req/r1/ping"
    with pytest.raises(ValueError, match="gateway mode"):
        request_topic("command//+/req/#", "r1", "ping")
    with pytest.raises(ValueError, match="not a gateway subscription"):
        request_topic("command///req/#", "r1", "ping", "kid")


def test_response_filter_and_parse_response() -> None:
    assert response_filter("command///req/r1/ping") == "command///res/r1/+"
    assert parse_response("command///res/r1/404") == ("r1", 404)
    assert parse_response("command///res/r1/abc") is None
    with pytest.raises(ValueError):
        response_filter("command///req//ping")


@given(st.text(max_size=80))
def test_parse_request_never_raises(topic: str) -> None:
    parsed = parse_request(topic)
    if parsed is not None:
        assert parsed.command
        assert parsed.response_base.count("/") == 4
