"""The local HTTP API on a Unix socket: a small HTTP/1.1 server with bounded everything.

Access is by file permission: the socket is mode 0660, group `[api] group` (default mqtt-agent-apps),
so a process outside that group is refused by the kernel before the agent sees it. Under systemd the
socket can come from a socket unit (systemd/mqtt-agent.socket, `FileDescriptorName=api`), which creates
it as root with the right group even though the service itself runs with PrivateUsers=yes.

One thread, non-blocking sockets, a selector. Each round it reads what every ready connection sent and
answers the requests that can be answered at once (status, errors); the publishing ones of the round go
to the handler's `commit` together, which writes them to the state store in one transaction (one fsync
for all; this thread commits it itself when the store's writer is idle), and each is answered 202 only
when that commit is on disk. While one round's commit is on its
way the next round is read (the store's group commit takes it together with whatever else waits). A
thread per connection was CPU-bound on 2 cores (a GIL hand-off and a thread switch for every request).

Bounded: at most `max_connections` connections at once (one more is answered 503 and closed; at most
REFUSE_QUEUE of those at a time), each request must arrive whole (headers and body) within `timeout`
seconds, headers within MAX_HEADER_BYTES, the body within `max_body_bytes` (413 before it is read). A slow
client only holds its own connection: nothing waits for one client's bytes (no slowloris stalls the
others), and an idle keep-alive connection is closed after `timeout`. One request per connection at a
time (a pipelined next request waits in the buffer until the previous one is answered).

Stopping is bounded by `stop(timeout)`: the listener closes at once (new connections are refused by the
kernel), requests waiting for their commit are answered when it lands, a request still arriving is
answered 503, idle connections are closed; whatever is left when the time is up is closed.
"""

from __future__ import annotations

import collections
import contextlib
import grp
import json
import logging
import os
import selectors
import socket
import stat
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Union

from agent.config import ApiConfig
from agent.logtext import untrusted
from agent.state.publish import ApiError
from agent.wakeup import WakeUp

log = logging.getLogger(__name__)

MAX_HEADER_BYTES = 16 * 1024
MAX_HEADERS = 64
SD_LISTEN_FDS_START = 3
# Connections over api.max_connections get a 503 (at most this many at a time, each within REFUSE_TIMEOUT s).
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


@dataclass(frozen=True)
class Deferred:
    """A handler's answer to a request whose reply waits for the disk: `work` goes to `commit` with the
    round's others, and the reply comes from there."""

    work: Any


HandlerResult = Union[Reply, Deferred]
Handler = Callable[[Request], HandlerResult]
# commit(works, done): store every work of a round together; done(replies) (any thread), one per work, in order.
Commit = Callable[[list[Any], Callable[[list[Reply]], None]], None]

_READ, _WAIT, _WRITE, _REFUSE, _LINGER = 0, 1, 2, 3, 4
# After an error answered before the request was read whole (413: the body is still on its way), the server
# stops writing and reads and drops what the client still sends, up to this long, before it closes: closing
# at once would make the client's send fail (EPIPE, ECONNRESET) before it reads the answer that says why.
LINGER_SECONDS = 2.0


class _Conn:
    __slots__ = ("buf", "close_after", "deadline", "events", "linger", "out", "sock", "state")

    def __init__(self, sock: socket.socket, state: int, deadline: float) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.out = b""
        self.state = state
        self.deadline = deadline
        self.close_after = False
        self.linger = False  # answered before its request was read whole: drain the rest before closing
        self.events = 0  # what the selector watches for (0: not registered)


