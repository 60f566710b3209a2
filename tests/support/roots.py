"""Debian root file systems for system tests, made once with debootstrap and cached: the one builder.

    root = ensure(ROOTS["systemd"])          # every root the tests use is in ROOTS
    python -m tests.support.prebuild          # build them all (scripts/test.sh does, in the background)

A root is built into a temporary directory next to the cache entry and renamed into place when complete,
so a run killed half-way leaves no broken root behind; a lock file per root makes a second process (a
test run while the prebuild builds) wait instead of building it too. Each entry records the key it was
built from (suite, architecture, variant, package list, RECIPE); a changed key rebuilds it. The cache
lives in /var/cache/mqtt-agent-tests (MQTT_AGENT_TEST_CACHE overrides it). Tests never boot or change a
cached root itself: they work on a copy (copy_root), or, for the brokers in the trixie root, run them
in place with the test's own directory bound over /t in a private mount namespace.

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
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

CACHE = Path(os.environ.get("MQTT_AGENT_TEST_CACHE", "/var/cache/mqtt-agent-tests"))
MIRROR = os.environ.get("DEBIAN_MIRROR", "http://deb.debian.org/debian")
# Bump when the way roots are built changes (not the package list: that is part of the key already).
RECIPE = "1"
KEY_FILE = ".mqtt-agent-test-root"
# Set by scripts/test.sh to the directory of its background prebuild (tests/support/prebuild.py): a
# root whose build failed there is reported with the build's log instead of being built again.
PREBUILD_ENV = "MQTT_AGENT_PREBUILD"

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


def host_arch() -> str:
    return subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True, check=True).stdout.strip()


@dataclass(frozen=True)
class RootSpec:
    """One cached root: CACHE/name, debootstrapped from suite for arch, then `packages` through apt."""

    name: str
    suite: str
    arch: str
    packages: tuple[str, ...]
    variant: str = "minbase"
    dirs: tuple[str, ...] = ()  # empty directories made in the root (bind-mount targets of the tests)

    @property
    def path(self) -> Path:
        return CACHE / self.name

    def key(self) -> str:
        """What the root is built from; a root whose KEY_FILE differs is rebuilt. (The format of the
        roots without `dirs` is the one the first roots were built with, so those stay valid.)"""
        key = (f"recipe={RECIPE} suite={self.suite} arch={self.arch} variant={self.variant} "
               f"packages={','.join(sorted(self.packages))}")
        if self.dirs:
            key += f" dirs={','.join(sorted(self.dirs))}"
        return key + "\n"

    def valid(self) -> bool:
        try:
            return (self.path / KEY_FILE).read_text() == self.key()
        except OSError:
            return False


HOST = host_arch()
# The package's dependencies, so that it installs offline (tests/system/test_deb_roots.py).
DEB_PACKAGES = ("python3", "python3-cryptography", "python3-systemd", "python3-tomli-w", "adduser", "procps")
# The Debian 12 the system tests boot with systemd as PID 1 (tests/system/test_deb_nspawn.py and
# test_containment_systemd.py): systemd, and the package's dependencies so that it installs offline.
BOOKWORM_SYSTEMD_PACKAGES = ("systemd", "systemd-sysv", "dbus", "python3", "python3-cryptography", "python3-systemd",
                             "python3-tomli-w", "adduser", "procps", "mosquitto")
# Every cached root by the name tests ask for it (tests.support.prebuild builds them all):
#   systemd        bookworm, booted in systemd-nspawn (the package, the hardened unit)
#   arm64, armhf   bookworm under qemu-user-static (the package on a Raspberry Pi's OS)
#   trixie         Debian 13, natively: the package installs there (a copy per test), and the other
#                  brokers (mosquitto 2.0.21, RabbitMQ 4.0) run from it in place with the test's
#                  directory bound at /t (tests/support/brokers/trixie.py). One root for both: one
#                  debootstrap less on a fresh machine.
ROOTS: dict[str, RootSpec] = {
    "systemd": RootSpec(f"bookworm-{HOST}-systemd", "bookworm", HOST, BOOKWORM_SYSTEMD_PACKAGES),
    "arm64": RootSpec("bookworm-arm64-deb", "bookworm", "arm64", DEB_PACKAGES),
    "armhf": RootSpec("bookworm-armhf-deb", "bookworm", "armhf", DEB_PACKAGES),
    "trixie": RootSpec(f"trixie-{HOST}", "trixie", HOST, (*DEB_PACKAGES, "mosquitto", "rabbitmq-server"),
                       dirs=("t",)),
}


def bookworm_systemd_root() -> Path:
    """The cached, bootable Debian 12 root (built on first use: about 1-2 min)."""
    return ensure(ROOTS["systemd"])


def lock(spec: RootSpec) -> IO[str]:
    """The open lock file of this root (flock it): whoever holds it may build the root."""
    CACHE.mkdir(parents=True, exist_ok=True)
    return open(CACHE / f".{spec.name}.lock", "w")


def failure_file(spec: RootSpec) -> Path | None:
    """Where the background prebuild records that it failed to build this root (see PREBUILD_ENV)."""
    prebuild = os.environ.get(PREBUILD_ENV)
    return Path(prebuild) / f"{spec.name}.failed" if prebuild else None


def ensure(spec: RootSpec, *, timeout: float = 1800.0, log: IO[str] | None = None) -> Path:
    """The cached root of `spec`, built now if missing or stale. Another process building it (the
    background prebuild, another test run): wait for it. If the prebuild failed to build it, raise
    with the prebuild's log rather than try again."""
    with lock(spec) as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        if spec.valid():
            return spec.path
        failed = failure_file(spec)
        if failed is not None and failed.exists():
            raise RootError(f"the background prebuild failed to build {spec.path}:\n{failed.read_text()}")
        build_locked(spec, timeout=timeout, log=log)
    return spec.path


