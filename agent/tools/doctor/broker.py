"""Checks 6, 7 and 8 for one broker whose TCP port answered: one probe connection made exactly as the
agent makes its own (build_context + paho, probe client id), followed as far as it gets.
"""

from __future__ import annotations

import datetime
import ssl
from collections.abc import Sequence

from cryptography import x509

from agent.config import Config, HostPort
from agent.connection import probe
from agent.errors import TLSSetupError
from agent.tls.context import build_context
from agent.tools.doctor.certs import chain_details
from agent.tools.doctor.mqtt_check import check_subscribe, connect_result
from agent.tools.doctor.report import CheckResult, fail, result, skipped
from agent.tools.doctor.tls_check import setup_failure, tls_failure
from agent.tools.doctor.topic_mapping import check_dot_mapping, command_names


def check_broker(cfg: Config, host: HostPort, probe_id: str, timeout: float,
                 chain: Sequence[x509.Certificate], now: datetime.datetime) -> list[CheckResult]:
    """Checks 6-8 for one broker whose TCP port answered."""
    target = str(host)
    ctx: ssl.SSLContext | None = None
    if cfg.tls.enabled:
        try:
            ctx = build_context(cfg.tls)
        except TLSSetupError as err:
            return [setup_failure(cfg, host, probe_id, timeout, err),
                    skipped(7, target, "TLS could not be set up"), skipped(8, target, "TLS could not be set up")]
    attempt = probe.connect_attempt(cfg.mqtt, ctx, host, probe_id, timeout, keep_open=True)
    out: list[CheckResult] = []
    if attempt.stage == probe.TCP_FAILED:
        failed = fail("tcp_error", f"connecting to {host} failed this time: {attempt.error}",
                      "the port answered a moment ago: the broker or the link is unstable; run the doctor again")
        if ctx is None:
            return [skipped(6, target, "tls.enabled = false (plain MQTT)"),
                    result(7, target, "connect failed", [failed]), skipped(8, target, "the connection failed")]
        return [result(6, target, "connect failed", [failed]), skipped(7, target, "the connection failed"),
                skipped(8, target, "the connection failed")]
    if attempt.stage in (probe.TLS_FAILED, probe.TLS_REJECTED):
        assert attempt.error is not None
        return [tls_failure(cfg, host, probe_id, timeout, attempt.error, chain, now,
                             after_handshake=attempt.stage == probe.TLS_REJECTED),
                skipped(7, target, "the TLS handshake failed"), skipped(8, target, "the TLS handshake failed")]
    if ctx is None:
        out.append(skipped(6, target, "tls.enabled = false (plain MQTT)"))
    else:
        client_cert = ", client certificate accepted" if cfg.tls.cert_file and attempt.stage == probe.CONNACK else ""
        name = "host name not checked (tls.insecure)" if cfg.tls.insecure else "broker certificate verified"
        out.append(result(6, target, f"{attempt.tls_version}, {attempt.cipher}, {name}{client_cert}",
                          details={"version": attempt.tls_version, "cipher": attempt.cipher,
                                   "chain": chain_details(chain)}))
    out.append(connect_result(cfg, host, attempt, probe_id, timeout))
    if attempt.accepted:
        out.append(check_subscribe(cfg, host, attempt, ctx, probe_id, timeout))
        mapping = check_dot_mapping(cfg, host, ctx, probe_id, timeout, command_names(cfg))
        if mapping is not None:
            out.append(mapping)
    else:
        attempt.close()
        out.append(skipped(8, target, "the broker did not accept the connection"))
    return out
