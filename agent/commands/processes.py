"""Every process an exec command starts is known, killed on timeout, and reaped when it exits.

A command's process group is not a boundary: `setsid sleep 3041 &` leaves it, so killing the group on
timeout left the sleep running. Instead:

- The agent is a *child subreaper* (prctl(PR_SET_CHILD_SUBREAPER), Linux 3.4+): a process whose parent
  dies is re-parented to the agent, not to PID 1, so nothing a command starts escapes the agent's view.
- Each command runs with a unique MQTT_AGENT_EXEC_ID in its environment, which every descendant inherits
  (fork, setsid and double fork keep the environment). On timeout the agent kills, in rounds until none
  is left, the command's process tree (by parent pid, from /proc) and every process carrying its id:
  found by walking /proc, because a cgroup per command would need `Delegate=yes` in the unit (and the
  cgroup v2 write access that comes with it), which this hardened service does not have. A program that
  clears its environment *and* leaves the tree before the timeout is the one case this misses; it is
  still reaped when it exits, and systemd's KillMode=control-group kills it when the service stops.
- Reaping: subprocess.Popen waits for its own pid; a reaper that called waitpid(-1) would steal those
  exit statuses. So the reaper only waits for specific pids: re-parented processes it has seen alive
  with an exec id (orphans of commands), and zombies no live Popen owns that it finds twice in a row
  (a plugin's own Popen is normally waited before the second look). Popen creation and reaping share a
  lock, so a new child is registered before the reaper can look at it.

Not on Linux (no /proc, no prctl): everything degrades to the process group kill, and nothing is reaped
beyond what subprocess does.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from agent.logtext import untrusted

log = logging.getLogger(__name__)

PR_SET_CHILD_SUBREAPER = 36
EXEC_ID_VAR = "MQTT_AGENT_EXEC_ID"
PROC = Path("/proc")
KILL_ROUNDS = 10
# How often the reaper looks while orphans are alive (they are reaped at most this late), and otherwise.
POLL_TRACKING = 0.5
POLL_IDLE = 30.0


_subreaper = False  # set once this process is a subreaper: then every process of a command is below it


def become_subreaper() -> bool:
    """Make this process the child subreaper of its descendants. False (and no error) where unsupported."""
    global _subreaper
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            log.warning("cannot become a child subreaper (%s): a process an exec command detaches may outlive "
                        "a timeout kill", os.strerror(ctypes.get_errno()))
            return False
    except (OSError, AttributeError) as exc:
        log.warning("cannot become a child subreaper (%s)", exc)
        return False
    _subreaper = True
    return True


@dataclass(frozen=True)
class ProcInfo:
    pid: int
    ppid: int
    state: str
    name: str


def _stat(pid: int, proc: Path = PROC) -> ProcInfo | None:
    try:
        data = (proc / str(pid) / "stat").read_text()
    except (OSError, ValueError):
        return None
    # "pid (comm) state ppid ...": comm may contain spaces and parentheses; the last ')' ends it.
    lpar, rpar = data.find("("), data.rfind(")")
    rest = data[rpar + 2:].split()
    if lpar < 0 or rpar < 0 or len(rest) < 2:
        return None
    return ProcInfo(pid, int(rest[1]), rest[0], data[lpar + 1:rpar])


def process_table(proc: Path = PROC) -> dict[int, ProcInfo]:
    """pid -> ProcInfo for every process visible in /proc (empty where there is no /proc)."""
    table: dict[int, ProcInfo] = {}
    try:
        names = [entry.name for entry in proc.iterdir()]
    except OSError:
        return table
    for name in names:
        if name.isdigit():
            info = _stat(int(name), proc)
            if info is not None:
                table[info.pid] = info
    return table


def has_exec_id(pid: int, exec_id: str, proc: Path = PROC) -> bool:
    try:
        environ = (proc / str(pid) / "environ").read_bytes()
    except OSError:
        return False
    return f"{EXEC_ID_VAR}={exec_id}".encode() in environ.split(b"\0")


def descendants(root: int, table: dict[int, ProcInfo]) -> set[int]:
    """The pids below `root` in the parent tree (not `root` itself)."""
    children: dict[int, list[int]] = {}
    for info in table.values():
        children.setdefault(info.ppid, []).append(info.pid)
    found: set[int] = set()
    stack = [root]
    while stack:
        for child in children.get(stack.pop(), ()):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


def _children(pid: int, proc: Path) -> list[int] | None:
    """Children of `pid` from /proc/PID/task/*/children (CONFIG_PROC_CHILDREN); None if unavailable."""
    try:
        tasks = [entry.name for entry in (proc / str(pid) / "task").iterdir()]
    except OSError:
        return [] if not (proc / str(pid)).exists() else None
    out: list[int] = []
    for tid in tasks:
        try:
            out += [int(c) for c in (proc / str(pid) / "task" / tid / "children").read_text().split()]
        except FileNotFoundError:
            if tid == str(pid) and (proc / str(pid)).exists():
                return None  # the kernel has no children files: callers walk the whole table
        except (OSError, ValueError):
            continue
    return out


def subtree_table(root: int, proc: Path = PROC) -> dict[int, ProcInfo] | None:
    """ProcInfo of `root`'s descendants only, through the children files: a few reads instead of one per
    process on the machine (which cost ~8 ms per command on a 150-process box). None if unavailable."""
    table: dict[int, ProcInfo] = {}
    stack = [root]
    while stack:
        kids = _children(stack.pop(), proc)
        if kids is None:
            return None
        for kid in kids:
            if kid not in table:
                info = _stat(kid, proc)
                if info is not None:
                    table[kid] = info
                    stack.append(kid)
    return table


def agent_table(proc: Path = PROC) -> dict[int, ProcInfo]:
    """The processes the agent needs to look at: as a subreaper, its own descendants (everything a command
    started is among them); otherwise, or without children files, every process."""
    if _subreaper:
        table = subtree_table(os.getpid(), proc)
        if table is not None:
            return table
    return process_table(proc)


def command_processes(root: int | None, exec_id: str, proc: Path = PROC,
                      table: dict[int, ProcInfo] | None = None) -> set[int]:
    """Live (not zombie) processes of one command: `root`'s tree and everything carrying `exec_id`."""
    if table is None:
        table = agent_table(proc)
    me = os.getpid()
    found = descendants(root, table) if root is not None else set()
    if root is not None and root in table:
        found.add(root)
    for pid in list(table):
        if pid not in found and pid != me and has_exec_id(pid, exec_id, proc):
            found.add(pid)
            found |= descendants(pid, table)
    return {pid for pid in found if pid in table and table[pid].state not in ("Z", "X") and pid != me}


@dataclass
class KillReport:
    killed: int  # processes sent SIGKILL
    survivors: int  # still alive after the last round (should be 0)
    pids: frozenset[int] = frozenset()

    def describe(self) -> str:
        if not self.killed:
            return "no process of it was left to kill"
        text = f"killed {self.killed} process{'es' if self.killed != 1 else ''}"
        if self.survivors:
            text += f"; {self.survivors} could not be killed"
        return text


def kill_command(popen: subprocess.Popen[bytes], exec_id: str, proc: Path = PROC) -> KillReport:
    """SIGKILL the command, its tree and every process carrying its exec id, in rounds (a process may
    fork between the walk and the kill) until none is left or KILL_ROUNDS are done. Counts what it killed."""
    if not proc.exists():  # no /proc: the process group is all that can be reached
        try:
            os.killpg(popen.pid, signal.SIGKILL)
            return KillReport(1, 0)
        except (ProcessLookupError, PermissionError):
            return KillReport(0, 0)
    killed: set[int] = set()
    left: set[int] = set()
    for _ in range(KILL_ROUNDS):
        left = command_processes(popen.pid, exec_id, proc)
        if not left:
            break
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            except ProcessLookupError:
                pass
        time.sleep(0.01)  # let the kernel turn them into zombies before the next walk
    return KillReport(len(killed), len(left), frozenset(killed))


@dataclass
class _Orphan:
    pid: int
    name: str
    command: str
    since: float  # when its command ended (monotonic)


class Reaper:
    """Owns the agent's children that no Popen waits for. See the module docstring for the rules."""

    def __init__(self, *, proc: Path = PROC, clock: Callable[[], float] = time.monotonic) -> None:
        self._proc = proc
        self._clock = clock
        self._lock = threading.Lock()  # held while a Popen is created and registered, and while reaping
        self._owned: set[int] = set()
        self._orphans: dict[int, _Orphan] = {}
        self._suspect_zombies: set[int] = set()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopped = False
        self.reaped = 0
        self.enabled = sys.platform.startswith("linux") and proc.exists()

    # --- spawning (worker threads) -------------------------------------------------------------

    @contextmanager
    def spawning(self) -> Iterator[Callable[[int], None]]:
        """`with reaper.spawning() as own: p = Popen(...); own(p.pid)`: no reap between fork and own()."""
        with self._lock:
            yield self._owned.add

    def release(self, pid: int) -> None:
        """The Popen of `pid` has waited for it."""
        with self._lock:
            self._owned.discard(pid)

    def command_ended(self, command: str, exec_id: str, killed: frozenset[int] = frozenset()) -> list[ProcInfo]:
        """After a command's main process exited: processes it left running, now tracked until they exit.
        `killed`: the pids a timeout killed (zombies now; re-parented ones are the agent's to reap)."""
        if not self.enabled:
            return []
        table = agent_table(self._proc)
        left = command_processes(None, exec_id, self._proc, table)
        infos = [table[pid] for pid in sorted(left) if pid in table]
        now = self._clock()
        with self._lock:
            for info in infos:
                self._orphans.setdefault(info.pid, _Orphan(info.pid, info.name, command, now))
            for pid in killed:
                if pid in table and pid not in self._owned:
                    self._orphans.setdefault(pid, _Orphan(pid, table[pid].name, command, now))
        if infos:
            log.warning("command %s left %d process(es) running after it exited: %s; they are reaped when "
                        "they exit", command, len(infos),
                        ", ".join(f"{i.pid} ({untrusted(i.name, 32)})" for i in infos[:10]),
                        extra={"COMMAND": command})
        self.poke()  # re-parented zombies are reaped now, not at the next idle look
        return infos

    # --- reaping -------------------------------------------------------------------------------

    def reap_once(self) -> int:
        """Wait for the exited children no Popen owns. Returns how many were reaped."""
        if not self.enabled:
            return 0
        me = os.getpid()
        count = 0
        with self._lock:
            table = agent_table(self._proc)
            mine = {pid: info for pid, info in table.items() if info.ppid == me and pid not in self._owned}
            for pid, info in mine.items():
                if info.state not in ("Z", "X"):
                    continue
                if pid in self._orphans or pid in self._suspect_zombies:
                    count += self._wait(pid)
                else:
                    self._suspect_zombies.add(pid)  # reaped at the next look if still nobody's
            self._suspect_zombies &= set(mine)
            # A tracked orphan that is gone without us (reaped elsewhere, or not our child): forget it.
            for pid in [p for p in self._orphans if p not in table]:
                self._orphans.pop(pid)
        return count

    def _wait(self, pid: int) -> int:
        try:
            got, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            got, status = 0, 0
        orphan = self._orphans.pop(pid, None)
        self._suspect_zombies.discard(pid)
        if got != pid:
            return 0
        self.reaped += 1
        code = os.waitstatus_to_exitcode(status)
        what = f"exited with status {code}" if code >= 0 else f"was killed by signal {-code}"
        if orphan is not None:
            log.info("process %d (%s) left by command %s %s, %.1f s after its command ended", pid,
                     untrusted(orphan.name, 32), orphan.command, what, self._clock() - orphan.since,
                     extra={"COMMAND": orphan.command})
        else:
            log.info("reaped process %d, which %s after its parent ended", pid, what)
        return 1

    @property
    def tracking(self) -> int:
        with self._lock:
            return len(self._orphans)

    def poke(self) -> None:
        with self._wake:
            self._wake.notify_all()

    def start(self) -> None:
        if not self.enabled or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._loop, name="reaper", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stopped:
            try:
                self.reap_once()
            except Exception:
                log.exception("internal error in the process reaper")
            busy = bool(self._orphans or self._suspect_zombies)
            with self._wake:
                if not self._stopped:
                    self._wake.wait(POLL_TRACKING if busy else POLL_IDLE)

    def stop(self) -> None:
        self._stopped = True
        self.poke()
        if self._thread is not None:
            self._thread.join(2.0)
        with self._lock:
            left = list(self._orphans.values())
        if left:
            # systemd's KillMode=control-group stops them with the service; say what is still running.
            log.info("%d process(es) left by commands still run at shutdown: %s", len(left),
                     ", ".join(f"{o.pid} ({untrusted(o.name, 32)}, from {o.command})" for o in left[:10]))


def new_exec_id() -> str:
    return uuid.uuid4().hex


# One per agent process: the subreaper property and the children are process-wide.
REAPER = Reaper()
