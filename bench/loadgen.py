"""The measuring side: sends Hono-style commands and times the responses.

One `Loader` plays the part of the application (Hono's northbound side): it publishes requests on
`command///req/REQ_ID/NAME` and subscribes to `command///res/#`. Each measurement uses its own
REQ_ID prefix, so late answers to an earlier phase are recognised and ignored.
"""

from __future__ import annotations

import itertools
import ssl
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from bench.wire import Message, WireClient, WireError

RESPONSES = "command///res/#"


def request_topic(req_id: str, name: str) -> str:
    return f"command///req/{req_id}/{name}"


def parse_response(topic: str) -> tuple[str, int] | None:
    """(req_id, status) of `command///res/REQ_ID/STATUS`, or None."""
    parts = topic.split("/")
    if len(parts) != 6 or parts[3] != "res" or not parts[5].isdigit():
        return None
    return parts[4], int(parts[5])


class BenchError(Exception):
    """A measurement could not be completed (no answer in time, process died, ...)."""


@dataclass
class Batch:
    """Outcome of a run of commands: per-command latencies (s), statuses, and the rate for windowed runs."""

    latencies: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    elapsed: float = 0.0
    lost: int = 0

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def errors(self) -> int:
        return sum(n for status, n in self.statuses.items() if not 200 <= status < 300) + self.lost


class Loader:
    """A connection to the broker that sends commands and collects their responses."""

    def __init__(self, host: str, port: int, context: ssl.SSLContext | None, client_id: str) -> None:
        self.client = WireClient(host, port, context, client_id)
        self._seq = itertools.count(1)
        self._prefix = itertools.count(1)

    def connect(self, timeout: float = 10.0) -> None:
        self.client.connect(timeout)
        self.client.subscribe(RESPONSES, 1, timeout)

    def reconnect(self, timeout: float) -> float:
        """Connect again as fast as possible (the broker may still be starting); returns when subscribed."""
        self.client.close()
        end = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < end:
            try:
                self.connect(timeout=max(min(end - time.monotonic(), 5.0), 0.1))
                return time.perf_counter()
            except (OSError, WireError) as exc:
                last = exc
                self.client.close()
                time.sleep(0.01)
        raise BenchError(f"the load generator could not reconnect within {timeout:g} s: {last}")

    def close(self) -> None:
        self.client.close()

    def new_prefix(self, tag: str) -> str:
        return f"{tag}{next(self._prefix)}x"

    def drain(self, quiet: float = 0.2, limit: float = 5.0) -> int:
        """Read and drop messages until none arrived for `quiet` s (at most `limit` s)."""
        n = 0
        end = time.monotonic() + limit
        while time.monotonic() < end:
            got = self.client.poll(quiet)
            if not got:
                break
            n += len(got)
        return n

    # --- measurements -----------------------------------------------------------------------------

    def first_answer(self, name: str, payload: bytes, interval: float, timeout: float,
                     alive: Callable[[], bool] | None = None, tick: Callable[[], None] | None = None) -> float:
        """Send `name` every `interval` s until one is answered; returns when (time.perf_counter()).

        Requests that arrive before the responder has subscribed are dropped by the broker (clean
        sessions), so the first answer marks the moment the responder started serving.
        """
        prefix = self.new_prefix("first")
        end = time.monotonic() + timeout
        next_send = 0.0
        while time.monotonic() < end:
            now = time.perf_counter()
            if now >= next_send:
                self.client.publish(request_topic(f"{prefix}{next(self._seq)}", name), payload)
                next_send = now + interval
            for msg in self.client.poll(max(next_send - time.perf_counter(), 0.0)):
                parsed = parse_response(msg.topic)
                if parsed and parsed[0].startswith(prefix):
                    return msg.received
            if tick is not None:
                tick()
            if alive is not None and not alive():
                raise BenchError("the responder exited before answering")
        raise BenchError(f"no answer to {name} within {timeout:g} s")

    def sequential(self, name: str, payload: bytes, count: int, timeout: float = 10.0) -> Batch:
        """One command at a time: send, wait for its response, repeat."""
        prefix = self.new_prefix("seq")
        batch = Batch()
        start = time.perf_counter()
        for _ in range(count):
            rid = f"{prefix}{next(self._seq)}"
            sent = time.perf_counter()
            self.client.publish(request_topic(rid, name), payload)
            end = sent + timeout
            answered = False
            while not answered:
                left = end - time.perf_counter()
                if left <= 0:
                    batch.lost += 1
                    break
                for msg in self.client.poll(left):
                    parsed = parse_response(msg.topic)
                    if parsed and parsed[0] == rid:
                        batch.latencies.append(msg.received - sent)
                        batch.statuses[parsed[1]] += 1
                        answered = True
        batch.elapsed = time.perf_counter() - start
        return batch

    def windowed(self, name: str, payload: bytes, total: int, window: int, timeout: float = 120.0) -> Batch:
        """Keep `window` commands outstanding until `total` are answered; the rate is answers per second."""
        prefix = self.new_prefix("win")
        batch = Batch()
        sent_at: dict[str, float] = {}
        sent = 0

        def send(n: int) -> None:
            nonlocal sent
            items = []
            now = time.perf_counter()
            for _ in range(min(n, total - sent)):
                rid = f"{prefix}{next(self._seq)}"
                sent_at[rid] = now
                items.append((request_topic(rid, name), payload))
            sent += len(items)
            if items:
                self.client.publish_many(items)

        start = time.perf_counter()
        deadline = start + timeout
        send(window)
        done = 0
        while done < total:
            left = deadline - time.perf_counter()
            if left <= 0:
                batch.lost = total - done
                break
            answered = 0
            msgs: list[Message] = self.client.poll(min(left, 10.0))
            for msg in msgs:
                parsed = parse_response(msg.topic)
                if not parsed:
                    continue
                t0 = sent_at.pop(parsed[0], None)
                if t0 is None:
                    continue
                batch.latencies.append(msg.received - t0)
                batch.statuses[parsed[1]] += 1
                answered += 1
            done += answered
            if answered:
                send(answered)
            elif not msgs and time.perf_counter() - start > timeout:
                break
        batch.elapsed = time.perf_counter() - start
        return batch

    def until_served(self, name: str, payload: bytes, interval: float, timeout: float,
                     alive: Callable[[], bool] | None = None) -> float:
        """After an outage: reconnect ourselves, then send `name` every `interval` s until answered."""
        end = time.monotonic() + timeout
        self.reconnect(timeout)
        return self.first_answer(name, payload, interval, max(end - time.monotonic(), 0.1), alive=alive)
