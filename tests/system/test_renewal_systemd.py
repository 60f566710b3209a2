"""Certificate renewal under the hardened unit as shipped, with a real systemd 252 (bookworm) in
systemd-nspawn: the device key arrives as a systemd credential, /etc/mqtt-agent is read-only to the
service, `mqtt-agent renew --force` (as root, beside the service) asks for a renewal, the exec signer runs
inside the sandbox, and everything renewal writes is under the unit's StateDirectory.

Uses the same bookworm root and container helper as the issue 12 test (tests/support/nspawn.py; skips the
same way without them).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from tests.support.nspawn import VENV_SITE_INSIDE, agent_container, install_agent_from_checkout, systemd_root
from tests.support.outcomes import wait_until
from tests.support.renewal import DEVICE_ID, broker_subjects, short_lived
from tests.support.roots import copy_root

pytestmark = pytest.mark.roots("systemd")  # waited for (or built) before the timeout starts

# Paths under the container root that a running system writes anyway (journal, systemd's own state, and the
# log of the mosquitto the shared root ships, which its own unit may start: it changed in 2 of ~10 runs).
EXPECTED_WRITES = ("var/log/journal/", "var/lib/systemd/", "tmp/", "var/tmp/", "run/", "etc/machine-id",
                   "var/log/mosquitto/")

SIGNER = f"""#!/usr/bin/python3.{sys.version_info.minor}
# Lab signer: the CSR on stdin, a certificate from the test CA on stdout (cryptography from the host venv).
import datetime, sys
sys.path[:0] = ["{VENV_SITE_INSIDE}"]
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
csr = x509.load_pem_x509_csr(sys.stdin.buffer.read())
ca = x509.load_pem_x509_certificate(open("/opt/ca/ca.pem", "rb").read())
key = serialization.load_pem_private_key(open("/opt/ca/ca.key", "rb").read(), None)
now = datetime.datetime.now(datetime.timezone.utc)
subject = x509.Name([*csr.subject, x509.NameAttribute(x509.NameOID.ORGANIZATION_NAME, "renewed")])
b = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca.subject).public_key(csr.public_key())
     .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
     .not_valid_after(now + datetime.timedelta(days=2)))
for ext in csr.extensions:
    b = b.add_extension(ext.value, ext.critical)
sys.stdout.buffer.write(b.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
"""


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """{path relative to root: (mtime_ns, size)} of every file, /proc, /sys and /dev left out."""
    out: dict[str, tuple[int, int]] = {}
    for base, dirs, files in os.walk(root):
        rel_base = Path(base).relative_to(root)
        if rel_base.parts and rel_base.parts[0] in ("proc", "sys", "dev"):
            dirs[:] = []
            continue
        for name in files:
            path = Path(base) / name
            try:
                st = path.lstat()
            except OSError:
                continue
            out[str(path.relative_to(root))] = (st.st_mtime_ns, st.st_size)
    return out


def test_renewal_under_the_hardened_unit_writes_only_its_state_directory(make_broker, pki, tmp_path):
    import shutil

    broker = make_broker(extra=["use_subject_as_username true"])
    device = short_lived(pki.ca, 3600, "device-nspawn")  # not due: renewal is asked for with `renew --force`
    root = copy_root(systemd_root(), tmp_path / "root")
    install_agent_from_checkout(root, f"""\
[agent]
device_id = "{DEVICE_ID}"

[mqtt]
hosts = ["127.0.0.1:{broker.port}"]
keepalive = 30

[tls]
ca_file = "/etc/mqtt-agent/ca.pem"
cert_file = "/etc/mqtt-agent/device.pem"
key_file = "/etc/mqtt-agent/device.key"

[metrics]
listen = ""

[renewal]
signer = "exec"
command = ["/opt/ca/sign"]
before = 60.0
check_interval = 0.5
probe_timeout = 5.0
""")
    (root / "opt/ca").mkdir()
    shutil.copy(pki.ca.cert_path, root / "opt/ca/ca.pem")
    shutil.copy(pki.ca.key_path, root / "opt/ca/ca.key")
    (root / "opt/ca/ca.key").chmod(0o644)  # a lab CA the service user may use; never do this in production
    (root / "opt/ca/sign").write_text(SIGNER)
    (root / "opt/ca/sign").chmod(0o755)
    etc = root / "etc/mqtt-agent"
    shutil.copy(pki.ca.cert_path, etc / "ca.pem")
    shutil.copy(device.cert, etc / "device.pem")
    shutil.copy(device.key, etc / "device.key")
    (etc / "device.key").chmod(0o600)  # root only: the service gets it as a credential
    box = agent_container(root, tmp_path / "boot.log")
    try:
        box.boot()
        # Synchronisation: the agent's subscription is in its journal only.
        wait_until(lambda: "subscribed to" in box.journal("mqtt-agent"), 60, "the agent subscribed", interval=0.2)
        # Connected with the device certificate although device.key is root's 0600 and the service runs as
        # mqtt-agent: it read the key as the systemd credential.
        assert broker_subjects(broker)[-1] == f"CN={DEVICE_ID}"
        assert box.show("mqtt-agent", "User")["User"] == "mqtt-agent"
        before = snapshot(root)
        res = box.run("/opt/mqtt-agent/bin/mqtt-agent", "renew", "--force", "--config",
                      "/etc/mqtt-agent/mqtt-agent.toml", timeout=120, check=False)
        assert res.returncode == 0 and res.stdout.startswith("success: renewed certificate in use"), \
            res.stdout + res.stderr + box.journal("mqtt-agent")[-3000:]
        wait_until(lambda: broker_subjects(broker)[-1] == f"O=renewed,CN={DEVICE_ID}", 30, "switched", interval=0.2)
        after = snapshot(root)
        changed = sorted(p for p, stamp in after.items() if before.get(p) != stamp)
        unexpected = [p for p in changed if not p.startswith("var/lib/mqtt-agent/") and not p.startswith(
            EXPECTED_WRITES)]
        assert unexpected == [], unexpected
        active = root / "var/lib/mqtt-agent/tls/active.pem"
        st = active.stat()
        uid = int(box.run("id", "-u", "mqtt-agent").stdout.strip())
        assert (st.st_mode & 0o777, st.st_uid) == (0o600, uid)
        assert "var/lib/mqtt-agent/tls/active.pem" in changed
        assert not any(p.startswith("etc/mqtt-agent/") for p in changed)  # read-only to the service anyway
        assert box.show("mqtt-agent", "ActiveState")["ActiveState"] == "active"
    finally:
        box.poweroff()
