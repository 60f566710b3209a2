"""Power cuts (LazyFS): the state directory is on a file system that drops every write not yet fsynced.

Commands arrive at a steady rate while the gateway loses power at random moments (fixed seed), one of
them during the start-up recovery. The ledger (what the exec command did) is outside the mount, like the
world a real command acts on. Outcome: nothing lost, nothing run twice, every command answered 200 or
500 "interrupted", and ids re-sent after the cuts answered from the journal.

A `ping` (a pure handler: journalled together with its answer, one durable point) goes with every
command: a cut before its commit leaves no PUBACK, so the broker delivers it again and it runs again;
every answer that reaches the broker for one ping id is the same (a second run would report another
uptime): answered once, from one run, any repeat from the journal.
"""

from __future__ import annotations

import collections
import json
import os
import random
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest

from agent.config import load_config
from agent.connection.adapter import new_client
from agent.tls.context import build_context
from tests.support.agentproc import AgentProcess
from tests.support.mosquitto import Mosquitto

pytestmark = pytest.mark.integration

POWERCUT = os.environ.get("LAZYFS_POWERCUT", "")
COMMANDS = 200
RATE = 20.0  # commands per second
CUTS = 6
SEED = 1010
RESENT = 20


def _powercut(*args: str) -> None:
    done = subprocess.run([POWERCUT, *args], timeout=60, capture_output=True, text=True)
    assert done.returncode == 0, f"powercut {' '.join(args)}: {done.stderr[-2000:]}"


