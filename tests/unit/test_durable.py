"""agent.state.files: atomic, durable small-file writes and stale temporary files."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from agent.state.files import is_temp_name, remove_stale_temps, write_atomic


def test_write_atomic_replaces_content_with_mode(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "state.json"
    write_atomic(target, b"one")
    write_atomic(target, b"two", mode=0o640)
    assert target.read_bytes() == b"two"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert sorted(p.name for p in target.parent.iterdir()) == ["state.json"]


def test_write_atomic_failure_keeps_old_content_and_leaves_no_temp(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "state.json"
    write_atomic(target, b"old")

    def broken_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError):
        write_atomic(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_remove_stale_temps_removes_only_our_temporary_names(tmp_path: Path) -> None:
    (tmp_path / ".connection-state.json.abcd1234.tmp").write_bytes(b"torn")
    (tmp_path / "keep.tmp").write_bytes(b"operator's")
    (tmp_path / "connection-state.json").write_bytes(b"{}")
    removed = remove_stale_temps(tmp_path)
    assert [p.name for p in removed] == [".connection-state.json.abcd1234.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["connection-state.json", "keep.tmp"]


@pytest.mark.parametrize(("name", "expected"), [
    (".device.key.a1B2c3_d.tmp", True), ("device.key", False), (".device.key.tmp", False), ("x.abcdefgh.tmp", False),
])
def test_is_temp_name(name: str, expected: bool) -> None:
    assert is_temp_name(name) is expected
