"""Wedge the real agent the way production wedges it: its log output stops being read.

A daemon whose stderr (or journal stream) is not drained blocks in write() the next time a thread
logs. `PausableAgent` runs the real agent with a one-page output pipe that the test can stop reading
and fill to the brim; from then on, whichever agent thread logs first is stuck until `resume()`.
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading

from tests.support.agentproc import AgentProcess

F_SETPIPE_SZ = 1031  # linux/fcntl.h
SYNC = "--- pausable-agent sync {} ---"


class PausableAgent(AgentProcess):
    """An AgentProcess whose output reader can be paused, with a helper to fill the output pipe."""

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self._go = threading.Event()
        self._go.set()
        self._synced = threading.Event()
        self._sync_token = ""

    def start(self) -> PausableAgent:
        super().start()
        assert self.proc and self.proc.stdout
        fcntl.fcntl(self.proc.stdout.fileno(), F_SETPIPE_SZ, 4096)  # the kernel minimum: one page
        return self

    def _read(self) -> None:
        assert self.proc and self.proc.stdout
        for line in self.proc.stdout:
            text = line.rstrip("\n")
            if self._sync_token and text == self._sync_token:
                self._synced.set()
            else:
                with self._cond:
                    self.lines.append(text)
                    self._cond.notify_all()
            if self._synced.is_set():
                # Paused only once the sync token is read: a line the agent logged just before the pause
                # (e.g. its "started" line right after the first WATCHDOG=1) must not stop the reader short
                # of the token (that was a race: "the output reader did not pause").
                self._go.wait()
        with self._cond:
            self._cond.notify_all()

    def _writer(self) -> int:
        assert self.proc
        # A separate open file description of the agent's stdout pipe, non-blocking for us only.
        return os.open(f"/proc/{self.proc.pid}/fd/1", os.O_WRONLY | os.O_NONBLOCK)

    def pause_and_fill(self, timeout: float = 10.0) -> int:
        """Stop reading the agent's output and fill its pipe: the next log write in the agent blocks.
        Returns the number of filler bytes written."""
        self._synced.clear()  # first: the reader must not stop on an earlier pause's token
        self._go.clear()
        self._sync_token = SYNC.format(os.urandom(4).hex())
        fd = self._writer()
        try:
            os.write(fd, (self._sync_token + "\n").encode())
            if not self._synced.wait(timeout):
                raise AssertionError("the output reader did not pause")
            written = 0
            for chunk in (b"." * 255 + b"\n", b"\n"):
                while True:
                    try:
                        written += os.write(fd, chunk)
                    except OSError as exc:
                        if exc.errno != errno.EAGAIN:
                            raise
                        break
            return written
        finally:
            os.close(fd)

    def resume(self) -> None:
        self._go.set()
