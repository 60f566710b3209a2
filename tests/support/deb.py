"""The Debian package, built by the tests with ./scripts/build-deb.sh (the command the README gives)."""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BUILD = REPO / "scripts" / "build-deb.sh"


def package_version() -> str:
    return subprocess.run(["dpkg-parsechangelog", "-l", str(REPO / "debian/changelog"), "-S", "Version"],
                          capture_output=True, text=True, check=True).stdout.strip()


def build_deb(out: Path, version: str | None = None, *, lintian: bool = False) -> tuple[Path, str]:
    """Build into `out`; the .deb's path and build-deb's output (lintian's report included)."""
    argv = [str(BUILD), "--no-apt", "--out", str(out)]
    if version:
        argv += ["--version", version]
    if not lintian:
        argv.append("--no-lintian")
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"build-deb.sh failed ({proc.returncode}):\n{proc.stdout[-4000:]}{proc.stderr[-4000:]}")
    deb = out / f"mqtt-agent_{version or package_version()}_all.deb"
    assert deb.is_file(), f"build-deb.sh did not write {deb}:\n{proc.stdout}"
    return deb, proc.stdout + proc.stderr
