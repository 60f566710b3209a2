"""The systemd unit: `systemd-analyze verify` is clean, `systemd-analyze security` rates the exposure at or
below 1.5, and the unit keeps the contracts the agent and the installers rely on."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest

from agent.config import CREDENTIAL_KEYS, CREDENTIAL_UNSET, AgentConfig
from agent.errors import EX_CONFIG

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "mqtt-agent.service"
MAX_EXPOSURE = 1.5


def systemd_analyze(*args: str) -> subprocess.CompletedProcess[str]:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.fail("systemd-analyze is not installed; run ./scripts/test.sh, which installs it (Debian: systemd)")
    cmd = [path, *args]
    if os.geteuid() == 0 and shutil.which("unshare"):
        # As root, systemd-analyze stamps /run/systemd/systemd-units-load; keep that in a private tmpfs.
        cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
               'mount -t tmpfs tmpfs /run/systemd && exec "$@"', "sh", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def directives(path: Path = UNIT) -> dict[str, list[str]]:
    """Key -> values (in order) of the [Service] section, comments and blank lines skipped."""
    out: dict[str, list[str]] = defaultdict(list)
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
            continue
        key, _, value = line.partition("=")
        out[f"{section}{key}"].append(value)
    return out


def service(key: str) -> list[str]:
    return directives()[f"[Service]{key}"]


def test_systemd_analyze_verify_reports_nothing(tmp_path: Path):
    # verify needs the unit's executables and the system's units; give it both in a scratch root
    # rather than installing anything on this machine.
    root = tmp_path / "root"
    (root / "etc/systemd/system").mkdir(parents=True)
    (root / "usr/lib/systemd").mkdir(parents=True)
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    for exe in (root / "opt/mqtt-agent/bin/mqtt-agent", root / "bin/kill"):
        exe.parent.mkdir(parents=True, exist_ok=True)
        exe.write_text("#!/bin/sh\n")
        exe.chmod(0o755)
    shutil.copy(UNIT, root / "etc/systemd/system" / UNIT.name)
    shutil.copy(UNIT.with_suffix(".socket"), root / "etc/systemd/system" / "mqtt-agent.socket")
    result = systemd_analyze("verify", f"--root={root}", UNIT.name, "mqtt-agent.socket")
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_security_exposure_is_at_most_1_5():
    result = systemd_analyze("security", "--offline=true", "--no-pager", str(UNIT))
    match = re.search(r"Overall exposure level for mqtt-agent\.service: (\d+\.\d)", result.stdout)
    assert match, result.stdout + result.stderr
    exposure = float(match.group(1))
    assert exposure <= MAX_EXPOSURE, result.stdout
    # The same through systemd-analyze's own gate (threshold is exposure x 10).
    gate = systemd_analyze("security", "--offline=true", "--no-pager", f"--threshold={int(MAX_EXPOSURE * 10)}",
                           str(UNIT))
    assert gate.returncode == 0, gate.stdout


def test_service_contract():
    assert service("Type") == ["notify"]
    assert service("NotifyAccess") == ["main"]
    assert service("WatchdogSec") == ["30"]
    assert service("Restart") == ["on-failure"]
    assert service("RestartPreventExitStatus") == [str(EX_CONFIG)]
    assert service("ExecStart") == ["/opt/mqtt-agent/bin/mqtt-agent run --config /etc/mqtt-agent/mqtt-agent.toml"]
    # The reload waits for the agent's verdict (through RuntimeDirectory=), so a rejected file fails it.
    assert service("ExecReload") == ["/opt/mqtt-agent/bin/mqtt-agent reload --config "
                                     "/etc/mqtt-agent/mqtt-agent.toml --pid $MAINPID"]
    # A subdirectory: /run/mqtt-agent holds mqtt-agent.socket's api.sock (0755, kept across restarts).
    assert service("RuntimeDirectory") == ["mqtt-agent/service"]
    assert service("RuntimeDirectoryMode") == ["0700"]
    assert service("KillMode") in ([], ["control-group"])  # what commands left running dies with the service
    assert (service("User"), service("Group")) == (["mqtt-agent"], ["mqtt-agent"])
    assert service("StateDirectory") == ["mqtt-agent"]
    assert service("ConfigurationDirectory") == ["mqtt-agent"]
    assert "DynamicUser" not in {k.split("]")[1] for k in directives()}
    # Stopping takes agent.shutdown_grace plus the time to deliver responses and disconnect (~3 s).
    assert int(service("TimeoutStopSec")[0]) >= AgentConfig.shutdown_grace + 5


def test_credentials_are_the_ones_the_agent_looks_for():
    loaded = dict(v.split(":", 1) for v in service("LoadCredential"))
    fallbacks = dict(v.split(":", 1) for v in service("SetCredential"))
    assert set(loaded) == set(CREDENTIAL_KEYS)
    assert loaded["tls.key_file"] == "/etc/mqtt-agent/device.key"
    # Every credential has a fallback, so a deployment without that file still starts.
    assert fallbacks == {key: CREDENTIAL_UNSET.decode() for key in CREDENTIAL_KEYS}


def test_no_privilege_is_granted_for_device_management():
    # Reboots and unit restarts go through polkit (deploy/polkit/), not through capabilities or setuid.
    assert service("NoNewPrivileges") == ["yes"]
    assert service("CapabilityBoundingSet") == [""]
    assert service("AmbientCapabilities") == [""]
    assert service("RestrictSUIDSGID") == ["yes"]
    assert "AF_UNIX" in service("RestrictAddressFamilies")[0]  # D-Bus, for polkit-authorised actions


def test_api_socket_unit_gives_the_apps_group_the_socket_the_agent_expects():
    from agent.config import ApiConfig
    from agent.service.server import inherited_socket

    socket_unit = UNIT.with_suffix(".socket").read_text()
    conf = dict(line.split("=", 1) for line in socket_unit.splitlines() if "=" in line and not line.startswith("#"))
    defaults = ApiConfig()
    assert conf["ListenStream"] == str(defaults.socket)
    assert (conf["SocketGroup"], conf["SocketMode"]) == (defaults.group, "0660")
    assert conf["FileDescriptorName"] == "api" and inherited_socket.__defaults__ == ("api",)
    assert conf["Service"] == UNIT.name
    assert "mqtt-agent.socket" in directives()["[Unit]Wants"][0]
