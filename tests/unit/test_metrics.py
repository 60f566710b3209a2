"""Prometheus metrics: a real scrape of the real agent after real traffic (counters move by exactly what
the test caused, `promtool check metrics` is clean), plus the listener events that only the resilience
layer emits, driven directly."""

from __future__ import annotations

import urllib.request

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from agent.config import HostPort, TlsConfig
from agent.service.metrics import DISCONNECT_REASONS, UNKNOWN_COMMAND, AgentMetrics, MetricsServer
from tests.support.clock import FakeClock
from tests.support.events import ended
from tests.support.metrics import parse, value
from tests.support.mosquitto import free_port


def test_resilience_events_are_counted():
    registry = CollectorRegistry()
    m = AgentMetrics(protocol="5", configured_keepalive=60, tls=TlsConfig(enabled=False), registry=registry)
    s = m.connection
    s.keepalive_changed(60, 30, "down", "3 idle drops within 900 s")
    s.keepalive_changed(30, 20, "down", "3 idle drops within 900 s")
    s.keepalive_changed(20, 40, "up", "no drop for 86400 s")
    s.keepalive_changed(40, 30, "sideways", "?")
    s.session_takeover("dev-1")
    s.outbox_changed(7)
    s.outbox_changed(3)
    s.outbox_dropped(2)
    s.outbox_dropped(5)
    got = parse(generate_latest(registry).decode())
    assert value(got, "mqtt_agent_keepalive_adjustments_total", direction="down") == 2
    assert value(got, "mqtt_agent_keepalive_adjustments_total", direction="up") == 1
    assert value(got, "mqtt_agent_keepalive_adjustments_total", direction="other") == 1
    assert value(got, "mqtt_agent_session_takeovers_total") == 1
    assert value(got, "mqtt_agent_outbox_messages") == 3
    assert value(got, "mqtt_agent_outbox_dropped_total") == 7


def test_disconnect_reasons_stay_bounded_and_offline_time_is_accounted():
    clock = FakeClock(100.0)
    registry = CollectorRegistry()
    m = AgentMetrics(protocol="3.1.1", configured_keepalive=60, tls=TlsConfig(enabled=False), registry=registry,
                     clock=clock, wall=lambda: 1.7e9)
    s = m.connection
    clock.now = 103.0
    s.connecting(HostPort("a", 8883), 1)
    s.connected(HostPort("a", 8883), 45, False)  # 3 s offline before the first CONNACK
    clock.now = 110.0
    for kind in ("idle_timeout", "connection_lost", "reconnect_requested", "session_taken_over"):
        s.connection_ended(ended(kind, connected_at=0.0))
    s.connecting(HostPort("b", 8883), 2)
    clock.now = 112.5
    got = parse(generate_latest(registry).decode())
    assert value(got, "mqtt_agent_offline_seconds_total") == pytest.approx(3.0 + 2.5)
    assert value(got, "mqtt_agent_connected") == 0
    s.connected(HostPort("b", 8883), 20, True)
    clock.now = 200.0
    got = parse(generate_latest(registry).decode())
    assert value(got, "mqtt_agent_offline_seconds_total") == pytest.approx(5.5)
    assert value(got, "mqtt_agent_disconnects_total", reason="idle_timeout") == 1
    assert value(got, "mqtt_agent_disconnects_total", reason="session_taken_over") == 1
    assert value(got, "mqtt_agent_disconnects_total", reason="other") == 2
    assert {dict(labels)["reason"] for (n, labels) in got if n == "mqtt_agent_disconnects_total"} == \
        {*DISCONNECT_REASONS, "other"}
    # Only the broker in use is shown.
    assert [dict(labels) for (n, labels) in got if n == "mqtt_agent_broker_info"] == \
        [{"host": "b:8883", "protocol": "3.1.1"}]
    assert value(got, "mqtt_agent_keepalive_seconds") == 20
    assert value(got, "mqtt_agent_reconnect_attempts_total") == 1
    assert value(got, "mqtt_agent_last_connect_timestamp_seconds") == 1.7e9


def test_unknown_and_removed_commands_fold_into_one_label():
    registry = CollectorRegistry()
    m = AgentMetrics(protocol="3.1.1", configured_keepalive=60, tls=TlsConfig(enabled=False), registry=registry,
                     commands=["ping", "reboot"])
    c = m.commands
    c.command_finished("ping", 200, 0.01)
    c.command_finished("reboot", 200, 1.0)
    c.set_commands(["ping"])  # a reload removed reboot
    c.command_finished("reboot", 200, 1.0)
    c.command_finished("x" * 64, 504, 30.0)
    c.command_rejected("", "malformed_topic")
    c.command_rejected("y", "something_new")
    got = parse(generate_latest(registry).decode())
    assert value(got, "mqtt_agent_commands_total", command="reboot", status="200") == 1
    assert value(got, "mqtt_agent_commands_total", command=UNKNOWN_COMMAND, status="200") == 1
    assert value(got, "mqtt_agent_commands_total", command=UNKNOWN_COMMAND, status="504") == 1
    assert value(got, "mqtt_agent_command_duration_seconds_bucket", command=UNKNOWN_COMMAND, le="30.0") == 2
    assert value(got, "mqtt_agent_commands_rejected_total", reason="malformed_topic") == 1
    assert value(got, "mqtt_agent_commands_rejected_total", reason="other") == 1


def test_metrics_server_reports_a_busy_port_by_name():
    registry = CollectorRegistry()
    first = MetricsServer(HostPort("127.0.0.1", free_port()), registry)
    first.start()
    try:
        second = MetricsServer(first.endpoint, registry)
        with pytest.raises(OSError, match=rf"cannot listen on 127.0.0.1:{first.port} \(metrics.listen\)"):
            second.start()
    finally:
        first.stop()


def test_metrics_server_on_ipv6_loopback():
    registry = CollectorRegistry()
    AgentMetrics(protocol="3.1.1", configured_keepalive=60, tls=TlsConfig(enabled=False), registry=registry)
    server = MetricsServer(HostPort("::1", free_port("::1")), registry)
    server.start()
    try:
        with urllib.request.urlopen(f"http://[::1]:{server.port}/metrics", timeout=10) as resp:
            assert b"mqtt_agent_connected 0.0" in resp.read()
    finally:
        server.stop()

