"""`mqtt-agent enroll` end to end: enroll -> sign -> install -> the agent answers a ping through a real
mosquitto over mutual TLS. The enroll tool itself (keys, CSRs, checks, installs) is tests/unit/test_enroll.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from agent.config import load_config
from agent.tools.send import send_command
from tests.support.agentproc import run_cli, write_toml
from tests.support.pki import sign_csr_file


def test_enrolled_device_answers_over_mutual_tls(tmp_path: Path, pki, make_broker, run_agent) -> None:  # type: ignore[no-untyped-def]
    broker = make_broker()
    cfg = write_toml(tmp_path / "device.toml", {
        "agent": {"device_id": "enrolled-1", "state_dir": str(tmp_path / "state"), "shutdown_grace": 5.0},
        "mqtt": {"hosts": [broker.address], "keepalive": 30},
        "tls": {"ca_file": str(pki.ca.cert_path), "cert_file": str(tmp_path / "etc/device.pem"),
                "key_file": str(tmp_path / "etc/device.key")},
        "reconnect": {"min_delay": 0.2, "max_delay": 2.0},
        "metrics": {"listen": ""},
    })
    owner = ["--owner", "daemon"] if os.geteuid() == 0 else []  # as tests/unit/test_enroll.py: really applied
    made = run_cli("enroll", "--config", str(cfg), *owner)
    assert made.returncode == 0, made.stderr
    signed = sign_csr_file(pki.ca, tmp_path / "etc/device.csr", tmp_path / "from-ca.pem")
    installed = run_cli("enroll", "--config", str(cfg), "--install-cert", str(signed))
    assert installed.returncode == 0, installed.stderr
    agent = run_agent(cfg)
    result = send_command(load_config(cfg), "ping", b"{}", timeout=10)
    assert result.status == 200
    assert json.loads(result.body)["device_id"] == "enrolled-1"
    assert agent.stop() == 0
