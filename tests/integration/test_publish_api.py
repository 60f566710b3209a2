"""The local API with a real agent, a real socket and a real mosquitto: topics, answers, limits, access."""

from __future__ import annotations

import contextlib
import grp
import json
import os
import pwd
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from agent.config import load_config
from tests.support.api import api_path, ndjson, post, post_as, status, wait_socket
from tests.support.mosquitto import free_port
from tests.support.mqttclient import TestClient
from tests.support.outcomes import info

pytestmark = pytest.mark.integration

GATEWAY = {"mqtt": {"command_topic": "command//+/req/#"}}


def test_gateway_topics_events_batches_and_status(broker: Any, make_config: Callable[..., Path],
                                                   run_agent: Callable[..., Any]) -> None:
    cfg = make_config(broker, GATEWAY)
    run_agent(cfg)
    sock = api_path(cfg)
    watcher = TestClient(cfg, subscribe="#")
    try:
        assert post(sock, "/v1/telemetry?device=child-7", b'{"t":1}', "application/json")[0] == 202
        assert post(sock, "/v1/events?device=child-7&ttl=30", b'{"e":1}')[0] == 202
        code, body = post(sock, "/v1/telemetry/batch?qos=0", ndjson([{"n": 1}, {"n": 2}]))
        assert (code, body["accepted"]) == (202, 2)
        assert post(sock, "/v1/telemetry/batch", b'[{"n": 3}, {"n": 4}]')[0] == 202
        got = watcher.wait(6)
        assert [(m.topic, m.payload) for m in got] == [
            ("telemetry//child-7/?content-type=application%2Fjson", b'{"t":1}'),
            ("event//child-7/?hono-ttl=30", b'{"e":1}'),
            ("telemetry/?content-type=application%2Fjson", b'{"n": 1}'),
            ("telemetry/?content-type=application%2Fjson", b'{"n": 2}'),
            ("telemetry/?content-type=application%2Fjson", b'{"n":3}'),
            ("telemetry/?content-type=application%2Fjson", b'{"n":4}'),
        ]
        assert [m.qos for m in got] == [1, 1, 0, 0, 1, 1]
        st = status(sock)
        assert st["connected"] is True and st["device_id"] == "dev-1" and st["broker"] == broker.address
        assert st["queue"]["messages"] == 0 and st["queue"]["accepted"] == {"telemetry": 5, "event": 1}
    finally:
        watcher.close()


def test_mqtt5_carries_content_type_and_expiry_as_properties(broker: Any, make_config: Callable[..., Path],
                                                            run_agent: Callable[..., Any]) -> None:
    cfg = make_config(broker, {"mqtt": {"protocol": "5"}})
    run_agent(cfg)
    watcher = TestClient(cfg, subscribe="#", protocol="5")
    try:
        assert post(api_path(cfg), "/v1/events?ttl=300", b"{}", "application/json")[0] == 202
        (msg,) = watcher.wait(1)
        assert msg.topic == "event"
        assert msg.properties.ContentType == "application/json"
        assert 295 <= msg.properties.MessageExpiryInterval <= 300
    finally:
        watcher.close()


def _raw(sock: Path, data: bytes, timeout: float = 10.0) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(sock))
        s.sendall(data)
        out = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return out
            out += chunk


def test_bad_requests_get_400_with_a_reason_and_a_slow_client_blocks_nobody(
        broker: Any, make_config: Callable[..., Path], run_agent: Callable[..., Any]) -> None:
    cfg = make_config(broker, {"api": {"timeout": 5.0, "max_body_bytes": 4096, "max_connections": 8}})
    agent = run_agent(cfg)
    sock = api_path(cfg)
    for target, body, code, error in [
        ("/v1/events?qos=0", b"{}", 400, "bad_qos"),
        ("/v1/telemetry?device=a/b", b"{}", 400, "bad_device"),
        ("/v1/telemetry?colour=red", b"{}", 400, "bad_query"),
        ("/v1/telemetry/batch", b"{not json}\n", 400, "bad_batch"),
        ("/v1/nothing", b"{}", 404, "not_found"),
        ("/v1/telemetry", b"x" * 5000, 413, "body_too_large"),
    ]:
        got, reply = post(sock, target, body)
        assert (got, reply["error"]) == (code, error), reply
        assert reply["message"]
    assert _raw(sock, b"NONSENSE\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    assert b'"limit":"api.max_body_bytes"' in _raw(sock, b"POST /v1/telemetry HTTP/1.1\r\nContent-Length: 9999\r\n\r\n")
    # Slowloris: clients that send a request a byte at a time hold only their own slots.
    slow = []
    for _ in range(5):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(sock))
        s.sendall(b"POST /v1/telemetry HTTP/1.1\r\nContent-Le")
        slow.append(s)
    try:
        for n in range(20):
            assert post(sock, "/v1/telemetry", json.dumps({"n": n}).encode())[0] == 202
        for s in slow:  # served while every slow client still held its connection, unanswered
            s.setblocking(False)
            with pytest.raises(BlockingIOError):
                s.recv(1)
        for s in slow:  # they are cut off after api.timeout, with a 408 naming it
            s.setblocking(True)
            s.settimeout(15)
            answer = s.recv(4096)
            assert answer.startswith(b"HTTP/1.1 408 ") and b"api.timeout" in answer
    finally:
        for s in slow:
            s.close()
    # Past api.max_connections a connection is answered 503 at once, and the agent goes on.
    held = []
    try:
        for _ in range(8):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(sock))
            held.append(s)
        time.sleep(0.3)
        assert _raw(sock, b"GET /v1/status HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 503 ")
    finally:
        for s in held:
            s.close()
    wait_socket(sock)
    assert agent.proc.poll() is None


