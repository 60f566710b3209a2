"""`mqtt-agent renew [--force]`: ask the running agent to renew its client certificate now.

The CLI does not renew by itself: the running agent owns the pairs in agent.state_dir/tls and the
session that has to switch. It leaves a request file there (the renewal thread looks for it every
renewal.check_interval) and waits for the agent to record the outcome in renewal.json.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from agent.config import Config
from agent.errors import AgentError
from agent.renewal.store import REQUEST, PairStore
from agent.state.files import write_atomic

SUCCESS_RESULTS = frozenset({"success", "not_due", "waiting"})


@dataclass(frozen=True)
class RenewOutcome:
    result: str | None  # None: no answer within the timeout
    message: str

    @property
    def ok(self) -> bool:
        return self.result in SUCCESS_RESULTS


def default_timeout(cfg: Config) -> float:
    r = cfg.renewal
    return 2 * r.check_interval + r.timeout + len(cfg.mqtt.hosts) * r.probe_timeout + 10.0


def request_renewal(cfg: Config, *, force: bool, timeout: float, wall: Callable[[], float] = time.time,
                    sleep: Callable[[float], None] = time.sleep) -> RenewOutcome:
    if not cfg.renewal.enabled:
        raise AgentError("certificate renewal is off: set [renewal] signer = \"exec\" with renewal.command, or "
                         "\"command\" for cert.csr/cert.install (docs/renewal.md)")
    store = PairStore(cfg.agent.state_dir / "tls")
    try:
        st = cfg.agent.state_dir.stat()
    except OSError as exc:
        raise AgentError(f"agent.state_dir {cfg.agent.state_dir} cannot be reached ({exc.strerror or exc}): "
                         "has the agent run yet?") from exc
    # Files made here (as root) go to the state directory's owner, the service user, so it can read them.
    owner = (st.st_uid, st.st_gid)
    try:
        if not store.dir.exists():
            store.dir.mkdir(mode=0o700)
            import os

            os.chown(store.dir, *owner)
        started = wall()
        write_atomic(store.path(REQUEST), b"force\n" if force else b"renew\n", 0o600, owner)
    except PermissionError as exc:
        raise AgentError(f"cannot write the renewal request in {store.dir}: permission denied; run as root or as "
                         "the service user (sudo -u mqtt-agent mqtt-agent renew)") from exc
    end = started + timeout
    while wall() < end:
        answer = store.read_state().get("last_request")
        if isinstance(answer, dict) and float(answer.get("at") or 0) >= started and not store.exists(REQUEST):
            return RenewOutcome(str(answer.get("result")), str(answer.get("message")))
        sleep(0.2)
    taken = not store.exists(REQUEST)
    return RenewOutcome(None, "the agent took the request but has not finished yet; see `mqtt-agent doctor`"
                        if taken else "the agent did not pick up the request: is it running (systemctl status "
                        "mqtt-agent)? It looks for requests every renewal.check_interval seconds")
