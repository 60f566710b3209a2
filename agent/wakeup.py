"""A wake-up for a thread that waits in select(): any thread, or a signal handler, makes it return now.

One socket pair (non-blocking, not inherited by children, closed when garbage-collected: a Session or an
Agent made and dropped, as tests do, leaks no descriptor). `set` sends a byte and takes no lock, so it is
safe in a signal handler. threading.Event is not: its set() takes the Event's own (non-reentrant) lock,
which the waiting thread holds for a moment inside wait() and clear(); a SIGTERM whose handler ran in that
moment (handlers run in the main thread, between two of its bytecodes) deadlocked the main thread, and the
agent never stopped. The read end is a file object for select() and selectors (`fileno`): the network pump
and the local API server wait on it beside their sockets; the main loop waits on it alone (`wait`).
"""

from __future__ import annotations

import contextlib
import select
import socket


class WakeUp:
    """set() from anywhere; the waiting thread selects on it (or calls wait()) and drains it."""

    def __init__(self) -> None:
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self._w.setblocking(False)

    def fileno(self) -> int:
        return self._r.fileno()

    def set(self) -> None:
        try:
            self._w.send(b"x")
        except OSError:
            pass  # full: a wake-up is pending anyway (or closed: nobody waits any more)

    def drain(self) -> None:
        """Forget the wake-ups so far (the waiting thread, once select() returned)."""
        try:
            while self._r.recv(65536):
                pass
        except OSError:  # BlockingIOError: drained (or closed)
            pass

    def wait(self, timeout: float) -> None:
        """Until set() (since the last wait) or `timeout` s; then forget the wake-ups."""
        with contextlib.suppress(OSError, ValueError):  # interrupted, or closed under us
            select.select([self._r], [], [], max(0.0, timeout))
        self.drain()

    def close(self) -> None:
        self._r.close()
        self._w.close()
