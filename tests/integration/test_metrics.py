"""Prometheus metrics: a real scrape of the real agent after real traffic (counters move by exactly what
the test caused, `promtool check metrics` is clean), plus the listener events that only the resilience
layer emits, driven directly."""

from __future__ import annotations

import shutil
import subprocess
import time

import pytest
from cryptography import x509

from agent import __version__
from agent.config import load_config
from agent.service.metrics import DISCONNECT_REASONS
from agent.tools.send import send_command
from tests.support.metrics import Samples, parse, value
from tests.support.mosquitto import free_port
from tests.support.outcomes import info, wait_until
from tests.support.outcomes import scrape_text as scrape


def total(samples: Samples, name: str) -> float:
    return sum(v for (n, _), v in samples.items() if n == name)


def promtool_check(text: str) -> subprocess.CompletedProcess[str]:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is not installed; run ./scripts/test.sh, which installs it (Debian: prometheus)")
    return subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)


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
    wait_until(lambda: value(parse(scrape(port)), "mqtt_agent_connected") == 0, 10, "the agent saw the outage")
    time.sleep(max(0.0, 1.5 - (time.monotonic() - stopped)))
    wall_before = time.time()
    broker.start()
    wait_until(lambda: value(parse(scrape(port)), "mqtt_agent_connected") == 1, 20, "connected again")
    # The request cannot be lost before the agent resubscribes: the resumed session kept the subscription.
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

