"""The raw end of one connection: what the session saw, turned into a kind and words, before the
classifier (classify.py) weighs it against the history.

Pure: plain values in (the agent's own close reason, the CONNACK refusal, whether the broker sent a
DISCONNECT and its reason code, the exception a CONNECT raised), a kind from classify.py and a reason an
operator can act on out. The session records the times and logs; `TlsExplanations` is the one part with
I/O (it may fetch the broker's certificate once to explain a failed handshake) and remembers what it said.
"""

from __future__ import annotations

import logging
import socket
import ssl
from dataclasses import dataclass, field
from typing import Any, Callable

from agent.config import HostPort, TlsConfig
from agent.connection.classify import (
    AUTH_FAILED,
    CONNECTION_LOST,
    KEEPALIVE_TIMEOUT,
    NETWORK_ERROR,
    RECONNECT_REQUESTED,
    REFUSED,
    SERVER_DISCONNECT,
    SESSION_TAKEN_OVER,
    SHUTDOWN,
    TLS_ERROR,
)
from agent.connection.events import ConnectionEnded
from agent.tls.explain import explain_handshake_error, fetch_peer_certificate

# MQTT 5 reason codes (paho maps MQTT 3.1.1 CONNACK codes onto these as well).
RC_KEEPALIVE_TIMEOUT = 0x8D


RC_SESSION_TAKEN_OVER = 0x8E


AUTH_FAILURE_CODES = frozenset({0x86, 0x87, 0x8C})  # bad user name or password, not authorized, bad auth method


# A host counts as working once a connection to it has lasted this long (not at CONNACK: a broker
# that accepts and drops at once must be left for the next host too).
HOST_PROVEN_AFTER = 5.0


def end_cause(*, close_reason: tuple[str, str] | None, refused: tuple[int, str] | None, from_server: bool,
              code: int | None, text: str, keepalive: int, link_error: str) -> tuple[str, str, int | None]:
    """(kind, reason, reason code) of a connection that ended. `close_reason`: the agent closed it itself
    and said why; `refused`: the CONNACK's failure code and words; `code`/`text`: paho's reason for the
    disconnect; `link_error`: how the socket ended, if it did ("closed by the peer")."""
    if close_reason is not None:
        kind, reason = close_reason
        return kind, reason, code
    if refused is not None:
        refused_code, refused_text = refused
        kind = AUTH_FAILED if refused_code in AUTH_FAILURE_CODES else REFUSED
        return kind, f"the broker refused the connection: {refused_text} (CONNACK 0x{refused_code:02X})", refused_code
    if from_server:
        kind = SESSION_TAKEN_OVER if code == RC_SESSION_TAKEN_OVER else SERVER_DISCONNECT
        return kind, f"the broker sent DISCONNECT: {text}", code
    if code == RC_KEEPALIVE_TIMEOUT:
        return KEEPALIVE_TIMEOUT, f"no answer to our PINGREQ within the keepalive ({keepalive} s)", code
    return CONNECTION_LOST, f"connection lost ({link_error or text})", code


def is_tls_failure(exc: BaseException) -> bool:
    return isinstance(exc, (ssl.SSLError, ssl.CertificateError))


def connect_failure(host: HostPort, exc: BaseException, connect_timeout: float) -> tuple[str, str]:
    """(kind, reason) of a CONNECT that raised before any MQTT was spoken (TCP, DNS, a timeout). A TLS
    failure is TLS_ERROR with no reason: `TlsExplanations` gives it."""
    if is_tls_failure(exc):
        return TLS_ERROR, ""
    if isinstance(exc, ConnectionRefusedError):
        return REFUSED, f"connection refused by {host}: nothing listens on that port"
    if isinstance(exc, socket.gaierror):
        return NETWORK_ERROR, f"cannot resolve {host.host}: {exc.strerror or exc}"
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return NETWORK_ERROR, f"{host} did not answer within {connect_timeout:g} s"
    if isinstance(exc, OSError):
        return NETWORK_ERROR, f"cannot reach {host}: {exc.strerror or exc}"
    return NETWORK_ERROR, f"connecting to {host} failed: {exc}"


def tls_failure_key(host: HostPort, exc: BaseException) -> tuple[str, str]:
    """Two handshake failures with this key are the same failure (explained once, then named again)."""
    return str(host), f"{type(exc).__name__}:{getattr(exc, 'verify_code', '')}:{getattr(exc, 'reason', '')}"


@dataclass
class TlsExplanations:
    """Each distinct handshake failure explained once (cause + remedy); a repeat gets the same words
    without fetching the broker's certificate again. Forget them when the TLS settings change."""

    fetch: Callable[[HostPort, TlsConfig, float], Any] = fetch_peer_certificate
    _known: dict[tuple[str, str], str] = field(default_factory=dict)

    def explain(self, host: HostPort, exc: BaseException, tls: TlsConfig, timeout: float) -> tuple[str, bool]:
        """The explanation, and whether it was given before."""
        key = tls_failure_key(host, exc)
        known = self._known.get(key)
        if known:
            return known, True
        # Only a certificate verification failure is explained by what the broker presents.
        peer = self.fetch(host, tls, timeout) if getattr(exc, "verify_code", None) is not None else None
        text = str(explain_handshake_error(exc, host, tls, peer))
        self._known[key] = text
        return text, False

    def clear(self) -> None:
        self._known.clear()


def explained(kind: str) -> bool:
    """An end with a known cause (ours, a takeover the broker named, a dead link): it counts against no
    message the agent sent just before (the poison check)."""
    return kind in (SHUTDOWN, RECONNECT_REQUESTED, SESSION_TAKEN_OVER, KEEPALIVE_TIMEOUT)


def host_failure(ended: ConnectionEnded) -> tuple[bool, bool]:
    """Does this classified end count against its host (for failover), and is it definite? A host that
    fails to connect, or accepts and drops at once, is skipped after a few tries; a refused TCP connect
    means nothing listens there (a stopped cluster node): no point in a second try."""
    flapping = ended.uptime is not None and ended.uptime < HOST_PROVEN_AFTER and ended.kind in (
        NETWORK_ERROR, SERVER_DISCONNECT)
    if ended.connected_at is None or flapping:
        return True, ended.kind == REFUSED and ended.error != ""
    return False, False


def end_log_line(ended: ConnectionEnded, raw_kind: str,
                 raw_reason: str = "") -> tuple[int, str, dict[str, object]] | None:
    """The level, words and journal fields of the log line for a classified end, or None when it was
    logged already (a failed connect attempt is logged as it fails, unless the classifier added to it:
    e.g. the broker that dropped us refuses the next CONNECT, so it was restarting)."""
    if ended.error:
        return None if ended.reason == raw_reason else (logging.WARNING, ended.reason, {"MQTT_REASON": ended.kind})
    if raw_kind == RECONNECT_REQUESTED:
        return logging.INFO, f"disconnected from {ended.host} to reconnect: {ended.reason}", {}
    if ended.kind == SHUTDOWN:
        return logging.INFO, f"disconnected from {ended.host} ({ended.reason or 'agent request'})", {}
    up = f" after {ended.uptime:.1f} s" if ended.uptime is not None else ""
    idle = f", {ended.idle_for:.1f} s after the last byte received" if ended.idle_for is not None else ""
    level = logging.ERROR if ended.kind in (AUTH_FAILED, REFUSED, SESSION_TAKEN_OVER) else logging.WARNING
    return (level, f"connection to {ended.host} ended{up}{idle}: {ended.kind}: {ended.reason}",
            {"MQTT_REASON": ended.kind, "MQTT_RC": ended.reason_code})
