"""Sick state disks, provoked for real against a running agent: a full disk (a small tmpfs filled up),
garbage in each file at start, and the state directory removed while the agent runs."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest

from agent.config import load_config
from agent.tools.send import send_command
from tests.support.agentproc import AgentProcess
from tests.support.mosquitto import Mosquitto, free_port
from tests.support.outcomes import info, wait_metric
from tests.support.outcomes import scrape_flat as scrape

pytestmark = pytest.mark.integration


def counting_command(ledger: Path) -> dict[str, Any]:
    return {"argv": ["/bin/sh", "-c", f'read id; cat >/dev/null; echo "$id" >> {ledger}; echo ok'], "timeout": 10.0}


def runs(ledger: Path) -> list[str]:
    return ledger.read_text().split() if ledger.exists() else []


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(mount)], check=True, timeout=30)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], timeout=30)


def test_a_full_disk_answers_503_without_the_disk_and_serves_again_once_space_is_free(
        broker: Mosquitto, make_config: Callable[..., Path], run_agent: Callable[..., AgentProcess],
        small_tmpfs: Path, tmp_path: Path) -> None:
    ledger = tmp_path / "ledger.txt"
    port = free_port()
    cfg_path = make_config(broker, {"agent": {"state_dir": str(small_tmpfs / "state")},
                                    "metrics": {"listen": f"127.0.0.1:{port}"},
                                    "commands.count": counting_command(ledger)}, name="full")
    cfg = load_config(cfg_path)
    agent = run_agent(cfg_path)
    assert send_command(cfg, "count", b"before\n", req_id="before", timeout=10).status == 200
    filler = small_tmpfs / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for chunk in (65536, 4096, 512, 1):  # fill the disk to the last byte
            try:
                while True:
                    os.write(fd, b"\0" * chunk)
            except OSError:
                pass
    finally:
        os.close(fd)
    # Large requests: SQLite reuses the space its WAL already has, so small ones may still fit (and are then
    # durable, run and answered 200); these need new blocks.
    answers = {}
    for n in range(10):
        rid = f"full{n}"
        answers[rid] = send_command(cfg, "count", f"{rid}\n".encode() + b"x" * 60000, req_id=rid, timeout=10)
    refused = [rid for rid, a in answers.items() if a.status == 503]
    assert set(a.status for a in answers.values()) <= {200, 503}
    assert len(refused) >= 5, {rid: a.status for rid, a in answers.items()}
    assert "cannot record the command in its journal" in json.loads(answers[refused[0]].body)["error"]
    ran = runs(ledger)
    assert [r for r in refused if r in ran] == []  # a 503 was not run
    assert all(r in ran for r, a in answers.items() if a.status == 200)
    # Bounded logs are the outcome here: one warning (naming agent.state_dir) for the burst, the rest counted.
    assert agent.count(r"the state store \(agent.state_dir\) cannot record a command") == 1  # rate-limited
    samples = scrape(port)
    assert samples['mqtt_agent_commands_rejected_total{reason="journal_error"}'] == len(refused)
    filler.unlink()
    result = send_command(cfg, "count", b"after\n", req_id="after", timeout=10)
    assert result.status == 200  # by itself: no restart
    assert runs(ledger)[-1] == "after"
    assert agent.proc is not None and agent.proc.poll() is None


def test_garbage_in_every_state_file_at_start(broker: Mosquitto, make_config: Callable[..., Path],
                                              run_agent: Callable[..., AgentProcess], tmp_path: Path) -> None:
    state = tmp_path / "state-garbage"
    state.mkdir(mode=0o700)
    garbage = bytes(range(256)) * 40
    for name in ("state.sqlite3", "state.sqlite3-wal", "connection-state.json"):
        (state / name).write_bytes(garbage)
    (state / ".connection-state.json.abcd1234.tmp").write_bytes(b"half a write")  # left by a cut
    port = free_port()
    cfg_path = make_config(broker, {"agent": {"state_dir": str(state)}, "metrics": {"listen": f"127.0.0.1:{port}"}},
                           name="garbage")
    agent = run_agent(cfg_path)
    assert send_command(load_config(cfg_path), "ping", timeout=10).status == 200
    assert "Traceback" not in agent.output  # handled, not crashed through (no other signal for a caught one)
    # Operator interface: one line per damaged file, naming it and where it was set aside.
    assert agent.count(r"state\.sqlite3 is not a usable SQLite database .* set aside as state\.sqlite3\.corrupt-") == 1
    assert agent.count(r"connection-state\.json is not valid JSON") == 1
    assert not (state / ".connection-state.json.abcd1234.tmp").exists()
    aside = sorted(state.glob("state.sqlite3.corrupt-*"))
    # The database itself is kept for an operator (a WAL without a valid header is discarded by SQLite).
    assert aside and aside[0].read_bytes() == garbage
    assert scrape(port)['mqtt_agent_state_recovered_total{reason="corrupt"}'] == 1


def test_state_dir_removed_while_running_is_noticed_and_nothing_is_acknowledged_into_it(
        broker: Mosquitto, make_config: Callable[..., Path], run_agent: Callable[..., AgentProcess],
        tmp_path: Path) -> None:
    ledger = tmp_path / "ledger.txt"
    state = tmp_path / "state-removed"
    port = free_port()
    cfg_path = make_config(broker, {"agent": {"state_dir": str(state)}, "metrics": {"listen": f"127.0.0.1:{port}"},
                                    "commands.count": counting_command(ledger)}, name="removed")
    cfg = load_config(cfg_path)
    agent = run_agent(cfg_path)
    subprocess.run(["rm", "-rf", str(state)], check=True)
    started = time.monotonic()
    wait_metric(port, "mqtt_agent_state_recovered_total", 1, timeout=10, reason="replaced")
    assert time.monotonic() - started < 5
    end = time.monotonic() + 5
    while not (state / "state.sqlite3").exists() and time.monotonic() < end:
        time.sleep(0.05)  # the fresh store is opened just after that line
    assert (state / "state.sqlite3").exists()
    assert scrape(port)['mqtt_agent_state_recovered_total{reason="replaced"}'] == 1
    for n in range(3):
        assert send_command(cfg, "count", f"r{n}\n".encode(), req_id=f"r{n}", timeout=10).status == 200
    agent.kill()  # a crash: what was acknowledged must be in the fresh file
    run_agent(cfg_path)
    for n in range(3):  # re-sent ids: answered from the journal, not run again
        assert send_command(cfg, "count", f"r{n}\n".encode(), req_id=f"r{n}", timeout=10).status == 200
    assert runs(ledger) == ["r0", "r1", "r2"]
    assert info(cfg_path)["commands"]["duplicates"] == 3
