"""Handler registration: duplicates are refused loudly, broken plugins are skipped, and plugin discovery
only pays for importlib.metadata when a plugin is installed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.registry import dist


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
                          env={"PYTHONPATH": f"{tmp_path}:{Path(__file__).resolve().parents[2]}", "PATH": "/usr/bin"})
    assert proc.stdout.strip() == "['hello', 'info', 'ping'] plugin mine_plugin:Hello True"
    assert "plugin 'broken' (mine_plugin:missing) could not be loaded and is ignored" in proc.stderr
    assert "command 'ping' from plugin mine_plugin:Hello is already registered by built-in" in proc.stderr


def test_no_plugins_no_importlib_metadata() -> None:
    code = ("import sys; from agent.commands.handlers.registry import build_registry; build_registry({}, dict);"
            "print('importlib.metadata' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"

