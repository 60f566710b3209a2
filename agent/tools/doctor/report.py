"""The doctor's report: plain data, its text rendering and its JSON form (pure, no I/O).

A check produces one `CheckResult` per target (a broker, the clock, ...). Its status follows from
its findings: any `fail` finding makes it FAIL, any `warn` finding makes it warn, none is ok.
A check whose prerequisite failed is `skip`, with the reason in its summary.
The JSON form is a public interface for fleet tooling: docs/doctor.md documents it (schema_version 1).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

OK = "ok"
WARN = "warn"
FAIL = "fail"
SKIP = "skip"
STATUSES = (OK, WARN, FAIL, SKIP)

SCHEMA_VERSION = 1

# Check number -> stable id. The ids appear in --json output and in docs/doctor.md.
CHECK_IDS: Mapping[int, str] = {
    1: "config",
    2: "files",
    3: "certificates",
    4: "dns",
    5: "tcp",
    6: "tls",
    7: "mqtt_connect",
    8: "subscribe",
    9: "history",
    10: "local",
    11: "renewal",
}

_LABEL = {OK: "ok", WARN: "warn", FAIL: "FAIL", SKIP: "skip"}


@dataclass(frozen=True)
class Finding:
    """One problem: what is wrong (cause) and the exact fix (remedy). `code` is stable for tooling."""

    severity: str  # WARN or FAIL
    code: str
    cause: str
    remedy: str

    def as_dict(self) -> dict[str, str]:
        return {"severity": self.severity, "code": self.code, "cause": self.cause, "remedy": self.remedy}


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one check for one target."""

    number: int
    target: str
    status: str
    summary: str
    findings: tuple[Finding, ...] = ()
    details: Mapping[str, Any] = field(default_factory=dict)
    notes: tuple[str, ...] = ()  # extra lines for the text report (certificate chain, diagnosis)

    @property
    def id(self) -> str:
        return CHECK_IDS[self.number]

    def as_dict(self) -> dict[str, Any]:
        return {
            "number": self.number,
            "id": self.id,
            "target": self.target,
            "status": self.status,
            "summary": self.summary,
            "findings": [f.as_dict() for f in self.findings],
            "details": dict(self.details),
        }


def result(
    number: int,
    target: str,
    summary: str,
    findings: Sequence[Finding] = (),
    details: Mapping[str, Any] | None = None,
    notes: Sequence[str] = (),
) -> CheckResult:
    """A CheckResult whose status is derived from its findings."""
    severities = {f.severity for f in findings}
    status = FAIL if FAIL in severities else WARN if WARN in severities else OK
    return CheckResult(number, target, status, summary, tuple(findings), dict(details or {}), tuple(notes))


def skipped(number: int, target: str, reason: str) -> CheckResult:
    """A check that was not run because a prerequisite failed or it does not apply."""
    return CheckResult(number, target, SKIP, f"not run: {reason}")


def fail(code: str, cause: str, remedy: str) -> Finding:
    """A finding that makes its check FAIL."""
    return Finding(FAIL, code, cause, remedy)


def warn(code: str, cause: str, remedy: str) -> Finding:
    """A finding that makes its check warn (exit code stays 0)."""
    return Finding(WARN, code, cause, remedy)


@dataclass
class Report:
    """Everything one doctor run found, in check order."""

    config: str
    client_id: str | None = None
    probe_client_id: str | None = None
    started_at: float = 0.0
    duration_s: float = 0.0
    agent_version: str = ""
    timeout_s: float = 0.0
    checks: list[CheckResult] = field(default_factory=list)

    def add(self, *results: CheckResult) -> None:
        self.checks.extend(results)

    def ordered(self) -> list[CheckResult]:
        # Stable: within one check number, targets keep the order they were added in (hosts as configured).
        return sorted(self.checks, key=lambda c: c.number)

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(STATUSES, 0)
        for check in self.checks:
            out[check.status] += 1
        return out

    @property
    def exit_code(self) -> int:
        """0 when nothing failed (warnings allowed), 1 otherwise."""
        return 1 if any(c.status == FAIL for c in self.checks) else 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "agent_version": self.agent_version,
            "config": self.config,
            "client_id": self.client_id,
            "probe_client_id": self.probe_client_id,
            "started_at": round(self.started_at, 3),
            "duration_s": round(self.duration_s, 3),
            "timeout_s": self.timeout_s,
            "exit_code": self.exit_code,
            "counts": self.counts(),
            "checks": [c.as_dict() for c in self.ordered()],
        }


def render_text(report: Report) -> str:
    """The human report: a header, one line per check and target, cause/remedy under each problem."""
    lines = [f"mqtt-agent doctor {report.agent_version}: {report.config}".rstrip()]
    if report.probe_client_id:
        lines.append(
            f"probe client id {report.probe_client_id}: the production id {report.client_id} is never used, "
            "so a running agent stays connected"
        )
    lines.append("")
    width = max((len(c.id) for c in report.checks), default=8)
    indent = " " * (4 + 1 + 3 + 1 + width + 2)
    for check in report.ordered():
        target = f"{check.target}: " if check.target else ""
        lines.append(f"{_LABEL[check.status]:<4} {check.number:>2}  {check.id:<{width}}  {target}{check.summary}")
        for finding in check.findings:
            lines.append(f"{indent}cause:  {finding.cause}")
            lines.append(f"{indent}remedy: {finding.remedy}")
        lines += [f"{indent}{note}" for note in check.notes]
    counts = report.counts()
    lines.append("")
    parts = [f"{counts[FAIL]} failed", f"{counts[WARN]} warning{'s' if counts[WARN] != 1 else ''}",
             f"{counts[OK]} ok"]
    if counts[SKIP]:
        parts.append(f"{counts[SKIP]} skipped")
    lines.append(f"{', '.join(parts)}: exit {report.exit_code}")
    return "\n".join(lines) + "\n"
