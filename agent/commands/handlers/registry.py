"""The one place where every handler is registered: built-ins, exec commands, plugins."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable, Mapping
from typing import Any, Callable

from agent.commands.handlers import DuplicateHandlerError, Handler, HandlerRegistry
from agent.commands.handlers.builtin import InfoHandler, PingHandler
from agent.commands.handlers.exec import ExecHandler
from agent.config import CommandSpec
from agent.errors import AgentError

log = logging.getLogger(__name__)

PLUGIN_GROUP = "mqtt_agent.handlers"


def _may_have_plugins(paths: Iterable[str]) -> bool:
    """A cheap look for any installed distribution declaring the plugin group.

    importlib.metadata (with the csv, email and zipfile modules it pulls in) adds about 0.75 MiB to the
    agent's resident memory; most gateways have no plugins, so it is imported only when this finds one,
    or when sys.path holds something other than directories (zip files, eggs) that this cannot look into.
    """
    marker = f"[{PLUGIN_GROUP}]"
    for entry in paths:
        try:
            with os.scandir(entry or ".") as listing:
                dirs = [d.path for d in listing if d.name.endswith((".dist-info", ".egg-info")) and d.is_dir()]
        except NotADirectoryError:
            return True
        except OSError:
            continue  # a missing path entry
        for dist in dirs:
            try:
                with open(dist + "/entry_points.txt", encoding="utf-8", errors="replace") as fh:
                    if marker in fh.read():
                        return True
            except OSError:
                continue
    return False


def _entry_points() -> Iterable[Any]:
    if not _may_have_plugins(sys.path):
        return []
    from importlib import metadata

    if sys.version_info < (3, 10):  # pragma: no cover - Python 3.9 has no selection API
        return metadata.entry_points().get(PLUGIN_GROUP, [])  # type: ignore[attr-defined,no-any-return,unused-ignore]
    return metadata.entry_points(group=PLUGIN_GROUP)


def load_plugin(entry_point: Any) -> Handler:
    """An entry point names a Handler instance, or a class/factory called without arguments."""
    obj = entry_point.load()
    if isinstance(obj, Handler) and not isinstance(obj, type):
        return obj
    if callable(obj):
        made = obj()
        if isinstance(made, Handler):
            return made
        raise AgentError(f"plugin {entry_point.name!r} ({entry_point.value}) returned {made!r}, not a handler")
    raise AgentError(f"plugin {entry_point.name!r} ({entry_point.value}) is neither a handler nor a factory")


def build_registry(
    commands: Mapping[str, CommandSpec],
    status: Callable[[], dict[str, Any]],
    *,
    plugins: Iterable[Any] | None = None,
    ping: PingHandler | None = None,
    builtins: Mapping[str, Handler] | None = None,
) -> HandlerRegistry:
    """Built-ins first, then exec commands from the config, then plugins.

    A plugin that fails to load or clashes with an earlier name is logged as an error and skipped:
    a broken Python package must not take the device's remote management down with it.
    """
    registry = HandlerRegistry()
    registry.register("ping", ping or PingHandler(), "built-in")
    registry.register("info", InfoHandler(status), "built-in")
    for name, handler in (builtins or {}).items():
        registry.register(name, handler, "built-in")
    for spec in commands.values():
        registry.register(spec.name, ExecHandler(spec), f"[commands.{spec.name}]")
    for ep in _entry_points() if plugins is None else plugins:
        source = f"plugin {ep.value}"
        try:
            registry.register(ep.name, load_plugin(ep), source)
        except DuplicateHandlerError as exc:
            log.error("%s", exc)
        except Exception as exc:  # noqa: BLE001 - any import-time error of third-party code
            log.error("plugin %r (%s) could not be loaded and is ignored: %s", ep.name, ep.value, exc)
    return registry
