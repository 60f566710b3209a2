"""Issue 12 under a real systemd 252 (bookworm) PID 1 in systemd-nspawn, with the hardened unit as shipped:
`systemctl reload` fails on a rejected file and succeeds on a good one (ExecReload = `mqtt-agent reload`),
exec commands see no systemd or credential variables, a setsid escape is killed on timeout, a detached
child is reaped, and the service's cgroup holds nothing but the agent afterwards.

Needs a bookworm root with systemd and python3.11 (the host's venv packages are bind-mounted into it):
$MQTT_AGENT_SYSTEMD_ROOT, or the cached root the Debian package tests build (issue 15). The root is
copied first, never changed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.agentproc import REPO
from tests.support.mosquitto import Mosquitto
from tests.support.roots import bookworm_systemd_root

VENV_SITE = Path(sys.prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"


def _root() -> Path:
    if os.geteuid() != 0 or shutil.which("systemd-nspawn") is None:
        pytest.skip("needs root and systemd-nspawn")
    # The cached root of the package tests, built here if this test runs first (a fresh machine).
    root = Path(os.environ["MQTT_AGENT_SYSTEMD_ROOT"]) if os.environ.get("MQTT_AGENT_SYSTEMD_ROOT") \
        else bookworm_systemd_root()
    if not (root / "lib/systemd/systemd").exists():
        pytest.skip(f"no bookworm root with systemd at {root} (set MQTT_AGENT_SYSTEMD_ROOT)")
    py = f"python{sys.version_info.major}.{sys.version_info.minor}"
    if not (root / "usr/bin" / py).exists():
        pytest.skip(f"the root has no {py} to run this venv's packages")
    return root


class Container:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.proc: subprocess.Popen[bytes] | None = None
        self.leader = 0

    def boot(self, log: Path) -> None:
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                ["systemd-nspawn", "-D", str(self.root), "-b", "--register=no", "--keep-unit",
                 f"--bind-ro={REPO}", f"--bind-ro={VENV_SITE}"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
        end = time.monotonic() + 60
        while not self.leader:
            assert time.monotonic() < end and self.proc.poll() is None, log.read_text()[-3000:]
            kids = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
            self.leader = int(kids[0]) if kids else 0
            time.sleep(0.1)

    def run(self, *argv: str, check: bool = False, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["nsenter", "-t", str(self.leader), "-m", "-u", "-i", "-p", "-C", *argv],
                              capture_output=True, text=True, check=check, timeout=timeout)

    def journal(self, unit: str | None = None) -> str:
        return self.run("journalctl", "--no-pager", "-o", "cat", *(["-u", unit] if unit else [])).stdout

    def poweroff(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.run("systemctl", "poweroff", timeout=20)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def wait_for(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, f"{what}: not within {timeout} s"
        time.sleep(0.2)


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
    source = _root()
    root = tmp_path / "root"
    subprocess.run(["cp", "-a", str(source), str(root)], check=True)
    broker = Mosquitto(tmp_path / "broker").start()  # on the host's loopback, which the container shares
    subprocess.run(["chroot", str(root), "useradd", "--system", "--no-create-home", "--shell",
                    "/usr/sbin/nologin", "mqtt-agent"], check=True)
    (root / "opt/mqtt-agent/bin").mkdir(parents=True)
    wrapper = root / "opt/mqtt-agent/bin/mqtt-agent"
    wrapper.write_text(f"#!/bin/sh\nPYTHONPATH={REPO}:{VENV_SITE} exec /usr/bin/python{sys.version_info.major}."
                       f"{sys.version_info.minor} -m agent \"$@\"\n")
    wrapper.chmod(0o755)
    (root / "etc/mqtt-agent").mkdir()
    (root / "etc/mqtt-agent/mqtt-agent.toml").write_text(agent_config(broker.port))
    shutil.copy(REPO / "systemd/mqtt-agent.service", root / "etc/systemd/system/mqtt-agent.service")
    wants = root / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    (wants / "mqtt-agent.service").symlink_to("/etc/systemd/system/mqtt-agent.service")
    box = Container(root)
    try:
        box.boot(tmp_path / "boot.log")
        wait_for(lambda: "subscribed to" in box.journal("mqtt-agent"), 60, "the agent subscribed")
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
    wait_for(lambda: "left by command detach exited with status 0" in box.journal("mqtt-agent"), 15,
             "the detached child reaped")
    main_pid = box.run("systemctl", "show", "-p", "MainPID", "--value", "mqtt-agent").stdout.strip()
    cgroup = box.run("systemctl", "show", "-p", "ControlGroup", "--value", "mqtt-agent").stdout.strip()
    # cgroup v2, or v1 with systemd's named hierarchy (hosts booted with the legacy layout).
    for base in ("/sys/fs/cgroup", "/sys/fs/cgroup/systemd", "/sys/fs/cgroup/unified"):
        res = box.run("cat", f"{base}{cgroup}/cgroup.procs")
        if res.returncode == 0:
            break
    assert res.returncode == 0, res.stderr
    procs = res.stdout.split()
    assert procs == [main_pid]  # nothing the commands started is left in the service
    assert "reception only permitted for main PID" not in box.journal()
    assert "cannot become a child subreaper" not in box.journal("mqtt-agent")

    conf = box.root / "etc/mqtt-agent/mqtt-agent.toml"
    good = conf.read_text()
    conf.write_text(good + '\n[commands.two]\nargv = ["/bin/true"]\n')
    res = box.run("systemctl", "reload", "mqtt-agent")
    assert res.returncode == 0, res.stderr
    conf.write_text(good.replace("keepalive = 30", 'keepalive = "soon"'))
    res = box.run("systemctl", "reload", "mqtt-agent")
    assert res.returncode == 1 and "failed" in res.stderr
    status = box.run("systemctl", "status", "mqtt-agent", "--no-pager").stdout
    assert "Active: active (running)" in status
    assert "mqtt.keepalive: must be an integer" in box.journal("mqtt-agent")
    assert box.run("systemctl", "show", "-p", "MainPID", "--value", "mqtt-agent").stdout.strip() == main_pid
