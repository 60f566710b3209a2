"""Runs the checks in order and stops descending a branch when its prerequisite fails.

    1 config --+-- 2 files ------------------------------------+
               +-- 3 certificates (local files)                |
               +-- per broker: 4 dns -> 5 tcp -> 3 certificate (fetched) |
               |                              -> 6 tls (needs 2) -> 7 connect -> 8 subscribe
               +-- 9 history
               +-- 10 local (clock, state_dir, metrics port)
               +-- 11 renewal (the pair in use, next renewal, last failure)

A failed config skips everything else. Per broker, a failed step skips the steps below it; the
other brokers and the local checks still run. Nothing is written; the production client id is
never used.
"""

from __future__ import annotations

import datetime
import secrets
import time
from collections.abc import Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Callable

from cryptography import x509

from agent import __version__
from agent.config import Config, HostPort
from agent.renewal.store import PairStore, select_pair
from agent.tls.explain import fetch_chain
from agent.tools.doctor.broker import check_broker
from agent.tools.doctor.certs import check_broker_certificate, check_local_certificates
from agent.tools.doctor.config_check import check_config
from agent.tools.doctor.files import BLOCKS_TLS, check_files
from agent.tools.doctor.history import check_history
from agent.tools.doctor.local import assess_clock, check_metrics_port, check_state_dir, kernel_clock_synchronised
from agent.tools.doctor.network import check_dns, check_tcp
from agent.tools.doctor.renewal_check import check_renewal
from agent.tools.doctor.report import CheckResult, Report, fail, result, skipped, warn
from agent.topics import PROBE_MARK

DEFAULT_TIMEOUT = 5.0


def probe_client_id(client_id: str, token: str | None = None) -> str:
    """The client id the doctor connects with: never the production one, which would take its session over."""
    return f"{client_id}{PROBE_MARK}{token or secrets.token_hex(3)}"


def _guarded(number: int, target: str, step: Callable[[], Sequence[CheckResult]]) -> list[CheckResult]:
    """Run one step; an unexpected exception becomes a FAIL line instead of ending the whole report."""
    try:
        return list(step())
    except Exception as exc:  # noqa: BLE001 - a diagnostic tool reports its own failures as findings too
        return [result(number, target, "internal error", [fail(
            "internal_error", f"the doctor itself failed in this check: {type(exc).__name__}: {exc}",
            "report this, with the output of `mqtt-agent doctor --json`, to the mqtt-agent maintainers")])]


def _host_checks(cfg: Config, host: HostPort, probe_id: str, timeout: float, tls_blocked: str,
                 now: datetime.datetime) -> list[CheckResult]:
    target = str(host)
    later = [6, 7, 8]
    addresses, dns = check_dns(host, timeout)
    out = [dns]
    if not addresses:
        reason = "DNS resolution failed"
        cert_skip = [skipped(3, f"broker {host}", reason)] if cfg.tls.enabled else []
        return [*out, skipped(5, target, reason), *cert_skip, *(skipped(n, target, reason) for n in later)]
    reachable, tcp = check_tcp(host, addresses, timeout)
    out.append(tcp)
    if not reachable:
        reason = "the TCP connection failed"
        cert_skip = [skipped(3, f"broker {host}", reason)] if cfg.tls.enabled else []
        return [*out, *cert_skip, *(skipped(n, target, reason) for n in later)]
    chain: list[x509.Certificate] = []
    if cfg.tls.enabled:
        chain, error = fetch_chain(host, cfg.tls, timeout)
        if chain:
            out.append(check_broker_certificate(chain, host, cfg.tls, now))
        else:
            out.append(result(3, f"broker {host}", "no certificate received", [warn(
                "no_broker_certificate", f"{host} sent no certificate in a TLS handshake ({error or 'no reason'})",
                "check that this port serves MQTT over TLS (usually 8883)")]))
    if tls_blocked:
        return out + [skipped(n, target, tls_blocked) for n in later]
    return out + check_broker(cfg, host, probe_id, timeout, chain, now)


def run_doctor(
    config_path: Path,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    service_user: str | None = "mqtt-agent",
    wall: Callable[[], float] = time.time,
    probe_token: str | None = None,
) -> Report:
    """Diagnose the gateway described by `config_path`. Never raises for a problem it can name;
    every network step is bounded by `timeout` seconds."""
    started = time.monotonic()
    report = Report(config=str(config_path), started_at=wall(), agent_version=__version__, timeout_s=timeout)
    cfg, config_result = check_config(config_path)
    report.add(config_result)
    if cfg is None:
        for number in range(2, 12):
            report.add(skipped(number, "", "the configuration is invalid"))
        report.duration_s = time.monotonic() - started
        return report
    report.client_id = cfg.mqtt.client_id
    configured = cfg
    # Diagnose the pair the agent uses: a renewed one in agent.state_dir/tls if it is present and good.
    pair = select_pair(PairStore(cfg.agent.state_dir / "tls"), cfg.tls, cfg.agent.device_id,
                       datetime.datetime.fromtimestamp(wall(), datetime.timezone.utc)) if cfg.tls.cert_file else None
    if pair is not None and pair.source != "configured":
        cfg = replace(cfg, tls=pair.tls(cfg.tls))
    report.probe_client_id = probe_id = probe_client_id(cfg.mqtt.client_id, probe_token)
    now = datetime.datetime.fromtimestamp(wall(), datetime.timezone.utc)
    files = _guarded(2, "", lambda: [check_files(cfg, service_user)])
    report.add(*files)
    report.add(*_guarded(3, "", lambda: check_local_certificates(cfg, now)))
    blocking = [f for f in files[0].findings if f.code in BLOCKS_TLS or f.code == "internal_error"]
    tls_blocked = f"the TLS files are unusable ({blocking[0].code}, check 2)" if blocking and cfg.tls.enabled else ""
    for host in cfg.mqtt.hosts:
        report.add(*_guarded(4, str(host), partial(_host_checks, cfg, host, probe_id, timeout, tls_blocked, now)))
    report.add(*_guarded(9, "", lambda: [check_history(cfg.agent.state_dir, wall())]))
    report.add(*_guarded(10, "clock", lambda: [assess_clock(now, kernel_clock_synchronised())]))
    report.add(*_guarded(10, "state_dir", lambda: [check_state_dir(cfg.agent.state_dir)]))
    report.add(*_guarded(10, "metrics", lambda: [check_metrics_port(cfg.metrics.endpoint, timeout)]))
    report.add(*_guarded(11, "", lambda: [check_renewal(configured, now)]))
    report.duration_s = time.monotonic() - started
    return report
