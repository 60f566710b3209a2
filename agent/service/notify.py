"""Talking to systemd's service manager: sd_notify messages, the STATUS line and the watchdog thread.

READY=1, RELOADING=1 and STOPPING=1 mark the agent's life cycle; STATUS= always says what it is doing
("connected to broker:8883 (MQTT 3.1.1, keepalive 20 s learned)"); WATCHDOG=1 goes out only while
agent/service/health.py finds the MQTT loop and the dispatcher making progress, so a wedged agent is
restarted instead of looking fine. Without $NOTIFY_SOCKET (not started by systemd as Type=notify)
every message is dropped silently; the STATUS line is still kept for `info` and the logs.

systemd-python's sd_notify is used when it is installed; otherwise a few lines of AF_UNIX datagram
code do the same (the protocol is one datagram of newline-separated KEY=VALUE pairs).
"""

from __future__ import annotations

import importlib
import logging
import os
import socket
import threading
import time
from collections.abc import Mapping
from typing import Callable

from agent.config import HostPort
from agent.connection.events import ConnectionEnded, SessionListener
from agent.service.health import Verdict

log = logging.getLogger(__name__)

Send = Callable[[str], bool]

# Below this, a watchdog ping interval would make a loaded machine miss pings for no reason.
MIN_STALL_LIMIT = 3.0
# Health is judged (and STATUS refreshed) at least this often, independent of the ping interval.
CHECK_INTERVAL = 1.0


def notify_address(value: str) -> str | bytes | None:
    """The socket address in $NOTIFY_SOCKET: a path, or '@name' for the abstract namespace."""
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None  # vsock and other forms are systemd-python's business


def socket_sender(address: str | bytes) -> Send:
    """An sd_notify sender in plain Python (used when systemd-python is absent)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    # Never block the caller: if the service manager's queue is full, a message is dropped.
    sock.setblocking(False)
    lock = threading.Lock()

    def send(message: str) -> bool:
        try:
            with lock:
                sock.sendto(message.encode("utf-8", "replace"), address)
        except OSError as exc:
            log.debug("sd_notify to %r failed: %s", address, exc)
            return False
        return True

    return send


def systemd_python_sender() -> Send | None:
    """sd_notify(3) through systemd-python, or None if it is not installed."""
    try:
        daemon = importlib.import_module("systemd.daemon")
    except ImportError:
        return None

    def send(message: str) -> bool:
        try:
            return bool(daemon.notify(message))
        except Exception as exc:  # noqa: BLE001 - a notification must never take the agent down
            log.debug("sd_notify failed: %s", exc)
            return False

    return send


def sender_from_environment(env: Mapping[str, str] | None = None) -> Send | None:
    """The sender for $NOTIFY_SOCKET, or None when the agent was not started as Type=notify."""
    env = os.environ if env is None else env
    raw = env.get("NOTIFY_SOCKET", "")
    if not raw:
        return None
    sender = systemd_python_sender()
    if sender is not None:
        log.debug("sd_notify through systemd-python to %s", raw)
        return sender
    address = notify_address(raw)
    if address is None:
        log.warning("NOTIFY_SOCKET=%s is not a path or abstract socket and systemd-python is not installed: "
                    "systemd will not hear from the agent", raw)
        return None
    log.debug("sd_notify through a plain AF_UNIX socket to %s (systemd-python is not installed)", raw)
    return socket_sender(address)


def watchdog_interval(env: Mapping[str, str] | None = None, pid: int | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of $WATCHDOG_USEC, as sd_watchdog_enabled(3) advises),
    or None if systemd does not watch this process."""
    env = os.environ if env is None else env
    usec = env.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    owner = env.get("WATCHDOG_PID", "")
    if owner and owner != str(os.getpid() if pid is None else pid):
        return None  # meant for another process (we are a child of the watched one)
    return int(usec) / 1e6 / 2


def _one_line(text: str) -> str:
    # A newline would start a new KEY=VALUE field: host names and reasons come from outside.
    return " ".join(text.split())


def _seconds(value: float) -> str:
    return f"{value:.0f}" if value >= 10 or value == int(value) else f"{value:.1f}"


class Notifier:
    """sd_notify messages. Thread-safe, never raises; a no-op without a service manager."""

    def __init__(self, send: Send | None, *, monotonic_usec: Callable[[], int] | None = None) -> None:
        self._send = send
        self._monotonic_usec = monotonic_usec or (lambda: time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)
        self._lock = threading.Lock()
        self._last_status: str | None = None
        self.sent: int = 0

    @property
    def enabled(self) -> bool:
        return self._send is not None

    def send(self, *fields: str) -> bool:
        """Send one message of KEY=VALUE fields (a STATUS field is remembered for `status`)."""
        if self._send is None:
            return False
        with self._lock:
            ok = self._send("\n".join(fields))
            self.sent += ok
            for f in fields:
                if f.startswith("STATUS="):
                    self._last_status = f[len("STATUS="):]
        return ok

    def ready(self, status: str) -> bool:
        return self.send("READY=1", f"STATUS={_one_line(status)}")

    def reloading(self, status: str = "reloading the configuration") -> bool:
        # MONOTONIC_USEC lets systemd (253+, Type=notify-reload) match this to the reload request.
        return self.send("RELOADING=1", f"MONOTONIC_USEC={self._monotonic_usec()}", f"STATUS={_one_line(status)}")

    def stopping(self, status: str, needs: float | None = None) -> bool:
        fields = ["STOPPING=1", f"STATUS={_one_line(status)}"]
        if needs is not None:
            # Extends TimeoutStopSec= only if the stop really takes longer: a larger agent.shutdown_grace
            # then needs no unit change.
            fields.append(f"EXTEND_TIMEOUT_USEC={int(needs * 1e6)}")
        return self.send(*fields)

    def status(self, text: str) -> bool:
        """Send STATUS= if it differs from the last one sent."""
        line = _one_line(text)
        with self._lock:
            if line == self._last_status:
                return False
        return self.send(f"STATUS={line}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")


