"""The local API answers a request it refuses before reading it whole (413) so that the client reads why:
it stops writing and drops what the client still sends for a bounded time, instead of closing at once (which
made the client's send fail with EPIPE before it read the answer). Real server, real Unix socket."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.config import ApiConfig
from agent.service.server import ApiServer, Reply, Request
from agent.tools.publish import request

LIMIT = 4096


def _handler(req: Request) -> Reply:
    return Reply(200, {"length": len(req.body)})


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[ApiServer, Path]]:
    path = tmp_path / "api.sock"
    srv = ApiServer(ApiConfig(socket=path, group="no-such-group-here", max_body_bytes=LIMIT, timeout=1.0),
                    _handler)
    srv.start()
    try:
        yield srv, path
    finally:
        srv.stop()


def _connect(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5.0)
    s.connect(str(path))
    return s


def _read_to_eof(s: socket.socket, limit: float = 5.0) -> bytes:
    out = b""
    end = time.monotonic() + limit
    while time.monotonic() < end:
        chunk = s.recv(65536)
        if not chunk:
            return out
        out += chunk
    raise AssertionError(f"the server did not close within {limit} s; read {out[:200]!r}")


def test_a_body_still_arriving_after_its_413_is_dropped_and_the_answer_read(server: tuple[ApiServer, Path]) -> None:
    _, path = server
    s = _connect(path)
    try:
        s.sendall(b"POST /v1/telemetry HTTP/1.1\r\nContent-Length: 5000\r\n\r\n")
        # The answer is there before the client sends its body (the server answers on the headers alone)...
        assert s.recv(12, socket.MSG_PEEK).startswith(b"HTTP/1.1 413")
        time.sleep(0.3)  # ... and the server had time to close, had it meant to
        s.sendall(b"x" * 5000)  # EPIPE here without the linger
        answer = _read_to_eof(s)
    finally:
        s.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413 ")
    assert json.loads(body)["error"] == "body_too_large"


def test_the_linger_is_bounded(server: tuple[ApiServer, Path]) -> None:
    """A client that goes on sending after its 413 is cut off within min(LINGER_SECONDS, api.timeout)."""
    _, path = server
    s = _connect(path)
    started = time.monotonic()
    closed_after = None
    try:
        s.sendall(b"POST /v1/telemetry HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n")
        for _ in range(100):  # bounded: 100 x 0.05 s
            try:
                s.sendall(b"y" * 1000)
            except (BrokenPipeError, ConnectionResetError):
                closed_after = time.monotonic() - started
                break
            time.sleep(0.05)
        answer = s.recv(65536)
    finally:
        s.close()
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert closed_after is not None and 0.8 <= closed_after <= 3.0, closed_after


def test_the_publish_client_reads_a_413_even_when_its_send_fails(server: tuple[ApiServer, Path]) -> None:
    _, path = server
    code, reply = request(path, "POST", "/v1/telemetry", b"z" * (3 * 1024 * 1024))
    assert (code, reply["error"]) == (413, "body_too_large")
    assert request(path, "POST", "/v1/telemetry", b"{}")[0] == 200  # and the server goes on
