"""Mutual-TLS round trip through a real mosquitto: the agent's reason to exist, in one test."""

from __future__ import annotations

import json

from agent.config import load_config
from agent.tools.send import send_command


def test_ping_round_trip_over_mutual_tls(broker, make_config, run_agent):
    cfg_path = make_config(broker)
    agent = run_agent(cfg_path)
    result = send_command(load_config(cfg_path), "ping", b'{"echo": "hi"}', timeout=10)
    assert result.status == 200
    body = json.loads(result.body)
    assert body["device_id"] == "dev-1"
    assert body["echo"] == "hi"
    assert result.topic.startswith("command///res/") and result.topic.endswith("/200")
    assert agent.stop() == 0
