"""Issue 12, one real test per point: what arrives (hostile topics, mistyped secrets, values MQTT cannot
carry) and what runs (escaping processes, inherited environments) stays contained. Real agent processes,
a real mosquitto with mutual TLS, real exec commands, metrics scraped over HTTP."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.agentproc import run_cli as mqtt_agent
from tests.support.mosquitto import free_port
from tests.support.mqttclient import TestClient
from tests.support.notify import NotifySocket
from tests.support.outcomes import scrape_flat as scrape
from tests.support.outcomes import script, send, wait_until


def alive(pid: int) -> bool:
    """True while /proc has the pid at all: a zombie counts, since nobody reaped it."""
    return Path(f"/proc/{pid}").exists()


# --- 1. bounded logs ----------------------------------------------------------------------------------


def test_hostile_burst_leaves_a_short_bounded_log_and_full_metrics(broker, make_config, run_agent, tmp_path):
    port = free_port()
    cfg = make_config(broker, {"metrics": {"listen": f"127.0.0.1:{port}"},
                               "limits": {"max_concurrent_commands": 1, "max_queued_commands": 0},
                               "commands.slow": {"argv": ["/bin/sleep", "3"]}})
    agent = run_agent(cfg)
    start = agent.mark()
    before = len(agent.output)
    watcher = TestClient(cfg, subscribe="command///res/#")
    hostile = "X" * 60_000
    n = 200
    for i in range(n):
        # A 60,000-character name with a line separator and a right-to-left override in it (mosquitto
        # refuses C0 controls such as "\n" in topics; the escaping of those is a unit test).
        watcher.publish(f"command///req/r{i}/\u2028FAKE ERROR root login\u202e{hostile}{i}")
    for i in range(n):
        watcher.publish(f"command///req/{hostile}{i}")  # no command name: not a command topic at all
    # Fill the only worker, then 100 commands over the queue limit: 429 each.
    watcher.publish("command///req/busy/slow")
    time.sleep(0.3)
    for i in range(100):
        watcher.publish(f"command///req/q{i}/ping")
    watcher.wait(n + 100, timeout=30)  # 200 x 404 and 100 x 429 answered (malformed: nothing to answer)
    wait_until(lambda: scrape(port).get('mqtt_agent_commands_rejected_total{reason="malformed_topic"}', 0) >= n,
               what="all malformed topics counted")

    log_lines = agent.lines[start:]
    grown = len(agent.output) - before
    longest = max(len(line) for line in log_lines)
    assert grown < 20_000, f"{grown} bytes of log for a hostile burst"
    assert longest < 1_000, f"a log line of {longest} characters"
    assert not any("\u2028" in line or "\u202e" in line for line in log_lines), "raw separators in the log"
    # One warning per reason (per minute), the rest counted.
    assert agent.count(r"rejected with 404") == 1
    assert agent.count(r"rejected with 429") == 1
    assert agent.count(r"not a command request topic") == 1
    shown = next(line for line in log_lines if "rejected with 404" in line)
    assert "...[+" in shown and "\\u2028FAKE ERROR" in shown  # cut, with a marker, and escaped
    samples = scrape(port)
    assert samples['mqtt_agent_commands_rejected_total{reason="unknown_command"}'] == n
    assert samples['mqtt_agent_commands_rejected_total{reason="queue_full"}'] == 100
    assert samples['mqtt_agent_commands_rejected_total{reason="malformed_topic"}'] == n
    # The response to the sender is bounded too.
    body = json.loads(next(m.payload for m in watcher.messages if m.topic.endswith("/404")))
    assert len(body["error"]) < 1_000 and body["error"].startswith("unknown command '\\u2028FAKE")
    watcher.close()


# --- 2. no escaped processes --------------------------------------------------------------------------


def test_setsid_escape_is_killed_on_timeout_and_a_detached_child_is_reaped(broker, make_config, run_agent,
                                                                           tmp_path):
    escaped = tmp_path / "escaped.pid"
    detached = tmp_path / "detached.pid"
    cfg = make_config(broker, {
        "commands.escape": {"argv": [script(tmp_path, "escape.sh", f"""\
            setsid sleep 3041 </dev/null >/dev/null 2>&1 &
            echo $! > {escaped}
            sleep 30
            """)], "timeout": 1.0},
        "commands.detach": {"argv": [script(tmp_path, "detach.sh", f"""\
            setsid sleep 2 &
            echo $! > {detached}
            echo started
            """)]},
    })
    agent = run_agent(cfg)
    assert agent.proc is not None

    r = send(cfg, "escape")
    assert r.status == 504
    # sh, its `sleep 30` and the setsid'd `sleep 3041`: the text says what was done, no more.
    assert json.loads(r.body)["error"] == "command 'escape' did not finish within 1 s; killed 3 processes"
    pid = int(escaped.read_text())
    wait_until(lambda: not alive(pid), 5, "the escaped process killed and reaped")

    started = time.monotonic()
    r = send(cfg, "detach")
    assert r.status == 200 and r.body == b"started\n"
    assert time.monotonic() - started < 2.0  # answered without waiting for the child holding the pipes
    child = int(detached.read_text())
    # Operator interface: the warning names the command and what it left running.
    agent.wait_for(rf"command detach left 1 process\(es\) running after it exited: {child} \(sleep\)")
    assert alive(child)
    wait_until(lambda: not alive(child), 10, "the detached child exited and was reaped (no zombie)")
    # Nothing the commands started is left: no child of the agent at all.
    children = subprocess.run(["ps", "-o", "pid=", "--ppid", str(agent.proc.pid)], capture_output=True,
                              text=True).stdout.split()
    assert children == []
    assert send(cfg, "ping").status == 200


# --- 3. clean environments ----------------------------------------------------------------------------


def test_commands_get_a_clean_environment(broker, make_config, run_agent, tmp_path):
    notify = NotifySocket(tmp_path)
    creds = tmp_path / "creds"
    creds.mkdir()
    cfg = make_config(broker, {
        # A command that talks to systemd's notify socket, as a failing systemctl would.
        "commands.showenv": {"argv": [script(tmp_path, "showenv.sh", """\
            systemd-notify STATUS=sent-by-a-command 2>/dev/null
            env -0
            """)]},
        "commands.showenv.env": {"REPORT_URL": "https://example.invalid/in", "LC_ALL": "C.UTF-8"},
    })
    agent_env = {
        "NOTIFY_SOCKET": notify.env_value, "WATCHDOG_USEC": "30000000", "CREDENTIALS_DIRECTORY": str(creds),
        "INVOCATION_ID": "0123456789abcdef", "JOURNAL_STREAM": "8:12345", "LISTEN_FDS": "0",
        "MQTT_AGENT_COMMAND": "forged", "KEEP_ME": "kept",
    }
    try:
        run_agent(cfg, env=agent_env)
        r = send(cfg, "showenv", req_id="env-1")
        assert r.status == 200
        env = dict(item.split("=", 1) for item in r.body.decode().split("\0") if item)
        for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "CREDENTIALS_DIRECTORY", "INVOCATION_ID",
                     "JOURNAL_STREAM", "LISTEN_FDS"):
            assert name not in env, f"{name} reached the command"
        assert env["KEEP_ME"] == "kept" and env["PATH"] == os.environ["PATH"]
        assert env["REPORT_URL"] == "https://example.invalid/in" and env["LC_ALL"] == "C.UTF-8"
        assert (env["MQTT_AGENT_COMMAND"], env["MQTT_AGENT_REQ_ID"], env["MQTT_AGENT_DEVICE_ID"]) == \
            ("showenv", "env-1", "dev-1")
        assert re.fullmatch(r"[0-9a-f]{32}", env["MQTT_AGENT_EXEC_ID"])
        time.sleep(0.5)
        assert not [m for m in notify.snapshot() if m.get("STATUS") == "sent-by-a-command"]
        assert any("READY" in m for m in notify.snapshot())  # the agent itself still talks to it
    finally:
        notify.close()


# --- 4. no echoed secrets -----------------------------------------------------------------------------


@pytest.mark.parametrize("value, kind", [("98765432101", "integer"), ("['Hunter2-SECRET']", "array"),
                                         ("{ inner = 'Tbl-SECRET-77' }", "table"), ("true", "boolean"),
                                         ("1.5e300", "number")])
def test_no_secret_value_in_check_config_doctor_or_run(broker, make_config, tmp_path, value, kind):
    cfg = make_config(broker, {"mqtt": {"username": "gw"}})
    cfg.write_text(cfg.read_text().replace("[mqtt]\n", f"[mqtt]\npassword = {value}\n"))
    secret_bits = [bit for bit in re.findall(r"[A-Za-z0-9-]{4,}", value) if bit not in ("inner", "true")]
    secret_bits += ["True", "true"] if kind == "boolean" else []
    expected = f"mqtt.password: must be a string, got {kind} (value not shown: it is a secret)"
    outputs = {}
    for args in (("check-config",), ("doctor", "--timeout", "3"), ("doctor", "--json"), ("run",)):
        res = mqtt_agent(*args, "--config", str(cfg))
        outputs[args] = res.stdout + res.stderr
        assert res.returncode != 0, args
        assert expected in outputs[args], (args, outputs[args])
    for args, out in outputs.items():
        for bit in secret_bits:
            # `true` is an English word in the doctor's text: check the password line only for booleans.
            haystack = "\n".join(line for line in out.splitlines() if "password" in line) \
                if kind == "boolean" else out
            assert bit not in haystack, (args, bit)


def test_secret_values_are_redacted_in_the_effective_config(broker, make_config, tmp_path):
    cfg = make_config(broker, {"mqtt": {"username": "gw", "password": "Str1ng-SECRET"},
                               "commands.report": {"argv": ["/bin/true"]},
                               "commands.report.env": {"TOKEN": "Env-SECRET-42"}})
    res = mqtt_agent("check-config", "--config", str(cfg))
    assert res.returncode == 0, res.stderr
    assert 'password = "<redacted>"' in res.stdout and 'TOKEN = "<redacted>"' in res.stdout
    assert "Str1ng-SECRET" not in res.stdout + res.stderr and "Env-SECRET-42" not in res.stdout + res.stderr
    bad = make_config(broker, {"commands.report": {"argv": ["/bin/true"]},
                               "commands.report.env": {"TOKEN": 4242424242}})
    res = mqtt_agent("check-config", "--config", str(bad))
    assert res.returncode == 78
    assert "commands.report.env.TOKEN: must be a string, got integer" in res.stderr
    assert "4242424242" not in res.stdout + res.stderr


# --- 5. config values MQTT cannot carry ---------------------------------------------------------------


def test_values_mqtt_cannot_carry_are_rejected_with_their_key_path(broker, make_config, tmp_path):
    cfg = make_config(broker, {
        "agent": {"device_id": "H" * 70_000},
        "mqtt": {"hosts": ["127.0.0.1:", "host name:8883", "[::1]:", ""], "client_id": "gw/1",
                 "username": "gw\0admin"},
        "commands.x": {"argv": ["/bin/true"]},
        "commands.x.env": {"MQTT_AGENT_REQ_ID": "x", "NOTIFY_SOCKET": "/x", "1BAD": "x"},
    })
    for args in (("check-config",), ("run",)):
        started = time.monotonic()
        res = mqtt_agent(*args, "--config", str(cfg), timeout=30)
        assert res.returncode == 78, (args, res.stderr)
        assert time.monotonic() - started < 20  # `run` stops at once instead of retrying forever
        err = res.stderr
        assert "agent.device_id: must be at most 256 bytes (UTF-8), got 70000 bytes" in err
        assert "mqtt.hosts[0]: empty port in '127.0.0.1:': write host:port, or leave out the ':'" in err
        assert "mqtt.hosts[1]: must not contain whitespace, got 'host name:8883'" in err
        assert "mqtt.hosts[2]: empty port in '[::1]:'" in err
        assert "mqtt.hosts[3]: empty address" in err
        assert "mqtt.client_id: must not contain '/', '+', '#' or NUL (it is used in MQTT topics), got 'gw/1'" in err
        assert "mqtt.username: must not contain NUL characters" in err
        assert "commands.x.env.MQTT_AGENT_REQ_ID: MQTT_AGENT_* variables are set by the agent" in err
        assert "commands.x.env.NOTIFY_SOCKET: is the agent's own systemd or credential variable" in err
        assert "commands.x.env.1BAD: variable names use letters, digits and '_'" in err
        assert len(err) < 5_000 and max(len(line) for line in err.splitlines()) < 400  # values quoted short


# --- 6. every answered command counted ----------------------------------------------------------------


def test_every_published_response_is_counted_by_status(broker, make_config, run_agent, tmp_path):
    port = free_port()
    cfg = make_config(broker, {
        "metrics": {"listen": f"127.0.0.1:{port}"},
        "limits": {"max_concurrent_commands": 1, "max_queued_commands": 1, "max_payload_bytes": 100,
                   "max_command_age": 0.5},
        "commands.slow": {"argv": ["/bin/sleep", "1.2"]},
        "commands.fail": {"argv": ["/bin/false"]},
    })
    run_agent(cfg)
    watcher = TestClient(cfg, subscribe="command///res/#")
    watcher.publish("command///req/a/no-such-command")  # 404
    watcher.publish("command///req/b/ping", b"{" + b" " * 200 + b"}")  # 413
    watcher.publish("command///req/c/fail")  # 500
    watcher.wait(3)
    watcher.publish("command///req/d/slow")  # 200, holds the only worker for 1.2 s
    time.sleep(0.3)
    # (info, not ping: an inline handler needs no worker, so it is never queued behind a busy one)
    watcher.publish("command///req/e/info")  # queued, too old when it runs: 410
    watcher.publish("command///req/f/info")  # no room left: 429
    watcher.publish("command///req/g")  # no command name: malformed, no response possible
    watcher.publish("command///req//no-such-command")  # one-way: rejected, nothing published
    msgs = watcher.wait(6)
    by_status: dict[str, int] = {}
    for m in msgs:
        status = m.topic.rsplit("/", 1)[1]
        by_status[status] = by_status.get(status, 0) + 1
    assert by_status == {"404": 1, "413": 1, "500": 1, "200": 1, "410": 1, "429": 1}
    wait_until(lambda: scrape(port).get('mqtt_agent_commands_rejected_total{reason="unknown_command"}') == 2)
    s = scrape(port)
    assert s['mqtt_agent_commands_total{command="_unknown",status="404"}'] == 1
    assert s['mqtt_agent_commands_total{command="ping",status="413"}'] == 1
    assert s['mqtt_agent_commands_total{command="fail",status="500"}'] == 1
    assert s['mqtt_agent_commands_total{command="slow",status="200"}'] == 1
    assert s['mqtt_agent_commands_total{command="info",status="410"}'] == 1
    assert s['mqtt_agent_commands_total{command="info",status="429"}'] == 1
    published = {k: v for k, v in s.items() if k.startswith("mqtt_agent_commands_total{")}
    assert sum(published.values()) == len(msgs)  # every response published, and nothing else
    for reason, count in (("unknown_command", 2), ("payload_too_large", 1), ("expired", 1), ("queue_full", 1),
                          ("malformed_topic", 1), ("journal_error", 0)):
        assert s[f'mqtt_agent_commands_rejected_total{{reason="{reason}"}}'] == count, reason
    # No duration sample for what never ran.
    assert 'mqtt_agent_command_duration_seconds_count{command="_unknown"}' not in s
    watcher.close()


# --- 7. the reload verdict ----------------------------------------------------------------------------


def test_reload_command_reports_the_verdict_of_the_running_agent(broker, make_config, run_agent, tmp_path, pki):
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    creds = tmp_path / "creds"
    creds.mkdir()
    shutil.copy(pki.device.key, creds / "tls.key_file")
    cfg = make_config(broker, {"commands.one": {"argv": ["/bin/true"]}})
    env = {"RUNTIME_DIRECTORY": str(runtime), "CREDENTIALS_DIRECTORY": str(creds)}
    agent = run_agent(cfg, env=env)
    assert agent.proc is not None
    pid = str(agent.proc.pid)
    good = cfg.read_text()
    sender = tmp_path / "sender.toml"  # `send` reads a config too: keep a valid one for it
    sender.write_text(good)

    # A valid change: applied, exit 0, and the command serves at once.
    cfg.write_text(good + '\n[commands.two]\nargv = ["/bin/true"]\n')
    res = mqtt_agent("reload", "--config", str(cfg), "--pid", pid, env=env)
    assert res.returncode == 0, res.stderr
    assert res.stdout == "configuration reloaded: commands added two (no reconnect)\n"
    assert send(sender, "two").status == 200

    # A rejected file: exit 1 with the problem, and no credentials hint for an unrelated key.
    cfg.write_text(good.replace("keepalive = 30", 'keepalive = "soon"'))
    res = mqtt_agent("reload", "--config", str(cfg), "--pid", pid, env=env)
    assert res.returncode == 1
    assert "rejected, the running configuration stays in effect" in res.stderr
    assert "mqtt.keepalive: must be an integer" in res.stderr
    assert "credentials" not in res.stderr and "credentials" not in agent.output.split("keepalive")[-1]
    assert send(sender, "two").status == 200  # the running configuration stays

    # A new certificate for a key systemd has not copied: rejected, and here the hint explains it.
    other = pki.ca.issue("dev-other", filename="other")
    cfg.write_text(good.replace(str(pki.device.cert), str(other.cert)))
    res = mqtt_agent("reload", "--config", str(cfg), "--pid", pid, env=env)
    assert res.returncode == 1
    assert "tls.key_file come(s) from systemd credentials" in res.stderr

    # No agent answering: exit 2 within the bound. (SIGSTOP: the process exists but cannot answer.)
    agent.proc.send_signal(19)
    try:
        started = time.monotonic()
        res = mqtt_agent("reload", "--config", str(cfg), "--pid", pid, "--timeout", "1", env=env)
        assert res.returncode == 2 and "no verdict" in res.stderr
        assert time.monotonic() - started < 10
    finally:
        agent.proc.send_signal(18)
    assert oct((runtime / "reload-verdict").stat().st_mode & 0o777) == "0o600"
