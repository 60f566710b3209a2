"""`systemctl reload` that fails when the new configuration is rejected.

SIGHUP has no answer channel, and systemd 252 (bookworm) has no Type=notify-reload (253+), so
`ExecReload=/bin/kill -HUP $MAINPID` always "succeeded". Instead ExecReload runs `mqtt-agent reload`,
which does not read the configuration itself (systemd does not hand ExecReload= the credentials when the
service has its own mount namespace, so it could not read the key; the agent, which has them, judges):

1. it writes a random token to DIR/reload-request (DIR: $RUNTIME_DIRECTORY, else agent.state_dir),
2. sends SIGHUP to the agent ($MAINPID),
3. waits (bounded) for DIR/reload-verdict to carry that token, and prints the verdict's message;
   exit 0 if the new configuration was applied, 1 if it was rejected, 2 if no verdict came in time.

The agent reads the request token when it *starts* a reload, after it has cleared its pending flag, so a
reload already running when the signal arrived answers with the old token and the signal's own reload
follows with the new one: a verdict is never attributed to the wrong request.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from agent.service.reload import ReloadOutcome
from agent.state.files import write_atomic

log = logging.getLogger(__name__)

REQUEST_FILE = "reload-request"
VERDICT_FILE = "reload-verdict"
EX_REJECTED = 1
EX_NO_VERDICT = 2


def verdict_dir(state_dir: Path, env: dict[str, str] | None = None) -> Path:
    """Where the request and the verdict live: systemd's RuntimeDirectory= (tmpfs, the first if several),
    else the state directory."""
    runtime = (os.environ if env is None else env).get("RUNTIME_DIRECTORY", "")
    first = runtime.split(":")[0]
    return Path(first) if first else state_dir


def read_request(directory: Path) -> str:
    """The token of the latest `mqtt-agent reload` request ('' if none)."""
    try:
        return (directory / REQUEST_FILE).read_text(encoding="ascii").strip()[:64]
    except (OSError, UnicodeDecodeError):
        return ""


def write_verdict(directory: Path, token: str, ok: bool, message: str) -> None:
    data = {"token": token, "ok": ok, "message": message[:4000], "pid": os.getpid(), "time": time.time()}
    write_atomic(directory / VERDICT_FILE, (json.dumps(data) + "\n").encode(), mode=0o600)


def answer_request(state_dir: Path, reload: Callable[[], ReloadOutcome]) -> ReloadOutcome:
    """The agent's side: run `reload` and leave its verdict for the `mqtt-agent reload` that asked.
    Call it after clearing the pending-reload flag: the token is read first, so a request written
    before this signal is answered by this reload (see above)."""
    where = verdict_dir(state_dir)
    token = read_request(where)
    outcome = reload()
    try:
        write_verdict(where, token, outcome.ok, outcome.message)
    except OSError as exc:
        log.warning("cannot record the reload verdict for `mqtt-agent reload` in %s: %s", where, exc.strerror or exc)
    return outcome


@dataclass(frozen=True)
class Verdict:
    ok: bool
    message: str


def _read_verdict(directory: Path, token: str) -> Verdict | None:
    try:
        data = json.loads((directory / VERDICT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("token") != token:
        return None
    return Verdict(bool(data.get("ok")), str(data.get("message", "")))


def request_reload(pid: int, directory: Path, timeout: float, *, clock: Callable[[], float] = time.monotonic,
                   poll: float = 0.05) -> Verdict | None:
    """Ask the agent at `pid` to reload and wait up to `timeout` s for its verdict (None: none came).
    Raises OSError if the request cannot be written or the signal not sent."""
    token = secrets.token_hex(16)
    write_atomic(directory / REQUEST_FILE, (token + "\n").encode(), mode=0o600)
    os.kill(pid, signal.SIGHUP)
    end = clock() + timeout
    while True:
        verdict = _read_verdict(directory, token)
        if verdict is not None or clock() >= end:
            return verdict
        time.sleep(poll)