def test_only_the_socket_group_may_publish(broker: Any, make_config: Callable[..., Path],
                                           run_agent: Callable[..., Any]) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to run clients as other users")
    group = grp.getgrnam("daemon")  # exists on every Debian system; stands in for mqtt-agent-apps
    nobody = pwd.getpwnam("nobody")
    cfg = make_config(broker, {"api": {"group": group.gr_name}})
    run_agent(cfg)
    sock = api_path(cfg)
    st = sock.stat()
    assert (oct(st.st_mode & 0o777), st.st_gid) == ("0o660", group.gr_gid)
    assert post_as(nobody.pw_uid, nobody.pw_gid, [], sock) == 13  # refused by the file system
    assert post_as(nobody.pw_uid, nobody.pw_gid, [group.gr_gid], sock) == 0
    assert status(sock)["queue"]["accepted"] == {"telemetry": 1}


def test_over_max_message_bytes_is_413_and_the_connection_stays_up(
        broker: Any, make_config: Callable[..., Path], run_agent: Callable[..., Any]) -> None:
    cfg = make_config(broker, {"mqtt": {"max_message_bytes": 2048}})
    try:
        load_config(cfg)
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"mqtt.max_message_bytes is not in this tree yet (issue 17): {exc}")
    run_agent(cfg)
    sock = api_path(cfg)
    watcher = TestClient(cfg, subscribe="#")
    try:
        code, reply = post(sock, "/v1/telemetry", b"x" * 2048)
        assert code == 413 and reply["limit"] == "mqtt.max_message_bytes" and reply["value"] == 2048
        assert post(sock, "/v1/telemetry", b"x" * 1900)[0] == 202
        (msg,) = watcher.wait(1)
        assert len(msg.payload) == 1900
        assert info(cfg)["connects"] == 1 and status(sock)["connected"] is True  # never disconnected
    finally:
        watcher.close()


def test_a_full_queue_refuses_events_drops_oldest_telemetry_and_commands_are_still_served(
        make_broker: Callable[..., Any], make_config: Callable[..., Path], run_agent: Callable[..., Any]) -> None:
    broker = make_broker()
    metrics_port = free_port()
    cfg = make_config(broker, {"publish": {"max_messages": 10}, "metrics": {"listen": f"127.0.0.1:{metrics_port}"}})
    TestClient(cfg, client_id="watcher", clean=False, subscribe="event").close()  # the broker keeps its session
    broker.stop()  # the link is down: everything waits in the queue
    agent = run_agent(cfg, wait_subscribed=False)
    sock = api_path(cfg)
    wait_socket(sock)
    for n in range(4):
        assert post(sock, "/v1/events", json.dumps({"e": n}).encode())[0] == 202
    assert post(sock, "/v1/telemetry/batch", ndjson([{"t": n} for n in range(6)]))[0] == 202
    for n in range(6, 10):
        assert post(sock, "/v1/telemetry", json.dumps({"t": n}).encode())[0] == 202  # t0..t3 make room
    for n in range(4, 10):
        assert post(sock, "/v1/events", json.dumps({"e": n}).encode())[0] == 202  # t4..t9 make room
    code, reply = post(sock, "/v1/events", b'{"e":10}')
    assert code == 507 and reply["limit"] == "publish.max_messages" and reply["value"] == 10
    assert post(sock, "/v1/telemetry", b'{"t":10}')[0] == 507  # nothing left that may be dropped
    st = status(sock)["queue"]
    assert st["messages"] == 10 and st["dropped"] == {"telemetry/queue_full": 10}
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    assert 'mqtt_agent_publish_dropped_total{kind="telemetry",reason="queue_full"} 10.0' in text
    assert "mqtt_agent_publish_queue_messages 10.0" in text
    broker.start()
    agent.wait_for(r"subscribed to ", timeout=30)
    watcher = TestClient(cfg, client_id="watcher", clean=False, subscribe="event")
    try:
        from agent.tools.send import send_command

        result = send_command(load_config(cfg), "ping", b"", timeout=20)
        assert result.status == 200  # commands still served
        events = watcher.wait(10, timeout=20)
        assert [json.loads(m.payload)["e"] for m in events] == list(range(10))
    finally:
        watcher.close()
    assert agent.proc.poll() is None


