"""[forward.local] with two real brokers: the gateway's own mosquitto and the upstream one."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.support.api import api_path, status, wait_socket
from tests.support.mqttclient import TestClient

pytestmark = pytest.mark.integration


def test_local_topics_are_forwarded_and_queued_while_upstream_is_down(
        make_broker: Callable[..., Any], make_config: Callable[..., Path], run_agent: Callable[..., Any]) -> None:
    upstream = make_broker()
    local = make_broker(tls=False)
    cfg = make_config(upstream, {
        "forward.local": {"host": local.address},
        "forward.local.topics": {"sensors/#": "telemetry", "alarms/+": "event"},
    })
    TestClient(cfg, client_id="cloud-fwd", clean=False, subscribe="#").close()
    agent = run_agent(cfg)
    agent.wait_for(r"forward.local: connected to ", timeout=20)
    sock = api_path(cfg)
    upstream.stop()
    app = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="local-app")
    app.connect(local.host, local.port)
    app.loop_start()
    try:
        for n in range(20):
            app.publish(f"sensors/room{n % 3}", json.dumps({"t": n}), qos=1).wait_for_publish(5)
            if n % 4 == 0:
                app.publish("alarms/door", json.dumps({"e": n // 4}), qos=1).wait_for_publish(5)
        app.publish("other/topic", b"not forwarded", qos=1).wait_for_publish(5)
        app.publish("alarms/door/deeper", b"not forwarded either", qos=1).wait_for_publish(5)
    finally:
        app.disconnect()
        app.loop_stop()
    deadline = time.monotonic() + 10
    while status(sock)["queue"]["messages"] < 25 and time.monotonic() < deadline:
        time.sleep(0.1)
    queue = status(sock)["queue"]
    assert queue["messages"] == 25 and queue["accepted"] == {"telemetry": 20, "event": 5}
    upstream.start()
    cloud = TestClient(cfg, client_id="cloud-fwd", clean=False, subscribe="#")
    try:
        got = cloud.wait(25, timeout=30)
        time.sleep(0.5)
        got = list(cloud.messages)
    finally:
        cloud.close()
    assert [json.loads(m.payload)["t"] for m in got if m.topic == "telemetry"] == list(range(20))
    assert [json.loads(m.payload)["e"] for m in got if m.topic == "event"] == list(range(5))
    assert len(got) == 25
    wait_socket(sock)
    assert agent.proc.poll() is None
