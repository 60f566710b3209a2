"""The same Architecture: all package on emulated ARM: Debian 12 arm64 (Raspberry Pi 3/4/5, 64-bit OS)
and armhf (32-bit Raspberry Pi OS; no cryptography wheel on PyPI, no compiler on the image); and on
Debian 13 (Python 3.13, python3-cryptography 43), natively.

Each root is debootstrapped once (the ARM ones under qemu-user-static) and cached (tests/support/roots.py); the
package is installed offline with dpkg, then `mqtt-agent --version`, `check-config` and an agent that
answers a ping from a broker on the host's loopback all run as ARM binaries (the Python interpreter
and Debian's compiled python3-cryptography for that architecture).
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from agent import __version__
from tests.conftest import PKI
from tests.support.mosquitto import Mosquitto
from tests.support.roots import HOST, ROOTS, alive, copy_root, ensure, in_root, spawn_in_root, stop_in_root
from tests.system.conftest import Debs

# The roots are built (or waited for) before the timeout starts (the `roots` marker, tests/conftest.py).
pytestmark = [pytest.mark.system, pytest.mark.timeout(900)]
ARCHS = ["arm64", "armhf"]
# (suite, architecture, the root's name in roots.ROOTS): the roots this file installs the package into.
TARGETS = [pytest.param(("bookworm", arch, arch), id=f"bookworm-{arch}",
                        marks=[pytest.mark.arm, pytest.mark.roots(arch)]) for arch in ARCHS]
TARGETS.append(pytest.param(("trixie", HOST, "trixie"), id=f"trixie-{HOST}", marks=pytest.mark.roots("trixie")))
MACHINE = {"arm64": "aarch64", "armhf": "armv7l", "amd64": "x86_64"}
CONF = "/etc/mqtt-agent/mqtt-agent.toml"


def _config(broker: Mosquitto) -> str:
    return f"""\
[agent]
device_id = "dev-1"

[mqtt]
hosts = ["{broker.address}"]

[tls]
ca_file = "/etc/mqtt-agent/ca.pem"
cert_file = "/etc/mqtt-agent/device.pem"
key_file = "/etc/mqtt-agent/device.key"

[metrics]
listen = ""
"""


def target_root(name: str, arch: str) -> Path:
    """The cached root (the trixie one also holds the other brokers; a copy of it changes nothing)."""
    if shutil.which("debootstrap") is None:
        pytest.fail("debootstrap is needed; run ./scripts/test.sh, which installs it")
    if arch != HOST and not Path("/usr/bin/qemu-arm-static").exists():
        pytest.fail("qemu-user-static is needed; run ./scripts/test.sh, which installs it")
    return ensure(ROOTS[name])


@pytest.mark.parametrize("target", TARGETS)
def test_package_installs_and_answers_a_ping(
        target: tuple[str, str, str], debs: Debs, make_broker: Callable[..., Mosquitto], pki: PKI,
        tmp_path_factory: pytest.TempPathFactory) -> None:
    suite, arch, name = target
    root = copy_root(target_root(name, arch), tmp_path_factory.mktemp(f"root-{suite}-{arch}"))
    (root / "var/tmp" / debs.current.name).write_bytes(debs.current.read_bytes())

    def run(*argv: str, timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
        proc = in_root(root, arch, argv, timeout=timeout)
        assert proc.returncode == 0, f"{' '.join(argv)} ({arch}): {proc.returncode}\n{proc.stdout}{proc.stderr}"
        return proc

    assert run("uname", "-m").stdout.strip() == MACHINE[arch]  # really emulated (ARM)
    installed = run("dpkg", "-i", f"/var/tmp/{debs.current.name}")
    assert "mqtt-agent is installed and enabled" in installed.stdout
    assert run("getent", "passwd", "mqtt-agent").returncode == 0
    # No systemd runs in this root: dpkg still enabled the unit for the next boot.
    assert (root / "etc/systemd/system/multi-user.target.wants/mqtt-agent.service").is_symlink()
    assert run("mqtt-agent", "--version").stdout.split() == ["mqtt-agent", __version__]

    broker = make_broker()
    for src, name in ((pki.ca.cert_path, "ca.pem"), (pki.device.cert, "device.pem"), (pki.device.key, "device.key")):
        (root / "etc/mqtt-agent" / name).write_bytes(src.read_bytes())
    (root / "etc/mqtt-agent/device.key").chmod(0o600)
    (root / CONF.lstrip("/")).write_text(_config(broker))
    check = run("mqtt-agent", "check-config", "--config", CONF)
    assert check.stdout.startswith(f"# {CONF}: valid")

    log = root.parent / f"agent-{arch}.log"
    with open(log, "w") as out:
        agent = spawn_in_root(root, arch, ["mqtt-agent", "run", "--config", CONF], stdout=out)
        assert agent.stdin is not None
        agent.stdin.write("go\n")
        agent.stdin.close()
    try:
        answer = None
        deadline = time.monotonic() + 180  # an emulated agent needs a while to start
        while time.monotonic() < deadline:
            answer = in_root(root, arch, ["mqtt-agent", "send", "--timeout", "10", "ping"], timeout=120)
            if answer.returncode == 0:
                break
            assert agent.poll() is None, f"the agent exited {agent.returncode}: {log.read_text()}"
            time.sleep(2)
        assert answer is not None and answer.returncode == 0, f"{answer}\n{log.read_text()}"
        assert answer.stdout.splitlines()[0] == "200"
    finally:
        inits = stop_in_root(agent)
    # The emulated agent is its namespace's init; it once outlived unshare (see stop_in_root).
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in inits) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert inits and not any(alive(pid) for pid in inits), f"the agent in {arch} outlived the test: {inits}"