def test_a_socket_passed_by_systemd_is_used_and_left_to_it(broker: Any, make_config: Callable[..., Path],
                                                           tmp_path: Path) -> None:
    import shutil

    from tests.support.agentproc import AgentProcess

    activate = shutil.which("systemd-socket-activate")
    if activate is None:
        pytest.skip("systemd-socket-activate is not installed (Debian: systemd)")
    cfg = make_config(broker)
    sock = api_path(cfg)
    # systemd-socket-activate listens, and starts the agent at the first connection with LISTEN_FDS set.
    agent = AgentProcess(cfg, wrapper=(activate, "-l", str(sock), "--fdname=api")).start()
    try:
        deadline = time.monotonic() + 10
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        # Served on the socket systemd-socket-activate holds (the agent could not bind that path itself).
        assert post(sock, "/v1/telemetry", b'{"via":"systemd"}')[0] == 202
    finally:
        assert agent.proc is not None
        asked = time.monotonic()
        agent.proc.send_signal(signal.SIGTERM)
        try:
            rc = agent.proc.wait(60)
        except subprocess.TimeoutExpired:
            agent.proc.send_signal(signal.SIGABRT)  # faulthandler: every thread's stack to the log
            rc = agent.stop(timeout=10)
        took = time.monotonic() - asked
    assert rc == 0, agent.output[-6000:]
    # Nothing runs and the one message is acknowledged: the stop takes about a second. Three times
    # agent.shutdown_grace (5 s here) is generous on a loaded machine; a main thread that deadlocked in
    # its signal handler (once seen: Event.set there) never stops at all.
    assert took < 15.0, f"the agent took {took:.1f} s to stop: " + agent.output[-6000:]
    assert sock.exists()  # the socket belongs to systemd (RemoveOnStop=): the agent leaves it alone
    with contextlib.suppress(FileNotFoundError):
        sock.unlink()


def test_publish_cli_exit_codes(broker: Any, make_config: Callable[..., Path], run_agent: Callable[..., Any],
                                tmp_path: Path) -> None:
    import sys

    from tests.support.agentproc import REPO

    cfg = make_config(broker, {**GATEWAY, "publish": {"max_messages": 1}})

    def cli(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([sys.executable, "-m", "agent", "publish", "--config", str(cfg), *args],
                              input=stdin, capture_output=True, cwd=REPO, timeout=30)

    down = cli("telemetry", "--payload", "{}")
    assert down.returncode == 2 and b"cannot reach the agent" in down.stderr
    run_agent(cfg)
    watcher = TestClient(cfg, subscribe="#")
    try:
        ok = cli("event", "--device", "child-7", "--ttl", "60", "--payload", "-", stdin=b'{"alarm":1}')
        assert ok.returncode == 0 and ok.stdout.startswith(b"accepted"), ok.stderr
        (payload := tmp_path / "p.json").write_bytes(b'{"t":2}')
        assert cli("telemetry", "--qos", "0", "--payload", f"@{payload}").returncode == 0
        got = watcher.wait(2)
        assert [(m.topic, m.payload, m.qos) for m in got] == [
            ("event//child-7/?content-type=application%2Fjson&hono-ttl=60", b'{"alarm":1}', 1),
            ("telemetry/?content-type=application%2Fjson", b'{"t":2}', 0)]
    finally:
        watcher.close()
    bad = cli("telemetry", "--device", "a/b", "--payload", "{}")
    assert bad.returncode == 1 and b"400 bad_device" in bad.stderr


def test_hono_errors_are_subscribed_counted_and_logged_not_dispatched(
        broker: Any, make_config: Callable[..., Path], run_agent: Callable[..., Any]) -> None:
    import urllib.request

    port = free_port()
    cfg = make_config(broker, {**GATEWAY, "publish": {"hono_errors": True},
                               "metrics": {"listen": f"127.0.0.1:{port}"}})
    agent = run_agent(cfg)
    agent.wait_for(r"subscribed to error//\+/# ", timeout=20)  # synchronisation: no other signal
    hono = TestClient(cfg)
    try:
        for n in range(3):
            hono.publish(f"error//child-7/corr-{n}/413", json.dumps(
                {"code": 413, "message": "payload too large " + "x" * 500}).encode())
        # Operator interface: Hono's error, cut short and escaped, is what the operator reads.
        agent.wait_for(r"Eclipse Hono could not process a message: .*code='413'", timeout=10)
        deadline = time.monotonic() + 10
        text = ""
        while time.monotonic() < deadline:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            if "mqtt_agent_publish_hono_errors_total 3.0" in text:
                break
            time.sleep(0.1)
        assert "mqtt_agent_publish_hono_errors_total 3.0" in text
        assert "mqtt_agent_commands_rejected_total" not in text or 'reason="malformed_topic"} 0.0' in text
        assert all(len(line) < 600 for line in agent.lines)  # the untrusted message is cut short
    finally:
        hono.close()
