"""Debian root file systems for system tests, made once with debootstrap and cached.

    root = debian_root("bookworm-amd64-systemd", "bookworm", "amd64", ["systemd", ...])

A root is built into a temporary directory next to the cache entry and renamed into place when complete,
so a run killed half-way leaves no broken root behind. Each entry records the key it was built from
(suite, architecture, variant, package list, RECIPE); a changed key rebuilds it. The cache lives in
/var/cache/mqtt-agent-tests (MQTT_AGENT_TEST_CACHE overrides it). Tests never boot or change a cached
root itself: they work on a copy (copy_root).

Foreign architectures (arm64, armhf) are emulated with Debian's qemu-user-static. The kernel runs an ARM
binary through qemu only if binfmt_misc says so; rather than registering qemu for the whole machine,
`in_root` creates a user namespace (uids 0-65535 mapped to themselves, so files keep their real
owners), mounts a private binfmt_misc instance there (Linux >= 6.7) and registers qemu in it: the
registration disappears with the namespace.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

CACHE = Path(os.environ.get("MQTT_AGENT_TEST_CACHE", "/var/cache/mqtt-agent-tests"))
MIRROR = "http://deb.debian.org/debian"
# Bump when the way roots are built changes (not the package list: that is part of the key already).
RECIPE = "1"
KEY_FILE = ".mqtt-agent-test-root"

# Debian architecture -> (qemu-user-static binary, binfmt_misc magic, mask); from qemu-user-static's
# /usr/lib/binfmt.d/qemu-*.conf.
_ELF_MASK = r"\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff"
QEMU = {
    "arm64": ("/usr/bin/qemu-aarch64-static",
              r"\x7f\x45\x4c\x46\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00"),
    "armhf": ("/usr/bin/qemu-arm-static",
              r"\x7f\x45\x4c\x46\x01\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\x28\x00"),
}
QEMU["armel"] = QEMU["armhf"]


class RootError(RuntimeError):
    pass


# The Debian 12 the system tests boot with systemd as PID 1 (tests/system/test_deb_nspawn.py and
# test_containment_systemd.py): systemd, and the package's dependencies so that it installs offline.
BOOKWORM_SYSTEMD_PACKAGES = ["systemd", "systemd-sysv", "dbus", "python3", "python3-cryptography", "python3-systemd",
                             "python3-tomli-w", "adduser", "procps", "mosquitto"]


def bookworm_systemd_root() -> Path:
    """The cached, bootable Debian 12 root (built on first use: about 1-2 min)."""
    return debian_root(f"bookworm-{host_arch()}-systemd", "bookworm", host_arch(), BOOKWORM_SYSTEMD_PACKAGES)


def host_arch() -> str:
    return subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True, check=True).stdout.strip()


def _key(suite: str, arch: str, variant: str, packages: Sequence[str]) -> str:
    return f"recipe={RECIPE} suite={suite} arch={arch} variant={variant} packages={','.join(sorted(packages))}\n"


def debian_root(name: str, suite: str, arch: str, packages: Sequence[str], *, variant: str = "minbase",
                timeout: float = 1800.0) -> Path:
    """The cached root CACHE/name for (suite, arch, packages), built now if missing or stale."""
    CACHE.mkdir(parents=True, exist_ok=True)
    dest = CACHE / name
    key = _key(suite, arch, variant, packages)
    with open(CACHE / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another test run building the same root: wait for it
        if (dest / KEY_FILE).exists() and (dest / KEY_FILE).read_text() == key:
            return dest
        tmp = CACHE / f".{name}.building-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            _build(tmp, suite, arch, variant, packages, timeout)
            (tmp / KEY_FILE).write_text(key)
            if dest.exists():
                old = CACHE / f".{name}.old-{os.getpid()}"
                dest.rename(old)
                shutil.rmtree(old)
            tmp.rename(dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _run(argv: Sequence[str], timeout: float, what: str) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RootError(
            f"{what} failed ({proc.returncode}): {' '.join(argv)}\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")


def _build(tmp: Path, suite: str, arch: str, variant: str, packages: Sequence[str], timeout: float) -> None:
    if shutil.which("debootstrap") is None:
        raise RootError("debootstrap is not installed; run ./scripts/test.sh, which installs it")
    deadline = time.monotonic() + timeout

    def left() -> float:
        return max(60.0, deadline - time.monotonic())

    common = ["debootstrap", f"--variant={variant}", f"--arch={arch}"]
    if arch == host_arch():
        _run([*common, suite, str(tmp), MIRROR], left(), "debootstrap")
    else:
        # First stage on the host (download and unpack: nothing of the target runs), second stage
        # (the maintainer scripts) under qemu inside the root. container=lxc: debootstrap then does not
        # insist on creating a device node (not allowed in a user namespace; the first stage made them).
        _run([*common, "--foreign", suite, str(tmp), MIRROR], left(), "debootstrap --foreign")
        _check(in_root(tmp, arch, ["/debootstrap/debootstrap", "--second-stage"], timeout=left(),
                       env={"container": "lxc"}), f"debootstrap --second-stage ({arch})")
    # The packages through apt, not debootstrap's --include: apt orders the configuration of python3
    # and its modules correctly (debootstrap --include=python3-cryptography fails to configure).
    shutil.copy2("/etc/resolv.conf", tmp / "etc/resolv.conf")
    (tmp / "etc/hosts").write_text("127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n")
    apt_env = {"DEBIAN_FRONTEND": "noninteractive"}
    _check(in_root(tmp, arch, ["apt-get", "update", "-qq"], timeout=left(), env=apt_env), "apt-get update")
    if packages:
        _check(in_root(tmp, arch, ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages],
                       timeout=left(), env=apt_env), f"apt-get install {' '.join(packages)}")
    _check(in_root(tmp, arch, ["apt-get", "clean"], timeout=left()), "apt-get clean")
    (tmp / "etc/resolv.conf").unlink()


def _check(proc: subprocess.CompletedProcess[str], what: str) -> None:
    if proc.returncode != 0:
        raise RootError(f"{what} failed ({proc.returncode}):\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")


def copy_root(src: Path, dest: Path) -> Path:
    """A private copy of a cached root for one test (cp -a keeps owners, modes and device nodes)."""
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(["cp", "-a", "--reflink=auto", f"{src}/.", str(dest)], check=True, timeout=600)
    return dest


# The script run as "root" in the new user namespace: a private binfmt_misc with qemu registered (F: the
# kernel opens qemu now, so the chroot does not need it), /proc and /dev for the root, then chroot.
_EMU_SCRIPT = r"""
set -e
if [ -n "$EMU_REGISTER" ]; then
    mount -t binfmt_misc none /proc/sys/fs/binfmt_misc
    printf '%s' "$EMU_REGISTER" >/proc/sys/fs/binfmt_misc/register
