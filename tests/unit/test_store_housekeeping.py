"""The state store's periodic round (StateStore.housekeeping, once a minute from the service): finished
commands past limits.dedupe_retention are forgotten, unfinished ones never, and a changed size bound is
taken and enforced."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from agent.protocol import Inbound, Response
from agent.state.store import OutMessage, StateStore
from tests.support.clock import FakeClock


def add(store: StateStore, key: str) -> None:
    done = threading.Event()
    msg = Inbound(topic=f"command///req/{key}/echo", payload=b"", received_wall=time.time())
    store.add_command(key, msg, running=False, answer=lambda r: [OutMessage("again", b"x")],
                      then=lambda o: done.set())
    assert done.wait(5)


def test_housekeeping_forgets_old_finished_commands_and_takes_the_new_bound(tmp_path: Path) -> None:
    wall = FakeClock(1_000_000.0)
    store = StateStore(tmp_path, max_bytes=64 * 1024 * 1024, wall=wall)
    try:
        add(store, "old")
        store.finish("old", Response(200, b"done"), [])
        add(store, "waiting")
        wall.advance(3600.0)
        add(store, "recent")
        store.finish("recent", Response(200, b"x" * 60000), [])
        store.housekeeping(retention=1800.0, max_bytes=32 * 1024 * 1024)
        assert store.lookup("old") is None  # finished an hour ago: past the retention
        assert store.lookup("recent") is not None and store.lookup("waiting") is not None
        assert store.max_bytes == 32 * 1024 * 1024
        for n in range(20):
            add(store, f"k{n}")
            store.finish(f"k{n}", Response(200, b"x" * 60000), [])
        store.housekeeping(retention=1800.0, max_bytes=512 * 1024)  # a reload lowered limits.max_state_bytes
        assert store.pruned_total > 0 and store.lookup("k0") is None
        assert store.lookup("waiting") is not None  # unfinished commands are never pruned
    finally:
        store.close()
