"""Command handlers: the Handler protocol and the registry every handler is registered in.

Built-ins, exec commands from the config and plugins (entry point group `mqtt_agent.handlers`)
are all registered by `build_registry` in `agent.commands.handlers.registry`, the one visible place.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Protocol, runtime_checkable

from agent.errors import AgentError
from agent.protocol import Request, Response


@runtime_checkable
class Handler(Protocol):
    """Anything with `handle(request) -> Response`.

    Optional attributes: `timeout` (seconds; default limits.command_timeout),
    `enforces_timeout` (True if the handler stops itself at `request.deadline`, as exec commands do) and
    `quiet` (True for read-only probes such as ping: successful answers are logged at debug level only) and
    `pure` (True only if handling a request has no effect but the answer, so that running it twice changes
    nothing: `ping`, `info`, a plugin that only reads. A pure command is run before it is journalled and is
    journalled as done together with its answer in one durable commit, before its PUBACK: one fsync instead
    of two. A power cut before that commit leaves no PUBACK, so the broker delivers it again and it runs
    again. Its PUBACK waits for the handler: a pure handler must answer within milliseconds, since Eclipse
    Hono releases a command it has no PUBACK for after about 1 s), and `inline` (with `pure`: the handler
    answers from memory in microseconds, as `ping` does; it then runs on the state store's writer thread,
    inside the transaction that journals it, whatever else is in flight: no worker and no second commit.
    It must never block or do I/O: every command waiting for that commit waits for it).
    Raise `agent.protocol.CommandError` (or BadRequest) to answer with an error status.
    """

    def handle(self, request: Request) -> Response: ...


class DuplicateHandlerError(AgentError):
    def __init__(self, name: str, first: str, second: str) -> None:
        super().__init__(f"command {name!r} from {second} is already registered by {first}; {second}'s is ignored")
        self.name = name


class HandlerRegistry(Mapping[str, Handler]):
    """Command name -> handler. Rejects duplicates; remembers where each handler came from."""

    def __init__(self) -> None:
        self._handlers: dict[str, Handler] = {}
        self._sources: dict[str, str] = {}

    def register(self, name: str, handler: Handler, source: str) -> None:
        if name in self._handlers:
            raise DuplicateHandlerError(name, self._sources[name], source)
        if not isinstance(handler, Handler):
            raise AgentError(f"command {name!r} from {source}: {handler!r} has no handle(request) method")
        self._handlers[name] = handler
        self._sources[name] = source

    def source(self, name: str) -> str:
        return self._sources[name]

    def __getitem__(self, name: str) -> Handler:
        return self._handlers[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._handlers)

    def __len__(self) -> int:
        return len(self._handlers)
