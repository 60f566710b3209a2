"""Check 1: the configuration, validated exactly as `run` and `check-config` validate it."""

from __future__ import annotations

import stat
from pathlib import Path

from agent.config import Config, load_config
from agent.errors import ConfigError
from agent.tools.doctor.report import CheckResult, Finding, fail, result, warn


def _remedy_for(problem: str, source: Path) -> str:
    key = problem.split(":", 1)[0].strip()
    if key.startswith("config file"):
        return ("create it (a commented example is etc/mqtt-agent.toml in the source) or pass the right file "
                "with --config")
    if " " in key or not key:
        return f"edit {source}, then run `mqtt-agent check-config --config {source}`"
    return f"fix {key} in {source}, then run `mqtt-agent check-config --config {source}`"


def check_config(path: Path) -> tuple[Config | None, CheckResult]:
    """Load and validate the config; every validation problem becomes one FAIL finding."""
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        problems = [fail("config_invalid", p, _remedy_for(p, path)) for p in exc.problems]
        n = len(problems)
        return None, result(1, "", f"{path}: {n} problem{'s' if n != 1 else ''}", problems)
    findings: list[Finding] = []
    m, t = cfg.mqtt, cfg.tls
    if not t.enabled:
        findings.append(warn(
            "tls_disabled",
            "tls.enabled = false: commands, responses and credentials travel unencrypted",
            "use the broker's TLS port (usually 8883) and set tls.enabled = true with tls.ca_file",
        ))
    elif t.insecure:
        findings.append(warn(
            "tls_insecure",
            "tls.insecure = true: the broker's host name is not verified (the chain still is)",
            "set tls.server_name to the name in the broker certificate and remove tls.insecure",
        ))
    if m.password:
        findings.append(warn(
            "password_in_config",
            f"mqtt.password is written in {path}",
            "move the password to a file of its own (mode 0600) and set mqtt.password_file to it",
        ))
        try:
            mode = stat.S_IMODE(path.stat().st_mode)
        except OSError:
            mode = 0
        if mode & 0o004:
            findings.append(warn(
                "config_world_readable",
                f"{path} holds mqtt.password and is readable by every user (mode {mode:04o})",
                f"chmod o-r {path}",
            ))
    tls = "no TLS" if not t.enabled else ("mutual TLS" if t.cert_file else "TLS")
    n = len(m.hosts)
    summary = (f"valid: {n} broker{'s' if n != 1 else ''}, MQTT {m.protocol}, {tls}, client id {m.client_id}, "
               f"subscription {m.subscription}")
    details = {
        "hosts": [str(h) for h in m.hosts],
        "protocol": m.protocol,
        "tls": t.enabled,
        "client_id": m.client_id,
        "command_topic": m.command_topic,
        "shared_group": m.shared_group,
        "state_dir": str(cfg.agent.state_dir),
    }
    return cfg, result(1, "", summary, findings, details)
