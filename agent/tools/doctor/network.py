"""Checks 4 and 5: DNS resolution and TCP connect for one broker, each bounded by the timeout.

TCP failures are told apart the way they look on the wire: refused (an RST: nothing listens),
timed out (silence: a firewall drops the packets or the host is down) and unreachable (no route).
"""

from __future__ import annotations

import errno
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

from agent.config import HostPort, is_ip_address
from agent.tools.doctor.report import CheckResult, Finding, fail, result, warn

MAX_ADDRESSES = 4
_UNREACHABLE = {errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EADDRNOTAVAIL}


@dataclass(frozen=True)
class Address:
    family: int
    sockaddr: tuple[Any, ...]

    @property
    def ip(self) -> str:
        return str(self.sockaddr[0])


def _getaddrinfo(host: HostPort, timeout: float) -> list[Address]:
    """getaddrinfo has no timeout of its own: run it in a daemon thread and stop waiting after `timeout`."""
    box: list[Any] = []

    def lookup() -> None:
        try:
            box.append(socket.getaddrinfo(host.host, host.port, type=socket.SOCK_STREAM))
        except (OSError, UnicodeError) as exc:
            box.append(exc)

    worker = threading.Thread(target=lookup, name="doctor-dns", daemon=True)
    worker.start()
    worker.join(timeout)
    if not box:
        raise socket.timeout(f"no answer within {timeout:g} s")
    if isinstance(box[0], BaseException):
        raise box[0]
    seen: list[Address] = []
    for family, _, _, _, sockaddr in box[0]:
        addr = Address(family, tuple(sockaddr))
        if all(a.ip != addr.ip for a in seen):
            seen.append(addr)
    return seen


def check_dns(host: HostPort, timeout: float) -> tuple[list[Address], CheckResult]:
    """Check 4. Returns the addresses (empty on failure) and the result."""
    target = str(host)
    if is_ip_address(host.host):
        family = socket.AF_INET6 if ":" in host.host else socket.AF_INET
        return [Address(family, (host.host, host.port))], result(4, target, "an IP address: nothing to resolve")
    try:
        addresses = _getaddrinfo(host, timeout)
    except socket.timeout:
        return [], result(4, target, "no answer", [fail(
            "dns_timeout",
            f"resolving {host.host} got no answer within {timeout:g} s",
            "check that the DNS servers of this gateway are reachable (`resolvectl status` or /etc/resolv.conf)",
        )])
    except socket.gaierror as exc:
        return [], result(4, target, "cannot be resolved", [_dns_finding(host, exc)])
    except (OSError, UnicodeError) as exc:
        return [], result(4, target, "cannot be resolved", [fail(
            "dns_failed", f"resolving {host.host} failed: {exc}", f"check the host name {host.host} in mqtt.hosts")])
    ips = ", ".join(a.ip for a in addresses)
    return addresses, result(4, target, f"{host.host} -> {ips}", details={"addresses": [a.ip for a in addresses]})


def _dns_finding(host: HostPort, exc: socket.gaierror) -> Finding:
    name = host.host
    if exc.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", -5)):
        return fail(
            "dns_no_such_name",
            f"{name} does not exist in DNS ({exc.strerror})",
            f"check the spelling of {name} in mqtt.hosts; `getent hosts {name}` must print an address",
        )
    if exc.errno == socket.EAI_AGAIN:
        return fail(
            "dns_unavailable",
            f"resolving {name} failed temporarily ({exc.strerror}): no DNS server answered",
            "check the gateway's network and DNS servers (`resolvectl status` or /etc/resolv.conf; "
            "is the uplink up?), or put the broker's address in mqtt.hosts",
        )
    return fail("dns_failed", f"resolving {name} failed: {exc.strerror or exc}",
                f"check {name} in mqtt.hosts and the resolver configuration (/etc/nsswitch.conf, /etc/resolv.conf)")


@dataclass(frozen=True)
class TcpAttempt:
    address: Address
    ok: bool
    seconds: float
    code: str = ""
    error: str = ""


def _connect(address: Address, timeout: float) -> TcpAttempt:
    start = time.monotonic()
    sock = socket.socket(address.family, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(address.sockaddr)
    except ConnectionRefusedError:
        return TcpAttempt(address, False, time.monotonic() - start, "connection_refused", "connection refused")
    except socket.timeout:
        return TcpAttempt(address, False, time.monotonic() - start, "timed_out", f"no answer within {timeout:g} s")
    except OSError as exc:
        code = "unreachable" if exc.errno in _UNREACHABLE else "tcp_error"
        return TcpAttempt(address, False, time.monotonic() - start, code, exc.strerror or str(exc))
    finally:
        sock.close()
    return TcpAttempt(address, True, time.monotonic() - start)


def _tcp_finding(host: HostPort, attempt: TcpAttempt, timeout: float, severity: str = "fail") -> Finding:
    where = f"{attempt.address.ip} port {host.port}"
    make = fail if severity == "fail" else warn
    if attempt.code == "connection_refused":
        return make(
            "connection_refused",
            f"connection refused by {where}: nothing listens on that port (or a firewall rejects it)",
            f"check the port in mqtt.hosts ({host}): brokers listen on 8883 for MQTT over TLS and 1883 without; "
            f"check that the broker runs (on the broker: `ss -ltn 'sport = :{host.port}'`)",
        )
    if attempt.code == "timed_out":
        return make(
            "timed_out",
            f"no answer from {where} within {timeout:g} s: a firewall drops the packets, or the host is down",
            f"check firewalls and security groups between this gateway and the broker for outbound TCP {host.port} "
            f"(`nc -vz {host.host} {host.port}`); on a slow link, retry with a larger --timeout",
        )
    if attempt.code == "unreachable":
        return make(
            "unreachable",
            f"{where} is unreachable from this gateway ({attempt.error}): there is no route to it",
            "check the gateway's network: `ip route` must show a route there (is the uplink, modem or VPN up?)",
        )
    return make("tcp_error", f"connecting to {where} failed: {attempt.error}",
                f"check the network path from this gateway to {host}")


def check_tcp(host: HostPort, addresses: list[Address], timeout: float) -> tuple[bool, CheckResult]:
    """Check 5: connect to each resolved address (at most MAX_ADDRESSES). True when one answered."""
    attempts = [_connect(a, timeout) for a in addresses[:MAX_ADDRESSES]]
    details = {"attempts": [{"address": a.address.ip, "ok": a.ok, "ms": round(a.seconds * 1000, 1),
                             "error": a.code or None} for a in attempts]}
    first_ok = next((i for i, a in enumerate(attempts) if a.ok), None)
    if first_ok is None:
        return False, result(5, str(host), attempts[0].error if attempts else "no address",
                             [_tcp_finding(host, a, timeout) for a in attempts], details)
    ok = attempts[first_ok]
    # paho tries the addresses in order: one that times out before the working one delays every connect.
    slow = [a for a in attempts[:first_ok] if a.code == "timed_out"]
    findings = [_tcp_finding(host, a, timeout, "warn") for a in slow]
    return True, result(5, str(host), f"connected to {ok.address.ip} in {ok.seconds * 1000:.1f} ms", findings,
                        details)
