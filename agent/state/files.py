"""Durable small files: write to a temporary name, fsync, rename into place, fsync the directory.

Every file the agent or `enroll` writes goes through here, so what a power cut can leave behind is decided
in one place: either the old content or the new, never a torn file, and never a rename that a cut undoes
(the directory entry is only durable once the directory itself is fsynced).
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from pathlib import Path

TEMP_SUFFIX = ".tmp"
# mkstemp(prefix=".NAME.", suffix=".tmp") names: ".NAME." + 8 random characters + ".tmp".
_TEMP_NAME = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")


def fsync_dir(directory: Path) -> None:
    """Make a rename or a new entry in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, mode: int = 0o600, owner: tuple[int, int] | None = None) -> None:
    """Replace `path` with `data` durably; the file never exists with wider permissions than `mode`.

    `owner` is (uid, gid) for a file written on behalf of another user (enroll, run as root, for the service).

    mkstemp creates the temporary file 0600, and mode and owner are set before any byte is written.
    On any error the temporary file is removed and the old content stays in place.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            if owner is not None:
                os.fchown(fh.fileno(), *owner)
            os.fchmod(fh.fileno(), mode)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def is_temp_name(name: str) -> bool:
    """True for a name write_atomic uses for its temporary files."""
    return bool(_TEMP_NAME.match(name))


def remove_stale_temps(directory: Path) -> list[Path]:
    """Remove temporary files a crash left in `directory` (only write_atomic's names); return what went."""
    removed: list[Path] = []
    try:
        entries = list(directory.iterdir())
    except OSError:
        return removed
    for entry in entries:
        if is_temp_name(entry.name) and entry.is_file() and not entry.is_symlink():
            with contextlib.suppress(OSError):
                entry.unlink()
                removed.append(entry)
    return removed
