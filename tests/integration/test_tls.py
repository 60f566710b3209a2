"""TLS context construction and the explanations of TLS failures."""

from __future__ import annotations


def test_a_healthy_agent_does_not_load_cryptography() -> None:
    """`cryptography` costs ~8 MiB of resident memory; only TLS failures, doctor and enroll need it."""
    import subprocess
    import sys

    code = ("import sys, agent.service.app, agent.cli, agent.service.metrics, agent.connection.session; "
            "print('cryptography' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"

