"""Secrets handed over by systemd (LoadCredential=): `run` and `check-config` both use
$CREDENTIALS_DIRECTORY/<config key> in place of the path the config names."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import CREDENTIAL_UNSET, load_config
from agent.tools.send import send_command
from tests.support.agentproc import REPO
from tests.support.outcomes import info


def check_config(path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", "check-config", "--config", str(path)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.integration
def test_agent_and_check_config_use_the_credential(pki, broker, make_config, run_agent, tmp_path):
    # The config names a key the service user could not read (here: not even there); systemd put a copy
    # into the credentials directory, readable by the service only.
    creds = tmp_path / "credentials"
    creds.mkdir(mode=0o700)
    shutil.copy(pki.device.key, creds / "tls.key_file")
    (creds / "tls.key_file").chmod(0o400)
    (creds / "mqtt.password_file").write_bytes(CREDENTIAL_UNSET)
    path = make_config(broker, {"tls": {"key_file": "/etc/mqtt-agent/absent/device.key"}})
    env = {"CREDENTIALS_DIRECTORY": str(creds), "PATH": "/usr/bin:/bin"}

    checked = check_config(path, env)
    assert checked.returncode == 0, checked.stderr
    assert f'key_file = "{creds}/tls.key_file"' in checked.stdout

    without = check_config(path, {"PATH": "/usr/bin:/bin"})
    assert without.returncode == 78
    assert "tls.key_file: /etc/mqtt-agent/absent/device.key does not exist" in without.stderr

    # Connected and serving although the configured key path does not exist: the credential was used.
    agent = run_agent(path, env={"CREDENTIALS_DIRECTORY": str(creds)})
    assert send_command(load_config(path, credentials_dir=creds), "ping", timeout=10).status == 200
    assert agent.stop() == 0


@pytest.mark.integration
def test_reload_after_a_new_key_says_to_restart(pki, broker, make_config, run_agent, tmp_path):
    # systemd copies credentials at start only. A certificate renewed with a new key, then a reload: the
    # agent sees the new certificate but the old key, rejects the reload, keeps running, and says why.
    device = pki.ca.issue("dev-1", filename=f"device-cred-{tmp_path.name}")
    creds = tmp_path / "credentials"
    creds.mkdir(mode=0o700)
    shutil.copy(device.key, creds / "tls.key_file")  # what systemd copied at start
    path = make_config(broker, {"tls": {"cert_file": str(device.cert), "key_file": str(device.key)}})
    agent = run_agent(path, env={"CREDENTIALS_DIRECTORY": str(creds)})
    pki.ca.issue("dev-1", filename=f"device-cred-{tmp_path.name}")  # new key and certificate on disk
    agent.proc.send_signal(signal.SIGHUP)
    # Operator interface: the rejection says why and what to do (systemctl restart).
    agent.wait_for(r"configuration reload rejected, the running configuration stays in effect: .*is not the "
                   r"private key of tls.cert_file.*tls.key_file come\(s\) from systemd credentials.*"
                   r"systemctl restart mqtt-agent")
    # Still connected with what it started with (the sender uses the new pair on disk, which is valid).
    assert send_command(load_config(path, credentials_dir=""), "ping", timeout=10).status == 200
    assert info(path)["connects"] == 1  # the rejected reload did not reconnect
    assert agent.stop() == 0

