"""`mqtt-agent publish`: one telemetry message or event through the running agent's local API.

For shell scripts and cron jobs. Only `[api] socket` is read from the configuration (an app's user
need not read the agent's keys); a config the user cannot read means the default socket.
Exit 0: accepted (durable in the agent's queue); 1: refused, with the reason; 2: the agent is not reachable.
"""

from __future__ import annotations

import http.client
import json
import socket
import sys
from pathlib import Path
from urllib.parse import urlencode

from agent.config import DEFAULT_API_SOCKET

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.9/3.10 only
    import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]

EX_ACCEPTED, EX_REFUSED, EX_UNREACHABLE = 0, 1, 2


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def socket_path(config: Path) -> Path:
    """`[api] socket` of `config` (the default when the file does not say). Raises OSError/ValueError."""
    with open(config, "rb") as fh:
        data = tomllib.load(fh)
    api = data.get("api", {})
    value = api.get("socket", str(DEFAULT_API_SOCKET)) if isinstance(api, dict) else str(DEFAULT_API_SOCKET)
    if not isinstance(value, str) or not value:
        raise ValueError("api.socket is not set (the local API is disabled in this configuration)")
    path = Path(value).expanduser()
    return path if path.is_absolute() else config.resolve().parent / path


def request(path: Path, method: str, target: str, body: bytes = b"", content_type: str | None = None,
            timeout: float = 30.0) -> tuple[int, dict[str, object]]:
    """One HTTP request over the Unix socket: (status, JSON body). Raises OSError if unreachable."""
    conn = _UnixConnection(str(path), timeout)
    try:
        headers = {"Content-Type": content_type} if content_type else {}
        try:
            conn.request(method, target, body=body, headers=headers)
        except (BrokenPipeError, ConnectionResetError):
            # The agent answered before it read the whole body (413: too large) and stopped reading: its
            # answer, which says why, is waiting to be read.
            if conn.sock is None:
                raise
        resp = conn.getresponse()
        raw = resp.read()
    except http.client.HTTPException as exc:
        raise OSError(f"the agent closed the connection ({exc})") from exc
    finally:
        conn.close()
    try:
        parsed = json.loads(raw) if raw else {}
    except ValueError:
        parsed = {"message": raw[:200].decode("utf-8", "replace")}
    return resp.status, parsed if isinstance(parsed, dict) else {"value": parsed}


def read_payload(arg: str) -> bytes:
    """JSON text as given, @FILE, or - (standard input)."""
    if arg == "-":
        return sys.stdin.buffer.read()
    if arg.startswith("@"):
        return Path(arg[1:]).read_bytes()
    return arg.encode("utf-8")


def publish(config: Path, kind: str, payload: bytes, *, device: str | None = None, qos: int | None = None,
            content_type: str | None = None, ttl: float | None = None) -> int:
    """Send, print the outcome, return the exit code."""
    note = ""
    try:
        path = socket_path(config)
    except PermissionError:
        # The agent's config is usually root:mqtt-agent 0640, which an app's user may not read: the
        # default socket is the likely one.
        path = DEFAULT_API_SOCKET
        note = f" ({config} is not readable by this user, so the default socket was tried)"
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        print(f"mqtt-agent publish: cannot read [api] socket from {config}: {reason}", file=sys.stderr)
        return EX_UNREACHABLE
    query: dict[str, str] = {}
    if device:
        query["device"] = device
    if qos is not None:
        query["qos"] = str(qos)
    if ttl is not None:
        query["ttl"] = f"{ttl:g}"
    target = "/v1/telemetry" if kind == "telemetry" else "/v1/events"
    if query:
        target += "?" + urlencode(query)
    try:
        status, body = request(path, "POST", target, payload, content_type)
    except OSError as exc:
        reason = getattr(exc, "strerror", None) or exc
        hint = (" (is this user in the socket's group, [api] group?)" if isinstance(exc, PermissionError)
                else " (is the agent running? systemctl status mqtt-agent)")
        print(f"mqtt-agent publish: cannot reach the agent at {path}: {reason}{hint}{note}", file=sys.stderr)
        return EX_UNREACHABLE
    if status == 202:
        ids = body.get("ids")
        print(f"accepted: {kind} queued as id {ids[0] if isinstance(ids, list) and ids else '?'}")
        return EX_ACCEPTED
    limit = f" [{body.get('limit')} = {body.get('value')}]" if body.get("limit") else ""
    print(f"mqtt-agent publish: refused ({status} {body.get('error', '')}): {body.get('message', '')}{limit}",
          file=sys.stderr)
    return EX_REFUSED