def build_locked(spec: RootSpec, *, timeout: float = 1800.0, log: IO[str] | None = None) -> None:
    """Build `spec` into a temporary directory next to its cache entry and rename it into place. The
    caller holds the root's lock (so temporary directories left by a killed build are stale)."""
    for stale in CACHE.glob(f".{spec.name}.building-*"):
        remove_tree(stale)
    tmp = CACHE / f".{spec.name}.building-{os.getpid()}-{threading.get_ident()}"
    try:
        _build(tmp, spec, timeout, log)
        (tmp / KEY_FILE).write_text(spec.key())
        if spec.path.exists():
            old = CACHE / f".{spec.name}.building-old-{os.getpid()}"
            spec.path.rename(old)
            remove_tree(old)
        tmp.rename(spec.path)
    finally:
        remove_tree(tmp)


def debian_root(name: str, suite: str, arch: str, packages: Sequence[str], *, variant: str = "minbase",
                timeout: float = 1800.0) -> Path:
    """The cached root CACHE/name for (suite, arch, packages), built now if missing or stale."""
    return ensure(RootSpec(name, suite, arch, tuple(packages), variant), timeout=timeout)


def remove_tree(path: Path) -> None:
    """rm -rf, after unmounting anything still mounted below `path` (a build killed half-way)."""
    if not path.exists():
        return
    prefix = str(path.resolve()) + "/"
    with open("/proc/self/mountinfo") as fh:
        mounts = [line.split()[4] for line in fh]
    for point in sorted((m for m in mounts if m.startswith(prefix)), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)
    shutil.rmtree(path, ignore_errors=True)


def _run(argv: Sequence[str], timeout: float, what: str, log: IO[str] | None) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    _check(proc, what, log)


def _build(tmp: Path, spec: RootSpec, timeout: float, log: IO[str] | None) -> None:
    if shutil.which("debootstrap") is None:
        raise RootError("debootstrap is not installed; run ./scripts/test.sh, which installs it")
    deadline = time.monotonic() + timeout
    started = time.monotonic()

    def left() -> float:
        return max(60.0, deadline - time.monotonic())

    def step(what: str) -> None:
        if log is not None:
            log.write(f"[{spec.name} +{time.monotonic() - started:.0f} s] {what}\n")
            log.flush()

    common = ["debootstrap", f"--variant={spec.variant}", f"--arch={spec.arch}"]
    if spec.arch == HOST:
        # In a mount namespace of its own: the /proc and /sys debootstrap mounts in the root vanish
        # with it, even if the build is killed.
        step("debootstrap")
        _run(["unshare", "--mount", "--propagation", "private", *common, spec.suite, str(tmp), MIRROR], left(),
             "debootstrap", log)
    else:
        # First stage on the host (download and unpack: nothing of the target runs), second stage
        # (the maintainer scripts) under qemu inside the root. container=lxc: debootstrap then does not
        # insist on creating a device node (not allowed in a user namespace; the first stage made them).
        step("debootstrap --foreign")
        _run([*common, "--foreign", spec.suite, str(tmp), MIRROR], left(), "debootstrap --foreign", log)
        step("debootstrap --second-stage (emulated)")
        _check(in_root(tmp, spec.arch, ["/debootstrap/debootstrap", "--second-stage"], timeout=left(),
                       env={"container": "lxc"}), f"debootstrap --second-stage ({spec.arch})", log)
    for d in spec.dirs:
        (tmp / d).mkdir(parents=True, exist_ok=True)
    # The packages through apt, not debootstrap's --include: apt orders the configuration of python3
    # and its modules correctly (debootstrap --include=python3-cryptography fails to configure).
    # While they install, a policy-rc.d that says 101 keeps their maintainer scripts from starting a
    # service (a broker on the host's network) in the root; removed afterwards, so that a test that
    # boots a copy of the root or installs a package in it sees an ordinary Debian.
    policy = tmp / "usr/sbin/policy-rc.d"
    policy.write_text("#!/bin/sh\n# while the test root is built: start no services\nexit 101\n")
    policy.chmod(0o755)
    shutil.copy2("/etc/resolv.conf", tmp / "etc/resolv.conf")
    (tmp / "etc/hosts").write_text("127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n")
    apt_env = {"DEBIAN_FRONTEND": "noninteractive"}
    step("apt-get update")
    _check(in_root(tmp, spec.arch, ["apt-get", "update", "-qq"], timeout=left(), env=apt_env), "apt-get update", log)
    if spec.packages:
        step(f"apt-get install {' '.join(spec.packages)}")
        _check(in_root(tmp, spec.arch, ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *spec.packages],
                       timeout=left(), env=apt_env), f"apt-get install {' '.join(spec.packages)}", log)
    _check(in_root(tmp, spec.arch, ["apt-get", "clean"], timeout=left()), "apt-get clean", log)
    (tmp / "etc/resolv.conf").unlink()
    policy.unlink()
    step("done")


def _check(proc: subprocess.CompletedProcess[str], what: str, log: IO[str] | None = None) -> None:
    if log is not None:
        log.write(proc.stdout[-20000:] + proc.stderr[-20000:])
        log.flush()
    if proc.returncode != 0:
        args = proc.args if isinstance(proc.args, str) else " ".join(map(str, proc.args))
        raise RootError(f"{what} failed ({proc.returncode}): {args[:300]}\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")


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
    foreign = arch != HOST
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
