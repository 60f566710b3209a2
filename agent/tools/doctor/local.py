"""Check 10: this machine: clock sanity, free space in state_dir, and the metrics port (free, or
owned by a running agent)."""

from __future__ import annotations

import ctypes
import ctypes.util
import datetime
import errno
import os
import socket
import sys
import urllib.error
import urllib.request
from pathlib import Path

from agent.config import HostPort
from agent.tools.doctor.report import CheckResult, fail, result, warn

# A clock earlier than this is certainly wrong: this mqtt-agent release did not exist yet.
CLOCK_FLOOR = datetime.datetime(2025, 1, 1, tzinfo=datetime.timezone.utc)
MIN_FREE_BYTES = 5 * 1024 * 1024
LOW_FREE_BYTES = 50 * 1024 * 1024
_TIME_ERROR = 5  # adjtimex(2): the clock is not synchronised
_METRICS_PREFIX = b"mqtt_agent_"


def kernel_clock_synchronised() -> bool | None:
    """Whether the kernel reports the clock as NTP-synchronised (adjtimex(2), read-only); None if unknown.

    This is what chrony, ntpd and systemd-timesyncd all report to; `timedatectl` reads the same flag.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        # A zeroed struct timex has modes = 0: a pure query. The buffer is larger than the struct on
        # every architecture, so the kernel's write stays inside it.
        buf = ctypes.create_string_buffer(1024)
        state = int(libc.adjtimex(buf))
    except (OSError, AttributeError):
        return None
    if state < 0:
        return None
    return state != _TIME_ERROR


def assess_clock(now: datetime.datetime, synchronised: bool | None) -> CheckResult:
    """Pure: the wall clock and the kernel's sync flag -> the clock line of check 10."""
    summary = f"{now:%Y-%m-%d %H:%M:%S} UTC"
    if now < CLOCK_FLOOR:
        return result(10, "clock", summary, [fail(
            "clock_wrong",
            f"the system clock says {now:%Y-%m-%d}, before this mqtt-agent release: it was never set (a board "
            "without RTC boots in 1970 until NTP syncs); every certificate looks not yet valid",
            "enable time sync (`timedatectl set-ntp true`, or chrony) and let NTP (UDP 123) reach its servers",
        )], {"now": now.isoformat(), "synchronised": synchronised})
    if synchronised is False:
        return result(10, "clock", summary + ", not NTP-synchronised", [warn(
            "clock_unsynchronised",
            "the kernel reports the clock as not synchronised (adjtimex: TIME_ERROR); a drifting clock makes "
            "certificates look expired or not yet valid",
            "check `timedatectl status` (System clock synchronized: yes) and the NTP service (systemd-timesyncd, "
            "chrony)",
        )], {"now": now.isoformat(), "synchronised": False})
    state = "NTP-synchronised" if synchronised else "synchronisation state unknown"
    return result(10, "clock", f"{summary}, {state}", details={"now": now.isoformat(), "synchronised": synchronised})


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _mib(n: float) -> str:
    return f"{n / 1024 ** 2:.1f} MiB" if n < 10 * 1024 ** 2 else f"{n / 1024 ** 2:.0f} MiB" if n < 10 * 1024 ** 3 \
        else f"{n / 1024 ** 3:.0f} GiB"


def check_state_dir(state_dir: Path) -> CheckResult:
    """Free space, free inodes and a writable file system where the journal and history live."""
    where = _existing(state_dir)
    try:
        st = os.statvfs(where)
    except OSError as exc:
        return result(10, f"state_dir {state_dir}", "cannot be inspected", [warn(
            "state_dir_unreadable", f"{state_dir} cannot be inspected: {exc.strerror or exc}",
            "run the doctor as the user the agent runs as, or as root")])
    no_inodes = bool(st.f_files) and st.f_favail == 0
    return assess_state_dir(state_dir, where, st.f_bavail * st.f_frsize, no_inodes=no_inodes,
                            read_only=bool(st.f_flag & os.ST_RDONLY))


