"""Helpers shared by the doctor tests (unit and integration)."""

from __future__ import annotations

import datetime
import json
import re
from pathlib import Path
from typing import Any

from agent.tools.doctor import Report, run_doctor
from agent.tools.doctor.report import CheckResult, Finding
from tests.support.agentproc import REPO

UTC = datetime.timezone.utc


TIMEOUT = 5.0


def doctor(config: Path, timeout: float = TIMEOUT) -> Report:
    return run_doctor(config, timeout=timeout, service_user=None)


def checks(report: Report, number: int) -> list[CheckResult]:
    return [c for c in report.checks if c.number == number]


def one(report: Report, number: int, target: str = "") -> CheckResult:
    found = [c for c in checks(report, number) if c.target.startswith(target)]
    assert len(found) == 1, f"check {number} {target!r}: {found}"
    return found[0]


def finding(check: CheckResult, code: str) -> Finding:
    match = [f for f in check.findings if f.code == code]
    assert match, f"no finding {code!r} in check {check.number} {check.target}: {check}"
    return match[0]


def _schema() -> dict[str, Any]:
    text = (REPO / "docs" / "doctor.md").read_text()
    block = re.search(r"<!-- schema -->\s*```json\n(.*?)```", text, re.S)
    assert block, "docs/doctor.md must hold the JSON schema after <!-- schema -->"
    schema: dict[str, Any] = json.loads(block.group(1))
    return schema


def _validate(value: Any, schema: dict[str, Any], path: str = "$") -> list[str]:
    """The subset of JSON Schema the documented schema uses."""
    errors: list[str] = []
    kinds = {"object": dict, "array": list, "string": str, "integer": int, "number": (int, float),
             "boolean": bool, "null": type(None)}
    wanted = schema.get("type")
    if wanted is not None:
        names = wanted if isinstance(wanted, list) else [wanted]
        ok = any(isinstance(value, kinds[n]) and not (n in ("integer", "number") and isinstance(value, bool))
                 for n in names)
        if not ok:
            return [f"{path}: expected {wanted}, got {type(value).__name__}"]
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: {value!r} not in {schema['enum']}")
    if "minimum" in schema and value < schema["minimum"]:
        errors.append(f"{path}: {value} < {schema['minimum']}")
    if "maximum" in schema and value > schema["maximum"]:
        errors.append(f"{path}: {value} > {schema['maximum']}")
    if isinstance(value, dict):
        for key in schema.get("required", []):
            if key not in value:
                errors.append(f"{path}: missing {key!r}")
        props = schema.get("properties", {})
        for key, item in value.items():
            if key in props:
                errors += _validate(item, props[key], f"{path}.{key}")
            elif schema.get("additionalProperties") is False:
                errors.append(f"{path}: unexpected key {key!r}")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            errors += _validate(item, schema["items"], f"{path}[{i}]")
    return errors

