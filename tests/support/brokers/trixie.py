"""The Debian 13 (trixie) root the other brokers run from: mosquitto 2.0.21 and RabbitMQ 4.0.

It is roots.ROOTS["trixie"], built and cached by tests/support/roots.py like every other root (the
same root the package's trixie test installs into, on a copy). Brokers run in it with chroot inside a
private mount namespace (`unshare --mount`): the /proc, /dev and per-test binds (the test's directory
over /t) vanish with the process, so a killed test leaves no mounts behind and the cached root is never
written to. The packages' maintainer scripts never started a broker in it (roots.py builds with a
policy-rc.d that refuses).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from tests.support import roots

SPEC = roots.ROOTS["trixie"]
CACHE = roots.CACHE
ROOT = SPEC.path


def unavailable() -> str | None:
    """Why a trixie root cannot be built or used here, or None."""
    if os.geteuid() != 0:
        return "the trixie broker root needs root (debootstrap, chroot, mount namespaces)"
    for tool in ("debootstrap", "unshare", "chroot"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian: apt-get install debootstrap util-linux coreutils)"
    return None


def ensure_root() -> Path:
    """The cached root, built first if missing (about 2 minutes, once per machine and package list)."""
    return roots.ensure(SPEC)


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
