"""Gateway pairs (mqtt.shared_group), the pure parts: config validation, the shared filter, the info
metric, and the doctor's words for a broker that refuses shared subscriptions.

No broker on this machine answers SUBACK 0x9E (mosquitto 2.0 has no switch to turn shared subscriptions
off; the RabbitMQ here is 3.10, MQTT 3.1.1 only), so the doctor's explanation of 0x9E is checked here on
the finding itself; tests/integration/test_gateway_pairs.py runs the granted case against mosquitto.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from agent.config import Config, TlsConfig, parse_config, render_config
from agent.connection.subscriptions import SHARED_UNSUPPORTED_FIX
from agent.errors import ConfigError
from agent.service.metrics import AgentMetrics
from agent.tools.doctor.mqtt_check import probe_subscription, subscribe_refused
from agent.topics import MAX_SHARED_GROUP, check_shared_group, parse_request, shared_filter


def config(tmp_path: Path, **mqtt: object) -> dict[str, dict[str, object]]:
    return {
        "agent": {"device_id": "gw-a", "state_dir": str(tmp_path / "state")},
        "mqtt": {"hosts": ["broker.example:8883"], "protocol": "5", **mqtt},
        "tls": {},
    }


def parsed(tmp_path: Path, **mqtt: object) -> Config:
    return parse_config(config(tmp_path, **mqtt), tmp_path / "agent.toml")


def problems(tmp_path: Path, **mqtt: object) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(config(tmp_path, **mqtt), tmp_path / "agent.toml")
    return info.value.problems


def test_a_group_turns_the_command_filter_into_its_shared_form(tmp_path: Path) -> None:
    cfg = parsed(tmp_path, shared_group="site-a", command_topic="command//+/req/#")
    assert cfg.mqtt.shared_group == "site-a"
    assert cfg.mqtt.subscription == "$share/site-a/command//+/req/#"
    # What the broker delivers still carries the plain topic, which parses as before.
    assert parse_request("command//plc-3/req/r1/reset") is not None
    assert 'shared_group = "site-a"' in render_config(cfg)


def test_without_a_group_nothing_changes(tmp_path: Path) -> None:
    assert parsed(tmp_path, shared_group="").mqtt.shared_group is None  # "" = none, as in etc/mqtt-agent.toml
    cfg = parsed(tmp_path)
    assert cfg.mqtt.shared_group is None
    assert cfg.mqtt.subscription == "command///req/#"
    assert "# shared_group is not set" in render_config(cfg)


def test_mqtt_311_with_a_group_is_a_config_error_naming_the_key(tmp_path: Path) -> None:
    assert problems(tmp_path, protocol="3.1.1", shared_group="site-a") == [
        'mqtt.shared_group: needs MQTT 5 (shared subscriptions do not exist in MQTT 3.1.1): set '
        'mqtt.protocol = "5" or remove mqtt.shared_group (got \'site-a\')'
    ]


@pytest.mark.parametrize(("group", "problem"), [
    ("site/a", "mqtt.shared_group: must not contain '/', '+', '#' or control characters (MQTT 5 section 4.8.2), "
               "found '/'"),
    ("site+#", "mqtt.shared_group: must not contain '/', '+', '#' or control characters (MQTT 5 section 4.8.2), "
               "found '#', '+'"),
    ("a\nb", "mqtt.shared_group: must not contain '/', '+', '#' or control characters (MQTT 5 section 4.8.2), "
             "found '\\n'"),
    ("g" * (MAX_SHARED_GROUP + 1), f"mqtt.shared_group: must be at most {MAX_SHARED_GROUP} characters, got "
                                   f"{MAX_SHARED_GROUP + 1}"),
    (7, "mqtt.shared_group: must be a string, got integer 7"),
])
def test_group_names_are_validated(tmp_path: Path, group: object, problem: str) -> None:
    assert problems(tmp_path, shared_group=group) == [problem]


def test_the_longest_group_and_unusual_characters_are_accepted() -> None:
    assert check_shared_group("") == "must not be empty (remove the key to subscribe without a group)"
    assert check_shared_group("g" * MAX_SHARED_GROUP) is None
    assert check_shared_group("Site A.gateways_2") is None
    assert shared_filter("Site A", "c///q/#") == "$share/Site A/c///q/#"


def test_info_metric_names_the_group_only_when_there_is_one() -> None:
    registry = CollectorRegistry()
    AgentMetrics(protocol="5", configured_keepalive=60, tls=TlsConfig(enabled=False), registry=registry,
                 shared_group="site-a")
    assert registry.get_sample_value("mqtt_agent_shared_group_info", {"group": "site-a"}) == 1.0
    plain = CollectorRegistry()
    AgentMetrics(protocol="5", configured_keepalive=60, tls=TlsConfig(enabled=False), registry=plain)
    assert b"mqtt_agent_shared_group_info" not in generate_latest(plain)


def test_doctor_subscribes_in_a_group_of_its_own(tmp_path: Path) -> None:
    cfg = parsed(tmp_path, shared_group="site-a")
    topic = probe_subscription(cfg.mqtt, "gw-a-doctor-0a1b2c")
    assert topic == "$share/site-a.gw-a-doctor-0a1b2c/command///req/#"
    assert probe_subscription(parsed(tmp_path).mqtt, "gw-a-doctor-0a1b2c") == "command///req/#"
    long = parsed(tmp_path, shared_group="g" * MAX_SHARED_GROUP)
    group = probe_subscription(long.mqtt, "gw-a-doctor-0a1b2c").split("/")[1]
    assert len(group) == MAX_SHARED_GROUP and check_shared_group(group) is None


def test_doctor_names_suback_0x9e_and_the_fix(tmp_path: Path) -> None:
    cfg = parsed(tmp_path, shared_group="site-a")
    topic = probe_subscription(cfg.mqtt, "gw-a-doctor-0a1b2c")
    finding = subscribe_refused(cfg, topic, 0x9E, "Shared Subscriptions not supported",
                                {"SharedSubscriptionAvailable": 0})
    assert finding.code == "shared_subscriptions_unsupported"
    assert finding.cause == (
        "the broker refused the subscription to $share/site-a.gw-a-doctor-0a1b2c/command///req/# (SUBACK 0x9E "
        "Shared Subscriptions not supported) (its CONNACK said so too: Shared Subscription Available = 0): "
        "with mqtt.shared_group = 'site-a' no command can arrive")
    assert finding.remedy.startswith("remove mqtt.shared_group")
    # An ACL refusal keeps its own words.
    acl = subscribe_refused(cfg, topic, 0x87, "Not authorized")
    assert acl.code == "subscribe_refused" and "not authorized" in acl.cause


def test_the_agent_log_names_the_setting_for_0x9e() -> None:
    assert "mqtt.shared_group" in SHARED_UNSUPPORTED_FIX


def test_joining_or_leaving_a_group_takes_a_restart(tmp_path: Path) -> None:
    from agent.service.reload import plan_reload

    plan = plan_reload(parsed(tmp_path), parsed(tmp_path, shared_group="site-a"))
    assert plan.restart_needed == ("mqtt.shared_group",)
    assert plan.effective.mqtt.shared_group is None  # the running agent keeps its subscription
