"""The Debian package as built by ./scripts/build-deb.sh: lintian, metadata, contents, the unit it ships."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.system.conftest import Debs

pytestmark = [pytest.mark.system, pytest.mark.timeout(600)]  # the session builds the package twice

REPO = Path(__file__).resolve().parents[2]


def field(deb: Path, name: str) -> str:
    return subprocess.run(["dpkg-deb", "--field", str(deb), name], capture_output=True, text=True,
                          check=True).stdout.strip()


def contents(deb: Path) -> dict[str, str]:
    """path -> 'mode owner/group' of every entry."""
    out = subprocess.run(["dpkg-deb", "--contents", str(deb)], capture_output=True, text=True, check=True).stdout
    entries = {}
    for line in out.splitlines():
        perms, owner, _size, _date, _time, path, *_ = line.split()
        entries[path.lstrip(".").rstrip("/") or "/"] = f"{perms} {owner}"
    return entries


def test_lintian_reports_no_errors_and_no_unexplained_warnings(debs: Debs) -> None:
    # build-deb.sh runs lintian --fail-on error (the build would have failed); warnings that remain
    # must be overridden, each with its reason, in debian/mqtt-agent.lintian-overrides.
    assert "lintian: no errors" in debs.lintian_report
    tags = [line for line in debs.lintian_report.splitlines() if re.match(r"^[EW]: ", line)]
    assert tags == []
    overrides = (REPO / "debian/mqtt-agent.lintian-overrides").read_text().split("\n\n")
    for block in overrides:
        lines = [ln for ln in block.strip().splitlines() if ln]
        assert lines and lines[0].startswith("#"), f"an override without its reason: {block!r}"


def test_one_architecture_independent_package_with_debians_compiled_dependencies(debs: Debs) -> None:
    assert field(debs.current, "Architecture") == "all"
    depends = field(debs.current, "Depends")
    for dep in ("python3 (>= 3.11)", "python3-cryptography (>= 3.4)", "python3-systemd", "python3-tomli-w (>= 1.0)",
                "adduser", "procps"):
        assert dep in depends
    # Carried inside instead: Debian 12/13 have older versions.
    assert "paho" not in depends and "prometheus" not in depends
    assert field(debs.newer, "Version") == debs.newer_version


def test_contents_program_unit_conffile_and_opt_in_polkit(debs: Debs) -> None:
    files = contents(debs.current)
    assert files["/usr/bin/mqtt-agent"].startswith("-rwxr-xr-x root/root")
    assert files["/etc/mqtt-agent/mqtt-agent.toml"] == "-rw-r----- root/root"
    assert "/lib/systemd/system/mqtt-agent.service" in files
    assert "/lib/systemd/system/mqtt-agent.socket" in files  # the local API (telemetry and events)
    assert "/usr/lib/mqtt-agent/agent/cli.py" in files
    assert "/usr/lib/mqtt-agent/vendor/paho/mqtt/client.py" in files
    assert "/usr/lib/mqtt-agent/vendor/prometheus_client/__init__.py" in files
    assert "/usr/lib/mqtt-agent/vendor/paho_mqtt-2.2.0.dist-info/licenses/epl-v20" in files
    assert not [p for p in files if "__pycache__" in p], "byte-code is compiled on the device (dh_python3)"
    # The polkit rule is an explicit opt-in: shipped as an example, never installed where polkit reads it.
    assert "/usr/share/doc/mqtt-agent/examples/polkit/50-mqtt-agent.rules" in files
    assert not [p for p in files if p.startswith(("/etc/polkit-1", "/usr/share/polkit-1"))]
    conffiles = subprocess.run(["dpkg-deb", "--info", str(debs.current), "conffiles"], capture_output=True,
                               text=True, check=True).stdout.split()
    assert conffiles == ["/etc/mqtt-agent/mqtt-agent.toml"]


def test_packaged_unit_is_the_repository_unit_with_the_packaged_path_and_a_config_condition(
        debs: Debs, tmp_path: Path) -> None:
    subprocess.run(["dpkg-deb", "-x", str(debs.current), str(tmp_path)], check=True)
    packaged = (tmp_path / "lib/systemd/system/mqtt-agent.service").read_text().splitlines()
    repo = (REPO / "systemd/mqtt-agent.service").read_text().replace(
        "/opt/mqtt-agent/bin/mqtt-agent", "/usr/bin/mqtt-agent").splitlines()
    assert [ln for ln in repo if ln.startswith("Exec")] != [], "the repository unit runs the venv's program"
    only_packaged = [ln for ln in packaged if ln not in repo and not ln.startswith("#")]
    only_repo = [ln for ln in repo if ln not in packaged and not ln.startswith("#")]
    assert only_repo == []
    assert only_packaged == [
        "ExecCondition=+/usr/bin/mqtt-agent check-config --quiet --config /etc/mqtt-agent/mqtt-agent.toml"]
    assert not [ln for ln in packaged if "/opt/mqtt-agent" in ln]
    assert "ExecStart=/usr/bin/mqtt-agent run --config /etc/mqtt-agent/mqtt-agent.toml" in packaged
    launcher = (tmp_path / "usr/bin/mqtt-agent").read_text()
    assert launcher.startswith("#!/usr/bin/python3 -I\n")


def test_packaging_scripts_are_shellcheck_clean() -> None:
    scripts = ["scripts/build-deb.sh", "deploy/apt-repo.sh", "debian/mqtt-agent.postinst", "debian/mqtt-agent.postrm"]
    result = subprocess.run(["shellcheck", "-x", *scripts], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout
