"""`mqtt-agent doctor`: say why a gateway cannot connect, and how to fix it.

Ordered checks (config, files, certificates, DNS, TCP, TLS, CONNECT, SUBSCRIBE, history, local),
each reported as ok / warn / FAIL with the cause and the exact remedy. Modules, in check order:

    config_check.py  1   the config, validated as `run` does
    files.py         2   TLS/secret files: parseable, private, readable, key matches certificate
    certs.py         3   certificate facts against security level, clock and broker name (pure)
    network.py       4-5 DNS and TCP, failures told apart
    probe.py         -   paho connections under a probe client id, chain fetch (moves bytes only)
    broker.py        6-8 one probe connection per broker, followed as far as it gets
    tls_check.py     6   the handshake as the agent does it; diagnostic retries; chain
    mqtt_check.py    7-8 CONNACK in words; SUBACK and the delivery probe
    history.py       9   the agent's connection-state.json
    local.py         10  clock, state_dir space, metrics port
    runner.py        -   order and prerequisites
    report.py        -   result types, text and JSON rendering
"""

from __future__ import annotations

from agent.tools.doctor.report import Report, render_text
from agent.tools.doctor.runner import DEFAULT_TIMEOUT, probe_client_id, run_doctor

__all__ = ["DEFAULT_TIMEOUT", "Report", "probe_client_id", "render_text", "run_doctor"]