def assess_state_dir(state_dir: Path, where: Path, free: int, *, no_inodes: bool, read_only: bool) -> CheckResult:
    """Pure: what statvfs said about the file system of `state_dir` (or of `where`, its nearest existing
    parent, when the agent has not created it yet) -> the state_dir line of check 10."""
    target = f"state_dir {state_dir}"
    details = {"free_bytes": free, "read_only": read_only, "exists": where == state_dir}
    created = "" if where == state_dir else f" (does not exist yet: the agent creates it; measured on {where})"
    if read_only:
        return result(10, target, "read-only file system" + created, [fail(
            "state_dir_read_only", f"{where} is on a read-only file system: the agent cannot keep its command "
            "journal there", "point agent.state_dir at a writable file system (read-only root images: use a "
            "persistent data partition)")], details)
    if free < MIN_FREE_BYTES or no_inodes:
        what = "no free inodes" if no_inodes else f"only {_mib(free)} free"
        return result(10, target, what + created, [fail(
            "state_dir_full", f"the file system of {where} has {what}: the command journal cannot grow",
            f"free space there (`du -xh {where} | sort -h | tail`), or move agent.state_dir")], details)
    summary = f"{_mib(free)} free{created}"
    if free < LOW_FREE_BYTES:
        return result(10, target, summary, [warn(
            "state_dir_low_space", f"the file system of {where} has only {_mib(free)} free",
            f"free space there (`du -xh {where} | sort -h | tail`)")], details)
    return result(10, target, summary, details=details)


def _scrape(host: str, port: int, timeout: float) -> tuple[int | None, bytes]:
    probe_host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    shown = f"[{probe_host}]" if ":" in probe_host else probe_host
    try:
        with urllib.request.urlopen(f"http://{shown}:{port}/metrics", timeout=timeout) as resp:
            return int(resp.status), resp.read(1024 * 1024)
    except urllib.error.HTTPError as exc:
        return exc.code, b""
    except (OSError, ValueError):
        return None, b""


def check_metrics_port(endpoint: HostPort | None, timeout: float) -> CheckResult:
    """The metrics address is free to bind, or already served by an mqtt-agent."""
    if endpoint is None:
        return result(10, "metrics", 'disabled ([metrics] listen = "")')
    target = f"metrics {endpoint}"
    try:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(endpoint.host, endpoint.port, type=socket.SOCK_STREAM,
                                                              flags=socket.AI_PASSIVE)[0]
    except (OSError, UnicodeError) as exc:
        return result(10, target, "address cannot be resolved", [fail(
            "metrics_address_invalid", f"[metrics] listen host {endpoint.host!r} cannot be resolved: {exc}",
            f'set [metrics] listen = "127.0.0.1:{endpoint.port}"')])
    sock = socket.socket(family, kind, proto)
    try:
        # The exporter's HTTP server sets SO_REUSEADDR too, so TIME_WAIT leftovers do not count as "in use".
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
    except OSError as exc:
        return _port_taken(endpoint, exc, timeout)
    finally:
        sock.close()
    return result(10, target, "free")


def _port_taken(endpoint: HostPort, exc: OSError, timeout: float) -> CheckResult:
    target = f"metrics {endpoint}"
    if exc.errno == errno.EADDRINUSE:
        status, body = _scrape(endpoint.host, endpoint.port, timeout)
        if status == 200 and _METRICS_PREFIX in body:
            return result(10, target, "in use by a running mqtt-agent (its /metrics answers)",
                          details={"owner": "mqtt-agent"})
        answer = f" (it answers /metrics with HTTP {status}, without mqtt_agent_ metrics)" if status else ""
        return result(10, target, "in use by another program", [fail(
            "metrics_port_in_use",
            f"{endpoint} is already in use by another program{answer}: the agent cannot export metrics there",
            f"find it with `ss -ltnp 'sport = :{endpoint.port}'`, or set [metrics] listen to a free port",
        )], {"owner": "other"})
    if exc.errno == errno.EADDRNOTAVAIL:
        return result(10, target, "not an address of this machine", [fail(
            "metrics_address_not_local", f"{endpoint.host} is not an address of this machine",
            f'set [metrics] listen = "127.0.0.1:{endpoint.port}" (or an address `ip -brief address` lists)')])
    if exc.errno == errno.EACCES:
        return result(10, target, "permission denied", [fail(
            "metrics_port_privileged", f"binding {endpoint} is not permitted (ports below 1024 need privileges)",
            "use a port above 1023 in [metrics] listen, e.g. 9883")])
    return result(10, target, "cannot be bound", [fail(
        "metrics_port_error", f"binding {endpoint} failed: {exc.strerror or exc}", "check [metrics] listen")])
