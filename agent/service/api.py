"""The local API's routes: telemetry and events in, status out (served by agent/service/server.py).

    POST /v1/telemetry          body = payload; ?device=ID&qos=0|1&ttl=S; Content-Type passed on
    POST /v1/events             the same, always QoS 1 (ttl -> Hono's hono-ttl)
    POST /v1/telemetry/batch    NDJSON or a JSON array, one message per value; one answer
    GET  /v1/status             connected, queue depth/bytes/oldest age, broker, device

The server hands every publishing request of one round to `commit` together: one durable write (one
fsync) for all of them. 202 only once the message is durable in the state store's outbound queue; 400
bad request, 413 over a size limit, 507 the queue is full under its policy, 503 while stopping or when
the store cannot be written. Every error body names the limit (`limit`, `value`) where one applies.
"""

from __future__ import annotations

import logging
import sqlite3
from typing import Any, Callable

from agent.service.server import Deferred, HandlerResult, Reply, Request
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

    def __call__(self, req: Request) -> HandlerResult:
        """The reply now, or Deferred(messages) for `commit` (the server batches a round's)."""
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
        except ApiError as exc:
            return Reply(exc.status, exc.body())
        return Deferred(messages)

    def commit(self, works: list[Any], done: Callable[[list[Reply]], None]) -> None:
        """Store the messages of several requests in one durable write; `done(replies)`, one per request,
        once they are on disk (202) or refused (507 queue full, 503 the store failed: nothing accepted)."""
        groups: list[list[OutMessage]] = works

        def stored(results: list[list[OutMessage] | BaseException]) -> None:
            done([self._reply(group, result) for group, result in zip(groups, results)])

        try:
            # The API's one thread commits itself when the writer is idle (no hand-off there and back; it
            # waits for that fsync, which its requests wait for anyway).
            self.outbox.admit_many(groups, stored, lead=True)
        except (OSError, sqlite3.Error, RuntimeError) as exc:
            stored([exc] * len(groups))

    @staticmethod
    def _reply(messages: list[OutMessage], result: list[OutMessage] | BaseException) -> Reply:
        if isinstance(result, QueueFull):
            return Reply(507, {"error": "queue_full", "message": str(result), "limit": result.limit,
                               "value": result.value})
        if isinstance(result, BaseException):
            log.error("api: cannot store %d message(s): %s", len(messages), result)
            return Reply(503, {"error": "state_store", "message": f"the state store cannot be written ({result}); "
                               "nothing was accepted; retry later"})
        return Reply(202, {"accepted": len(result), "ids": [m.id for m in result]})


def _method(req: Request, allowed: str) -> Reply:
    return Reply(405, {"error": "method_not_allowed", "message": f"{req.path} takes {allowed}, not {req.method[:10]}"})
