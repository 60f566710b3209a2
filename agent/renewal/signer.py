"""The exec signer: `[renewal] command` gets the CSR (PEM) on stdin and prints the chain (PEM) on stdout.

It runs exactly like an exec command (agent/commands/handlers/exec.py): argv directly (no shell), its own session,
killed with everything it started at the timeout, and the same clean environment (the agent's minus its
systemd and credential variables, agent/environment.py), with MQTT_AGENT_DEVICE_ID set.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass

from agent.commands.handlers.exec import _communicate
from agent.commands.processes import REAPER, new_exec_id
from agent.environment import clean_environment
from agent.errors import AgentError

MAX_CHAIN_BYTES = 1 << 20
SIGNER_NAME = "renewal.command"


class SignerError(AgentError):
    """The signer did not return a chain; the message says what it did instead."""


@dataclass(frozen=True)
class ExecSigner:
    argv: tuple[str, ...]
    timeout: float
    device_id: str

    def sign(self, csr_pem: bytes) -> bytes:
        exec_id = new_exec_id()
        env = clean_environment(agent_vars={"MQTT_AGENT_DEVICE_ID": self.device_id, "MQTT_AGENT_EXEC_ID": exec_id})
        try:
            with REAPER.spawning() as own:
                proc = subprocess.Popen(list(self.argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, env=env, close_fds=True, start_new_session=True,
                                        cwd="/")
                own(proc.pid)
        except OSError as exc:
            raise SignerError(f"renewal.command: cannot start {self.argv[0]}: {exc.strerror or exc}") from exc
        try:
            outcome = _communicate(proc, csr_pem, time.monotonic() + self.timeout, MAX_CHAIN_BYTES, exec_id)
        finally:
            REAPER.release(proc.pid)
        REAPER.command_ended(SIGNER_NAME, exec_id, outcome.kill.pids if outcome.kill else frozenset())
        if outcome.timed_out:
            done = outcome.kill.describe() if outcome.kill else "it was killed"
            raise SignerError(f"renewal.command did not finish within {self.timeout:g} s (renewal.timeout); {done}")
        if outcome.returncode != 0:
            tail = outcome.stderr_tail.decode("utf-8", "replace").strip()[-300:]
            shown = tail.encode("unicode_escape").decode("ascii") if tail else "nothing on stderr"
            raise SignerError(f"renewal.command exited with status {outcome.returncode}: {shown}")
        if outcome.truncated:
            raise SignerError(f"renewal.command printed more than {MAX_CHAIN_BYTES} bytes; expected a PEM chain")
        if b"-----BEGIN CERTIFICATE-----" not in outcome.stdout:
            raise SignerError("renewal.command printed no PEM certificate on stdout")
        return outcome.stdout
