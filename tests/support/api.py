"""Talk to an agent's local API over its Unix socket (tests and benchmarks)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from agent.tools.publish import request


def api_path(config: Path) -> Path:
    from agent.tools.publish import socket_path

    return socket_path(config)


def post(sock: Path, target: str, body: bytes, content_type: str | None = None) -> tuple[int, dict[str, Any]]:
    return request(sock, "POST", target, body, content_type)


def status(sock: Path) -> dict[str, Any]:
    code, body = request(sock, "GET", "/v1/status")
    assert code == 200, body
    return body


def wait_socket(sock: Path, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            request(sock, "GET", "/v1/status", timeout=2)
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"the agent's API did not answer on {sock} within {timeout} s")


def post_until_accepted(sock: Path, target: str, body: bytes, timeout: float = 60.0) -> dict[str, Any]:
    """What an app does while the agent restarts: retry until 202 (bounded)."""
    end = time.monotonic() + timeout
    while True:
        try:
            code, reply = post(sock, target, body)
            if code == 202:
                return reply
            assert code == 503, (code, reply)
        except OSError:
            pass
        assert time.monotonic() < end, f"{target} not accepted within {timeout} s"
        time.sleep(0.05)


def ndjson(values: list[Any]) -> bytes:
    return b"".join(json.dumps(v).encode() + b"\n" for v in values)


def post_as(uid: int, gid: int, groups: list[int], sock: Path, target: str = "/v1/telemetry",
            body: bytes = b'{"from":"child"}') -> int:
    """POST from a forked child running as uid/gid with these supplementary groups (needs root):
    0 = 202, 13 = refused by the file system (EACCES), 98 = another answer, 97 = another error."""
    import os

    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 99
        try:
            os.setgroups(groups)
            os.setgid(gid)
            os.setuid(uid)
            got, _ = post(sock, target, body)
            code = 0 if got == 202 else 98
        except PermissionError:
            code = 13
        except BaseException:  # noqa: BLE001 - the child must exit, whatever happened
            code = 97
        os._exit(code)
    _, st = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(st)
