"""Exec commands from `[commands.NAME]`: argv run directly, never through a shell.

The payload goes to stdin, stdout (capped at max_output_bytes) is the response body. Exit 0 -> 200,
non-zero -> 500 with the tail of stderr, past the timeout -> every process of the command is killed
(its tree and whatever carries its exec id, see agent.commands.processes), 504. The environment is the
agent's minus its systemd and credential variables (agent.environment). Processes a command
leaves running are reaped when they exit, and logged.
"""

from __future__ import annotations

import logging
import os
import selectors
import signal
import subprocess
import time
from dataclasses import dataclass

from agent.commands.processes import REAPER, KillReport, Reaper, kill_command, new_exec_id
from agent.config import CommandSpec
from agent.environment import clean_environment
from agent.protocol import OK, CommandError, CommandTimeout, Request, Response

log = logging.getLogger(__name__)

STDERR_TAIL = 2048
_CHUNK = 65536
# After the command's own process exits, output still arriving through pipes a detached child holds open
# is read for this long, then the response is sent (the child is reaped when it exits).
PIPE_LINGER = 0.5


@dataclass
class _Outcome:
    stdout: bytes
    stderr_tail: bytes
    truncated: bool
    timed_out: bool
    returncode: int | None
    kill: KillReport | None = None


class ExecHandler:
    enforces_timeout = True

    def __init__(self, spec: CommandSpec, reaper: Reaper = REAPER) -> None:
        self.spec = spec
        self.timeout = spec.timeout
        self._reaper = reaper

    def handle(self, request: Request) -> Response:
        exec_id = new_exec_id()
        env = clean_environment(extra=self.spec.env, agent_vars={
            "MQTT_AGENT_COMMAND": request.command,
            "MQTT_AGENT_REQ_ID": request.req_id,
            "MQTT_AGENT_DEVICE_ID": request.device_id,
            "MQTT_AGENT_EXEC_ID": exec_id,  # inherited by all it starts: how its processes are found
        })
        try:
            with self._reaper.spawning() as own:
                proc = subprocess.Popen(
                    self.spec.argv,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    env=env,
                    close_fds=True,
                    start_new_session=True,  # own process group and session, away from the agent's signals
                )
                own(proc.pid)
        except OSError as exc:
            raise CommandError(f"cannot start {self.spec.argv[0]}: {exc.strerror or exc}") from exc
        try:
            outcome = _communicate(proc, request.payload, request.deadline, self.spec.max_output_bytes, exec_id)
        finally:
            self._reaper.release(proc.pid)
        self._reaper.command_ended(self.spec.name, exec_id, outcome.kill.pids if outcome.kill else frozenset())
        if outcome.timed_out:
            done = outcome.kill.describe() if outcome.kill else "it was killed"
            raise CommandTimeout(f"command {self.spec.name!r} did not finish within {self.spec.timeout:g} s; {done}")
        if outcome.truncated:
            log.warning(
                "command %s: output exceeded max_output_bytes (%d); the response is truncated",
                self.spec.name, self.spec.max_output_bytes,
                extra={"COMMAND": self.spec.name, "REQ_ID": request.req_id},
            )
        rc = outcome.returncode
        if rc == 0:
            return Response(OK, outcome.stdout, content_type=None)
        stderr = outcome.stderr_tail.decode("utf-8", "replace")
        if rc is not None and rc < 0:
            try:
                what = f"was killed by signal {signal.Signals(-rc).name}"
            except ValueError:
                what = f"was killed by signal {-rc}"
        else:
            what = f"exited with status {rc}"
        raise CommandError(f"command {self.spec.name!r} {what}", exit_status=rc, stderr=stderr)


def _communicate(proc: subprocess.Popen[bytes], data: bytes, deadline: float, cap: int, exec_id: str) -> _Outcome:
    """Feed stdin, read stdout (up to `cap`) and the stderr tail until EOF or the deadline."""
    assert proc.stdin and proc.stdout and proc.stderr
    sel = selectors.DefaultSelector()
    out = bytearray()
    err = bytearray()
    truncated = False
    view = memoryview(data)
    if data:
        os.set_blocking(proc.stdin.fileno(), False)
        sel.register(proc.stdin, selectors.EVENT_WRITE)
    else:
        proc.stdin.close()
    sel.register(proc.stdout, selectors.EVENT_READ)
    sel.register(proc.stderr, selectors.EVENT_READ)
    timed_out = False
    linger_until: float | None = None
    kill: KillReport | None = None
    try:
        while sel.get_map():
            now = time.monotonic()
            remaining = deadline - now
            if remaining <= 0:
                timed_out = True
                break
            if linger_until is None and proc.poll() is not None:
                # The command exited; a detached child may hold its pipes open for hours: do not wait for it.
                linger_until = now + PIPE_LINGER
            if linger_until is not None and now >= linger_until:
                break
            wait = min(remaining, 0.1 if linger_until is None else max(linger_until - now, 0.0))
            for key, _ in sel.select(wait):
                fobj = key.fileobj
                if fobj is proc.stdin:
                    try:
                        written = os.write(proc.stdin.fileno(), view[:_CHUNK])
                    except BrokenPipeError:
                        written = len(view)  # the program does not read its input: fine
                    view = view[written:]
                    if not view:
                        sel.unregister(proc.stdin)
                        proc.stdin.close()
                    continue
                chunk = os.read(key.fd, _CHUNK)
                if not chunk:
                    sel.unregister(fobj)
                    continue
                if fobj is proc.stdout:
                    room = cap - len(out)
                    if len(chunk) > room:
                        truncated = True
                    out += chunk[: max(room, 0)]
                else:
                    err += chunk
                    del err[:-STDERR_TAIL]
        if not timed_out:
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.0))
            except subprocess.TimeoutExpired:
                timed_out = True
    finally:
        sel.close()
        if timed_out:
            kill = kill_command(proc, exec_id)
            proc.wait()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream and not stream.closed:
                stream.close()
    return _Outcome(bytes(out), bytes(err), truncated, timed_out, None if timed_out else proc.returncode, kill)
