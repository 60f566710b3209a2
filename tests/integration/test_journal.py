"""The real agent as systemd starts it logs to journald with its fields (the journal handler itself is
tests/unit/test_journal.py)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.journal import Journal


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[Journal]:
    j = Journal(tmp_path / "journal.sock")
    yield j
    j.sock.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for a private mount namespace")
def test_real_agent_under_a_journal_stream_logs_to_journald(broker, make_config, journal, tmp_path):
    """The agent as systemd starts it: stderr is the journal stream ($JOURNAL_STREAM names it) and journald's
    socket is at its usual path. A private mount namespace puts this test's socket at that path."""
    import subprocess
    import threading

    from agent.config import load_config
    from agent.tools.send import send_command
    from tests.support.agentproc import REPO

    path = make_config(broker)
    read_end, write_end = os.pipe()
    st = os.fstat(write_end)
    setup = ("mount -t tmpfs tmpfs /run/systemd && mkdir /run/systemd/journal && "
             "touch /run/systemd/journal/socket && mount --bind \"$0\" /run/systemd/journal/socket && "
             "exec \"$1\" -m agent run --config \"$2\"")
    proc = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", setup, str(journal.path), sys.executable,
         str(path)],
        stdout=write_end, stderr=write_end, cwd=REPO,
        env={**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}", "PYTHONUNBUFFERED": "1"})
    os.close(write_end)
    stderr_lines: list[bytes] = []
    reader = threading.Thread(target=lambda: stderr_lines.extend(os.fdopen(read_end, "rb")), daemon=True)
    reader.start()
    records: list[dict[str, str]] = []
    try:
        while not any(r.get("MESSAGE", "").startswith("subscribed to ") for r in records):
            records.append(journal.receive())
        assert send_command(load_config(path), "no-such-command", timeout=10).status == 404
        while not any(r.get("COMMAND") == "no-such-command" for r in records):
            records.append(journal.receive())
    finally:
        proc.terminate()
        proc.wait(20)
        reader.join(5)
    connected = next(r for r in records if r["MESSAGE"].startswith("connected to "))
    assert (connected["KEEPALIVE"], connected["PRIORITY"], connected["SYSLOG_IDENTIFIER"]) == ("30", "6", "mqtt-agent")
    rejected = next(r for r in records if r.get("COMMAND") == "no-such-command")
    assert (rejected["STATUS"], rejected["PRIORITY"], rejected["LOGGER"]) == ("404", "4", "agent.commands.dispatch")
    assert rejected["REQ_ID"]
    # Nothing went to stderr: under systemd the journal gets the records, with their fields.
    assert b"".join(stderr_lines) == b"", b"".join(stderr_lines)[-2000:]
