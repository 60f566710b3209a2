"""System-tier fixtures: the Debian package (built once per session, two versions for upgrades)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.deb import build_deb, package_version


@dataclass(frozen=True)
class Debs:
    current: Path       # this checkout, at debian/changelog's version
    current_version: str
    newer: Path         # the same sources as the next version, for upgrade tests
    newer_version: str
    lintian_report: str


@pytest.fixture(scope="session")
def debs(tmp_path_factory: pytest.TempPathFactory) -> Debs:
    for tool in ("dpkg-buildpackage", "dh", "lintian"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed; run ./scripts/test.sh, which installs the package build tools")
    out = tmp_path_factory.mktemp("debs")
    current, report = build_deb(out, lintian=True)
    newer_version = f"{package_version()}+test1"
    newer, _ = build_deb(out, newer_version)
    return Debs(current, package_version(), newer, newer_version, report)


@dataclass(frozen=True)
class Repo:
    path: Path          # the repository tree (serve it, or use it as file:PATH)
    keyring: Path       # the public key gateways install
    gnupghome: Path     # holds the secret signing key
    fingerprint: str


def stop_gpg_agent(gnupghome: Path) -> None:
    """gpg starts a gpg-agent (and on newer GnuPG a keyboxd) per GNUPGHOME that outlives it: stop them."""
    subprocess.run(["gpgconf", "--kill", "all"], env={"GNUPGHOME": str(gnupghome), "PATH": "/usr/bin:/bin"},
                   capture_output=True, timeout=30, check=False)


@pytest.fixture(scope="session")
def apt_repo(debs: Debs, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Repo]:
    """A signed repository made by deploy/apt-repo.sh (with a new key) holding both versions."""
    for tool in ("gpg", "apt-ftparchive"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed; run ./scripts/test.sh (gnupg, apt-utils)")
    base = tmp_path_factory.mktemp("apt-repo")
    gnupghome, repo = base / "gnupg", base / "repo"
    script = str(Path(__file__).resolve().parents[2] / "deploy/apt-repo.sh")
    try:
        made = subprocess.run([script, "--new-key", "mqtt-agent test fleet", "--gnupghome", str(gnupghome),
                               "--out", str(repo), str(debs.current), str(debs.newer)],
                              capture_output=True, text=True, timeout=120)
        assert made.returncode == 0, made.stderr
        fingerprint = next(w for w in made.stdout.split() if len(w) == 40 and w.isalnum())
        yield Repo(repo, repo / "mqtt-agent-archive-keyring.gpg", gnupghome, fingerprint)
    finally:
        stop_gpg_agent(gnupghome)
