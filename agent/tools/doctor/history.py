"""Check 9: what the running agent has learned about its connection, from
`{state_dir}/connection-state.json` (written by agent/state/connection_file.py): recent disconnect
reasons, the learned keepalive and a suspected duplicate client id.

The file is read defensively: absent means "no history yet", and any field that is missing or of
the wrong type is ignored rather than trusted.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from agent.state.connection_file import STATE_FILE
from agent.state.connection_file import STATE_VERSION as SUPPORTED_VERSION
from agent.tools.doctor.report import CheckResult, Finding, fail, result, warn

FLAP_WINDOW = 3600.0
FLAP_COUNT = 5
RECENT = 86400.0

_REMEDIES = {
    "idle_timeout": "a NAT or firewall drops idle connections: keep [keepalive_tuning] enabled so the agent learns a "
                    "shorter keepalive, or set mqtt.keepalive below the idle time at which the drops happen",
    "keepalive_timeout": "the broker stopped answering pings: the link loses packets (check signal and link quality)",
    "session_taken_over": "another client uses the same client id: give every gateway its own mqtt.client_id",
    "auth_failed": "the broker refuses the credentials: see check 7",
    "tls_error": "the TLS handshake fails: see check 6",
    "refused": "the broker refuses the connection: see checks 5 and 7",
    "server_disconnect": "the broker closes the connection itself: check the broker's log for this client",
    "message_rejected": "the broker closed the connection right after a message it would not take (usually over "
                        "its size limit): set mqtt.max_message_bytes to the broker's limit (Eclipse Hono: 2048)",
}


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.0f} h ago"
    return f"{seconds / 86400:.0f} days ago"


def _disconnects(data: Mapping[str, Any]) -> list[dict[str, Any]]:
    raw = data.get("disconnects")
    if not isinstance(raw, list):
        return []
    out = []
    for item in raw:
        if isinstance(item, dict) and _num(item.get("at")) is not None and isinstance(item.get("reason"), str):
            out.append(item)
    return sorted(out, key=lambda d: float(d["at"]))


def assess_history(data: Any, now: float) -> CheckResult:
    """Pure: the decoded history file and the wall clock -> check 9's result."""
    if not isinstance(data, dict):
        return result(9, "", "history file is not a JSON object", [warn(
            "history_unreadable", f"{STATE_FILE} does not hold a JSON object",
            f"the agent rewrites {STATE_FILE}; if this persists, delete it while the agent is stopped")])
    version = data.get("version")
    if version != SUPPORTED_VERSION:
        return result(9, "", f"history format version {version!r} is not known to this doctor", [warn(
            "history_version", f"{STATE_FILE} has format version {version!r}; this doctor reads version "
            f"{SUPPORTED_VERSION}", "use the doctor of the same mqtt-agent version as the running agent")])
    findings: list[Finding] = []
    parts: list[str] = []
    details: dict[str, Any] = {}
    events = _disconnects(data)
    recent = [d for d in events if now - float(d["at"]) <= RECENT]
    last_hour = [d for d in events if now - float(d["at"]) <= FLAP_WINDOW]
    by_reason = Counter(str(d["reason"]) for d in recent)
    details["disconnects_24h"] = dict(by_reason)
    if recent:
        reasons = ", ".join(f"{r} {n}" for r, n in by_reason.most_common())
        parts.append(f"{len(recent)} disconnect{'s' if len(recent) != 1 else ''} in 24 h ({reasons})")
        last = recent[-1]
        up = _num(last.get("uptime_s"))
        idle = _num(last.get("idle_s"))
        facts = [f"after {up:.0f} s up" if up is not None else "", f"{idle:.0f} s idle" if idle is not None else ""]
        host = f" from {last['host']}" if isinstance(last.get("host"), str) else ""
        parts.append(f"last {_ago(now - float(last['at']))}: {last['reason']}{host}"
                     + (f" ({', '.join(f for f in facts if f)})" if any(facts) else ""))
        details["last_disconnect"] = {k: last.get(k) for k in ("at", "reason", "host", "uptime_s", "idle_s",
                                                                 "reason_code")}
    elif events:
        parts.append("no disconnects in 24 h")
    else:
        parts.append("no disconnects recorded")
    if len(last_hour) >= FLAP_COUNT:
        top, count = Counter(str(d["reason"]) for d in last_hour).most_common(1)[0]
        findings.append(warn(
            "connection_flapping",
            f"{len(last_hour)} disconnects in the last hour, {count} of them {top}",
            _REMEDIES.get(top, "check the broker's log and the network between this gateway and the broker"),
        ))
    keepalive = data.get("keepalive")
    if isinstance(keepalive, dict):
        current, configured = _num(keepalive.get("current")), _num(keepalive.get("configured"))
        details["keepalive"] = {k: keepalive.get(k) for k in ("current", "configured", "learned", "evidence")}
        if keepalive.get("learned") is True and current is not None:
            evidence = keepalive.get("evidence")
            parts.append(f"keepalive learned: {current:.0f} s"
                         + (f" instead of {configured:.0f} s" if configured is not None else "")
                         + (f" ({evidence})" if isinstance(evidence, str) and evidence else ""))
        elif current is not None:
            parts.append(f"keepalive {current:.0f} s")
    duplicate = data.get("duplicate_client_id")
    if isinstance(duplicate, dict) and isinstance(duplicate.get("client_id"), str):
        when = _num(duplicate.get("suspected_at"))
        takeovers = _num(duplicate.get("takeovers"))
        cid = duplicate["client_id"]
        details["duplicate_client_id"] = {"client_id": cid, "suspected_at": when, "takeovers": takeovers}
        fresh = when is not None and now - when <= RECENT
        make = fail if fresh else warn
        findings.append(make(
            "duplicate_client_id",
            f"another client seems to use client id {cid!r}: the broker handed this agent's session to it"
            + (f" {takeovers:.0f} times" if takeovers else "")
            + (f" (last suspected {_ago(now - when)})" if when is not None else ""),
            "give every gateway its own mqtt.client_id; look for a second device running with the same id (a "
            "cloned SD card, an old installation, a test script); the doctor itself never uses that id",
        ))
    return result(9, "", "; ".join(parts), findings, details)


def check_history(state_dir: Path, now: float) -> CheckResult:
    """Check 9: read the history file (never write it)."""
    path = state_dir / STATE_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return result(9, "", f"no history yet ({path} does not exist: the agent has not run with this state_dir)")
    except OSError as exc:
        return result(9, "", "history file unreadable", [warn(
            "history_unreadable", f"{path} cannot be read: {exc.strerror or exc}",
            "run the doctor as the user the agent runs as, or as root")])
    try:
        data = json.loads(text)
    except ValueError as exc:
        return result(9, "", "history file is not valid JSON", [warn(
            "history_unreadable", f"{path} is not valid JSON ({exc})",
            f"the agent rewrites it; if this persists, delete {path} while the agent is stopped")])
    out = assess_history(data, now)
    return CheckResult(out.number, out.target, out.status, out.summary, out.findings,
                       {**out.details, "file": str(path)}, out.notes)
