"""deploy/apt-repo.sh: a signed repository that apt (with signed-by) accepts, and refuses once altered."""

from __future__ import annotations

import gzip
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.system.conftest import Debs, Repo, stop_gpg_agent

pytestmark = [pytest.mark.system, pytest.mark.timeout(600)]  # the session builds the package twice


def apt(state: Path, repo: Path, keyring: Path, *argv: str, arch: str = "arm64") -> subprocess.CompletedProcess[str]:
    """apt-get/apt-cache with a private state, this repository as the only source, and the gateway's
    sources line (signed-by: only this key may sign it)."""
    (state / "lists/partial").mkdir(parents=True, exist_ok=True)
    (state / "cache/archives/partial").mkdir(parents=True, exist_ok=True)
    sources = state / "mqtt-agent.list"
    sources.write_text(f"deb [signed-by={keyring}] file:{repo} stable main\n")
    opts = [f"-oDir::State={state}", f"-oDir::State::Lists={state}/lists", f"-oDir::Cache={state}/cache",
            f"-oDir::Etc::SourceList={sources}", "-oDir::Etc::SourceParts=/nonexistent",
            "-oDir::State::Status=/dev/null", f"-oAPT::Architecture={arch}", "-oAPT::Sandbox::User=root",
            "-oDebug::NoLocking=1"]
    return subprocess.run([argv[0], *opts, *argv[1:]], capture_output=True, text=True, timeout=120)


def test_apt_accepts_the_repository_and_offers_the_newest_version_on_every_architecture(
        apt_repo: Repo, debs: Debs, tmp_path: Path) -> None:
    for arch in ("amd64", "arm64", "armhf", "armel"):
        state = tmp_path / arch
        update = apt(state, apt_repo.path, apt_repo.keyring, "apt-get", "update", arch=arch)
        assert update.returncode == 0 and "W:" not in update.stderr, update.stderr
        policy = apt(state, apt_repo.path, apt_repo.keyring, "apt-cache", "policy", "mqtt-agent", arch=arch).stdout
        assert f"Candidate: {debs.newer_version}" in policy
        assert f" {debs.current_version} " in policy  # the older one stays installable (apt install mqtt-agent=V)
    pool = sorted(p.name for p in (apt_repo.path / "pool/main/m/mqtt-agent").iterdir())
    assert pool == sorted([debs.current.name, debs.newer.name])


def test_apt_refuses_an_altered_repository_and_another_key(apt_repo: Repo, tmp_path: Path) -> None:
    tampered = tmp_path / "tampered"
    shutil.copytree(apt_repo.path, tampered)
    packages = tampered / "dists/stable/main/binary-arm64/Packages"
    # An index changed by someone without the key (consistent in itself, but not what Release signs).
    packages.write_text(packages.read_text().replace("Maintainer:", "Maintainer: someone else,"))
    (packages.parent / "Packages.gz").write_bytes(gzip.compress(packages.read_bytes()))
    update = apt(tmp_path / "s1", tampered, apt_repo.keyring, "apt-get", "update")
    policy = apt(tmp_path / "s1", tampered, apt_repo.keyring, "apt-cache", "policy", "mqtt-agent").stdout
    assert update.returncode == 100 and "Hash Sum mismatch" in update.stderr, update.stderr
    assert "Candidate:" not in policy

    other = tmp_path / "other-key"
    other.mkdir(mode=0o700)
    gpg_env = {"GNUPGHOME": str(other), "PATH": "/usr/bin:/bin"}
    wrong = tmp_path / "wrong.gpg"
    try:
        subprocess.run(["gpg", "--batch", "--quiet", "--passphrase", "", "--quick-generate-key", "someone else",
                        "ed25519", "sign", "never"], env=gpg_env, check=True, capture_output=True, timeout=60)
        wrong.write_bytes(subprocess.run(["gpg", "--batch", "--export"], env=gpg_env, capture_output=True,
                                         check=True, timeout=60).stdout)
    finally:
        stop_gpg_agent(other)
    update = apt(tmp_path / "s2", apt_repo.path, wrong, "apt-get", "update")
    policy = apt(tmp_path / "s2", apt_repo.path, wrong, "apt-cache", "policy", "mqtt-agent").stdout
    assert update.returncode == 100 and "NO_PUBKEY" in update.stderr and "is not signed" in update.stderr
    assert "Candidate:" not in policy
