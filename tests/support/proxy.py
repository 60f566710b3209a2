"""A TCP fault proxy for tests: sits between the agent and a real broker on loopback and misbehaves
like the networks gateways live on.

- `idle_limit`: drop (reset) connections idle longer than T seconds in both directions, like a
  NAT, firewall or carrier that forgets idle flows.
- `blackhole()` / `resume()`: stop forwarding without closing anything (bytes wait in the kernel
  buffers, new connections are accepted but not connected through), then carry on.
- `reset_all()`: reset every connection now. `refuse`: reset new connections at once.
- `drop_after`: close every connection this long after it opened (a broker that accepts, then drops).

One thread with a selector; every wait is bounded, and `stop()` ends it. Only for loopback.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

from tests.support.mosquitto import free_port


@dataclass(eq=False)
class _Pair:
    client: socket.socket
    opened: float
    upstream: socket.socket | None = None
    last: float = 0.0
    closed: bool = False


@dataclass
class ProxyStats:
    accepted: int = 0
    idle_drops: int = 0
    resets: int = 0
    timed_drops: int = 0
    events: list[tuple[float, str]] = field(default_factory=list)


def _reset(sock: socket.socket | None) -> None:
    """Close with RST (SO_LINGER 0), as a middlebox that forgot the flow would answer."""
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


class FaultProxy:
    def __init__(self, upstream_host: str, upstream_port: int, host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self.host = host
        self.port = free_port(host)
        self.idle_limit: float | None = None
        self.drop_after: float | None = None
        self.refuse = False
        self.stats = ProxyStats()
        self._blackhole = False
        self._pairs: list[_Pair] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    # --- control (test thread) -------------------------------------------------------------------

    def start(self) -> FaultProxy:
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((self.host, self.port))
        self._listener.listen(64)
        self._listener.setblocking(False)
        self._thread = threading.Thread(target=self._run, name="fault-proxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(5)
        with self._lock:
            for pair in self._pairs:
                self._close(pair, reset=False)
            self._pairs.clear()
        if self._listener:
            self._listener.close()

    def blackhole(self) -> float:
        """Stop forwarding (nothing is closed). Returns the time.monotonic() it started."""
        self._event("blackhole")
        self._blackhole = True
        return time.monotonic()

    def resume(self) -> None:
        self._event("resume")
        self._blackhole = False

    def reset_all(self) -> int:
        with self._lock:
            pairs = [p for p in self._pairs if not p.closed]
            for pair in pairs:
                self._close(pair, reset=True)
            self.stats.resets += len(pairs)
        self._event(f"reset {len(pairs)}")
        return len(pairs)

    @property
    def open_connections(self) -> int:
        with self._lock:
            return sum(1 for p in self._pairs if not p.closed)

    def _event(self, what: str) -> None:
        self.stats.events.append((time.monotonic(), what))

    # --- proxy thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        assert self._listener is not None
        sel.register(self._listener, selectors.EVENT_READ, None)
        registered: dict[socket.socket, _Pair] = {}
        while not self._stop.is_set():
            self._sync_registrations(sel, registered)
            for key, _ in sel.select(timeout=0.05):
                if key.data is None:
                    self._accept()
                else:
                    self._forward(key.fileobj, key.data)  # type: ignore[arg-type]
            self._housekeeping()
        sel.close()

    def _sync_registrations(self, sel: selectors.BaseSelector, registered: dict[socket.socket, _Pair]) -> None:
        """Read only from live, connected pairs, and from none while black-holed."""
        with self._lock:
            wanted: dict[socket.socket, _Pair] = {}
            if not self._blackhole:
                for pair in self._pairs:
                    if pair.closed:
                        continue
                    if pair.upstream is None:
                        self._connect_upstream(pair)
                        if pair.closed or pair.upstream is None:
                            continue
                    wanted[pair.client] = pair
                    wanted[pair.upstream] = pair
            self._pairs = [p for p in self._pairs if not p.closed]
        for sock in list(registered):
            if sock not in wanted:
                with contextlib.suppress(KeyError, ValueError, OSError):
                    sel.unregister(sock)
                del registered[sock]
        for sock, pair in wanted.items():
            if sock not in registered:
                try:
                    sel.register(sock, selectors.EVENT_READ, pair)
                except (KeyError, ValueError, OSError):
                    continue
                registered[sock] = pair

    def _accept(self) -> None:
        assert self._listener is not None
        try:
            client, _ = self._listener.accept()
        except OSError:
            return
        if self.refuse:
            _reset(client)
            self._event("refused")
            return
        client.settimeout(5.0)  # blocking with a bound: sendall on loopback never waits long
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        now = time.monotonic()
        with self._lock:
            self.stats.accepted += 1
            self._pairs.append(_Pair(client, now, last=now))
        self._event("accepted")

    def _connect_upstream(self, pair: _Pair) -> None:
        try:
            up = socket.create_connection(self.upstream, timeout=2.0)
        except OSError:
            self._close(pair, reset=True)  # as a dead broker port would: the client sees a reset
            return
        up.settimeout(5.0)
        up.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pair.upstream = up
        pair.last = time.monotonic()

    def _forward(self, sock: socket.socket, pair: _Pair) -> None:
        if pair.closed or self._blackhole:
            return
        other = pair.upstream if sock is pair.client else pair.client
        try:
            data = sock.recv(65536)
        except OSError:
            data = b""
        with self._lock:
            if pair.closed:
                return
            if not data or other is None:
                self._close(pair, reset=False)
                return
            try:
                other.sendall(data)
            except OSError:
                self._close(pair, reset=True)
                return
            pair.last = time.monotonic()

    def _housekeeping(self) -> None:
        now = time.monotonic()
        with self._lock:
            for pair in self._pairs:
                if pair.closed:
                    continue
                if self.drop_after is not None and now - pair.opened >= self.drop_after:
                    self.stats.timed_drops += 1
                    self._close(pair, reset=True)
                    self._event("timed drop")
                elif (self.idle_limit is not None and not self._blackhole and pair.upstream is not None
                      and now - pair.last >= self.idle_limit):
                    self.stats.idle_drops += 1
                    self._close(pair, reset=True)
                    self._event(f"idle drop after {now - pair.last:.2f} s")

    def _close(self, pair: _Pair, reset: bool) -> None:
        """Close both sides (lock held). A reset goes to the client; the broker side closes normally
        (the broker then keeps a persistent session, as it would when a NAT drops the flow)."""
        if pair.closed:
            return
        pair.closed = True
        if reset:
            _reset(pair.client)
        else:
            with contextlib.suppress(OSError):
                pair.client.close()
        if pair.upstream is not None:
            with contextlib.suppress(OSError):
                pair.upstream.close()
