"""Build everything the test suite caches (every root in roots.ROOTS, the aedes install), or wait for it.

    python -m tests.support.prebuild --dir DIR [--jobs N]

scripts/test.sh runs this in the background while lint, mypy and the fast tiers run, and exports
MQTT_AGENT_PREBUILD=DIR to pytest. The prebuild first takes the lock of every root that is missing or
stale, then writes DIR/locked (test.sh waits for that line), so any test that asks for a root from then
on waits for this build instead of starting its own. Per root it writes DIR/NAME.log (the build's
steps and output) and, if the build fails, DIR/NAME.failed (the error and the log's tail): the test
that needs the root then fails with that text (roots.ensure). DIR/status is the last line written:
"ok" or "failed: NAMES". Exit status 0 only if everything was built.

Tests marked `roots(...)` (tests/conftest.py) wait for their roots before their own timeout starts
(wait_for), so a slow fresh build never looks like a hung test.

Parallel builds: --jobs 2 (the default) builds two roots at a time. A native root is mostly download
and dpkg; an emulated one is one qemu process at a time (CPU-bound), so two builds keep both cores of a
2-core machine busy.
"""

from __future__ import annotations

import argparse
import fcntl
import sys
import time
import traceback
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import IO

from tests.support import roots
from tests.support.brokers import aedes

# The order builds start in: what the system tier needs first (the systemd root and the trixie root,
# whose brokers the interop tests start), then the slow emulated ones.
ORDER = ("systemd", "trixie", "arm64", "armhf")


def _build_one(name: str, held: IO[str], out: Path) -> tuple[str, float, str | None]:
    spec = roots.ROOTS[name]
    started = time.monotonic()
    error: str | None = None
    with open(out / f"{spec.name}.log", "w") as log:
        try:
            roots.build_locked(spec, log=log)
        except Exception as exc:  # noqa: BLE001 - any failure is recorded for the tests, then reported
            error = f"{type(exc).__name__}: {exc}"
            log.write(traceback.format_exc())
        finally:
            elapsed = time.monotonic() - started
            if error is not None:
                tail = (out / f"{spec.name}.log").read_text(errors="replace")[-4000:]
                (out / f"{spec.name}.failed").write_text(f"{error}\n--- {out / spec.name}.log (tail) ---\n{tail}")
            held.close()  # releases the lock: a waiting test now sees the root (or the .failed file)
    return spec.name, elapsed, error


def prebuild(out: Path, jobs: int = 2, names: Iterable[str] = ORDER, *, npm: bool = True) -> bool:
    """Build `names` (keys of roots.ROOTS) and, with npm, the aedes install; True if all went well."""
    out.mkdir(parents=True, exist_ok=True)
    for stale in (*out.glob("*.failed"), out / "locked", out / "status"):
        stale.unlink(missing_ok=True)
    todo: list[tuple[str, IO[str]]] = []
    for name in names:
        held = roots.lock(roots.ROOTS[name])
        try:
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # another run is building it; the tests wait for that one
            held.close()
            continue
        if roots.ROOTS[name].valid():
            held.close()
        else:
            todo.append((name, held))
    (out / "locked").write_text(" ".join(roots.ROOTS[n].name for n, _ in todo) + "\n")
    print(f"prebuild: cache {roots.CACHE}; to build: {' '.join(n for n, _ in todo) or 'nothing'}", flush=True)
    started = time.monotonic()
    failed: list[str] = []

    def install_aedes() -> tuple[str, float, str | None]:
        try:
            aedes.ensure_aedes()
            return "aedes", time.monotonic() - started, None
        except Exception as exc:  # noqa: BLE001 - reported; the aedes tests fail on their own
            return "aedes", time.monotonic() - started, str(exc)

    with ThreadPoolExecutor(max(1, jobs)) as pool:
        futures = [pool.submit(install_aedes)] if npm else []
        futures += [pool.submit(_build_one, name, held, out) for name, held in todo]
        for future in as_completed(futures):
            name, elapsed, error = future.result()
            print(f"prebuild: {name} {'FAILED' if error else 'ready'}: took {elapsed:.0f} s, "
                  f"{time.monotonic() - started:.0f} s after the start{': ' + error.splitlines()[0] if error else ''}",
                  flush=True)
            if error:
                failed.append(name)
    print(f"prebuild: {'failed: ' + ' '.join(failed) if failed else 'ok'} after {time.monotonic() - started:.0f} s",
          flush=True)
    (out / "status").write_text(f"failed: {' '.join(failed)}\n" if failed else "ok\n")
    return not failed


def wait_for(names: Iterable[str]) -> None:
    """Wait until none of these roots is being built (by the prebuild or anyone), then make sure each
    is there: built now if missing, RootError if the prebuild failed on it."""
    for name in names:
        roots.ensure(roots.ROOTS[name])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, required=True, help="where the logs and status files go")
    parser.add_argument("--jobs", type=int, default=2, help="roots built at the same time (default 2)")
    parser.add_argument("names", nargs="*", metavar="ROOT", help=f"roots to build (default: all of {', '.join(ORDER)})")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in roots.ROOTS]
    if unknown:
        parser.error(f"no such root: {', '.join(unknown)} (known: {', '.join(roots.ROOTS)})")
    return 0 if prebuild(args.dir, args.jobs, args.names or ORDER) else 1


if __name__ == "__main__":
    sys.exit(main())
