"""PUBACK only after the command's row is durable, shown by the order of the agent's system calls.

The agent runs under strace (plain MQTT, so the bytes are readable): every PUBACK it sends must follow
an fsync of the state store's WAL that completed after the command's PUBLISH was read. Walking the trace
in order: a PUBLISH read adds one to "received", a completed fsync of state.sqlite3* moves "received"
to "durable", and a PUBACK takes one from "durable", which must never be empty.
"""

from __future__ import annotations

import re
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from agent.config import load_config
from agent.connection.adapter import new_client
from tests.support.agentproc import AgentProcess

pytestmark = pytest.mark.integration

PUBLISH_TOPIC = "command///req/"
PUBACK = 0x40  # the packet type of a PUBACK
_HEX = re.compile(r"\\x([0-9a-f]{2})")
_SENT = re.compile(r'sendto\(\d+<[^>]*>, "((?:\\x[0-9a-f]{2})*)"')


def _packet_types(data: bytes) -> list[int]:
    """The MQTT packets in what one sendto wrote (the agent writes waiting packets together)."""
    types, at = [], 0
    while at < len(data):
        types.append(data[at] & 0xF0)
        length, shift, at = 0, 0, at + 1
        while at < len(data):
            byte = data[at]
            at += 1
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        at += length
    return types


def _decoded(line: str) -> str:
    """strace -xx writes every byte of strings and paths as \\xNN: turn them back into characters."""
    return _HEX.sub(lambda m: chr(int(m.group(1), 16)), line)


def check_order(trace: str) -> tuple[int, int, int]:
    """(publishes read, fsyncs, pubacks sent); raises AssertionError at the first early PUBACK.

    An fsync of the state store covers the commands read before it began (their rows were written
    before it); it counts once it has returned. The k-th PUBACK needs k commands covered."""
    publishes = fsyncs = pubacks = durable = 0
    started: dict[str, int] = {}  # pid -> publishes read when its unfinished state-store fsync began
    for n, raw in enumerate(trace.splitlines(), 1):
        line = _decoded(raw)
        pid = line.split(" ", 1)[0]
        sync = re.search(r"\bf(?:data)?sync\(\d+<([^>]*)>", line)
        if "recvfrom(" in line or "recvfrom resumed" in line:
            publishes += line.count(PUBLISH_TOPIC)
        elif sync and "state.sqlite3" in sync.group(1):
            if "<unfinished" in line:
                started[pid] = publishes
            elif re.search(r"\)\s*= 0$", line):
                durable, fsyncs = max(durable, publishes), fsyncs + 1
        elif re.search(r"<\.\.\. f(?:data)?sync resumed>\)\s*= 0$", line) and pid in started:
            durable, fsyncs = max(durable, started.pop(pid)), fsyncs + 1
        elif "sendto(" in line and (sent := _SENT.search(raw)):
            for kind in _packet_types(bytes.fromhex(sent.group(1).replace("\\x", ""))):
                if kind == PUBACK:
                    pubacks += 1
                    assert pubacks <= durable, f"PUBACK before the command was durable, trace line {n}: {line}"
    return publishes, fsyncs, pubacks


