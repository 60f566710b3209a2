"""Exec commands run real processes: stdin/stdout, exit codes, stderr tail, output cap, and timeouts
that kill the whole process group."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from agent.commands.handlers.exec import ExecHandler
from agent.config import CommandSpec
from agent.protocol import CommandError, CommandTimeout, Request


def run(argv: list[str], payload: bytes = b"", timeout: float = 5.0, cap: int = 65536):
    handler = ExecHandler(CommandSpec(name="t", argv=tuple(argv), timeout=timeout, max_output_bytes=cap))
    req = Request(command="t", req_id="r1", device_id="dev-1", payload=payload,
                  deadline=time.monotonic() + timeout)
    return handler.handle(req)


def test_payload_on_stdin_stdout_as_body() -> None:
    resp = run(["/bin/cat"], b'{"a": 1}')
    assert resp.status == 200
    assert resp.body == b'{"a": 1}'


def test_large_payload_is_streamed_without_deadlock() -> None:
    data = os.urandom(1 << 20)
    resp = run(["/bin/cat"], data, cap=2 << 20)
    assert resp.body == data


def test_environment_names_the_request() -> None:
    resp = run(["/bin/sh", "-c", 'echo "$MQTT_AGENT_COMMAND $MQTT_AGENT_REQ_ID $MQTT_AGENT_DEVICE_ID"'])
    assert resp.body == b"t r1 dev-1\n"


def test_nonzero_exit_is_500_with_the_stderr_tail() -> None:
    with pytest.raises(CommandError) as info:
        run(["/bin/sh", "-c", "echo doing; echo 'disk full' >&2; exit 3"])
    resp = info.value.response()
    assert resp.status == 500
    assert json.loads(resp.body) == {"error": "command 't' exited with status 3", "exit_status": 3,
                                     "stderr": "disk full\n"}


def test_stderr_keeps_only_the_tail() -> None:
    with pytest.raises(CommandError) as info:
        run(["/bin/sh", "-c", "head -c 10000 /dev/zero | tr '\\0' a >&2; echo END >&2; exit 1"])
    stderr = info.value.extra["stderr"]
    assert stderr.endswith("END\n") and len(stderr) == 2048


def test_killed_by_a_signal() -> None:
    with pytest.raises(CommandError) as info:
        run(["/bin/sh", "-c", "kill -TERM $$"])
    assert info.value.message == "command 't' was killed by signal SIGTERM"


def test_output_is_capped() -> None:
    resp = run(["/bin/sh", "-c", "head -c 5000 /dev/zero"], cap=100)
    assert resp.status == 200 and resp.body == b"\0" * 100


def test_timeout_kills_the_process_group(tmp_path: Path) -> None:
    marker = tmp_path / "child.pid"
    started = time.monotonic()
    with pytest.raises(CommandTimeout) as info:
        run(["/bin/sh", "-c", f"sleep 30 & echo $! > {marker}; wait"], timeout=0.5)
    assert time.monotonic() - started < 5
    assert info.value.status == 504
    assert info.value.message == "command 't' did not finish within 0.5 s; killed 2 processes"
    child = int(marker.read_text())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the background child survived the timeout")


def test_program_missing_at_run_time(tmp_path: Path) -> None:
    with pytest.raises(CommandError) as info:
        run([str(tmp_path / "gone")])
    assert info.value.status == 500
    assert info.value.message.startswith(f"cannot start {tmp_path}/gone: No such file")


def test_program_that_ignores_stdin() -> None:
    resp = run(["/bin/echo", "ok"], b"x" * 200_000)
    assert resp.body == b"ok\n"
