"""Issue 12 under a real systemd 252 (bookworm) PID 1 in systemd-nspawn, with the hardened unit as shipped:
`systemctl reload` fails on a rejected file and succeeds on a good one (ExecReload = `mqtt-agent reload`),
exec commands see no systemd or credential variables, a setsid escape is killed on timeout, a detached
child is reaped, and the service's cgroup holds nothing but the agent afterwards.

Needs a bookworm root with systemd and python3.11 (the host's venv packages are bind-mounted into it):
$MQTT_AGENT_SYSTEMD_ROOT, or the cached root the Debian package tests build (issue 15). The root is
copied first, never changed.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.mosquitto import Mosquitto
from tests.support.nspawn import Container, agent_container, install_agent_from_checkout, systemd_root
from tests.support.outcomes import wait_until
from tests.support.roots import copy_root

pytestmark = pytest.mark.roots("systemd")  # waited for (or built) before the timeout starts


def agent_config(port: int) -> str:
    return f"""\
[agent]
device_id = "gw-nspawn"

[mqtt]
hosts = ["127.0.0.1:{port}"]
keepalive = 30

[tls]
enabled = false

[metrics]
listen = ""

[commands.showenv]
argv = ["/bin/sh", "-c", "systemctl is-active nonexistent.service >/dev/null 2>&1; systemd-notify STATUS=x; env"]

[commands.escape]
argv = ["/bin/sh", "-c", "setsid sleep 3041 </dev/null >/dev/null 2>&1 & sleep 30"]
timeout = 1.0

[commands.detach]
argv = ["/bin/sh", "-c", "setsid sleep 2 & echo started"]
"""


@pytest.fixture
def container(tmp_path: Path) -> Iterator[tuple[Container, Mosquitto]]:
    root = copy_root(systemd_root(), tmp_path / "root")
    broker = Mosquitto(tmp_path / "broker").start()  # on the host's loopback, which the container shares
    install_agent_from_checkout(root, agent_config(broker.port))
    box = agent_container(root, tmp_path / "boot.log")
    try:
        box.boot()
        # Synchronisation: the agent's subscription is in its journal only.
        wait_until(lambda: "subscribed to" in box.journal("mqtt-agent"), 60, "the agent subscribed", interval=0.2)
        yield box, broker
    finally:
        box.poweroff()
        broker.stop()


@pytest.mark.timeout(900)  # may debootstrap the cached root first (tests/support/roots.py)
def test_reload_verdict_environment_and_processes_under_systemd(container, tmp_path):
    from tests.support.mqttclient import TestClient

    box, broker = container
    host_cfg = tmp_path / "client.toml"
    host_cfg.write_text(agent_config(broker.port))
    watcher = TestClient(host_cfg, subscribe="command///res/#")
    for name in ("showenv", "escape", "detach"):
        watcher.publish(f"command///req/r-{name}/{name}")
    replies = {m.topic: m.payload.decode() for m in watcher.wait(3, timeout=30)}
    watcher.close()

    env = dict(line.split("=", 1) for line in replies["command///res/r-showenv/200"].splitlines() if "=" in line)
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "CREDENTIALS_DIRECTORY", "INVOCATION_ID",
                 "JOURNAL_STREAM", "SYSTEMD_EXEC_PID"):
        assert name not in env, name
    assert env["USER"] == "mqtt-agent" and env["MQTT_AGENT_COMMAND"] == "showenv"
    assert replies["command///res/r-escape/504"] == \
        '{"error":"command \'escape\' did not finish within 1 s; killed 3 processes"}'
    assert replies["command///res/r-detach/200"] == "started\n"
    # Reaping leaves no trace but this line (a zombie is gone from cgroup.procs before it is reaped).
    wait_until(lambda: "left by command detach exited with status 0" in box.journal("mqtt-agent"), 15,
               "the detached child reaped", interval=0.2)
    main_pid = box.show("mqtt-agent", "MainPID")["MainPID"]
    cgroup = box.show("mqtt-agent", "ControlGroup")["ControlGroup"]
    # cgroup v2, or v1 with systemd's named hierarchy (hosts booted with the legacy layout).
    for base in ("/sys/fs/cgroup", "/sys/fs/cgroup/systemd", "/sys/fs/cgroup/unified"):
        res = box.run("cat", f"{base}{cgroup}/cgroup.procs", check=False)
        if res.returncode == 0:
            break
    assert res.returncode == 0, res.stderr
    procs = res.stdout.split()
    assert procs == [main_pid]  # nothing the commands started is left in the service
    # systemd's own complaint (a child's sd_notify) and the agent's: only their absence in the journal says
    # that no command reached NOTIFY_SOCKET and that the agent is the subreaper of what it starts.
    assert "reception only permitted for main PID" not in box.journal()
    assert "cannot become a child subreaper" not in box.journal("mqtt-agent")

    conf = box.root / "etc/mqtt-agent/mqtt-agent.toml"
    good = conf.read_text()
    conf.write_text(good + '\n[commands.two]\nargv = ["/bin/true"]\n')
    res = box.run("systemctl", "reload", "mqtt-agent", check=False)
    assert res.returncode == 0, res.stderr
    conf.write_text(good.replace("keepalive = 30", 'keepalive = "soon"'))
    res = box.run("systemctl", "reload", "mqtt-agent", check=False)
    assert res.returncode == 1 and "failed" in res.stderr
    # Still running, the same process: the rejected file changed nothing.
    assert box.show("mqtt-agent", "ActiveState", "SubState", "MainPID") == {
        "ActiveState": "active", "SubState": "running", "MainPID": main_pid}
    # Operator interface: the journal says which key is wrong (systemctl only says "failed").
    assert "mqtt.keepalive: must be an integer" in box.journal("mqtt-agent")
