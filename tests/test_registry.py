"""Handler registration: duplicates are refused loudly, broken plugins are skipped, and plugin discovery
only pays for importlib.metadata when a plugin is installed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agent.commands.handlers import DuplicateHandlerError, HandlerRegistry
from agent.commands.handlers.builtin import PingHandler
from agent.commands.handlers.registry import _may_have_plugins
from agent.errors import AgentError


def dist(root: Path, name: str, entry_points: str | None) -> None:
    info = root / f"{name}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    if entry_points is not None:
        (info / "entry_points.txt").write_text(entry_points)


def test_duplicate_registration_names_both_sources() -> None:
    reg = HandlerRegistry()
    reg.register("ping", PingHandler(), "built-in")
    with pytest.raises(DuplicateHandlerError) as info:
        reg.register("ping", PingHandler(), "plugin x:y")
    assert str(info.value) == (
        "command 'ping' from plugin x:y is already registered by built-in; plugin x:y's is ignored")


def test_an_object_without_handle_is_refused() -> None:
    with pytest.raises(AgentError, match="has no handle"):
        HandlerRegistry().register("x", object(), "test")  # type: ignore[arg-type]


def test_plugin_pre_scan(tmp_path: Path) -> None:
    dist(tmp_path / "a", "other", "[console_scripts]\nx = y:z\n")
    dist(tmp_path / "b", "nothing", None)
    assert not _may_have_plugins([str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "missing")])
    dist(tmp_path / "c", "mine", "[mqtt_agent.handlers]\nhello = mine:Hello\n")
    assert _may_have_plugins([str(tmp_path / "a"), str(tmp_path / "c")])
    zipped = tmp_path / "lib.zip"
    zipped.write_bytes(b"PK")
    assert _may_have_plugins([str(zipped)])  # cannot look inside: let importlib.metadata decide


def test_plugins_are_found_and_broken_ones_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    dist(tmp_path, "mine", "[mqtt_agent.handlers]\nhello = mine_plugin:Hello\nbroken = mine_plugin:missing\n"
         "ping = mine_plugin:Hello\n")
    (tmp_path / "mine_plugin.py").write_text(
        "from agent.protocol import Response\n"
        "class Hello:\n    def handle(self, request):\n        return Response.ok({'hello': request.device_id})\n")
    code = (
        "import logging, sys; logging.basicConfig(level=logging.ERROR);"
        "from agent.commands.handlers.registry import build_registry;"
        "reg = build_registry({}, dict);"
        "print(sorted(reg), reg.source('hello'), 'importlib.metadata' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={"PYTHONPATH": f"{tmp_path}:{Path(__file__).resolve().parents[1]}", "PATH": "/usr/bin"})
    assert proc.stdout.strip() == "['hello', 'info', 'ping'] plugin mine_plugin:Hello True"
    assert "plugin 'broken' (mine_plugin:missing) could not be loaded and is ignored" in proc.stderr
    assert "command 'ping' from plugin mine_plugin:Hello is already registered by built-in" in proc.stderr


def test_no_plugins_no_importlib_metadata() -> None:
    code = ("import sys; from agent.commands.handlers.registry import build_registry; build_registry({}, dict);"
            "print('importlib.metadata' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
