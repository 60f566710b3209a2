"""The local API's routes: telemetry and events in, status out (served by agent/service/server.py).

    POST /v1/telemetry          body = payload; ?device=ID&qos=0|1&ttl=S; Content-Type passed on
    POST /v1/events             the same, always QoS 1 (ttl -> Hono's hono-ttl)
    POST /v1/telemetry/batch    NDJSON or a JSON array, one message per value; one answer
    GET  /v1/status             connected, queue depth/bytes/oldest age, broker, device

202 only once the message is durable in the state store's outbound queue; 400 bad request, 413 over a
size limit, 507 the queue is full under its policy, 503 while stopping or when the store cannot be
written. Every error body names the limit (`limit`, `value`) where one applies.
"""

from __future__ import annotations

import logging
import sqlite3
from typing import Any, Callable

from agent.service.server import Reply, Request
from agent.state.outbox import Outbox, QueueFull
from agent.state.publish import ApiError, PublishContext, batch, single
from agent.state.store import OutMessage

log = logging.getLogger(__name__)

ROUTES = {"/v1/telemetry": "telemetry", "/v1/events": "event", "/v1/telemetry/batch": "batch", "/v1/status": "status"}


class PublishApi:
    def __init__(self, outbox: Outbox, ctx: PublishContext, status: Callable[[], dict[str, Any]]) -> None:
        self.outbox = outbox
        self.ctx = ctx
        self._status = status
        self.stopping = False

    def __call__(self, req: Request) -> Reply:
        route = ROUTES.get(req.path)
        if route is None:
            return Reply(404, {"error": "not_found", "message": f"no such resource {req.path[:100]!r}; "
                               "known: " + ", ".join(ROUTES)})
        if route == "status":
            if req.method != "GET":
                return _method(req, "GET")
            return Reply(200, self._status())
        if req.method != "POST":
            return _method(req, "POST")
        if self.stopping:
            return Reply(503, {"error": "stopping", "message": "the agent is stopping; retry once it is back"})
        try:
            if route == "batch":
                messages = batch(req.query, req.headers, req.body, self.ctx)
            else:
                messages = [single(route, req.query, req.headers, req.body, self.ctx)]
            return self._queue(messages)
        except ApiError as exc:
            return Reply(exc.status, exc.body())

    def _queue(self, messages: list[OutMessage]) -> Reply:
        try:
            stored = self.outbox.admit(messages)
        except QueueFull as exc:
            return Reply(507, {"error": "queue_full", "message": str(exc), "limit": exc.limit, "value": exc.value})
        except (OSError, sqlite3.Error, RuntimeError) as exc:
            log.error("api: cannot store %d message(s): %s", len(messages), exc)
            return Reply(503, {"error": "state_store", "message": f"the state store cannot be written ({exc}); "
                               "nothing was accepted; retry later"})
        ids = [m.id for m in stored]
        return Reply(202, {"accepted": len(stored), "ids": ids})


def _method(req: Request, allowed: str) -> Reply:
    return Reply(405, {"error": "method_not_allowed", "message": f"{req.path} takes {allowed}, not {req.method[:10]}"})
