"""Pure pieces of issue 12: untrusted text in logs, the log summary, the clean environment, the process
table walk, and the config checks for secrets and MQTT strings."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.commands.processes import ProcInfo, _stat, descendants
from agent.config import parse_config
from agent.environment import clean_environment, is_removed
from agent.errors import ConfigError
from agent.logtext import LogSummary, untrusted


def test_untrusted_cuts_escapes_and_says_how_much_was_cut() -> None:
    assert untrusted("ping") == "ping"
    assert untrusted("a\nb\r\t\x1b[31m\\") == "a\\nb\\r\\t\\x1b[31m\\\\"
    assert untrusted("\u2028x\u202e") == "\\u2028x\\u202e"
    assert untrusted("X" * 60_000) == "X" * 120 + "...[+59880 chars]"
    assert untrusted("abcdef", 3) == "abc...[+3 chars]"
    assert untrusted(b"\xff\x00ok") == "\ufffd\\x00ok"
    assert untrusted(b"y" * 1000, 10) == "y" * 10 + "...[+990 bytes]"
    assert untrusted(None) == "None"


@given(st.text(max_size=3000))
def test_untrusted_is_bounded_and_single_line(text: str) -> None:
    out = untrusted(text)
    assert len(out) <= 4 * 120 + 40
    assert len(out.splitlines()) <= 1
    assert not any(ord(ch) < 0x20 or 0x7F <= ord(ch) <= 0x9F for ch in out)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_log_summary_one_line_per_key_per_interval_with_the_count() -> None:
    logger = logging.getLogger("test.summary")
    logger.propagate = False
    records = _Records()
    logger.addHandler(records)
    now = [0.0]
    summary = LogSummary(logger, 60.0, clock=lambda: now[0])
    for _ in range(2000):
        summary.log("queue_full", logging.WARNING, "rejected %s", "x")
    summary.log("unknown_command", logging.WARNING, "unknown")
    assert records.lines == ["rejected x", "unknown"]
    now[0] = 61.0
    summary.log("queue_full", logging.WARNING, "rejected %s", "y")
    assert records.lines[-1] == "rejected y (and 1999 more like it in the last 61 s, not logged)"
    summary.log("queue_full", logging.WARNING, "rejected %s", "z")
    summary.flush()
    assert records.lines[-1] == "1 more queue_full event(s) were not logged (rate limit)"
    logger.removeHandler(records)


def test_clean_environment_drops_the_service_variables_and_adds_the_agents_last() -> None:
    base = {"PATH": "/usr/bin", "LANG": "C.UTF-8", "NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "1",
            "WATCHDOG_PID": "9", "CREDENTIALS_DIRECTORY": "/run/credentials/x", "LISTEN_FDS": "1",
            "INVOCATION_ID": "abc", "MONITOR_SERVICE_RESULT": "x", "MQTT_AGENT_REQ_ID": "forged", "HOME": "/h"}
    env = clean_environment(base, extra=[("REPORT_URL", "u"), ("PATH", "/opt/bin")],
                            agent_vars={"MQTT_AGENT_REQ_ID": "r1"})
    assert env == {"PATH": "/opt/bin", "LANG": "C.UTF-8", "HOME": "/h", "REPORT_URL": "u", "MQTT_AGENT_REQ_ID": "r1"}
    assert is_removed("TRIGGER_UNIT") and not is_removed("http_proxy")


def test_proc_stat_with_a_hostile_name_and_the_descendant_walk(tmp_path: Path) -> None:
    (tmp_path / "42").mkdir()
    (tmp_path / "42" / "stat").write_text("42 (evil) Z 7 (x) S 1 2 3) S 17 42 42 0 -1\n")
    assert _stat(42, tmp_path) == ProcInfo(42, 17, "S", "evil) Z 7 (x) S 1 2 3")
    table = {p: ProcInfo(p, pp, "S", "x") for p, pp in ((10, 1), (11, 10), (12, 11), (13, 10), (20, 1))}
    assert descendants(10, table) == {11, 12, 13}
    assert descendants(20, table) == set()


def _cfg(**sections: dict[str, Any]) -> dict[str, Any]:
    base: dict[str, Any] = {"agent": {"device_id": "gw-1", "state_dir": "/tmp/x"},
                            "mqtt": {"hosts": ["b:8883"]}, "tls": {"enabled": False}}
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    return base


def problems(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return info.value.problems


@pytest.mark.parametrize("value, kind", [(98765432101, "integer"), (["Hunter2-SECRET"], "array"),
                                         ({"a": "Tbl-SECRET"}, "table"), (True, "boolean"), (1.5, "number")])
def test_a_mistyped_password_is_never_printed(value: object, kind: str) -> None:
    (problem,) = problems(_cfg(mqtt={"username": "u", "password": value}))
    assert problem == f"mqtt.password: must be a string, got {kind} (value not shown: it is a secret)"


def test_mqtt_strings_and_hosts() -> None:
    found = problems(_cfg(agent={"device_id": "é" * 200}, mqtt={
        "hosts": ["b:", " c:1 ", "d e:1", "x" * 300 + ":1"], "client_id": "a+b", "username": "u\0",
        "password": "p\0", "command_topic": "command/" + "t" * 2000 + "/+/req/#"}))
    assert "agent.device_id: must be at most 256 bytes (UTF-8), got 400 bytes: " + repr("é" * 200)[:80] + \
        "...[202 chars]" in found
    assert "mqtt.hosts[0]: empty port in 'b:': write host:port, or leave out the ':'" in found
    assert "mqtt.hosts[2]: must not contain whitespace, got 'd e:1'" in found
    assert "mqtt.hosts[3]: host must be at most 253 bytes without NUL, got 300 bytes" in found
    assert "mqtt.client_id: must not contain '/', '+', '#' or NUL (it is used in MQTT topics), got 'a+b'" in found
    assert "mqtt.username: must not contain NUL characters: 'u\\x00'" in found
    assert "mqtt.password: must not contain NUL characters" in found
    assert "mqtt.command_topic: must be at most 1024 bytes (UTF-8), got 2016 bytes" in " ".join(found)
    assert not any("hosts[1]" in p for p in found)  # surrounding blanks are trimmed, as before


def test_command_env_table() -> None:
    ok = parse_config(_cfg(commands={"r": {"argv": ["/bin/true"], "env": {"A_1": "x", "LC_ALL": "C"}}}))
    assert ok.commands["r"].env == (("A_1", "x"), ("LC_ALL", "C"))
    assert "x" not in repr(ok.commands["r"]).split("argv")[0]  # values stay out of reprs
    found = problems(_cfg(commands={"r": {"argv": ["/bin/true"], "env": {
        "MQTT_AGENT_X": "v", "CREDENTIALS_DIRECTORY": "v", "bad-name": "v", "N": 7, "BIG": "v" * 40000}}}))
    assert found == [
        "commands.r.env.MQTT_AGENT_X: MQTT_AGENT_* variables are set by the agent for each request",
        "commands.r.env.CREDENTIALS_DIRECTORY: is the agent's own systemd or credential variable, which commands "
        "never get (docs/systemd.md, 'Exec commands')",
        "commands.r.env.bad-name: variable names use letters, digits and '_', not starting with a digit (1-128)",
        "commands.r.env.N: must be a string, got integer (write \"...\"; value not shown)",
        "commands.r.env.BIG: must be at most 32768 bytes without NUL (value not shown)",
    ]


def test_subtree_table_finds_the_same_descendants_as_a_full_scan() -> None:
    import signal
    import subprocess

    from agent.commands.processes import process_table, subtree_table

    child = subprocess.Popen(["/bin/sh", "-c", "sleep 5 & sleep 5 & wait"])
    grandchildren: set[int] = set()
    try:
        for _ in range(200):
            grandchildren = descendants(child.pid, process_table())
            if len(grandchildren) >= 2:
                break
            time.sleep(0.02)
        assert len(grandchildren) == 2
        sub = subtree_table(os.getpid())
        assert sub is not None, "no /proc/PID/task/*/children on this kernel"
        assert {child.pid} | grandchildren <= set(sub)
        assert {sub[pid].ppid for pid in grandchildren} == {child.pid}
        assert all(info.ppid in set(sub) | {os.getpid()} for info in sub.values())
    finally:
        for pid in grandchildren:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        child.kill()
        child.wait()
