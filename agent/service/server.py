"""The local HTTP API on a Unix socket: a small HTTP/1.1 server with bounded everything.

Access is by file permission: the socket is mode 0660, group `[api] group` (default mqtt-agent-apps),
so a process outside that group is refused by the kernel before the agent sees it. Under systemd the
socket can come from a socket unit (systemd/mqtt-agent.socket, `FileDescriptorName=api`), which creates
it as root with the right group even though the service itself runs with PrivateUsers=yes.

Bounded: at most `max_connections` connections at once (one thread each; one more is answered 503
at once and closed), each request must arrive whole (headers and body) within `timeout` seconds, headers
within MAX_HEADER_BYTES, the body within `max_body_bytes` (413 before it is read). A slow client only
holds its own slot (no slowloris stalls the others), and an idle keep-alive connection is closed after
`timeout`.
"""

from __future__ import annotations

import contextlib
import grp
import json
import logging
import os
import queue
import selectors
import socket
import stat
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from agent.config import ApiConfig
from agent.logtext import untrusted
from agent.state.publish import ApiError

log = logging.getLogger(__name__)

MAX_HEADER_BYTES = 16 * 1024
MAX_HEADERS = 64
SD_LISTEN_FDS_START = 3
# Connections over api.max_connections wait here for their 503 (one thread answers them, briefly each).
REFUSE_QUEUE = 64
REFUSE_TIMEOUT = 0.5
REASONS = {200: "OK", 202: "Accepted", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
           408: "Request Timeout", 411: "Length Required", 413: "Content Too Large", 500: "Internal Server Error",
           503: "Service Unavailable", 507: "Insufficient Storage"}


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: str
    headers: Mapping[str, str]  # lower-case names
    body: bytes


@dataclass(frozen=True)
class Reply:
    status: int
    body: dict[str, Any]


Handler = Callable[[Request], Reply]


class _Closed(Exception):
    """The client went away, or a request did not arrive in time (nothing more to answer)."""


