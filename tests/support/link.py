"""A stand-in for paho behind the outbox (`Outbox.bind(link, ...)`): records what was handed over and
gives message ids, for the pure outbox, publish and poison tests."""

from __future__ import annotations

import itertools

from agent.state import poison
from agent.state.store import OutMessage


class FakeLink:
    """`link(msg)` -> a message id (None while `refuse` is set); `mids` maps the ids handed out to their
    messages in order; `withdrawn` and `set_aside` collect the outbox's callbacks when bound to them.
    With `unsendable`, a message with that payload is refused as too large (poison.Unsendable)."""

    def __init__(self, unsendable: bytes | None = None) -> None:
        self.sent: list[OutMessage] = []
        self.mids: dict[int, OutMessage] = {}
        self.withdrawn: list[int] = []
        self.set_aside: list[str] = []
        self.refuse = False
        self.unsendable = unsendable
        self._ids = itertools.count(1)

    def __call__(self, msg: OutMessage) -> int | None:
        if self.unsendable is not None and msg.payload == self.unsendable:
            raise poison.Unsendable(poison.TOO_LARGE, "over the limit")
        if self.refuse:
            return None
        mid = next(self._ids)
        self.sent.append(msg)
        self.mids[mid] = msg
        return mid