class ApiServer:
    """Serves the API on one thread; at most `max_connections` connections."""

    def __init__(self, cfg: ApiConfig, handler: Handler, *,
                 commit: Commit | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.handler = handler
        self._commit = commit
        self._clock = clock
        self._sock: socket.socket | None = None
        self._owned_path: Path | None = None
        self._thread: threading.Thread | None = None
        self._wakeup = WakeUp()
        self._sel = selectors.DefaultSelector()
        self._conns: dict[int, _Conn] = {}  # fd -> connection (refused ones too)
        self._active = 0  # connections that count against max_connections
        self._refusing = 0
        self._done: collections.deque[tuple[list[_Conn], list[Reply]]] = collections.deque()
        self._waiting = 0  # connections whose request waits for a commit
        self._stop_by: float | None = None
        self.stopping = False
        self.refused_busy = 0
        self.timed_out = 0
        self.rounds = 0  # commits asked for (each covers the publishing requests of one round)

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
        self._sel.register(sock, selectors.EVENT_READ)
        self._sel.register(self._wakeup, selectors.EVENT_READ)
        self._thread = threading.Thread(target=self._run, name="api", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        """Stop within about `timeout` s: no new connections; requests waiting for their commit are
        answered if it lands in time, the rest 503 or closed."""
        self._stop_by = self._clock() + timeout
        self.stopping = True
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout + 1.0)
            if self._thread.is_alive():
                log.warning("api: the server thread did not end within %g s of the stop", timeout + 1.0)
        if self._owned_path is not None:
            with contextlib.suppress(FileNotFoundError):
                self._owned_path.unlink()

    def _wake(self) -> None:
        self._wakeup.set()

    # --- the loop ---------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                if self.stopping and self._stopped():
                    break
                now = self._clock()
                timeout = min((c.deadline for c in self._conns.values() if c.state != _WAIT), default=now + 1.0)
                if self._stop_by is not None:
                    timeout = min(timeout, self._stop_by)
                ready = self._sel.select(max(0.0, min(timeout - now, 1.0)))
                publish: list[tuple[_Conn, Any]] = []
                for key, mask in ready:
                    if key.fileobj is self._sock:
                        self._accept()
                    elif key.fileobj is self._wakeup:
                        self._wakeup.drain()
                    else:
                        conn = key.data
                        if mask & selectors.EVENT_WRITE:
                            self._send(conn)
                        if mask & selectors.EVENT_READ and conn.sock.fileno() >= 0:
                            self._receive(conn, publish)
                self._answer_committed()
                if publish:
                    self._start_commit(publish)  # (a round this thread commits itself is answered in it)
                self._expire()
        except Exception:
            log.exception("api: the server loop failed; the local API is down until the agent restarts")
        finally:
            for conn in list(self._conns.values()):
                self._close(conn)
            with contextlib.suppress(Exception):
                self._sel.close()
            if self._sock is not None:
                self._sock.close()
            self._wakeup.close()

    def _stopped(self) -> bool:
        """While stopping (loop thread): True once nothing is left to answer, or the time is up."""
        if self._sock is not None and self._sock.fileno() >= 0:
            self._sel.unregister(self._sock)
            self._sock.close()  # the kernel refuses new connections from here on
        now = self._clock()
        assert self._stop_by is not None
        if now >= self._stop_by:
            return True
        for conn in list(self._conns.values()):
            if conn.state in (_READ, _REFUSE, _LINGER) and not conn.out:
                if conn.buf and conn.state == _READ:  # a request on its way: it will not be served
                    self._reply(conn, Reply(503, {"error": "stopping",
                                                  "message": "the agent is stopping; retry once it is back"}), True)
                else:
                    self._close(conn)
        return not self._conns

    def _accept(self) -> None:
        assert self._sock is not None
        for _ in range(64):  # bounded per round: the others get their turn
            try:
                sock, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.error("api: accept failed: %s", exc.strerror or exc)
                return
            sock.setblocking(False)
            now = self._clock()
            if self._active < self.cfg.max_connections:
                self._active += 1
                conn = _Conn(sock, _READ, now + self.cfg.timeout)
                self._conns[sock.fileno()] = conn
                self._watch(conn, selectors.EVENT_READ)
            elif self._refusing < REFUSE_QUEUE:
                # Its request is read (so the client sees the answer rather than a reset), never handled.
                self.refused_busy += 1
                self._refusing += 1
                conn = _Conn(sock, _REFUSE, now + REFUSE_TIMEOUT)
                self._conns[sock.fileno()] = conn
                conn.out = _encode(Reply(503, {
                    "error": "busy", "message": f"{self.cfg.max_connections} connections are open already; retry",
                    "limit": "api.max_connections", "value": self.cfg.max_connections}), close=True)
                self._watch(conn, selectors.EVENT_READ | selectors.EVENT_WRITE)
            else:
                self.refused_busy += 1
                sock.close()  # even the refusals are bounded

    def _watch(self, conn: _Conn, events: int) -> None:
        if events == conn.events:
            return
        if conn.events == 0:
            self._sel.register(conn.sock, events, conn)
        elif events == 0:
            self._sel.unregister(conn.sock)
        else:
            self._sel.modify(conn.sock, events, conn)
        conn.events = events

    def _close(self, conn: _Conn) -> None:
        fd = conn.sock.fileno()
        if fd < 0:
            return
        if conn.events:
            self._sel.unregister(conn.sock)
            conn.events = 0
        self._conns.pop(fd, None)
        if conn.state == _REFUSE:
            self._refusing -= 1
        else:
            self._active -= 1
        with contextlib.suppress(OSError):
            conn.sock.close()

    # --- reading ----------------------------------------------------------------------------------

    def _receive(self, conn: _Conn, publish: list[tuple[_Conn, Any]]) -> None:
        try:
            chunk = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        if not chunk:
            if conn.state == _WAIT or conn.out:
                # The client is done sending (perhaps only half-closed): its answer still goes out, then close.
                if conn.state == _REFUSE:
                    conn.state = _WRITE
                conn.close_after = True
                self._watch(conn, selectors.EVENT_WRITE if conn.out else 0)
            else:
                self._close(conn)  # the client went away (idle, or mid-request: nothing to answer)
            return
        if conn.state in (_REFUSE, _LINGER):
            return  # read and dropped
        conn.buf += chunk
        if conn.state == _READ:
            self._next_request(conn, publish)
        elif len(conn.buf) > MAX_HEADER_BYTES + self.cfg.max_body_bytes:
            # A pipelining client waits for its answer: read no more from it until then.
            self._watch(conn, conn.events & ~selectors.EVENT_READ)

    def _next_request(self, conn: _Conn, publish: list[tuple[_Conn, Any]]) -> None:
        """Handle the request complete in `conn.buf`, if there is one."""
        try:
            req = parse_request(conn.buf, self.cfg.max_body_bytes)
        except ApiError as exc:
            conn.buf.clear()
            conn.linger = True  # the rest of this request may still be on its way
            self._reply(conn, Reply(exc.status, exc.body()), True)
            return
        if req is None:
            return
        close = (req.headers.get("connection", "").lower() == "close" or self.stopping
                 or req.headers.get(":version") == "HTTP/1.0")
        try:
            result = self.handler(req)
        except Exception:
            log.exception("api: internal error answering %s %s", untrusted(req.method, 10), untrusted(req.path, 100))
            result = Reply(500, {"error": "internal", "message": "internal error; see the agent's log"})
        if isinstance(result, Deferred):
            conn.state, conn.close_after = _WAIT, close
            self._watch(conn, selectors.EVENT_READ)  # a client that goes away is noticed (its answer is not)
            publish.append((conn, result.work))
        else:
            self._reply(conn, result, close)

    # --- committing -------------------------------------------------------------------------------

    def _start_commit(self, publish: list[tuple[_Conn, Any]]) -> None:
        conns = [c for c, _ in publish]
        self._waiting += len(conns)
        self.rounds += 1
        answered = threading.Event()

        def done(replies: list[Reply]) -> None:  # any thread (the store's writer): hand over, wake the loop
            if answered.is_set():
                return
            answered.set()
            self._done.append((conns, replies))
            if threading.current_thread() is self._thread:
                # This thread committed the round itself: answer now, before the messages are handed to the
                # client (they are on disk; the apps need not wait for that write).
                self._answer_committed()
            else:
                self._wake()

        if self._commit is None:
            done([Reply(500, {"error": "internal", "message": "this server cannot store messages"})] * len(conns))
            return
        try:
            self._commit([w for _, w in publish], done)
        except Exception:
            log.exception("api: internal error storing %d request(s)", len(conns))
            done([Reply(500, {"error": "internal", "message": "internal error; see the agent's log"})] * len(conns))

    def _answer_committed(self) -> None:
        while self._done:
            conns, replies = self._done.popleft()
            self._waiting -= len(conns)
            for conn, reply in zip(conns, replies):
                if conn.sock.fileno() < 0:
                    continue  # the client went away meanwhile (the messages are stored all the same)
                conn.state = _READ
                self._reply(conn, reply, conn.close_after)

    # --- writing ----------------------------------------------------------------------------------

    def _reply(self, conn: _Conn, reply: Reply, close: bool) -> None:
        conn.out = _encode(reply, close=close)
        conn.close_after = close
        conn.state = _WRITE
        conn.deadline = self._clock() + self.cfg.timeout
        self._send(conn)

    def _send(self, conn: _Conn) -> None:
        if conn.sock.fileno() < 0:
            return
        try:
            sent = conn.sock.send(conn.out)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._close(conn)
            return
        conn.out = conn.out[sent:]
        if conn.out:
            self._watch(conn, selectors.EVENT_WRITE | (selectors.EVENT_READ if conn.state == _REFUSE else 0))
            return
        if conn.state == _REFUSE:
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_WR)  # then wait for the client's end (or the deadline)
            self._watch(conn, selectors.EVENT_READ)
            return
        if conn.linger and conn.state == _WRITE:
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_WR)  # the answer is complete; what the client still sends is dropped
            conn.state = _LINGER
            conn.deadline = self._clock() + min(LINGER_SECONDS, self.cfg.timeout)
            self._watch(conn, selectors.EVENT_READ)
            return
        if conn.close_after or conn.state != _WRITE:
            self._close(conn)
            return
        conn.state = _READ
        conn.deadline = self._clock() + self.cfg.timeout
        self._watch(conn, selectors.EVENT_READ)
        if conn.buf:
            pending: list[tuple[_Conn, Any]] = []
            self._next_request(conn, pending)  # a pipelined request that was waiting
            if pending:
                self._start_commit(pending)

    def _expire(self) -> None:
        now = self._clock()
        for conn in list(self._conns.values()):
            if conn.state == _WAIT or now < conn.deadline:
                continue
            if conn.state == _READ and conn.buf:
                self.timed_out += 1
                err = ApiError(408, "timeout", f"the request did not arrive within api.timeout = "
                                               f"{self.cfg.timeout:g} s", limit="api.timeout", value=self.cfg.timeout)
                conn.buf.clear()
                conn.out = _encode(Reply(err.status, err.body()), close=True)
                conn.close_after, conn.state = True, _WRITE
                conn.deadline = now + 1.0  # a client that does not read its 408 loses it
                self._send(conn)
            else:
                self._close(conn)  # idle keep-alive, a refused client that does not go, an unread answer


