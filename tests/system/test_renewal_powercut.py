"""A power cut during a certificate renewal's install, with LazyFS (writes not fsynced are dropped).

The agent's state_dir is a LazyFS mount; the broker and the CA are outside it (other machines, in reality).
The agent is killed (SIGKILL) at several moments after the signer answered: while it writes the pending
pair, probes, renames it into place, reconnects. Then the unsynced writes are dropped, and the agent
starts again on what is left: it must connect with a pair that works, and finish the renewal.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from agent.config import load_config
from agent.tools.send import send_command
from tests.support.pki import TestCA
from tests.support.renewal import DEVICE_ID, broker_subjects, openssl_signer, script, short_lived

POWERCUT = os.environ.get("LAZYFS_POWERCUT", "")
# Seconds between the signer's answer and the cut: mid-write, mid-probe, after the switch.
DELAYS = (0.0, 0.03, 0.1, 0.4)

pytestmark = pytest.mark.skipif(
    not POWERCUT or not Path(POWERCUT).exists(),
    reason="LAZYFS_POWERCUT is not set (or does not exist): point it at ../shared/tools/lazyfs/powercut to run "
           "the power-cut tests (.ci/run does when it is there)")


def powercut(*args: str) -> None:
    subprocess.run([POWERCUT, *args], check=True, capture_output=True, timeout=120)


@pytest.mark.parametrize("delay", DELAYS)
def test_power_cut_during_the_install_comes_back_with_a_working_pair(delay, make_broker, make_config, run_agent,
                                                                     pki, tmp_path):
    broker = make_broker(extra=["use_subject_as_username true"])
    ca: TestCA = pki.ca
    device = short_lived(ca, 3600, f"device-pc-{int(delay * 1000)}")
    signed = tmp_path / "signed"  # outside LazyFS: the test's own clock
    inner = openssl_signer(tmp_path, ca)
    signer = script(tmp_path / "signer.sh", f'out=$("{inner}")\nprintf "%s\\n" "$out"\ntouch "{signed}"\n')
    # LazyFS does not mount on a path containing "-o" (it takes it for a FUSE option), which pytest's
    # /tmp/pytest-of-root/... does: the mount point gets a directory of its own.
    base = Path(tempfile.mkdtemp(prefix="renewalpc", dir="/tmp"))
    state = base / "state"
    powercut("mount", str(state))
    try:
        cfg = make_config(broker, {
            "agent": {"state_dir": str(state)},
            "tls": {"cert_file": str(device.cert), "key_file": str(device.key)},
            "renewal": {"signer": "exec", "command": [signer], "before": 3590.0, "check_interval": 0.5,
                        "retry_min": 1.0, "probe_timeout": 5.0},
        })
        agent = run_agent(cfg)
        deadline = time.monotonic() + 30
        while not signed.exists():
            assert time.monotonic() < deadline, "the signer was never called"
            time.sleep(0.005)
        time.sleep(delay)
        agent.kill()  # the machine dies...
        powercut("cut", str(state))  # ...and whatever was not fsynced is gone
        again = run_agent(cfg)  # comes back: connected with some pair (waits for "subscribed")
        assert send_command(load_config(cfg), "ping", timeout=15).status == 200
        # ...and the renewal completes: the broker ends up seeing the renewed certificate.
        end = time.monotonic() + 40
        while broker_subjects(broker)[-1] != f"O=renewed,CN={DEVICE_ID}":
            assert time.monotonic() < end, f"never switched to a renewed pair: {broker_subjects(broker)}"
            time.sleep(0.2)
        assert send_command(load_config(cfg), "ping", timeout=15).status == 200
        again.stop()
    finally:
        powercut("umount", str(state))
        shutil.rmtree(base, ignore_errors=True)
