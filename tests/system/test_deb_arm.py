"""The same Architecture: all package on emulated ARM: Debian 12 arm64 (Raspberry Pi 3/4/5, 64-bit OS)
and armhf (32-bit Raspberry Pi OS; no cryptography wheel on PyPI, no compiler on the image).

Each root is debootstrapped once under qemu-user-static and cached (tests/support/roots.py); the
package is installed offline with dpkg, then `mqtt-agent --version`, `check-config` and an agent that
answers a ping from a broker on the host's loopback all run as ARM binaries (the Python interpreter
and Debian's compiled python3-cryptography for that architecture).
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from agent import __version__
from tests.conftest import PKI
from tests.support.mosquitto import Mosquitto
from tests.support.roots import copy_root, debian_root, in_root, spawn_in_root
from tests.system.conftest import Debs

pytestmark = [pytest.mark.system, pytest.mark.arm]
ARCHS = ["arm64", "armhf"]

ROOT_PACKAGES = ["python3", "python3-cryptography", "python3-systemd", "adduser", "procps"]
MACHINE = {"arm64": "aarch64", "armhf": "armv7l"}
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


@pytest.fixture(scope="module")
def arm_roots() -> dict[str, Path]:
    """The cached emulated roots. Built for the first time (about 5 min each under emulation, mostly the
    maintainer scripts), both at once: each build is one emulated process at a time, so two use two cores."""
    if shutil.which("debootstrap") is None or not Path("/usr/bin/qemu-arm-static").exists():
        pytest.fail("debootstrap and qemu-user-static are needed; run ./scripts/test.sh, which installs them")
    with ThreadPoolExecutor(len(ARCHS)) as pool:
        futures = {arch: pool.submit(debian_root, f"bookworm-{arch}-deb", "bookworm", arch, ROOT_PACKAGES)
                   for arch in ARCHS}
        return {arch: future.result() for arch, future in futures.items()}


@pytest.mark.parametrize("arch", ARCHS)
def test_package_installs_and_answers_a_ping_on_emulated_arm(
        arch: str, arm_roots: dict[str, Path], debs: Debs, make_broker: Callable[..., Mosquitto], pki: PKI,
        tmp_path_factory: pytest.TempPathFactory) -> None:
    root = copy_root(arm_roots[arch], tmp_path_factory.mktemp(f"root-{arch}"))
    (root / "var/tmp" / debs.current.name).write_bytes(debs.current.read_bytes())

    def run(*argv: str, timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
        proc = in_root(root, arch, argv, timeout=timeout)
        assert proc.returncode == 0, f"{' '.join(argv)} ({arch}): {proc.returncode}\n{proc.stdout}{proc.stderr}"
        return proc

    assert run("uname", "-m").stdout.strip() == MACHINE[arch]  # really emulated
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
        agent.kill()
        agent.wait(timeout=30)
