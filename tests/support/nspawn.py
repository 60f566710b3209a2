"""A Debian root booted with systemd as PID 1 in systemd-nspawn, and commands run inside it.

    with Container(root_dir) as ct:          # boots; waits until systemd reports running/degraded
        ct.run("systemctl", "start", "mqtt-agent")

PID 1 of this machine is not systemd, so the container is not registered with machined
(--register=no) and stays in the caller's scope (--keep-unit); `machinectl shell` is therefore not
available and commands enter the container's namespaces with nsenter instead. --private-network gives
the container its own network namespace with only a loopback device: nothing it starts (mosquitto,
the agent's exporter) is reachable from, or collides with, the host. `private_network=False` shares
the host's network instead (a test whose broker runs on the host's loopback), and `bind_ro` bind-mounts
host paths read-only (this checkout and the venv's packages, for `agent_from_checkout`).

The helpers below the class set a root up for the agent of this checkout under the hardened unit as
shipped (`systemd_root`, `install_agent_from_checkout`), for the tests that need the unit but not the
Debian package.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

REPO = Path(__file__).resolve().parents[2]
VENV_SITE = Path(sys.prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
# Where agent_container binds them inside: fixed paths, not the host's. A checkout under /tmp or /var/tmp
# (a CI clone) would be hidden from the service by the unit's PrivateTmp=yes.
REPO_INSIDE = "/opt/mqtt-agent-test/checkout"
VENV_SITE_INSIDE = "/opt/mqtt-agent-test/site-packages"


class ContainerError(RuntimeError):
    pass


def nspawn_available() -> str | None:
    """None if containers can be booted here, else the reason they cannot."""
    if shutil.which("systemd-nspawn") is None:
        return "systemd-nspawn is not installed (Debian: systemd-container); run ./scripts/test.sh"
    if os.geteuid() != 0:
        return "systemd-nspawn needs root"
    return None


class Container:
    def __init__(self, root: Path, *, boot_timeout: float = 120.0, private_network: bool = True,
                 bind_ro: Sequence[Path | tuple[Path, str]] = (), console: Path | None = None) -> None:
        self.root = root
        self.boot_timeout = boot_timeout
        self.private_network = private_network
        self.bind_ro = tuple(bind_ro)
        self.proc: subprocess.Popen[bytes] | None = None
        self.leader = 0
        self.console = console or root.parent / f"{root.name}.console.log"

    def __enter__(self) -> Container:
        self.boot()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def boot(self) -> None:
        machine = f"mqtt-agent-test-{os.getpid()}"
        options = [*(["--private-network"] if self.private_network else []),
                   *(f"--bind-ro={b[0]}:{b[1]}" if isinstance(b, tuple) else f"--bind-ro={b}" for b in self.bind_ro)]
        with open(self.console, "wb") as log:
            self.proc = subprocess.Popen(
                ["systemd-nspawn", "--quiet", "-D", str(self.root), "-b", "--register=no", "--keep-unit",
                 *options, f"--machine={machine}", "--console=passive"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + self.boot_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ContainerError(f"systemd-nspawn exited {self.proc.returncode}: {self._console_tail()}")
            if not self.leader:
                self.leader = self._find_leader()
            if self.leader:
                state = self.run("systemctl", "is-system-running", check=False, timeout=30).stdout.strip()
                if state in ("running", "degraded"):
                    return
            time.sleep(0.5)
        raise ContainerError(f"the container did not finish booting in {self.boot_timeout:g} s: {self._console_tail()}")

    def _find_leader(self) -> int:
        """PID (on the host) of the container's init: the child of systemd-nspawn that runs systemd."""
        assert self.proc is not None
        try:
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        except OSError:
            return 0
        for pid in children:
            try:
                if Path(f"/proc/{pid}/comm").read_text().strip() == "systemd":
                    return int(pid)
            except OSError:
                continue
        return 0

    def _console_tail(self) -> str:
        try:
            return self.console.read_text(errors="replace")[-3000:]
        except OSError:
            return "(no console log)"

    def run(self, *argv: str, check: bool = True, timeout: float = 120.0, input: str | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run argv inside the container as root (all of its namespaces, its root directory)."""
        if not self.leader:
            raise ContainerError("the container is not running")
        cmd = ["nsenter", f"--target={self.leader}", "--mount", "--uts", "--ipc", "--net", "--pid", "--cgroup",
               "--root", "--wd=/", "env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8",
               "HOME=/root", "SYSTEMD_PAGER=", "SYSTEMD_COLORS=0",
               *(f"{k}={v}" for k, v in (env or {}).items()), *argv]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, input=input)
        if check and proc.returncode != 0:
            raise ContainerError(
                f"{' '.join(argv)} exited {proc.returncode}:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
        return proc

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.run("systemctl", "show", unit, "-p", ",".join(props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def wait_for(self, unit: str, want: dict[str, str], timeout: float = 60.0) -> dict[str, str]:
        """Poll `systemctl show` until every property in `want` has its value; the last values otherwise."""
        deadline = time.monotonic() + timeout
        seen = self.show(unit, *want)
        while not all(seen.get(k) == v for k, v in want.items()):
            if time.monotonic() > deadline:
                raise ContainerError(f"{unit}: wanted {want}, still {seen} after {timeout:g} s")
            time.sleep(0.5)
            seen = self.show(unit, *want)
        return seen

    def journal(self, unit: str | None = None) -> str:
        """The container's journal (of one unit), message text only."""
        return self.run("journalctl", "--no-pager", "-o", "cat", *(["-u", unit] if unit else []), check=False).stdout

    def poweroff(self) -> None:
        """The same as stop(): a clean poweroff, bounded."""
        self.stop()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        # SIGRTMIN+3 to the container's systemd: a clean poweroff (journal flushed).
        if self.leader:
            try:
                os.kill(self.leader, signal.SIGRTMIN + 3)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.leader = 0


# --- the agent of this checkout under the hardened unit, in a copy of the cached bookworm root ----------


def systemd_root() -> Path:
    """The bootable bookworm root (cached; built on first use), or a skip naming what is missing.

    $MQTT_AGENT_SYSTEMD_ROOT names another one. It must have this interpreter's python3.X, since the
    host venv's packages are bind-mounted into it."""
    import pytest

    reason = nspawn_available()
    if reason:
        pytest.skip(reason)
    from tests.support.roots import bookworm_systemd_root

    root = Path(os.environ["MQTT_AGENT_SYSTEMD_ROOT"]) if os.environ.get("MQTT_AGENT_SYSTEMD_ROOT") \
        else bookworm_systemd_root()
    if not (root / "lib/systemd/systemd").exists():
        pytest.skip(f"no bookworm root with systemd at {root} (set MQTT_AGENT_SYSTEMD_ROOT)")
    py = f"python{sys.version_info.major}.{sys.version_info.minor}"
    if not (root / "usr/bin" / py).exists():
        pytest.skip(f"the root has no {py} to run this venv's packages")
    return root


def install_agent_from_checkout(root: Path, config: str) -> None:
    """In a private copy of a root: the `mqtt-agent` user, /opt/mqtt-agent/bin/mqtt-agent running this
    checkout with the venv's packages (bound at REPO_INSIDE and VENV_SITE_INSIDE: boot it with
    agent_container), /etc/mqtt-agent/mqtt-agent.toml, and the shipped unit, enabled."""
    subprocess.run(["chroot", str(root), "useradd", "--system", "--no-create-home", "--shell",
                    "/usr/sbin/nologin", "mqtt-agent"], check=True)
    (root / "opt/mqtt-agent/bin").mkdir(parents=True)
    wrapper = root / "opt/mqtt-agent/bin/mqtt-agent"
    python = f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}"
    wrapper.write_text(f"#!/bin/sh\nPYTHONPATH={REPO_INSIDE}:{VENV_SITE_INSIDE} exec {python} -m agent \"$@\"\n")
    wrapper.chmod(0o755)
    etc = root / "etc/mqtt-agent"
    etc.mkdir(exist_ok=True)
    (etc / "mqtt-agent.toml").write_text(config)
    shutil.copy(REPO / "systemd/mqtt-agent.service", root / "etc/systemd/system/mqtt-agent.service")
    wants = root / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    (wants / "mqtt-agent.service").symlink_to("/etc/systemd/system/mqtt-agent.service")


def agent_container(root: Path, console: Path) -> Container:
    """A Container for a root set up by install_agent_from_checkout: the host's network (its broker on the
    host loopback), this checkout and the venv bind-mounted read-only."""
    return Container(root, private_network=False, bind_ro=((REPO, REPO_INSIDE), (VENV_SITE, VENV_SITE_INSIDE)),
                     console=console)
