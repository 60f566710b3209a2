"""Check 11: the certificate pair in use (configured or renewed) and the state of its renewal.

Read-only: it looks at agent.state_dir/tls (agent/renewal/store.py) and never starts a renewal."""

from __future__ import annotations

import datetime
from typing import Any

from agent.config import Config
from agent.renewal import policy
from agent.renewal.store import PENDING, PENDING_KEY, REJECTED, PairStore, select_pair
from agent.tools.doctor.report import CheckResult, Finding, result, skipped, warn

# Without renewal, a certificate this close to its expiry is worth a warning (the alert's horizon too).
UNRENEWED_WARN = 14 * 86400.0


def check_renewal(cfg: Config, now: datetime.datetime) -> CheckResult:
    if not (cfg.tls.enabled and cfg.tls.cert_file):
        return skipped(11, "", "no client certificate is configured")
    store = PairStore(cfg.agent.state_dir / "tls")
    pair = select_pair(store, cfg.tls, cfg.agent.device_id, now)
    state = store.read_state()
    findings: list[Finding] = []
    details: dict[str, Any] = {"pair": pair.describe() if pair else None, "enabled": cfg.renewal.enabled,
                               "signer": cfg.renewal.signer or None,
                               "pending": store.exists(PENDING) or store.exists(PENDING_KEY)}
    if pair is None:
        return result(11, "", "no usable certificate pair (check 2 and 3 say why)", details=details)
    left = (pair.not_after - now).total_seconds()
    summary = f"{pair.source} pair in use ({pair.cert_file}), valid until {pair.not_after:%Y-%m-%d %H:%M} UTC"
    r = cfg.renewal
    if r.enabled:
        due = max(policy.due_at(pair.not_before.timestamp(), pair.not_after.timestamp(), cfg.agent.device_id,
                                at=r.at, before=r.before), float(state.get("next_attempt") or 0.0))
        when = datetime.datetime.fromtimestamp(due, datetime.timezone.utc)
        details["next_renewal"] = when.isoformat()
        summary += f"; renewal ({r.signer}) due {when:%Y-%m-%d %H:%M} UTC"
    elif left < UNRENEWED_WARN:
        findings.append(warn("certificate_not_renewed", f"the client certificate expires in {left / 86400:.1f} days "
                             "and renewal is off", "configure [renewal] signer (docs/renewal.md), or enroll again "
                             "and install a new certificate with `mqtt-agent enroll --install-cert`"))
    failure = state.get("last_failure")
    if isinstance(failure, dict) and int(state.get("failures") or 0) > 0:
        details["last_failure"] = failure
        details["failures"] = state.get("failures")
        at = datetime.datetime.fromtimestamp(float(failure.get("at") or 0), datetime.timezone.utc)
        findings.append(warn("renewal_failing", f"certificate renewal failed {state.get('failures')} time(s) in a "
                             f"row, last at {at:%Y-%m-%d %H:%M} UTC ({failure.get('result')}): {failure.get('reason')}",
                             "fix the cause named above; `mqtt-agent renew --force` tries again at once"))
    if store.exists(REJECTED):
        details["rejected"] = str(store.path(REJECTED))
    if state.get("watch"):
        summary += "; the renewed pair is still being watched after the switch"
    return result(11, "", summary, findings, details=details)
