"""deploy/ansible: ansible-lint clean, and site.yml run for real against localhost into a staging root.

The run is the real thing except for where it writes: the role installs the agent (a wheel of this
checkout) into a venv, makes the key and CSR with community.crypto, signs the CSR with the test CA
"on the control node", renders the config and validates it with the staged `mqtt-agent check-config`.
Service management is off (mqtt_agent_manage_service: false). The role's user is pointed at the
existing `daemon` account: creating and deleting a real `mqtt-agent` user would change this machine
for every parallel test run, while an existing non-root account still proves ownership is applied.
Finally the staged config and certificate are used by a real agent against a real mosquitto.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.config import load_config
from agent.tools.send import send_command
from tests.support.agentproc import REPO
from tests.support.mosquitto import BrokerOptions, Mosquitto

ANSIBLE_DIR = REPO / "deploy/ansible"
BIN = Path(sys.executable).parent
OWNER = "daemon"
DEVICE = "gw-ansible-1"
# The role creates the local API's group; a name of this run's own (removed at the end), so that parallel
# runs and the machine's own groups are left alone.
API_GROUP = f"mqtt-apps-t{os.getpid()}"
# The API socket outside the staging root: an app user must be able to reach it, and pytest's own temporary
# directories are private to root.
API_SOCKET = Path(f"/tmp/mqtt-agent-ansible-{os.getpid()}/api.sock")

if sys.version_info < (3, 11):  # ansible-core 2.19 (ansible 12) needs Python 3.11 on the control node
    pytest.skip("the ansible test extras need Python 3.11+", allow_module_level=True)


def ansible_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
    env.update({
        "ANSIBLE_HOME": str(tmp_path / "ansible-home"),
        "ANSIBLE_LOCAL_TEMP": str(tmp_path / "ansible-tmp"),
        "ANSIBLE_REMOTE_TEMP": str(tmp_path / "ansible-remote-tmp"),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_FORCE_COLOR": "0",
        "ANSIBLE_RETRY_FILES_ENABLED": "0",
        "ANSIBLE_PIPELINING": "1",
        "PATH": f"{BIN}:{env.get('PATH', '')}",
    })
    return env


def tool(name: str) -> str:
    path = BIN / name
    if not path.exists():
        pytest.fail(f"{name} is not installed in {BIN}; ./scripts/test.sh installs the test extras")
    return str(path)


def write_inventory(tmp_path: Path, pki: Any, root: Path, broker_address: str, **extra: Any) -> Path:
    host_vars: dict[str, Any] = {
        "ansible_connection": "local",
        "ansible_python_interpreter": sys.executable,
        "ansible_become": False,  # the test already runs as root; there is no sudo here
        "mqtt_agent_root": str(root),
        "mqtt_agent_user": OWNER,
        "mqtt_agent_group": OWNER,
        "mqtt_agent_create_user": False,
        "mqtt_agent_manage_service": False,
        "mqtt_agent_wheel_dir": str(tmp_path / "wheels"),
        "mqtt_agent_hosts": [broker_address],
        "mqtt_agent_broker_ca": str(pki.ca.cert_path),
        "mqtt_agent_fleet_ca_cert": str(pki.ca.cert_path),
        "mqtt_agent_fleet_ca_key": str(pki.ca.key_path),
        "mqtt_agent_metrics_listen": "",
        "mqtt_agent_commands": {"uptime": {"argv": ["/usr/bin/uptime"], "timeout": 5}},
        "mqtt_agent_extra_config": "[reconnect]\nmin_delay = 0.2\nmax_delay = 2.0",
        "mqtt_agent_api_group": API_GROUP,
        "mqtt_agent_api_socket": str(API_SOCKET),
    }
    host_vars.update(extra)
    inventory = {"all": {"children": {"gateways": {"hosts": {DEVICE: host_vars}}}}}
    path = tmp_path / "inventory.json"  # JSON is YAML: the inventory plugin reads it as such
    path.write_text(json.dumps(inventory))
    return path


def playbook(tmp_path: Path, inventory: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool("ansible-playbook"), "-i", str(inventory), str(ANSIBLE_DIR / "site.yml"), *args],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path, env=ansible_env(tmp_path),
                          stdin=subprocess.DEVNULL)


def recap(result: subprocess.CompletedProcess[str]) -> dict[str, int]:
    m = re.search(rf"^{re.escape(DEVICE)}\s+:\s+(.*)$", result.stdout, re.MULTILINE)
    assert m, result.stdout[-3000:] + result.stderr[-3000:]
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m.group(1))}


def test_ansible_lint_clean(tmp_path: Path) -> None:
    result = subprocess.run([tool("ansible-lint"), "--offline", "--nocolor", "site.yml", "roles/mqtt_agent",
                             "inventory.example.yml"], capture_output=True, text=True, timeout=300,
                            cwd=ANSIBLE_DIR, env=ansible_env(tmp_path), stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    assert "Passed" in result.stdout + result.stderr


@dataclass
class Deployment:
    root: Path
    tmp: Path
    inventory: Path
    first: subprocess.CompletedProcess[str]
    broker: Mosquitto
    pki: Any

    @property
    def conf(self) -> Path:
        return self.root / "etc/mqtt-agent"

    def inventory_with(self, **extra: Any) -> Path:
        return write_inventory(self.tmp, self.pki, self.root, self.broker.address, **extra)


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory, pki: Any) -> Iterator[Deployment]:
    """site.yml run once into a staging root, with a real broker for the deployed agent to talk to.

    The tests below share it and run in file order: first run, second run, the agent, a rejected
    config, renewal (which changes the certificate, so it comes last).
    """
    tmp = tmp_path_factory.mktemp("ansible")
    broker = Mosquitto(tmp / "broker", BrokerOptions(cafile=pki.ca.cert_path, certfile=pki.broker.cert,
                                                     keyfile=pki.broker.key)).start()
    root = tmp / "root"
    inventory = write_inventory(tmp, pki, root, broker.address)
    try:
        yield Deployment(root, tmp, inventory, playbook(tmp, inventory), broker, pki)
    finally:
        broker.stop()
        subprocess.run(["groupdel", API_GROUP], capture_output=True, timeout=30)
        shutil.rmtree(API_SOCKET.parent, ignore_errors=True)


@pytest.mark.integration
def test_first_run_builds_the_tree(deployed: Deployment) -> None:
    first, root, conf, pki = deployed.first, deployed.root, deployed.conf, deployed.pki
    assert first.returncode == 0, first.stdout[-6000:] + first.stderr[-3000:]
    counts = recap(first)
    assert counts["failed"] == 0 and counts["changed"] > 0
    daemon = pwd.getpwnam(OWNER)
    # The key: made on the device, 0600, owned by the service account.
    key_path = conf / "device.key"
    st = key_path.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o600, daemon.pw_uid, daemon.pw_gid)
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    # The certificate: signed by the (test) fleet CA for this key and device id, usable as a client cert.
    cert = x509.load_pem_x509_certificate((conf / "device.pem").read_bytes())
    cert.verify_directly_issued_by(pki.ca.cert)
    assert cert.subject.rfc4514_string() == f"CN={DEVICE}"
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()
    assert x509.ExtendedKeyUsageOID.CLIENT_AUTH in cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName) == [DEVICE]
    # Modes and owners of everything else the role put there.
    for rel, mode, uid, gid in (
        ("etc/mqtt-agent/mqtt-agent.toml", 0o640, 0, daemon.pw_gid),
        ("etc/mqtt-agent/device.pem", 0o644, 0, 0),
        ("etc/mqtt-agent/device.csr", 0o644, 0, 0),
        ("etc/mqtt-agent/ca.pem", 0o644, 0, 0),
        ("etc/systemd/system/mqtt-agent.service", 0o644, 0, 0),
        ("etc/mqtt-agent", 0o755, 0, 0),
    ):
        st = (root / rel).stat()
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (mode, uid, gid), rel
    assert (root / "etc/systemd/system/mqtt-agent.service").read_bytes() == \
        (REPO / "systemd/mqtt-agent.service").read_bytes()
    assert (conf / "ca.pem").read_bytes() == pki.ca.cert_path.read_bytes()
    # The CA key stayed on the control node: no file in the device tree holds it.
    ca_body = b"".join(pki.ca.key_path.read_bytes().splitlines()[1:3])
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink() and path.stat().st_size < 1_000_000:
            assert ca_body not in b"".join(path.read_bytes().splitlines()), path
    # The agent installed from this checkout, and the config passes its check-config.
    venv_bin = root / "opt/mqtt-agent/bin"
    version = subprocess.run([str(venv_bin / "mqtt-agent"), "--version"], capture_output=True, text=True,
                             timeout=60, cwd="/")
    assert version.stdout.strip() == "mqtt-agent 0.1.0", version.stderr
    check = subprocess.run([str(venv_bin / "mqtt-agent"), "check-config", "--config", str(conf / "mqtt-agent.toml")],
                           capture_output=True, text=True, timeout=60, cwd="/")
    assert check.returncode == 0, check.stderr
    cfg = load_config(conf / "mqtt-agent.toml")
    assert cfg.agent.device_id == DEVICE
    assert [str(h) for h in cfg.mqtt.hosts] == [deployed.broker.address]
    assert cfg.commands["uptime"].argv == ("/usr/bin/uptime",) and cfg.reconnect.min_delay == 0.2


@pytest.mark.integration
def test_second_run_changes_nothing(deployed: Deployment) -> None:
    second = playbook(deployed.tmp, deployed.inventory)
    assert second.returncode == 0, second.stdout[-6000:]
    assert recap(second)["changed"] == 0, second.stdout[-6000:]


@pytest.mark.integration
def test_deployed_agent_answers_over_mutual_tls(deployed: Deployment, run_agent: Any) -> None:
    config = deployed.conf / "mqtt-agent.toml"
    agent = run_agent(config)
    result = send_command(load_config(config), "ping", b"{}", timeout=10)
    assert result.status == 200
    assert json.loads(result.body)["device_id"] == DEVICE
    assert agent.stop() == 0


def _unit_values(text: str, section: str) -> dict[str, list[str]]:
    """KEY -> values of `section` in a unit file, as systemd reads them (an empty value resets the list)."""
    out: dict[str, list[str]] = {}
    current = ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = line.strip("[]")
            continue
        if current == section:
            key, _, value = line.partition("=")
            out[key] = [] if value == "" else [*out.get(key, []), value]
    return out


@pytest.mark.integration
def test_socket_unit_and_group_give_the_api_to_the_apps_group(deployed: Deployment, run_agent: Any) -> None:
    import grp

    from tests.support.api import api_path, post_as, status

    root = deployed.root
    units = root / "etc/systemd/system"
    # The socket unit of the checkout (as the Debian package ships it) and a drop-in with [api]'s path and group.
    assert (units / "mqtt-agent.socket").read_bytes() == (REPO / "systemd/mqtt-agent.socket").read_bytes()
    sock = API_SOCKET
    merged = _unit_values((units / "mqtt-agent.socket").read_text(), "Socket")
    for key, values in _unit_values((units / "mqtt-agent.socket.d/api.conf").read_text(), "Socket").items():
        merged[key] = values  # a drop-in key replaces the unit's (ListenStream= first resets the list)
    assert merged["ListenStream"] == [str(sock)]
    assert (merged["SocketUser"], merged["SocketGroup"], merged["SocketMode"]) == ([OWNER], [API_GROUP], ["0660"])
    assert merged["FileDescriptorName"] == ["api"]
    for rel in ("etc/systemd/system/mqtt-agent.socket", "etc/systemd/system/mqtt-agent.socket.d/api.conf"):
        st = (root / rel).stat()
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o644, 0, 0), rel
    # The group exists (a system group), and the config's [api] names the same socket and group.
    group = grp.getgrnam(API_GROUP)
    assert group.gr_gid < 1000
    config = deployed.conf / "mqtt-agent.toml"
    cfg = load_config(config)
    assert (cfg.api.socket, cfg.api.group) == (sock, API_GROUP)
    # The deployed agent serves it: a member of the group may POST, anyone else is refused by the kernel.
    agent = run_agent(config)
    assert api_path(config) == sock
    st = sock.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o660, group.gr_gid)
    nobody = pwd.getpwnam("nobody")
    assert post_as(nobody.pw_uid, nobody.pw_gid, [], sock) == 13
    assert post_as(nobody.pw_uid, nobody.pw_gid, [group.gr_gid], sock) == 0
    assert status(sock)["queue"]["accepted"] == {"telemetry": 1}
    assert agent.stop() == 0


@pytest.mark.integration
def test_config_rejected_by_check_config_is_not_installed(deployed: Deployment) -> None:
    config = deployed.conf / "mqtt-agent.toml"
    before = config.read_bytes()
    # keepalive 0 is out of range: check-config exits 78 on the device, the old config stays.
    bad = playbook(deployed.tmp, deployed.inventory_with(mqtt_agent_keepalive=0))
    assert bad.returncode != 0
    assert recap(bad)["failed"] == 1
    assert "mqtt.keepalive: must be 1..65535, got 0" in bad.stdout
    assert config.read_bytes() == before


@pytest.mark.integration
def test_certificate_due_for_renewal_is_signed_again(deployed: Deployment) -> None:
    cert_path, key_path = deployed.conf / "device.pem", deployed.conf / "device.key"
    old_cert, old_key = x509.load_pem_x509_certificate(cert_path.read_bytes()), key_path.read_bytes()
    # Every certificate expires within 900 days of an 825-day validity: it is due, and signed again.
    renew = playbook(deployed.tmp, deployed.inventory_with(mqtt_agent_cert_renew_days=900))
    assert renew.returncode == 0, renew.stdout[-6000:]
    new_cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    assert new_cert.serial_number != old_cert.serial_number
    assert new_cert.public_key().public_numbers() == old_cert.public_key().public_numbers()
    assert key_path.read_bytes() == old_key