class StatusLine(SessionListener):
    """Keeps the one-line description of what the agent is doing, from the session's events.

    Runs on the network thread: it only stores text and wakes `on_change`, never blocks.
    """

    def __init__(self, protocol: str, configured_keepalive: int, on_change: Callable[[], None] = lambda: None) -> None:
        self.protocol = protocol
        self.configured_keepalive = configured_keepalive
        self._on_change = on_change
        self._text = "starting"
        self._learned: int | None = None
        self._failed_attempts = 0
        self._note = ""
        self._lock = threading.Lock()

    @property
    def text(self) -> str:
        with self._lock:
            return self._text + (f"; {self._note}" if self._note else "")

    def _set(self, text: str, note: str | None = None) -> None:
        with self._lock:
            self._text = text
            if note is not None:
                self._note = note
        self._on_change()

    def connecting(self, host: HostPort, attempt: int) -> None:
        n = self._failed_attempts + 1
        self._set(f"connecting to {host}" + (f" (attempt {n})" if n > 1 else ""), note="")

    def connected(self, host: HostPort, keepalive: int, session_present: bool) -> None:
        self._failed_attempts = 0
        if self._learned is not None and keepalive == self._learned and keepalive != self.configured_keepalive:
            how = " learned"
        elif keepalive != self.configured_keepalive:
            how = " set by the broker"
        else:
            how = ""
        self._set(f"connected to {host} (MQTT {self.protocol}, keepalive {keepalive} s{how})")

    def connection_ended(self, ended: ConnectionEnded) -> None:
        if ended.connected_at is None:
            self._failed_attempts += 1
        self._set(f"disconnected from {ended.host}: {ended.kind}")

    def reconnect_scheduled(self, delay: float, ended: ConnectionEnded) -> None:
        self._set(f"reconnecting in {_seconds(delay)} s: {ended.kind}")

    def subscribed(self, topic: str, granted: bool, reason: str) -> None:
        with self._lock:
            self._note = "" if granted else f"subscription to {topic} refused ({reason}): no commands can arrive"
        self._on_change()

    def keepalive_changed(self, old: int, new: int, direction: str, evidence: str) -> None:
        self._learned = new

    def session_takeover(self, client_id: str) -> None:
        with self._lock:
            self._note = f"another client with client id {client_id} took the session over"
        self._on_change()


class ServiceWatchdog:
    """The thread that keeps systemd informed: STATUS on every change, WATCHDOG=1 only while healthy.

    `health()` is evaluated every second (agent/service/health.py); when it reports a problem the STATUS line
    says so and pings stop, so systemd restarts the agent after WatchdogSec=. A ping is never sent
    on a timer alone.
    """

    def __init__(
        self,
        notifier: Notifier,
        status: Callable[[], str],
        health: Callable[[], Verdict],
        *,
        interval: float | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.notifier = notifier
        self._status = status
        self._health = health
        self.interval = interval
        self._clock = clock
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._phase = ""
        self.verdict = Verdict(True)
        self.pings = 0

    @staticmethod
    def stall_limit(interval: float | None) -> float:
        """How long the loop or dispatcher may show no progress before pings stop: one ping interval
        (half of WatchdogSec=), so systemd acts within about 1.5 x WatchdogSec of a wedge."""
        return max(interval or 15.0, MIN_STALL_LIMIT)

    def poke(self) -> None:
        """Something changed (called from any thread, never blocks): refresh STATUS now."""
        self._wake.set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="sd-notify", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread:
            self._thread.join(timeout)

    def set_phase(self, text: str) -> None:
        """A life-cycle phase ("stopping: ...") that the STATUS line shows instead of the connection."""
        self._phase = text
        self.poke()

    def current_status(self) -> str:
        if not self.verdict.healthy:
            return f"unhealthy: {self.verdict.problem} (watchdog pings withheld)"
        return self._phase or self._status()

    def _run(self) -> None:
        next_ping = self._clock()
        while not self._stop.is_set():
            try:
                next_ping = self._turn(next_ping)
            except Exception:
                log.exception("internal error in the systemd notification thread")
            self._wake.wait(self.wait_time(next_ping))
            self._wake.clear()

    def wait_time(self, next_ping: float) -> float:
        """How long to sleep before the next turn: until the next ping is due, at most CHECK_INTERVAL.
        While unhealthy the ping stays due, so then it is CHECK_INTERVAL (never a busy loop)."""
        if self.interval is None or not self.verdict.healthy:
            return CHECK_INTERVAL
        return min(CHECK_INTERVAL, max(next_ping - self._clock(), 0.0))

    def _turn(self, next_ping: float) -> float:
        before = self.verdict
        self.verdict = self._health()
        self.notifier.status(self.current_status())
        # Notify first, log second: logging is what may be wedged (a blocked stderr or journal).
        if before.healthy and not self.verdict.healthy:
            log.error("watchdog: %s; withholding WATCHDOG=1 so that systemd restarts the agent if this persists",
                      self.verdict.problem)
        elif not before.healthy and self.verdict.healthy:
            log.warning("watchdog: recovered (%s); watchdog pings resume", before.problem)
        now = self._clock()
        if self.interval is not None and now >= next_ping and self.verdict.healthy:
            if self.notifier.watchdog():
                self.pings += 1
            return now + self.interval
        return next_ping  # while unhealthy it stays due: the first healthy check pings at once
