"""Prometheus metrics: a real scrape of the real agent after real traffic (counters move by exactly what
the test caused, `promtool check metrics` is clean), plus the listener events that only the resilience
layer emits, driven directly."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.request

import pytest
from cryptography import x509
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from agent import __version__
from agent.config import HostPort, TlsConfig, load_config
from agent.connection.session import ConnectionEnded
from agent.service.metrics import DISCONNECT_REASONS, UNKNOWN_COMMAND, AgentMetrics, MetricsServer
from agent.tools.send import send_command
from tests.support.clock import FakeClock
from tests.support.mosquitto import free_port

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def total(samples: Samples, name: str) -> float:
    return sum(v for (n, _), v in samples.items() if n == name)


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        assert resp.status == 200
        return str(resp.read().decode())


def promtool_check(text: str) -> subprocess.CompletedProcess[str]:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is not installed; run ./scripts/test.sh, which installs it (Debian: prometheus)")
    return subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)


def info(cfg_path) -> dict:
    result = send_command(load_config(cfg_path), "info", timeout=10)
    assert result.status == 200
    return dict(json.loads(result.body))


@pytest.mark.integration
def test_scrape_after_real_traffic(pki, broker, make_config, run_agent):
    port = free_port()
    path = make_config(broker, {"metrics": {"listen": f"127.0.0.1:{port}"},
                                "commands.fail": {"argv": ["/bin/false"]}})
    agent = run_agent(path)
    cfg = load_config(path)
    before = parse(scrape(port))
    assert value(before, "mqtt_agent_connected") == 1
    assert value(before, "mqtt_agent_connects_total") == 1
    assert value(before, "mqtt_agent_broker_info", host=broker.address, protocol="3.1.1") == 1
    assert value(before, "mqtt_agent_keepalive_seconds") == 30
    assert value(before, "mqtt_agent_keepalive_configured_seconds") == 30
    assert value(before, "mqtt_agent_keepalive_min_seconds") == 10  # keepalive_tuning.min default
    assert value(before, "mqtt_agent_build_info", version=__version__, python=_python(), paho=_paho()) == 1
    for reason in DISCONNECT_REASONS:
        assert value(before, "mqtt_agent_disconnects_total", reason=reason) == 0  # pre-initialised

    # Commands: 3 pings, 2 failures, 1 unknown command, 1 oversized payload.
    for _ in range(3):
        assert send_command(cfg, "ping", timeout=10).status == 200
    for _ in range(2):
        assert send_command(cfg, "fail", timeout=10).status == 500
    assert send_command(cfg, "nope", timeout=10).status == 404
    assert send_command(cfg, "ping", b"x" * 70000, timeout=10).status == 413
    after = parse(scrape(port))
    assert value(after, "mqtt_agent_commands_total", command="ping", status="200") == 3
    assert value(after, "mqtt_agent_commands_total", command="fail", status="500") == 2
    assert value(after, "mqtt_agent_command_duration_seconds_count", command="ping") == 3
    assert value(after, "mqtt_agent_command_duration_seconds_count", command="fail") == 2
    assert 0 < value(after, "mqtt_agent_command_duration_seconds_sum", command="fail") < 10
    assert value(after, "mqtt_agent_commands_rejected_total", reason="unknown_command") == 1
    assert value(after, "mqtt_agent_commands_rejected_total", reason="payload_too_large") == 1
    assert value(after, "mqtt_agent_commands_in_flight") == 0
    # The unknown command is not a label of its own (unbounded names would explode the series).
    assert not any(dict(labels).get("command") == "nope" for (_, labels) in after)

    # A broker outage of at least 1.5 s: one disconnect, offline time, reconnect attempts.
    offline_before = value(after, "mqtt_agent_offline_seconds_total")
    stopping = time.monotonic()  # the agent may see the drop before stop() returns
    broker.stop()
    stopped = time.monotonic()
    agent.wait_for(r"reconnecting in ")
    time.sleep(max(0.0, 1.5 - (time.monotonic() - stopped)))
    wall_before = time.time()
    broker.start()
    agent.wait_for(r"connected to .*session resumed", timeout=20)
    agent.wait_for(r"subscribed to ", since=agent.count(r"subscribed to "))
    facts = info(path)
    wall_after = time.time()
    final_text = scrape(port)
    final = parse(final_text)
    assert value(final, "mqtt_agent_connected") == 1
    assert value(final, "mqtt_agent_connects_total") == facts["connects"] == 2
    # Every attempt after the first is a reconnect attempt, and every attempt but the current one ended.
    assert value(final, "mqtt_agent_reconnect_attempts_total") == facts["connect_attempts"] - 1
    assert total(final, "mqtt_agent_disconnects_total") == facts["connect_attempts"] - 1
    assert facts["connect_attempts"] >= 2
    assert value(final, "mqtt_agent_disconnects_total", reason="refused") == facts["connect_attempts"] - 2
    offline = value(final, "mqtt_agent_offline_seconds_total") - offline_before
    assert 1.5 <= offline < time.monotonic() - stopping
    assert wall_before <= value(final, "mqtt_agent_last_connect_timestamp_seconds") <= wall_after
    # Connected again: offline time stands still.
    time.sleep(1.0)
    assert value(parse(scrape(port)), "mqtt_agent_offline_seconds_total") == pytest.approx(
        value(final, "mqtt_agent_offline_seconds_total"), abs=0.01)

    # Certificates: the exact expiry of the device certificate and of the CA.
    device = x509.load_pem_x509_certificate(pki.device.cert.read_bytes())
    ca = x509.load_pem_x509_certificate(pki.ca.cert_path.read_bytes())
    assert value(final, "mqtt_agent_tls_certificate_expiry_timestamp_seconds", certificate="client") == \
        device.not_valid_after_utc.timestamp()
    assert value(final, "mqtt_agent_tls_certificate_expiry_timestamp_seconds", certificate="ca") == \
        ca.not_valid_after_utc.timestamp()

    check = promtool_check(final_text)
    assert check.returncode == 0 and check.stdout == "" and check.stderr == "", check
    assert agent.stop() == 0


def _python() -> str:
    import platform

    return platform.python_version()


def _paho() -> str:
    from importlib.metadata import version

    return version("paho-mqtt")


def ended(kind: str, connected_at: float | None = 0.0) -> ConnectionEnded:
    return ConnectionEnded(host=HostPort("b", 1), kind=kind, reason="", attempt_started=0.0, ended_at=1.0,
                           connected_at=connected_at)




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
        s.connection_ended(ended(kind))
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
