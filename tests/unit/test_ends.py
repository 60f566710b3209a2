"""The raw end of a connection (agent/connection/ends.py), pure: which kind and words each piece of evidence
gives, before the classifier weighs the history; and the log line each classified end gets."""

from __future__ import annotations

import logging
import socket
import ssl
from typing import Any

import pytest

from agent.config import HostPort, TlsConfig
from agent.connection.classify import (
    AUTH_FAILED,
    CONNECTION_LOST,
    IDLE_TIMEOUT,
    KEEPALIVE_TIMEOUT,
    NETWORK_ERROR,
    RECONNECT_REQUESTED,
    REFUSED,
    SERVER_DISCONNECT,
    SESSION_TAKEN_OVER,
    SHUTDOWN,
    TLS_ERROR,
)
from agent.connection.ends import (
    HOST_PROVEN_AFTER,
    TlsExplanations,
    connect_failure,
    end_cause,
    end_log_line,
    explained,
    host_failure,
)
from agent.connection.events import ConnectionEnded
from tests.support.events import ended as make_ended

HOST = HostPort("broker.example", 8883)


def cause(**kw: Any) -> tuple[str, str, int | None]:
    evidence: dict[str, Any] = {"close_reason": None, "refused": None, "from_server": False, "code": 0x80,
                                "text": "Unspecified error", "keepalive": 60, "link_error": ""}
    evidence.update(kw)
    return end_cause(**evidence)


def test_the_agents_own_reason_wins_over_what_paho_reports() -> None:
    assert cause(close_reason=(KEEPALIVE_TIMEOUT, "no PINGRESP 31.0 s after our PINGREQ"), refused=(0x87, "x"),
                 from_server=True) == (KEEPALIVE_TIMEOUT, "no PINGRESP 31.0 s after our PINGREQ", 0x80)


@pytest.mark.parametrize(("code", "kind"), [(0x86, AUTH_FAILED), (0x87, AUTH_FAILED), (0x8C, AUTH_FAILED),
                                            (0x85, REFUSED), (0x88, REFUSED)])
def test_a_refused_connack_names_its_code(code: int, kind: str) -> None:
    assert cause(refused=(code, "Not authorized"), code=0x80) == (
        kind, f"the broker refused the connection: Not authorized (CONNACK 0x{code:02X})", code)


def test_a_disconnect_from_the_broker_is_a_takeover_only_with_0x8e() -> None:
    assert cause(from_server=True, code=0x8E, text="Session taken over") == (
        SESSION_TAKEN_OVER, "the broker sent DISCONNECT: Session taken over", 0x8E)
    assert cause(from_server=True, code=0x8B, text="Server shutting down") == (
        SERVER_DISCONNECT, "the broker sent DISCONNECT: Server shutting down", 0x8B)


def test_paho_keepalive_timeout_and_a_lost_link() -> None:
    assert cause(code=0x8D, keepalive=45) == (
        KEEPALIVE_TIMEOUT, "no answer to our PINGREQ within the keepalive (45 s)", 0x8D)
    assert cause(link_error="reset by the peer") == (CONNECTION_LOST, "connection lost (reset by the peer)", 0x80)
    assert cause() == (CONNECTION_LOST, "connection lost (Unspecified error)", 0x80)


@pytest.mark.parametrize(("exc", "kind", "reason"), [
    (ConnectionRefusedError(111, "Connection refused"), REFUSED,
     "connection refused by broker.example:8883: nothing listens on that port"),
    (socket.gaierror(-2, "Name or service not known"), NETWORK_ERROR,
     "cannot resolve broker.example: Name or service not known"),
    (socket.timeout("timed out"), NETWORK_ERROR, "broker.example:8883 did not answer within 7.5 s"),
    (OSError(113, "No route to host"), NETWORK_ERROR, "cannot reach broker.example:8883: No route to host"),
    (ValueError("bad"), NETWORK_ERROR, "connecting to broker.example:8883 failed: bad"),
    (ssl.SSLError(1, "wrong version number"), TLS_ERROR, ""),
    (ssl.CertificateError("hostname mismatch"), TLS_ERROR, ""),
])
def test_a_connect_that_raised(exc: BaseException, kind: str, reason: str) -> None:
    assert connect_failure(HOST, exc, 7.5) == (kind, reason)


def verify_failure() -> ssl.SSLCertVerificationError:
    exc = ssl.SSLCertVerificationError(1, "certificate verify failed: unable to get local issuer certificate")
    exc.verify_code = 20
    exc.reason = "CERTIFICATE_VERIFY_FAILED"
    return exc