fi
root="$1"; shift
mount --make-rprivate /
mount -t proc proc "$root/proc"
mount --rbind /dev "$root/dev"
mount -t tmpfs tmpfs "$root/tmp"
[ -d "$root/run" ] && mount -t tmpfs tmpfs "$root/run"
exec chroot "$root" "$@"
"""


def spawn_in_root(root: Path, arch: str, argv: Sequence[str], *, env: dict[str, str] | None = None,
                  stdout: Any = subprocess.PIPE) -> subprocess.Popen[str]:
    """Start argv as root inside `root` (chroot with its own /proc, /tmp, /run; the host's /dev), in a
    mount and PID namespace of its own; killing the returned process ends everything in it. A
    foreign-architecture root runs under qemu-user-static, in a user namespace too (see the module's
    docstring). The host's network is shared (a broker on the host's loopback is reachable); nothing
    is registered or stays mounted outside the namespaces. The caller writes one line to stdin ("go")
    before anything else: see release()."""
    foreign = arch != host_arch()
    register = ""
    if foreign:
        qemu, magic = QEMU[arch]
        if not Path(qemu).exists():
            raise RootError(f"{qemu} is missing; run ./scripts/test.sh, which installs qemu-user-static")
        register = f":mqtt-agent-{arch}:M::{magic}:{_ELF_MASK}:{qemu}:F"
    run_env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "HOME": "/root",
               "EMU_REGISTER": register, **(env or {})}
    ns = ["--user"] if foreign else []
    proc = subprocess.Popen(
        ["unshare", *ns, "--mount", "--pid", "--fork", "--kill-child",
         "sh", "-c", 'read -r _ && exec sh -c "$0" emu "$@"', _EMU_SCRIPT, str(root), *argv],
        stdin=subprocess.PIPE, stdout=stdout, stderr=subprocess.STDOUT if stdout is not subprocess.PIPE
        else subprocess.PIPE, text=True, env=run_env)
    try:
        if foreign:
            _map_ids(proc.pid)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc


def in_root(root: Path, arch: str, argv: Sequence[str], *, timeout: float = 600.0,
            env: dict[str, str] | None = None, input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run argv inside `root` to completion (see spawn_in_root)."""
    proc = spawn_in_root(root, arch, argv, env=env)
    try:
        out, err = proc.communicate(f"go\n{input or ''}", timeout=timeout)
    except BaseException:
        stop_in_root(proc)
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def stop_in_root(proc: subprocess.Popen[str], timeout: float = 30.0) -> list[int]:
    """End everything spawn_in_root started.

    Killing `unshare` alone is not enough for a foreign root: writing the child's uid map changes its
    credentials, which clears the parent-death signal that --kill-child relies on, so the namespace's init
    (the program itself, by exec) outlived the test, reparented to the host's PID 1. Killing that init ends
    its PID namespace and every process in it. Returns the host pids of the inits it killed.
    """
    try:
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    except OSError:
        children = []
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)
    proc.kill()
    proc.wait(timeout=timeout)
    return [int(pid) for pid in children]


def alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _map_ids(pid: int) -> None:
    """Map uids and gids 0-65535 of the new user namespace of `pid` to the same host ids. Only a
    privileged parent can write such a map (newuidmap would want /etc/subuid entries)."""
    own = Path("/proc/self/ns/user").readlink()
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}/ns/user").readlink() == own:
        if time.monotonic() > deadline:
            raise RootError("unshare did not create its user namespace within 10 s")
        time.sleep(0.005)
    for name in ("uid_map", "gid_map"):
        with open(f"/proc/{pid}/{name}", "w") as fh:
            fh.write("0 0 65536\n")
