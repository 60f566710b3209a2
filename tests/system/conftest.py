"""System-tier fixtures: the Debian package (built once per session, two versions for upgrades)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.deb import build_deb, package_version


@dataclass(frozen=True)
class Debs:
    current: Path       # this checkout, at debian/changelog's version
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
    return Debs(current, newer, newer_version, report)
