"""A broker's message size limit (issue 17, point 1), against a real mosquitto with `max_packet_size
16384` and an exec command printing 48 KB. Before, the response was re-sent at every reconnect, the
broker dropped the connection each time, and no command was answered again (on MQTT 3.1.1 misread as a
duplicate client id)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.support.mosquitto import free_port
from tests.support.outcomes import scrape, send

LIMIT = 16384


def big_command(tmp_path: Path) -> dict[str, Any]:
    script = tmp_path / "big.sh"
    script.write_text("#!/bin/sh\nhead -c 49152 /dev/zero | tr '\\0' x\n")
    script.chmod(0o755)
    return {"argv": [str(script)], "timeout": 10}


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_an_oversized_response_is_answered_500_and_the_channel_keeps_working(make_broker, make_config, run_agent,
                                                                             tmp_path, protocol):
    broker = make_broker(extra=[f"max_packet_size {LIMIT}"])
    port = free_port()
    cfg = make_config(broker, {"mqtt": {"protocol": protocol}, "commands.big": big_command(tmp_path),
                               "metrics": {"listen": f"127.0.0.1:{port}"}})
    agent = run_agent(cfg)
    result = send(cfg, "big", timeout=30)
    assert result.status == 500
    body = json.loads(result.body)
    if protocol == "5":
        # mosquitto announces Maximum Packet Size in its CONNACK: the response is replaced before it is sent.
        assert body["limit"] == LIMIT and body["size"] > 49152
        assert "Maximum Packet Size" in body["error"]
        reason = "too_large"
    else:
        # MQTT 3.1.1 announces nothing: the broker drops the connection at each try, and after a few the
        # response is set aside and answered 500.
        assert body["size"] >= 49152 and "set aside" in body["error"]
        reason = "poison"
    for _ in range(3):  # the command channel works again
        assert send(cfg, "ping", timeout=10).status == 200
    metrics = scrape(port)
    assert metrics[("mqtt_agent_messages_set_aside_total", (("reason", reason),))] == 1
    disconnects = {dict(labels)["reason"]: v for (name, labels), v in metrics.items()
                   if name == "mqtt_agent_disconnects_total"}
    assert disconnects["session_taken_over"] == 0, agent.output
    assert metrics[("mqtt_agent_session_takeovers_total", ())] == 0
    if protocol == "3.1.1":
        assert disconnects["message_rejected"] == 3, agent.output
    else:
        assert sum(disconnects.values()) == 0, agent.output


def test_a_configured_limit_applies_where_the_broker_announces_none(make_broker, make_config, run_agent, tmp_path):
    """Eclipse Hono's case: nothing announced (MQTT 3.1.1), the documented limit configured."""
    broker = make_broker(extra=[f"max_packet_size {LIMIT}"])
    port = free_port()
    cfg = make_config(broker, {"mqtt": {"max_message_bytes": 2048}, "commands.big": big_command(tmp_path),
                               "metrics": {"listen": f"127.0.0.1:{port}"}})
    run_agent(cfg)
    result = send(cfg, "big", timeout=10)
    assert result.status == 500
    body = json.loads(result.body)
    assert body["limit"] == 2048 and "mqtt.max_message_bytes" in body["error"]
    assert send(cfg, "ping", timeout=10).status == 200
    metrics = scrape(port)
    assert metrics[("mqtt_agent_messages_set_aside_total", (("reason", "too_large"),))] == 1
    assert sum(v for (name, _), v in metrics.items() if name == "mqtt_agent_disconnects_total") == 0


def test_the_brokers_server_keep_alive_is_honoured_and_reported(make_broker, make_config, run_agent):
    """Issue 17, point 3: MQTT 5 CONNACK Server Keep Alive (mosquitto `max_keepalive`) and Maximum Packet Size."""
    broker = make_broker(extra=["max_keepalive 20", f"max_packet_size {LIMIT}"])
    port = free_port()
    cfg = make_config(broker, {"mqtt": {"protocol": "5", "keepalive": 60},
                               "metrics": {"listen": f"127.0.0.1:{port}"}})
    run_agent(cfg)
    result = send(cfg, "info", timeout=10)
    assert result.status == 200
    info = json.loads(result.body)
    assert info["keepalive_s"] == 20 and info["keepalive_set_by_broker"] is True
    assert info["max_message_bytes"] == LIMIT
    metrics = scrape(port)
    assert metrics[("mqtt_agent_keepalive_seconds", ())] == 20
    assert metrics[("mqtt_agent_keepalive_configured_seconds", ())] == 60
