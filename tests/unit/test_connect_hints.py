"""Refusals that name the setting to change (issue 17, points 2 and 3), pure: an MQTT 5 CONNECT that
gets no CONNACK (a 3.1.1-only broker), and a non-standard MQTT 3.1.1 CONNACK (aedes' keepaliveLimit)."""

from __future__ import annotations

import pytest

from agent.config import Config, HostPort, KeepaliveTuningConfig, MqttConfig, ReconnectConfig, parse_config
from agent.connection import probe
from agent.connection.classify import CONNECTION_LOST, NETWORK_ERROR, REFUSED
from agent.connection.events import ConnectionEnded
from agent.connection.monitor import ConnectionMonitor
from agent.tools.doctor.mqtt_check import connack_finding, connect_result

HOST = HostPort("broker", 8883)
FIX = 'set mqtt.protocol = "3.1.1"'


def monitor(protocol: str) -> ConnectionMonitor:
    mqtt = MqttConfig(hosts=(HOST,), client_id="dev-1", protocol=protocol, keepalive=60)
    return ConnectionMonitor(mqtt, ReconnectConfig(), KeepaliveTuningConfig(enabled=False, min=1))


def never_connected(kind: str, reason: str, *, code: int | None = None, error: str = "") -> ConnectionEnded:
    return ConnectionEnded(host=HOST, kind=kind, reason=reason, attempt_started=10.0, ended_at=10.2,
                           reason_code=code, keepalive=60, error=error)


@pytest.mark.parametrize(("kind", "reason"), [
    (CONNECTION_LOST, "connection lost (closed by the peer)"),  # RabbitMQ 3.10 closes the socket
    (NETWORK_ERROR, "no CONNACK within 10 s"),  # amqtt never answers
])
def test_an_mqtt5_connect_without_connack_names_the_protocol_setting(kind, reason):
    ended = monitor("5").classify(never_connected(kind, reason))
    assert ended.kind == NETWORK_ERROR and ended.reason.endswith(FIX)
    # The same on MQTT 3.1.1 says nothing about the protocol.
    assert FIX not in monitor("3.1.1").classify(never_connected(kind, reason)).reason


def test_a_tcp_failure_or_a_clear_refusal_gets_no_protocol_hint():
    refused = never_connected(REFUSED, "connection refused by broker:8883", error="ConnectionRefusedError()")
    assert FIX not in monitor("5").classify(refused).reason
    auth = never_connected("auth_failed", "the broker refused the connection: Not authorized (CONNACK 0x87)",
                           code=0x87)
    assert FIX not in monitor("5").classify(auth).reason


def test_a_non_standard_311_connack_says_the_keepalive_may_be_over_the_broker_limit():
    ended = monitor("3.1.1").classify(never_connected(
        REFUSED, "the broker refused the connection: Unspecified error (CONNACK 0x80)", code=0x80))
    assert ended.kind == REFUSED
    assert "keepalive (60 s) is over its keepaliveLimit" in ended.reason and "mqtt.keepalive" in ended.reason
    standard = monitor("3.1.1").classify(never_connected(
        REFUSED, "the broker refused the connection: Server unavailable (CONNACK 0x88)", code=0x88))
    assert "mqtt.keepalive" not in standard.reason


def test_an_mqtt5_connect_refused_as_unsupported_version_names_the_protocol_setting():
    """aedes answers an MQTT 5 CONNECT with CONNACK 0x84 (Unsupported Protocol Version)."""
    ended = monitor("5").classify(never_connected(
        REFUSED, "the broker refused the connection: Unsupported protocol version (CONNACK 0x84)", code=0x84))
    assert ended.kind == REFUSED and ended.reason.endswith(FIX)


def _cfg(protocol: str) -> Config:
    return parse_config({"agent": {"device_id": "dev-1"}, "mqtt": {"hosts": ["broker:1883"], "protocol": protocol},
                         "tls": {"enabled": False}})


@pytest.mark.parametrize("stage", [probe.CLOSED, probe.TIMEOUT])
def test_doctor_names_the_protocol_fix_for_an_mqtt5_connect_without_connack(stage):
    attempt = probe.Attempt(label="MQTT", stage=stage)
    v5 = connect_result(_cfg("5"), HOST, attempt, "dev-1-doctor", 5.0)
    assert any(FIX in f.remedy for f in v5.findings)
    v311 = connect_result(_cfg("3.1.1"), HOST, attempt, "dev-1-doctor", 5.0)
    assert not any(FIX in f.remedy for f in v311.findings)


def test_doctor_explains_aedes_keepalive_refusal():
    finding = connack_finding(0x80, "Unspecified error", _cfg("3.1.1").mqtt, "dev-1-doctor")
    assert finding.code == "keepalive_over_limit" and "lower mqtt.keepalive (now 60)" in finding.remedy
