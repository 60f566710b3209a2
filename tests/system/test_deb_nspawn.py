"""The Debian package under a real systemd: Debian 12 booted in systemd-nspawn (PID 1 is systemd).

One container for the module, the steps in order, as an operator would take them: install the .deb
offline (its Debian dependencies are already in the cached root) and see the unconfigured service wait
instead of crash-looping; configure it with test certificates for the mosquitto inside the container;
start it, ping it, reload it, watch its watchdog; upgrade to a newer build (config, state and the
command journal kept); remove; purge. The root is made once with debootstrap and cached
(tests/support/roots.py); each run boots a private copy of it.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.nspawn import Container, nspawn_available
from tests.support.pki import TestCA
from tests.support.roots import bookworm_systemd_root, copy_root
from tests.system.conftest import Debs, Repo

# The first run debootstraps the root (1-2 min, more on a loaded machine), and the package is built.
pytestmark = [pytest.mark.system, pytest.mark.timeout(900), pytest.mark.roots("systemd")]

CONF = "/etc/mqtt-agent/mqtt-agent.toml"
UNIT = "mqtt-agent.service"
DEVICE = "nspawn-gw"

MOSQUITTO_CONF = """\
listener 8883 127.0.0.1
cafile /etc/mosquitto/certs/ca.pem
certfile /etc/mosquitto/certs/broker.pem
keyfile /etc/mosquitto/certs/broker.key
require_certificate true
allow_anonymous true
"""


def agent_config(extra: str = "") -> str:
    return f"""\
[agent]
device_id = "{DEVICE}"

[mqtt]
hosts = ["localhost:8883"]

[tls]
ca_file = "/etc/mqtt-agent/ca.pem"
cert_file = "/etc/mqtt-agent/device.pem"
key_file = "/etc/mqtt-agent/device.key"

[commands.stamp]
argv = ["/bin/date", "+%s.%N"]
{extra}"""


@dataclass
class Gateway:
    ct: Container
    root: Path
    debs: Debs
    device_files: Path  # ca.pem, device.pem, device.key as the operator receives them

    def deb_path(self, deb: Path) -> str:
        """The .deb's path inside the container (copied into its /var/tmp)."""
        target = self.root / "var/tmp" / deb.name
        target.write_bytes(deb.read_bytes())
        return f"/var/tmp/{deb.name}"

    def send(self, command: str, *args: str, attempts: int = 30) -> list[str]:
        """`mqtt-agent send` inside the container until it gets an answer (the agent may still be
        connecting); its output lines (status, body)."""
        last = None
        for _ in range(attempts):
            last = self.ct.run("mqtt-agent", "send", "--timeout", "5", *args, command, check=False, timeout=60)
            if last.returncode == 0:
                return last.stdout.splitlines()
            time.sleep(1)
        raise AssertionError(f"mqtt-agent send {command}: {last.returncode if last else '?'} "
                             f"{last.stdout if last else ''}{last.stderr if last else ''}")

    def journal(self, lines: int = 40) -> str:
        return self.ct.run("journalctl", "--no-pager", "-o", "short-monotonic", "-n", str(lines), "-u", UNIT,
                           check=False).stdout

    def write(self, path: str, text: str, mode: int = 0o644) -> None:
        dest = self.root / path.lstrip("/")
        dest.write_text(text)
        dest.chmod(mode)


def _id_in(root: Path, db: str, name: str) -> int:
    for line in (root / "etc" / db).read_text().splitlines():
        fields = line.split(":")
        if fields[0] == name:
            return int(fields[2])
    raise AssertionError(f"{name} not in {db}")