@pytest.fixture
def lazyfs(tmp_path: Path) -> Iterator[Path]:
    if not POWERCUT or not Path(POWERCUT).is_file():
        pytest.skip("LAZYFS_POWERCUT is not set to the powercut script (../shared/tools/lazyfs/powercut); "
                    ".ci/run sets it where LazyFS is installed")
    if os.geteuid() != 0 or not Path("/dev/fuse").exists():
        pytest.skip("power cuts need root and /dev/fuse for LazyFS")
    # A short path: LazyFS cannot read its config file from a long one (pytest's tmp_path is too long).
    base = Path(tempfile.mkdtemp(prefix="pc", dir="/tmp"))
    mount = base / "state"
    _powercut("mount", str(mount))
    try:
        yield mount
    finally:
        subprocess.run([POWERCUT, "umount", str(mount)], timeout=60, capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


class Backend:
    """Sends commands like Hono would and records every response (status, body) per request id."""

    def __init__(self, config: Path) -> None:
        cfg = load_config(config)
        self.client = new_client(cfg.mqtt, "backend-powercut", build_context(cfg.tls))
        self.host = cfg.mqtt.hosts[0]
        self.lock = threading.Lock()
        self.responses: dict[str, list[tuple[int, bytes]]] = collections.defaultdict(list)
        self.subscribed = threading.Event()
        self.client.on_connect = lambda c, *a: c.subscribe("command///res/#", qos=1)
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.on_message = self._on_message

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        parts = msg.topic.split("/")
        with self.lock:
            self.responses[parts[4]].append((int(parts[5]), bytes(msg.payload)))

    def start(self) -> None:
        self.client.connect(self.host.host, self.host.port, keepalive=10)
        self.client.loop_start()
        assert self.subscribed.wait(10)

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def send(self, rid: str, name: str = "ledger") -> None:
        self.client.publish(f"command///req/{rid}/{name}", rid.encode() + b"\n" if name == "ledger" else b"",
                            qos=1)

    def answered(self, rids: list[str]) -> int:
        with self.lock:
            return sum(1 for r in rids if self.responses.get(r))


def _wait(cond: Callable[[], bool], timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.1)
    return cond()


def test_power_cuts_lose_nothing_and_run_nothing_twice(broker: Mosquitto, make_config: Callable[..., Path],
                                                       lazyfs: Path, tmp_path: Path) -> None:
    ledger = tmp_path / "ledger.txt"  # outside the mount: the world the commands act on keeps its power
    ledger.touch()
    cfg = make_config(broker, {
        "agent": {"state_dir": str(lazyfs)},
        "limits": {"max_queued_commands": 1000},  # the backlog of a restart is admitted, not answered 429
        "commands.ledger": {"argv": ["/bin/sh", "-c", f'read id; echo "$id" >> {ledger}; echo ok'],
                            "timeout": 10.0},
    }, name="powercut")
    observer = make_config(broker, name="backend")
    rng = random.Random(SEED)
    rids = [f"p{n:03d}" for n in range(COMMANDS)]
    pings = [f"q{n:03d}" for n in range(COMMANDS)]
    duration = COMMANDS / RATE
    cut_at = sorted(rng.uniform(1.0, duration) for _ in range(CUTS))
    recovery_cut = CUTS // 2  # after this cut, the next start is cut again while it recovers
    agents: list[AgentProcess] = []

    def start_agent(wait: bool = True) -> AgentProcess:
        agent = AgentProcess(cfg, new_session=True).start()
        agents.append(agent)
        if wait:
            agent.wait_for(r"subscribed to ", timeout=30)
        return agent

    backend = Backend(observer)
    agent = start_agent()
    backend.start()
    sender = threading.Thread(target=lambda: [(backend.send(r), backend.send(q, "ping"), time.sleep(1 / RATE))
                                              for r, q in zip(rids, pings)], daemon=True)
    started = time.monotonic()
    sender.start()
    recovery_cut_done = False
    try:
        for i, at in enumerate(cut_at):
            time.sleep(max(0.0, started + at - time.monotonic()))
            agent.kill_group()
            _powercut("cut", str(lazyfs))
            if i == recovery_cut:
                early = start_agent(wait=False)
                # The recovery runs before the session starts: cut as soon as it says what it recovers.
                early.wait_for(r"resuming command|interrupted by an agent stop|from an earlier run wait", timeout=30)
                early.kill_group()  # the cut comes while the journal is being recovered
                _powercut("cut", str(lazyfs))
                recovery_cut_done = True
                print(f"recovery cut {'before' if 'subscribed to' not in early.output else 'after'} the subscription")
            agent = start_agent()
        sender.join(duration + 10)
        assert _wait(lambda: backend.answered(rids + pings) == len(rids) * 2, 60), (
            f"unanswered: {[r for r in rids + pings if not backend.responses.get(r)]}")
        # Re-send ids answered before the cuts: the journal answers them; they do not run again.
        again = rng.sample(rids[: COMMANDS // 2], RESENT)
        pings_again = rng.sample(pings[: COMMANDS // 2], RESENT)
        before = {r: len(backend.responses[r]) for r in again + pings_again}
        for r, q in zip(again, pings_again):
            backend.send(r)
            backend.send(q, "ping")
        assert _wait(lambda: all(len(backend.responses[r]) > before[r] for r in again + pings_again), 30)
        time.sleep(1.0)  # any second execution would reach the ledger by now
    finally:
        backend.stop()
        for a in agents:
            if a.proc and a.proc.poll() is None:
                a.stop()
    runs = collections.Counter(ledger.read_text().split())
    twice = sorted(r for r, n in runs.items() if n > 1)
    assert twice == [], f"executed more than once: {twice}"
    outcome: dict[str, set[int]] = {}
    for r in rids:
        statuses = {status for status, _ in backend.responses[r]}
        outcome[r] = statuses
        assert len(statuses) == 1, f"{r} answered differently: {backend.responses[r]}"
        status, body = backend.responses[r][0]
        assert status in (200, 500), (r, status, body)
        if status == 500:
            assert json.loads(body).get("interrupted") is True, body
        else:
            assert runs[r] == 1, f"{r} answered 200 but ran {runs[r]} times"
    for r in again:
        assert {s for s, _ in backend.responses[r]} == outcome[r]
    for q in pings:  # a pure command: answered 200, every answer the same (one run; repeats from the journal)
        answers = set(backend.responses[q])
        assert len(answers) == 1, f"ping {q} answered from more than one run: {backend.responses[q]}"
        assert next(iter(answers))[0] == 200, answers
    assert len(agents) >= CUTS + 2 and recovery_cut_done
    for a in agents:
        assert "Traceback" not in a.output, a.output[-3000:]  # handled, not crashed through
    # No cut left a store the agent had to set aside as corrupt.
    assert sorted(load_config(cfg).agent.state_dir.glob("*.corrupt-*")) == []
    interrupted = sum(1 for r in rids if outcome[r] == {500})
    repeated = sum(1 for q in pings if len(backend.responses[q]) > 1)
    print(f"power cuts: {CUTS + 1}, commands {COMMANDS}, answered 200: {COMMANDS - interrupted}, "
          f"interrupted: {interrupted}, re-sent and answered from the journal: {RESENT}; pings {COMMANDS}, "
          f"answered more than once (the journal's copy): {repeated}")
