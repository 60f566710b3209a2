"""sd_notify plumbing (a real datagram socket, in-process) and the STATUS line's wording."""

from __future__ import annotations

import socket
from functools import partial
from pathlib import Path

import pytest

from agent.config import HostPort
from agent.service.notify import (
    Notifier,
    StatusLine,
    notify_address,
    sender_from_environment,
    socket_sender,
    watchdog_interval,
)
from tests.support.events import ended as make_ended
from tests.support.notify import NotifySocket, parse

HOST = HostPort("broker.example", 8883)
ended = partial(make_ended, host=HOST, ended_at=5.0)


@pytest.mark.parametrize(("value", "address"), [
    ("/run/systemd/notify", "/run/systemd/notify"),
    ("@sd-notify-abc", b"\0sd-notify-abc"),
    ("", None),
    ("vsock:2:1234", None),
])
def test_notify_address(value, address):
    assert notify_address(value) == address


@pytest.mark.parametrize(("env", "pid", "interval"), [
    ({"WATCHDOG_USEC": "30000000"}, 42, 15.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "42"}, 42, 15.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "41"}, 42, None),  # another process is watched
    ({"WATCHDOG_USEC": "0"}, 42, None),
    ({"WATCHDOG_USEC": "soon"}, 42, None),
    ({}, 42, None),
])
def test_watchdog_interval(env, pid, interval):
    assert watchdog_interval(env, pid) == interval


@pytest.mark.parametrize("abstract", [False, True])
def test_plain_socket_sender_reaches_a_real_socket(tmp_path: Path, abstract: bool):
    sock = NotifySocket(tmp_path, abstract=abstract)
    try:
        notifier = Notifier(socket_sender(notify_address(sock.env_value)), monotonic_usec=lambda: 123)
        assert notifier.ready("connecting to broker:8883")
        assert notifier.status("line one\nWATCHDOG=1")  # a newline must not smuggle a field in
        assert notifier.reloading()
        assert notifier.stopping("stopping", needs=20.0)
        assert notifier.watchdog()
        msgs = [sock.wait_for(k, since=i) for i, k in enumerate(["READY", "STATUS", "RELOADING", "STOPPING",
                                                                  "WATCHDOG"])]
    finally:
        sock.close()
    assert msgs[0].fields == {"READY": "1", "STATUS": "connecting to broker:8883"}
    assert msgs[1].fields == {"STATUS": "line one WATCHDOG=1"}
    assert msgs[2].fields == {"RELOADING": "1", "MONOTONIC_USEC": "123", "STATUS": "reloading the configuration"}
    assert msgs[3].fields == {"STOPPING": "1", "STATUS": "stopping", "EXTEND_TIMEOUT_USEC": "20000000"}
    assert msgs[4].fields == {"WATCHDOG": "1"}


def test_status_is_sent_only_when_it_changes():
    sent: list[str] = []
    notifier = Notifier(lambda m: sent.append(m) is None)
    notifier.ready("connected")
    assert not notifier.status("connected")
    assert notifier.status("reconnecting in 1 s: refused")
    assert not notifier.status("reconnecting in 1 s: refused")
    assert sent == ["READY=1\nSTATUS=connected", "STATUS=reconnecting in 1 s: refused"]


def test_no_socket_no_messages_and_no_errors(tmp_path: Path):
    assert sender_from_environment({}) is None
    notifier = Notifier(None)
    assert not notifier.enabled
    assert not notifier.ready("x")
    assert not notifier.watchdog()
    # A socket nobody listens on: the send fails quietly (the agent must not care).
    send = socket_sender(str(tmp_path / "gone.sock"))
    assert send("READY=1") is False


def test_plain_sender_never_blocks_when_the_receiver_is_full(tmp_path: Path):
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(tmp_path / "full.sock"))
    receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    try:
        send = socket_sender(str(tmp_path / "full.sock"))
        results = [send("STATUS=" + "x" * 200) for _ in range(2000)]
    finally:
        receiver.close()
    assert results[0] is True
    assert False in results  # dropped, not blocked


def test_status_line_wording():
    line = StatusLine("3.1.1", configured_keepalive=60)
    assert line.text == "starting"
    line.connecting(HOST, 1)
    assert line.text == "connecting to broker.example:8883"
    line.connected(HOST, 60, False)
    assert line.text == "connected to broker.example:8883 (MQTT 3.1.1, keepalive 60 s)"
    line.connection_ended(ended("idle_timeout", connected_at=1.0))
    assert line.text == "disconnected from broker.example:8883: idle_timeout"
    line.reconnect_scheduled(8.0, ended("idle_timeout", connected_at=1.0))
    assert line.text == "reconnecting in 8 s: idle_timeout"
    line.connecting(HOST, 2)
    assert line.text == "connecting to broker.example:8883"
    line.connection_ended(ended("refused"))
    line.reconnect_scheduled(0.35, ended("refused"))
    assert line.text == "reconnecting in 0.3 s: refused"
    line.connecting(HOST, 3)
    assert line.text == "connecting to broker.example:8883 (attempt 2)"
    line.keepalive_changed(60, 20, "down", "3 idle drops")
    line.connected(HOST, 20, True)
    assert line.text == "connected to broker.example:8883 (MQTT 3.1.1, keepalive 20 s learned)"
    line.connected(HOST, 45, True)
    assert line.text == "connected to broker.example:8883 (MQTT 3.1.1, keepalive 45 s set by the broker)"
    line.subscribed("command///req/#", False, "Not authorized")
    assert line.text.endswith("; subscription to command///req/# refused (Not authorized): no commands can arrive")
    line.subscribed("command///req/#", True, "Granted QoS 1")
    assert ";" not in line.text
    line.session_takeover("dev-1")
    assert line.text.endswith("; another client with client id dev-1 took the session over")


def test_parse_helper_matches_the_protocol():
    assert parse(b"READY=1\nSTATUS=a=b") == {"READY": "1", "STATUS": "a=b"}
