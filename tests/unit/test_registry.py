"""Handler registration: duplicates are refused loudly, broken plugins are skipped, and plugin discovery
only pays for importlib.metadata when a plugin is installed."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.commands.handlers import DuplicateHandlerError, HandlerRegistry
from agent.commands.handlers.builtin import PingHandler
from agent.commands.handlers.registry import _may_have_plugins
from agent.errors import AgentError
from tests.support.registry import dist


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