def test_every_puback_follows_the_fsync_of_its_command(make_broker: Callable[..., Any],
                                                        make_config: Callable[..., Path], tmp_path: Path) -> None:
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("strace is not installed (Debian: apt-get install strace)")
    broker = make_broker(tls=False)
    plain = {"tls": {"enabled": False, "ca_file": None, "cert_file": None, "key_file": None}}
    cfg = make_config(broker, plain, name="traced")
    log = tmp_path / "trace.txt"
    # -y names the file behind each descriptor; fsyncs of state.sqlite3-wal are the commits.
    # The fds of fsync are resolved per line, so "resumed" lines carry the path only with -y too.
    agent = AgentProcess(cfg, new_session=True, wrapper=(
        strace, "-f", "-qq", "-y", "-xx", "-s", "65536", "-e", "trace=recvfrom,sendto,fsync,fdatasync",
        "-o", str(log))).start()
    try:
        agent.wait_for(r"subscribed to ", timeout=30)
        backend_cfg = load_config(make_config(broker, plain, name="backend"))
        client = new_client(backend_cfg.mqtt, "backend-trace", None)
        got: dict[str, int] = {}
        cond = threading.Condition()

        def on_message(c: Any, u: Any, msg: Any) -> None:
            with cond:
                got[msg.topic.split("/")[4]] = int(msg.topic.split("/")[5])
                cond.notify_all()

        client.on_message = on_message
        client.connect(broker.host, broker.port)
        client.subscribe("command///res/#", qos=1)
        client.loop_start()
        time.sleep(0.5)

        def wait(n: int) -> None:
            end = time.monotonic() + 20
            with cond:
                while len(got) < n and time.monotonic() < end:
                    cond.wait(0.2)
            assert len(got) >= n, got

        for i in range(10):  # one at a time: each PUBACK waits for its own fsync
            client.publish(f"command///req/one{i}/ping", b"", qos=1)
            wait(i + 1)
        for i in range(40):  # a burst: group commit, many PUBACKs per fsync
            client.publish(f"command///req/burst{i}/ping", b"", qos=1)
        wait(50)
        client.loop_stop()
        client.disconnect()
        time.sleep(0.5)
    finally:
        agent.kill_group()
    assert set(got.values()) == {200}
    publishes, fsyncs, pubacks = check_order(log.read_text())
    assert publishes == 50 and pubacks == 50, (publishes, pubacks)
    # Each command is two durable writes (its row; its response): the burst shared commits.
    assert fsyncs < 2 * 50, fsyncs


def test_the_checker_catches_an_early_puback() -> None:
    """The same walk over a trace where the PUBACK precedes the fsync fails (the check can fail)."""
    early = "\n".join([
        '1 recvfrom(5<TCP:[1]>, "\\x00\\x0f' + "".join(f"\\x{b:02x}" for b in b"command///req/1/p") + '", 2048, 0,'
        ' NULL, NULL) = 20',
        '1 sendto(5<TCP:[1]>, "\\x40\\x02\\x00\\x01", 4, 0, NULL, 0) = 4',
        "2 fdatasync(7<" + "".join(f"\\x{b:02x}" for b in b"/s/state.sqlite3-wal") + ">) = 0",
    ])
    with pytest.raises(AssertionError, match="PUBACK before the command was durable"):
        check_order(early)
    ok = "\n".join([early.splitlines()[0], early.splitlines()[2], early.splitlines()[1]])
    assert check_order(ok) == (1, 1, 1)


def test_the_checker_finds_a_puback_written_together_with_a_response() -> None:
    """The agent writes a commit's responses and PUBACKs in one send: the PUBACK inside it still counts."""
    publish = bytes([0x32, 8]) + b"\x00\x04res/\x00\x07"  # a QoS 1 PUBLISH (topic "res/", mid 7)
    both = "".join(f"\\x{b:02x}" for b in publish + b"\x40\x02\x00\x01")
    lines = [
        '1 recvfrom(5<TCP:[1]>, "\\x00\\x0f' + "".join(f"\\x{b:02x}" for b in b"command///req/1/p") + '", 2048, 0,'
        ' NULL, NULL) = 20',
        f'1 sendto(5<TCP:[1]>, "{both}", 14, 0, NULL, 0) = 14',
        "2 fdatasync(7<" + "".join(f"\\x{b:02x}" for b in b"/s/state.sqlite3-wal") + ">) = 0",
    ]
    with pytest.raises(AssertionError, match="PUBACK before the command was durable"):
        check_order("\n".join(lines))
    assert check_order("\n".join([lines[0], lines[2], lines[1]])) == (1, 1, 1)
