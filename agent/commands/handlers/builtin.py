"""Built-in handlers: `ping` and `info`."""

from __future__ import annotations

import platform
import sys
import time
from typing import Any, Callable

from agent import __version__, paho_version
from agent.protocol import BadRequest, Request, Response


class PingHandler:
    """Answers with the device id, agent version and uptime; echoes `{"echo": ...}` if given."""

    timeout = 5.0
    quiet = True  # a health probe: its answers are logged at debug level
    pure = True  # no effect but its answer: journalled with it in one commit (see Handler)
    inline = True  # answers from memory at once: runs inside that commit, on the state writer (see Handler)

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._started = clock()

    def handle(self, request: Request) -> Response:
        data = request.json()
        if data is not None and not isinstance(data, dict):
            raise BadRequest("ping takes no payload or a JSON object such as {\"echo\": \"hello\"}")
        body: dict[str, Any] = {
            "device_id": request.device_id,
            "version": __version__,
            "uptime_s": round(self._clock() - self._started, 3),
        }
        if data and "echo" in data:
            body["echo"] = data["echo"]
        return Response.ok(body)



class InfoHandler:
    """Versions, platform, connection and counters; `status()` supplies the live part."""

    timeout = 5.0
    quiet = True  # read-only: its answers are logged at debug level
    pure = True  # no effect but its answer

    def __init__(self, status: Callable[[], dict[str, Any]]) -> None:
        self._status = status
        self._static = {
            "agent_version": __version__,
            "python": platform.python_version(),
            "paho_mqtt": paho_version(),
            "platform": platform.platform(),
            "machine": platform.machine(),
            "executable": sys.executable,
        }

    def handle(self, request: Request) -> Response:
        body = dict(self._static)
        body["device_id"] = request.device_id
        body.update(self._status())
        return Response.ok(body)