def test_a_handshake_failure_is_explained_once_and_the_certificate_fetched_once() -> None:
    fetched: list[HostPort] = []
    explanations = TlsExplanations(fetch=lambda host, tls, timeout: fetched.append(host))
    tls = TlsConfig(ca_file=None)
    text, again = explanations.explain(HOST, verify_failure(), tls, 5.0)
    assert not again and text and "tls.ca_file" in text
    assert explanations.explain(HOST, verify_failure(), tls, 5.0) == (text, True)
    assert fetched == [HOST]
    explanations.clear()  # new TLS settings: explained afresh
    assert explanations.explain(HOST, verify_failure(), tls, 5.0) == (text, False)
    assert fetched == [HOST, HOST]


def test_a_failure_without_a_verify_code_fetches_nothing() -> None:
    fetched: list[HostPort] = []
    explanations = TlsExplanations(fetch=lambda host, tls, timeout: fetched.append(host))
    text, again = explanations.explain(HOST, ssl.SSLError(1, "wrong version number"), TlsConfig(), 5.0)
    assert text and not again and fetched == []


def ended(kind: str, **kw: Any) -> ConnectionEnded:
    fields: dict[str, Any] = {"host": HOST, "reason": "why", "attempt_started": 90.0, "ended_at": 100.0,
                              "connected_at": 91.0, "last_in": 98.0, "reason_code": 0x80}
    return make_ended(kind, **{**fields, **kw})


def test_the_log_line_of_each_end() -> None:
    assert end_log_line(ended(IDLE_TIMEOUT), CONNECTION_LOST) == (
        logging.WARNING, "connection to broker.example:8883 ended after 9.0 s, 2.0 s after the last byte received: "
                         "idle_timeout: why", {"MQTT_REASON": IDLE_TIMEOUT, "MQTT_RC": 0x80})
    level, text, _ = end_log_line(ended(AUTH_FAILED, connected_at=None, last_in=None), AUTH_FAILED) or (0, "", {})
    assert level == logging.ERROR and text == "connection to broker.example:8883 ended: auth_failed: why"
    assert end_log_line(ended(SHUTDOWN, reason=""), RECONNECT_REQUESTED) == (
        logging.INFO, "disconnected from broker.example:8883 to reconnect: ", {})
    assert end_log_line(ended(SHUTDOWN, reason=""), SHUTDOWN) == (
        logging.INFO, "disconnected from broker.example:8883 (agent request)", {})


def test_a_failed_connect_is_logged_again_only_when_the_classifier_added_to_it() -> None:
    failed = ended(REFUSED, connected_at=None, error="ConnectionRefusedError()", reason="refused")
    assert end_log_line(failed, REFUSED, "refused") is None  # logged as it failed
    revised = ended(REFUSED, connected_at=None, error="ConnectionRefusedError()", reason="refused; so restarting")
    assert end_log_line(revised, REFUSED, "refused") == (logging.WARNING, "refused; so restarting",
                                                         {"MQTT_REASON": REFUSED})


@pytest.mark.parametrize(("kind", "expected"), [(SHUTDOWN, True), (RECONNECT_REQUESTED, True),
                                                (SESSION_TAKEN_OVER, True), (KEEPALIVE_TIMEOUT, True),
                                                (CONNECTION_LOST, False), (SERVER_DISCONNECT, False),
                                                (IDLE_TIMEOUT, False)])
def test_only_ends_with_a_known_cause_are_explained(kind: str, expected: bool) -> None:
    assert explained(kind) is expected


def test_which_ends_count_against_the_host() -> None:
    refused = ended(REFUSED, connected_at=None, last_in=None, error="ConnectionRefusedError()")
    assert host_failure(refused) == (True, True)  # nothing listens there: fail over at once
    assert host_failure(ended(REFUSED, connected_at=None, last_in=None)) == (True, False)  # CONNACK refusal
    assert host_failure(ended(NETWORK_ERROR, connected_at=None, last_in=None, error="timeout")) == (True, False)
    flap = 100.0 - HOST_PROVEN_AFTER + 0.5
    assert host_failure(ended(SERVER_DISCONNECT, connected_at=flap)) == (True, False)  # accepts and drops at once
    assert host_failure(ended(NETWORK_ERROR, connected_at=flap)) == (True, False)
    assert host_failure(ended(IDLE_TIMEOUT, connected_at=flap)) == (False, False)  # the path, not the host
    assert host_failure(ended(NETWORK_ERROR, connected_at=100.0 - HOST_PROVEN_AFTER)) == (False, False)