@pytest.fixture(scope="module")
def gateway(debs: Debs, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    reason = nspawn_available()
    if reason:
        pytest.fail(reason)
    cached = bookworm_systemd_root()
    work = tmp_path_factory.mktemp("nspawn")
    root = copy_root(cached, work / "root")
    ca = TestCA(work / "pki")
    broker = ca.issue("localhost", sans=["localhost", "127.0.0.1"], server=True, filename="broker")
    device = ca.issue(DEVICE, filename="device")
    certs = root / "etc/mosquitto/certs"
    certs.mkdir(parents=True, exist_ok=True)
    uid = _id_in(root, "passwd", "mosquitto")
    for src, name in ((ca.cert_path, "ca.pem"), (broker.cert, "broker.pem"), (broker.key, "broker.key")):
        (certs / name).write_bytes(src.read_bytes())
        os.chown(certs / name, uid, 0)
        (certs / name).chmod(0o600 if name.endswith(".key") else 0o644)
    (root / "etc/mosquitto/conf.d/tls.conf").write_text(MOSQUITTO_CONF)
    # The device's files, where the operator puts them (installed before the package: /etc/mqtt-agent
    # is the package's directory, and dpkg keeps files it does not own). The key stays root's: systemd
    # hands it to the service as a credential.
    staged = work / "device-files"
    staged.mkdir()
    for src, name in ((ca.cert_path, "ca.pem"), (device.cert, "device.pem"), (device.key, "device.key")):
        (staged / name).write_bytes(src.read_bytes())
    with Container(root) as ct:
        gw = Gateway(ct, root, debs, staged)
        ct.wait_for("mosquitto.service", {"ActiveState": "active"})
        yield gw


def test_install_offline_enables_the_unit_and_waits_for_a_configuration(gateway: Gateway) -> None:
    ct = gateway.ct
    out = ct.run("dpkg", "-i", gateway.deb_path(gateway.debs.current)).stdout
    assert f"edit {CONF}" in out  # the next steps, printed once
    assert ct.run("getent", "passwd", "mqtt-agent").stdout.split(":")[6].strip() == "/usr/sbin/nologin"
    assert ct.run("systemctl", "is-enabled", UNIT).stdout.strip() == "enabled"
    assert ct.run("stat", "-c", "%a %U:%G", CONF).stdout.strip() == "640 root:mqtt-agent"
    # Not failed and not restarting: the start was skipped by the config check...
    state = ct.show(UNIT, "ActiveState", "Result", "NRestarts", "ConditionResult")
    assert state["ActiveState"] == "inactive"
    assert state["NRestarts"] == "0"
    assert state["Result"] in ("exec-condition", "success")
    assert ct.run("systemctl", "is-failed", UNIT, check=False).stdout.strip() != "failed"
    # ... and `systemctl status` says what to fix: check-config's message names the keys and files.
    status = ct.run("systemctl", "status", "--no-pager", "-n", "20", UNIT, check=False).stdout
    assert "tls.ca_file" in status and "/etc/mqtt-agent/ca.pem does not exist" in status
    # A second start changes nothing either: still skipped, no restart loop.
    ct.run("systemctl", "start", UNIT)
    time.sleep(1)
    assert ct.show(UNIT, "ActiveState", "NRestarts") == {"ActiveState": "inactive", "NRestarts": "0"}


def test_configured_agent_starts_reports_ready_and_answers_ping(gateway: Gateway) -> None:
    ct, root = gateway.ct, gateway.root
    staged = gateway.device_files
    for name in ("ca.pem", "device.pem", "device.key"):
        dest = root / "etc/mqtt-agent" / name
        dest.write_bytes((staged / name).read_bytes())
        dest.chmod(0o600 if name.endswith(".key") else 0o644)
    gateway.write(CONF, agent_config(), 0o640)
    ct.run("chgrp", "mqtt-agent", CONF)
    ct.run("mqtt-agent", "check-config", "--quiet", "--config", CONF)
    ct.run("systemctl", "restart", UNIT)  # Type=notify: returns once the agent sent READY=1
    state = ct.show(UNIT, "ActiveState", "SubState", "StatusText", "MainPID", "WatchdogUSec", "User")
    assert (state["ActiveState"], state["SubState"]) == ("active", "running")
    assert state["WatchdogUSec"] == "30s"
    assert state["StatusText"], "the agent reports what it is doing (STATUS=)"
    assert state["User"] == "mqtt-agent"
    lines = gateway.send("ping")
    assert lines[0] == "200"
    # Once connected, the status line says so.
    ct.wait_for(UNIT, {"SubState": "running"})
    assert ct.run("stat", "-c", "%U %a", "/var/lib/mqtt-agent").stdout.split() == ["mqtt-agent", "700"]


# Inside the container, as root: subscribe (the vendored paho, the device's certificate), then publish as
# each user given, then print what the subscriber got and how each publish ended.
WATCH_AND_PUBLISH = """\
import json, ssl, subprocess, sys, threading
sys.path.insert(0, "/usr/lib/mqtt-agent/vendor")
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

got, ready, arrived = [], threading.Event(), threading.Event()
client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="app-watcher")
ctx = ssl.create_default_context(cafile="/etc/mqtt-agent/ca.pem")
ctx.load_cert_chain("/etc/mqtt-agent/device.pem", "/etc/mqtt-agent/device.key")
client.tls_set_context(ctx)
client.on_connect = lambda c, *a: c.subscribe("telemetry/#", 1)
client.on_subscribe = lambda *a: ready.set()
def on_message(c, u, m):
    got.append([m.topic, m.payload.decode()])
    arrived.set()
client.on_message = on_message
client.connect("localhost", 8883)
client.loop_start()
assert ready.wait(30), "the watcher could not subscribe"
runs = {}
for user in sys.argv[1:]:
    p = subprocess.run(["runuser", "-u", user, "--", "mqtt-agent", "publish", "telemetry", "--payload",
                        json.dumps({"from": user})], capture_output=True, text=True, timeout=60)
    runs[user] = [p.returncode, p.stdout + p.stderr]
arrived.wait(20)
print(json.dumps({"runs": runs, "got": got}))
"""


def test_an_app_in_mqtt_agent_apps_publishes_through_the_packaged_socket(gateway: Gateway) -> None:
    """The package's mqtt-agent.socket under real systemd: systemd makes the socket with the apps' group,
    hands it to the agent; a member's message reaches the broker, anyone else is refused by the kernel."""
    import json

    ct = gateway.ct
    assert ct.run("systemctl", "is-enabled", "mqtt-agent.socket").stdout.strip() == "enabled"
    assert ct.show("mqtt-agent.socket", "ActiveState")["ActiveState"] == "active"
    assert ct.run("stat", "-c", "%F %a %U:%G", "/run/mqtt-agent/api.sock").stdout.strip() == \
        "socket 660 mqtt-agent:mqtt-agent-apps"
    ct.run("useradd", "--system", "--no-create-home", "--groups", "mqtt-agent-apps", "sensor-app")
    ct.run("useradd", "--system", "--no-create-home", "outsider")
    gateway.write("/var/tmp/watch_and_publish.py", WATCH_AND_PUBLISH)
    out = ct.run("python3", "/var/tmp/watch_and_publish.py", "sensor-app", "outsider", timeout=120).stdout
    result = json.loads(out.strip().splitlines()[-1])
    member, outsider = result["runs"]["sensor-app"], result["runs"]["outsider"]
    assert member[0] == 0 and member[1].startswith("accepted"), member  # 202: durable in the agent's queue
    assert outsider[0] == 2 and "Permission denied" in outsider[1], outsider  # refused by the file system
    assert result["got"] == [["telemetry/?content-type=application%2Fjson", '{"from": "sensor-app"}']], \
        f"{result}\n{gateway.journal()}"
    assert "local API on the socket systemd passed" in gateway.journal(200)


def test_reload_applies_a_valid_change_and_keeps_the_process(gateway: Gateway) -> None:
    ct = gateway.ct
    pid = ct.show(UNIT, "MainPID")["MainPID"]
    gateway.write(CONF, agent_config('\n[commands.hello]\nargv = ["/bin/echo", "hello from the reload"]\n'), 0o640)
    reload = ct.run("systemctl", "reload", UNIT, check=False)
    assert reload.returncode == 0, f"{reload.stderr}\n{gateway.journal()}"
    lines = gateway.send("hello")
    assert lines[0] == "200" and "hello from the reload" in "\n".join(lines[1:])
    state = ct.show(UNIT, "MainPID", "ActiveState", "NRestarts")
    assert state == {"MainPID": pid, "ActiveState": "active", "NRestarts": "0"}


def test_watchdog_pings_arrive_and_a_wedged_agent_is_restarted(gateway: Gateway) -> None:
    ct = gateway.ct
    # A shorter watchdog for this test only (a runtime drop-in, gone at the next boot), so the pings
    # and the restart are seen in seconds, not minutes.
    dropin = gateway.root / "run/systemd/system/mqtt-agent.service.d"
    dropin.mkdir(parents=True, exist_ok=True)
    (dropin / "test-watchdog.conf").write_text("[Service]\nWatchdogSec=4\nTimeoutAbortSec=5\n")
    ct.run("systemctl", "daemon-reload")
    ct.run("systemctl", "restart", UNIT)
    first = ct.show(UNIT, "WatchdogTimestampMonotonic")["WatchdogTimestampMonotonic"]
    deadline = time.monotonic() + 20
    while ct.show(UNIT, "WatchdogTimestampMonotonic")["WatchdogTimestampMonotonic"] == first:
        assert time.monotonic() < deadline, "no WATCHDOG=1 from a healthy agent within 20 s (WatchdogSec=4)"
        time.sleep(0.5)
    pid = ct.show(UNIT, "MainPID")["MainPID"]
    ct.run("kill", "-STOP", pid)  # wedged: no progress, no pings
    deadline = time.monotonic() + 60
    while True:
        state = ct.show(UNIT, "MainPID", "ActiveState", "SubState", "NRestarts")
        if state["NRestarts"] == "1" and state["ActiveState"] == "active" and state["MainPID"] not in ("0", pid):
            break
        assert time.monotonic() < deadline, f"not restarted after the watchdog expired: {state}"
        time.sleep(0.5)
    (dropin / "test-watchdog.conf").unlink()
    ct.run("systemctl", "daemon-reload")
    ct.run("systemctl", "restart", UNIT)
    assert gateway.send("ping")[0] == "200"


def test_upgrade_from_the_apt_repository_restarts_and_keeps_config_state_and_the_command_journal(
        gateway: Gateway, apt_repo: Repo) -> None:
    ct = gateway.ct
    config_before = (gateway.root / CONF.lstrip("/")).read_text()
    stamp = gateway.send("stamp", "--req-id", "before-upgrade")
    assert stamp[0] == "200"
    state_files = set(ct.run("find", "/var/lib/mqtt-agent", "-type", "f").stdout.split())
    assert state_files, "the agent keeps its journal in state_dir"
    pid = ct.show(UNIT, "MainPID")["MainPID"]
    # The fleet's way (README): the keyring, one sources line, apt. The repository is a directory in
    # the container here (file:), served over HTTPS in a fleet.
    shutil.copytree(apt_repo.path, gateway.root / "srv/mqtt-agent-repo")
    keyring = "/usr/share/keyrings/mqtt-agent-archive-keyring.gpg"
    shutil.copy(apt_repo.keyring, gateway.root / keyring.lstrip("/"))
    gateway.write("/etc/apt/sources.list.d/mqtt-agent.list",
                  f"deb [signed-by={keyring}] file:/srv/mqtt-agent-repo stable main\n")
    # Only this source: the container has no network for Debian's mirror.
    only = ["-o", "Dir::Etc::SourceList=/etc/apt/sources.list.d/mqtt-agent.list", "-o", "Dir::Etc::SourceParts=-"]
    ct.run("apt-get", *only, "update")
    ct.run("apt-get", *only, "install", "-y", "mqtt-agent", env={"DEBIAN_FRONTEND": "noninteractive"})
    assert ct.run("dpkg-query", "-W", "-f", "${Version}", "mqtt-agent").stdout == gateway.debs.newer_version
    assert (gateway.root / CONF.lstrip("/")).read_text() == config_before  # the operator's edits
    ct.wait_for(UNIT, {"ActiveState": "active", "SubState": "running"})
    assert ct.show(UNIT, "MainPID")["MainPID"] != pid, "the upgrade restarted the service"
    assert state_files <= set(ct.run("find", "/var/lib/mqtt-agent", "-type", "f").stdout.split())
    # The journal survived: the same request id is answered from it, not run again (same timestamp).
    again = gateway.send("stamp", "--req-id", "before-upgrade")
    assert again == stamp
    assert gateway.send("stamp")[1] != stamp[1]  # (a new request does run)


def test_remove_stops_and_keeps_config_then_purge_removes_everything(gateway: Gateway) -> None:
    ct = gateway.ct
    ct.run("dpkg", "-r", "mqtt-agent")
    assert ct.show(UNIT, "ActiveState")["ActiveState"] in ("inactive", "failed")
    assert ct.run("pgrep", "-u", "mqtt-agent", check=False).returncode == 1, "no agent process left"
    assert ct.run("test", "-f", CONF, check=False).returncode == 0, "remove keeps the configuration"
    assert ct.run("test", "-d", "/var/lib/mqtt-agent", check=False).returncode == 0, "remove keeps the state"
    ct.run("dpkg", "--purge", "mqtt-agent")
    for path in ("/etc/mqtt-agent", "/var/lib/mqtt-agent", "/lib/systemd/system/mqtt-agent.service",
                 "/usr/lib/mqtt-agent", "/usr/bin/mqtt-agent",
                 "/etc/systemd/system/multi-user.target.wants/mqtt-agent.service"):
        assert ct.run("test", "-e", path, check=False).returncode == 1, f"{path} is left after purge"
    assert ct.run("getent", "passwd", "mqtt-agent", check=False).returncode == 2
    assert ct.run("getent", "group", "mqtt-agent", check=False).returncode == 2
    ct.run("systemctl", "daemon-reload")
    assert ct.show(UNIT, "LoadState")["LoadState"] == "not-found"
