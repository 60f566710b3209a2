"""Hono command topics: parsing requests, building responses and the operator's request topics."""

from __future__ import annotations

from urllib.parse import quote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.topics import (
    MAX_BAG_PROPERTIES,
    parse_property_bag,
    parse_request,
    parse_response,
    request_topic,
    response_filter,
)


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


# --- Hono's full form: command///req/REQ_ID/COMMAND[/*][/property-bag] (issue 17, point 6) -------------

@pytest.mark.parametrize(
    ("topic", "command", "props"),
    [
        ("command///req/r1/ping/?foo=bar", "ping", (("foo", "bar"),)),
        ("command///req/r1/fw/update/?v=1.2&force", "fw/update", (("v", "1.2"), ("force", ""))),
        ("command///req/r1/ping/?a=%2F%3F%26%3D&a=2&&", "ping", (("a", "/?&="), ("a", "2"))),
        ("command///req/r1/ping/?", "ping", ()),
        ("command///req/r1/ping", "ping", ()),
        ("command///req/r1/?x=1", "?x=1", ()),  # the command itself, not a bag
        ("command///req/r1/a/?x/b", "a/?x/b", ()),  # only a last segment is a bag
    ],
)
def test_a_trailing_property_bag_is_parsed_not_part_of_the_command(topic: str, command: str,
                                                                   props: tuple[tuple[str, str], ...]) -> None:
    parsed = parse_request(topic)
    assert parsed is not None
    assert (parsed.command, parsed.properties) == (command, props)
    assert parsed.response_topic(200) == "command///res/r1/200"


def test_a_property_bag_is_bounded() -> None:
    bag = "?" + "&".join(f"k{i}=v" for i in range(1000))
    assert len(parse_property_bag(bag)) == MAX_BAG_PROPERTIES


_SAFE = st.text(st.characters(blacklist_characters="+#\x00", blacklist_categories=("Cs",)), max_size=20)


@given(st.lists(st.tuples(_SAFE.filter(bool), _SAFE), max_size=8), st.sampled_from(["ping", "fw/update"]))
def test_property_bags_round_trip(pairs: list[tuple[str, str]], command: str) -> None:
    bag = "?" + "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in pairs)
    parsed = parse_request(f"command///req/r1/{command}/{bag}")
    assert parsed is not None
    assert parsed.command == command
    assert parsed.properties == tuple(pairs)


def test_the_doctors_delivery_probe_is_recognised_and_nothing_else() -> None:
    from agent.tools.doctor.runner import probe_client_id
    from agent.topics import is_delivery_probe, response_topic

    assert is_delivery_probe(f"command///req/x/{probe_client_id('gw-1', 'abc123')}")
    assert not is_delivery_probe("command///req/7/ping") and not is_delivery_probe("command///req/-doctor-/ping")
    assert response_topic("command///res/7", 200) == parse_request("command///req/7/ping").response_topic(200)