def parse_request(buf: bytearray, max_body_bytes: int) -> Request | None:
    """Take the first complete request out of `buf` (None: not complete yet). Raises ApiError."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        if len(buf) > MAX_HEADER_BYTES:
            raise ApiError(400, "headers_too_large", f"request headers over {MAX_HEADER_BYTES} bytes")
        return None
    if end > MAX_HEADER_BYTES:
        raise ApiError(400, "headers_too_large", f"request headers over {MAX_HEADER_BYTES} bytes")
    lines = buf[:end].decode("latin-1").split("\r\n")
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
    if length > max_body_bytes:
        raise ApiError(413, "body_too_large", f"a {length}-byte body is over api.max_body_bytes = {max_body_bytes}",
                       limit="api.max_body_bytes", value=max_body_bytes)
    start = end + 4
    if len(buf) < start + length:
        return None
    body = bytes(buf[start:start + length])
    del buf[:start + length]
    path, _, query = target.partition("?")
    return Request(method, path, query, headers, body)


def _encode(reply: Reply, *, close: bool) -> bytes:
    body = json.dumps(reply.body, separators=(",", ":")).encode("utf-8") + b"\n"
    head = (f"HTTP/1.1 {reply.status} {REASONS.get(reply.status, 'Error')}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"{'Connection: close' if close else 'Connection: keep-alive'}\r\n\r\n")
    return head.encode("ascii") + body
