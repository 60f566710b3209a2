"""deploy/install.sh, run for real into staging trees (--root): system user, venv, unit, config, enable.

The staged venv is created with Debian's /usr/bin/python3 and the agent is pip-installed from this
checkout, exactly as on a device; only apt-get and the running systemd are left out (--root).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.agentproc import REPO

INSTALL = REPO / "deploy/install.sh"
VENV = "opt/mqtt-agent"
UNIT = "etc/systemd/system/mqtt-agent.service"
WANTS = "etc/systemd/system/multi-user.target.wants/mqtt-agent.service"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="install.sh creates users and chowns files: needs root")


def install(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(INSTALL), *args], capture_output=True, text=True, timeout=timeout,
                          cwd="/", stdin=subprocess.DEVNULL)


def snapshot(root: Path) -> dict[str, tuple[object, ...]]:
    """Everything a second run could change: type, mode, owner, size, mtime, content, link target."""
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            path = Path(dirpath, name)
            st = path.lstat()
            digest = ""
            if stat.S_ISREG(st.st_mode):
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
            link = str(path.readlink()) if stat.S_ISLNK(st.st_mode) else ""
            out[str(path.relative_to(root))] = (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns,
                                                digest, link)
    return out


def staged_id(root: Path, db: str, name: str) -> int:
    for line in (root / "etc" / db).read_text().splitlines():
        fields = line.split(":")
        if fields[0] == name:
            return int(fields[2])
    raise AssertionError(f"{name} not in {db} of {root}")


def site_packages(root: Path) -> Path:
    (lib,) = (root / VENV / "lib").glob("python3.*")
    return lib / "site-packages"


def venv_python(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # -I: import the staged package, not this checkout. The #! lines name /opt/mqtt-agent (the runtime
    # path), so the staged interpreter is called directly.
    return subprocess.run([str(root / VENV / "bin/python"), "-I", *args], capture_output=True, text=True,
                          timeout=60, cwd="/")


@pytest.fixture(scope="module")
def staged(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, subprocess.CompletedProcess[str]]]:
    root = tmp_path_factory.mktemp("stage") / "root"
    result = install("--root", str(root))
    yield root, result
    shutil.rmtree(root, ignore_errors=True)


def test_shellcheck_clean() -> None:
    result = subprocess.run(["shellcheck", str(INSTALL)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout
    assert result.stdout == ""


def test_usage_errors() -> None:
    for args, message in ((["--root", "relative/dir"], "--root must be an absolute path"),
                          (["--purge"], "--purge is only used with --uninstall"),
                          (["--systemd-python", "maybe"], "--systemd-python must be debian, build or none"),
                          (["--bogus"], "unknown option: --bogus")):
        result = install(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr
    helptext = install("--help")
    assert helptext.returncode == 0
    for word in ("--root", "--uninstall", "--purge", "aarch64", "armv7l", "piwheels"):
        assert word in helptext.stdout


def test_staged_install_tree(staged: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    root, result = staged
    assert result.returncode == 0, result.stdout + result.stderr
    assert "created system user and group mqtt-agent" in result.stdout
    assert "enabled mqtt-agent.service" in result.stdout
    # The static system user and group, created in the tree's own passwd/group.
    passwd = next(ln for ln in (root / "etc/passwd").read_text().splitlines() if ln.startswith("mqtt-agent:"))
    _, _, uid, gid, _, home, shell = passwd.split(":")
    assert int(uid) < 1000 and home == "/var/lib/mqtt-agent" and shell == "/usr/sbin/nologin"
    assert staged_id(root, "group", "mqtt-agent") == int(gid)
    # The unit exactly as in the repository, enabled by a wants/ link to its runtime path.
    unit = root / UNIT
    assert unit.read_bytes() == (REPO / "systemd/mqtt-agent.service").read_bytes()
    assert stat.S_IMODE(unit.stat().st_mode) == 0o644
    assert str((root / WANTS).readlink()) == "/etc/systemd/system/mqtt-agent.service"
    # The example config, readable by the service user only (and root).
    config = root / "etc/mqtt-agent/mqtt-agent.toml"
    st = config.stat()
    assert config.read_bytes() == (REPO / "etc/mqtt-agent.toml").read_bytes()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o640, 0, int(gid))
    assert stat.S_IMODE((root / "etc/mqtt-agent").stat().st_mode) == 0o755
    # The venv: scripts name the runtime interpreter, not the staging path.
    script = (root / VENV / "bin/mqtt-agent").read_text().splitlines()[0]
    assert script == "#!/opt/mqtt-agent/bin/python"
    assert str(root) not in (root / VENV / "pyvenv.cfg").read_text()
    # Debian's python3-systemd is borrowed by a link (resolved on the device), not built.
    assert str((site_packages(root) / "systemd").readlink()) == "/usr/lib/python3/dist-packages/systemd"


def test_staged_agent_runs(staged: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    root, _ = staged
    version = venv_python(root, "-m", "agent", "--version")
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == "mqtt-agent 0.1.0"
    where = venv_python(root, "-c", "import agent, paho.mqtt, prometheus_client, cryptography; print(agent.__file__)")
    assert where.stdout.strip().startswith(str(root / VENV / "lib"))
    # The example config loads with the installed dependencies and fails only for the files a device lacks.
    check = venv_python(root, "-m", "agent", "check-config", "--config", str(root / "etc/mqtt-agent/mqtt-agent.toml"))
    assert check.returncode == 78
    assert "tls.ca_file: /etc/mqtt-agent/ca.pem does not exist" in check.stderr
    assert "enroll" in venv_python(root, "-m", "agent", "enroll", "--help").stdout


def test_second_run_changes_nothing_and_keeps_an_edited_config(
        staged: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    root, _ = staged
    config = root / "etc/mqtt-agent/mqtt-agent.toml"
    config.write_text(config.read_text().replace('device_id = "gateway-0001"', 'device_id = "gw-edited"'))
    before = snapshot(root)
    again = install("--root", str(root))
    assert again.returncode == 0, again.stderr
    assert "nothing to do" in again.stdout
    assert snapshot(root) == before
    assert 'device_id = "gw-edited"' in config.read_text()


def test_upgrade_reinstalls_only_the_program_then_uninstall_and_purge(tmp_path: Path) -> None:
    root = tmp_path / "root"
    source = tmp_path / "src"
    source.mkdir()
    shutil.copy(REPO / "pyproject.toml", source)
    shutil.copytree(REPO / "agent", source / "agent", ignore=shutil.ignore_patterns("__pycache__"))
    first = install("--root", str(root), "--source", str(source), "--systemd-python", "none")
    assert first.returncode == 0, first.stdout + first.stderr
    assert not (site_packages(root) / "systemd").is_symlink()
    assert (site_packages(root) / "agent/tools/enroll.py").is_file()
    unit_mtime = (root / UNIT).stat().st_mtime_ns
    init = source / "agent/__init__.py"
    init.write_text(init.read_text().replace('__version__ = "0.1.0"', '__version__ = "0.1.0.post1"'))
    upgrade = install("--root", str(root), "--source", str(source), "--systemd-python", "none")
    assert upgrade.returncode == 0, upgrade.stderr
    assert "installed mqtt-agent 0.1.0.post1 into /opt/mqtt-agent" in upgrade.stdout
    assert "created" not in upgrade.stdout and "enabled" not in upgrade.stdout
    assert (root / UNIT).stat().st_mtime_ns == unit_mtime
    assert venv_python(root, "-m", "agent", "--version").stdout.strip() == "mqtt-agent 0.1.0.post1"
    # A key the operator enrolled must survive a plain uninstall.
    key = root / "etc/mqtt-agent/device.key"
    key.write_text("key material\n")
    key.chmod(0o600)
    removed = install("--root", str(root), "--uninstall")
    assert removed.returncode == 0, removed.stderr
    for gone in (VENV, UNIT, WANTS, "usr/lib/sysusers.d/mqtt-agent.conf"):
        assert not (root / gone).exists() and not (root / gone).is_symlink(), gone
    assert key.read_text() == "key material\n"
    assert "kept /etc/mqtt-agent" in removed.stdout
    assert "nothing to do" in install("--root", str(root), "--uninstall").stdout
    purged = install("--root", str(root), "--uninstall", "--purge")
    assert purged.returncode == 0 and "removed /etc/mqtt-agent" in purged.stdout
    assert not (root / "etc/mqtt-agent").exists()
    # The user stays (files elsewhere may still belong to it); a reinstall reuses it.
    assert staged_id(root, "passwd", "mqtt-agent") < 1000