def inherited_socket(name: str = "api") -> socket.socket | None:
    """The listening socket systemd passed for `name` (LISTEN_FDS/LISTEN_FDNAMES), if any."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    try:
        count = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return None
    names = os.environ.get("LISTEN_FDNAMES", "").split(":")
    for i in range(count):
        if i < len(names) and names[i] == name:
            return socket.socket(fileno=SD_LISTEN_FDS_START + i)
    return None


def bind_unix(path: Path, group: str) -> socket.socket:
    """Listen on `path`: mode 0660 with group `group` if it exists, else 0600 (with a warning).

    A socket file left by an earlier run is replaced; one that another process still answers on is not
    (OSError naming the path)."""
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise OSError(f"{path} exists and is not a socket; remove it or choose another [api] socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # stale: nobody answers there
        else:
            raise OSError(f"another process already serves {path} (a second agent?); stop it or choose another "
                          "[api] socket")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # never, even for a moment, wider than 0600
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        log.warning("api.group: group %r does not exist: only the agent's own user (and root) may publish through "
                    "%s; create it (groupadd %s), add the apps' users to it and restart the agent",
                    group, path, group)
    else:
        try:
            os.chown(path, -1, gid)
            path.chmod(0o660)
        except OSError as exc:
            log.warning("api.group: cannot give %s to group %r (%s): only the agent's own user (and root) may "
                        "publish; under systemd use the socket unit mqtt-agent.socket, which sets the group",
                        path, group, exc.strerror or exc)
    sock.listen(128)
    return sock


class ApiServer:
    """Accepts connections on its own thread; one thread per connection, at most `max_connections`."""

    def __init__(self, cfg: ApiConfig, handler: Handler, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.handler = handler
        self._clock = clock
        self._sock: socket.socket | None = None
        self._owned_path: Path | None = None
        self._thread: threading.Thread | None = None
        self._stop_r, self._stop_w = socket.socketpair()
        self._lock = threading.Lock()
        self._active = 0
        self._conns: set[socket.socket] = set()
        self._refusals: queue.Queue[socket.socket | None] = queue.Queue(REFUSE_QUEUE)
        self.stopping = False
        self.refused_busy = 0
        self.timed_out = 0

    @property
    def path(self) -> Path | None:
        """The socket file this server made (None: it serves the socket systemd passed)."""
        return self._owned_path

    def start(self) -> None:
        """Listen (raises OSError with the reason) and serve on a thread."""
        sock = inherited_socket()
        if sock is None:
            assert self.cfg.socket is not None
            sock = bind_unix(self.cfg.socket, self.cfg.group)
            self._owned_path = self.cfg.socket
        sock.setblocking(False)
        self._sock = sock
        self._thread = threading.Thread(target=self._accept_loop, name="api-accept", daemon=True)
        self._thread.start()
        threading.Thread(target=self._refuse_loop, name="api-refuse", daemon=True).start()

    def stop(self, timeout: float = 2.0) -> None:
        self.stopping = True
        with contextlib.suppress(queue.Full):
            self._refusals.put_nowait(None)
        with contextlib.suppress(OSError):
            self._stop_w.send(b"x")
        if self._thread is not None:
            self._thread.join(timeout)
        if self._sock is not None:
            self._sock.close()
        if self._owned_path is not None:
            with contextlib.suppress(FileNotFoundError):
                self._owned_path.unlink()
        end = self._clock() + timeout
        while self._active and self._clock() < end:
            time.sleep(0.02)
        with self._lock:
            for conn in list(self._conns):
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)

    # --- accepting ------------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        assert self._sock is not None
        sel = selectors.DefaultSelector()
        sel.register(self._sock, selectors.EVENT_READ)
        sel.register(self._stop_r, selectors.EVENT_READ)
        try:
            while not self.stopping:
                for key, _ in sel.select(1.0):
                    if key.fileobj is self._stop_r:
                        return
                    try:
                        conn, _ = self._sock.accept()
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError as exc:
                        log.error("api: accept failed: %s", exc.strerror or exc)
                        time.sleep(0.1)
                        continue
                    self._admit(conn)
        except Exception:
            log.exception("api: the accept loop failed; the local API is down until the agent restarts")
        finally:
            sel.close()

    def _admit(self, conn: socket.socket) -> None:
        with self._lock:
            busy = self._active >= self.cfg.max_connections
            if not busy:
                self._active += 1
                self._conns.add(conn)
        if busy:
            self.refused_busy += 1
            try:
                self._refusals.put_nowait(conn)
            except queue.Full:
                conn.close()  # even the refusals are bounded
            return
        threading.Thread(target=self._serve, args=(conn,), name="api-conn", daemon=True).start()

    def _refuse_loop(self) -> None:
        """Answer connections over api.max_connections with 503, one at a time, each within a short time:
        its request is read (so the client sees the answer rather than a reset), never handled."""
        while True:
            conn = self._refusals.get()
            if conn is None:
                return
            try:
                conn.settimeout(REFUSE_TIMEOUT)
                with contextlib.suppress(OSError):
                    conn.recv(MAX_HEADER_BYTES)
                    conn.sendall(_encode(Reply(503, {
                        "error": "busy", "message": f"{self.cfg.max_connections} connections are open already; "
                        "retry", "limit": "api.max_connections", "value": self.cfg.max_connections}), close=True))
                    conn.shutdown(socket.SHUT_WR)
                    conn.recv(MAX_HEADER_BYTES)  # until the client closes (or the timeout)
            finally:
                conn.close()

    # --- one connection ---------------------------------------------------------------------------

    def _serve(self, conn: socket.socket) -> None:
        buf = bytearray()
        try:
            while not self.stopping:
                try:
                    req = self._read_request(conn, buf)
                except ApiError as exc:
                    conn.settimeout(self.cfg.timeout)
                    conn.sendall(_encode(Reply(exc.status, exc.body()), close=True))
                    return
                if req is None:
                    return
                try:
                    reply = self.handler(req)
                except Exception:
                    log.exception("api: internal error answering %s %s", untrusted(req.method, 10),
                                  untrusted(req.path, 100))
                    reply = Reply(500, {"error": "internal", "message": "internal error; see the agent's log"})
                close = (req.headers.get("connection", "").lower() == "close" or self.stopping
                         or req.headers.get(":version") == "HTTP/1.0")
                conn.settimeout(self.cfg.timeout)
                conn.sendall(_encode(reply, close=close))
                if close:
                    return
        except (_Closed, OSError):
            pass
        finally:
            with contextlib.suppress(OSError):
                conn.close()
            with self._lock:
                self._active -= 1
                self._conns.discard(conn)

    def _recv(self, conn: socket.socket, buf: bytearray, deadline: float) -> None:
        left = deadline - self._clock()
        if left <= 0:
            self.timed_out += 1
            raise ApiError(408, "timeout", f"the request did not arrive within api.timeout = {self.cfg.timeout:g} s",
                           limit="api.timeout", value=self.cfg.timeout)
        conn.settimeout(left)
        try:
            chunk = conn.recv(65536)
        except socket.timeout:
            self.timed_out += 1
            raise ApiError(408, "timeout", f"the request did not arrive within api.timeout = {self.cfg.timeout:g} s",
                           limit="api.timeout", value=self.cfg.timeout) from None
        if not chunk:
            raise _Closed()
        buf += chunk

    def _read_request(self, conn: socket.socket, buf: bytearray) -> Request | None:
        """The next request on `conn` (None: the client closed an idle connection). Raises ApiError."""
        deadline = self._clock() + self.cfg.timeout
        while b"\r\n\r\n" not in buf:
            if len(buf) > MAX_HEADER_BYTES:
                raise ApiError(400, "headers_too_large", f"request headers over {MAX_HEADER_BYTES} bytes")
            try:
                self._recv(conn, buf, deadline)
            except ApiError:
                if not buf:
                    raise _Closed() from None  # an idle keep-alive connection: just close it
                raise
            except _Closed:
                if buf:
                    raise
                return None
        head, _, _rest = bytes(buf).partition(b"\r\n\r\n")
        if len(head) > MAX_HEADER_BYTES:
            raise ApiError(400, "headers_too_large", f"request headers over {MAX_HEADER_BYTES} bytes")
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise ApiError(400, "bad_request", "not an HTTP/1.x request line")
        method, target, version = parts
        headers: dict[str, str] = {":version": version}
        if len(lines) - 1 > MAX_HEADERS:
            raise ApiError(400, "headers_too_large", f"more than {MAX_HEADERS} header lines")
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep or not name or name != name.strip():
                raise ApiError(400, "bad_request", "a malformed header line")
            headers[name.lower()] = value.strip()
        if "chunked" in headers.get("transfer-encoding", "").lower():
            raise ApiError(411, "length_required", "send the body with Content-Length (chunked transfer is not "
                                                   "supported; curl: --data-binary @file)")
        length_text = headers.get("content-length", "0")
        if not length_text.isdigit():
            raise ApiError(400, "bad_request", "Content-Length must be a number")
        length = int(length_text)
        if length > self.cfg.max_body_bytes:
            raise ApiError(413, "body_too_large", f"a {length}-byte body is over api.max_body_bytes = "
                                                  f"{self.cfg.max_body_bytes}", limit="api.max_body_bytes",
                           value=self.cfg.max_body_bytes)
        del buf[:len(head) + 4]
        while len(buf) < length:
            self._recv(conn, buf, deadline)
        body = bytes(buf[:length])
        del buf[:length]
        path, _, query = target.partition("?")
        return Request(method, path, query, headers, body)


def _encode(reply: Reply, *, close: bool) -> bytes:
    body = json.dumps(reply.body, separators=(",", ":")).encode("utf-8") + b"\n"
    head = (f"HTTP/1.1 {reply.status} {REASONS.get(reply.status, 'Error')}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"{'Connection: close' if close else 'Connection: keep-alive'}\r\n\r\n")
    return head.encode("ascii") + body
