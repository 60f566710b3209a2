"""A debootstrapped Debian 13 (trixie) root holding mosquitto 2.0.21 and RabbitMQ 4.0, cached.

The root is built once per machine under /var/cache/mqtt-agent-tests/trixie-brokers-<version>: into a
temp dir next to it, then renamed into place, so an interrupted build never looks finished. The
version string hashes the package list, so a changed list builds a new root. Brokers run in it with
chroot inside a private mount namespace (`unshare --mount`): the /proc, /dev and per-test binds vanish
with the process, so a killed test leaves no mounts behind.

Packages are installed in a second step, after a policy-rc.d that returns 101 is in place, so their
postinst scripts never start a broker inside the root.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import IO

CACHE = Path(os.environ.get("MQTT_AGENT_TEST_CACHE", "/var/cache/mqtt-agent-tests"))
MIRROR = os.environ.get("DEBIAN_MIRROR", "http://deb.debian.org/debian")
SUITE = "trixie"
PACKAGES = ("mosquitto", "rabbitmq-server")
VERSION = "1-" + hashlib.sha256(" ".join((SUITE, *PACKAGES)).encode()).hexdigest()[:10]
ROOT = CACHE / f"trixie-brokers-{VERSION}"


def unavailable() -> str | None:
    """Why a trixie root cannot be built or used here, or None."""
    if os.geteuid() != 0:
        return "the trixie broker root needs root (debootstrap, chroot, mount namespaces)"
    for tool in ("debootstrap", "unshare", "chroot"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian: apt-get install debootstrap util-linux coreutils)"
    return None


def ensure_root() -> Path:
    """The cached root, built first if missing (about 2 minutes, once per machine and package list).

    The build's output goes to a log next to the cache; a failure raises with its tail."""
    if (ROOT / ".complete").exists():
        return ROOT
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".trixie-brokers.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (ROOT / ".complete").exists():
            return ROOT
        tmp = CACHE / f".trixie-brokers-{VERSION}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        started = time.monotonic()
        log_path = CACHE / f"trixie-brokers-{VERSION}.build.log"
        log = open(log_path, "w")  # noqa: SIM115 - closed below; handed to the child processes
        try:
            _build(tmp, log)
        except subprocess.CalledProcessError as exc:
            log.close()
            shutil.rmtree(tmp, ignore_errors=True)
            tail = log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"building the trixie broker root failed ({exc}); {log_path}:\n{tail}") from exc
        log.close()
        (tmp / ".complete").write_text(f"built in {time.monotonic() - started:.0f} s\n")
        shutil.rmtree(ROOT, ignore_errors=True)
        tmp.rename(ROOT)
        return ROOT


def _build(tmp: Path, log: IO[str]) -> None:
    """debootstrap, then the packages with a policy-rc.d that keeps their services from starting."""
    subprocess.run(["debootstrap", "--variant=minbase", SUITE, str(tmp), MIRROR],
                   check=True, stdout=log, stderr=log)
    (tmp / "t").mkdir()  # where each broker binds its workdir
    policy = tmp / "usr/sbin/policy-rc.d"
    policy.write_text("#!/bin/sh\n# built for tests: never start services in this root\nexit 101\n")
    policy.chmod(0o755)
    shutil.copy("/etc/resolv.conf", tmp / "etc/resolv.conf")
    script = ("apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "
              "--no-install-recommends " + " ".join(PACKAGES) + " && apt-get clean")
    subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                    f"mount -t proc proc {tmp}/proc && mount --rbind /dev {tmp}/dev && "
                    f"exec chroot {tmp} sh -c '{script}'"],
                   check=True, stdout=log, stderr=log)


def chroot_command(argv: list[str], binds: dict[Path, str], *, root: Path = ROOT) -> list[str]:
    """argv run in `root` in a private mount namespace, with host dirs bound at the given paths."""
    mounts = [f"mount -t proc proc {root}/proc", f"mount --rbind /dev {root}/dev"]
    for host, inside in binds.items():
        target = f"{root}{inside}"
        mounts.append(f"mkdir -p {target} && mount --bind {host} {target}")
    quoted = " ".join("'" + a.replace("'", "'\\''") + "'" for a in argv)
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c",
            " && ".join(mounts) + f" && exec chroot {root} {quoted}"]


if __name__ == "__main__":
    print(ensure_root())
