"""The package's layers: every import points down (or stays inside its own group).

A newcomer reads the tree top-down: cli -> service/tools -> commands/connection -> state/tls -> config ->
the shared vocabulary. A module may import from its own group and from groups below it, never from a
group beside or above it; this test reads every import in agent/ (including those inside functions) and
fails on the first arrow that points the wrong way.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

AGENT = Path(__file__).resolve().parents[2] / "agent"

# group -> rank; a module's group is its first package below agent/ (or its own name for top-level modules).
RANKS = {
    "errors": 0, "protocol": 0, "topics": 0, "logtext": 0, "environment": 0, "wakeup": 0, "__init__": 0,
    "config": 1,
    "tls": 2, "state": 2,
    "connection": 3, "commands": 3,
    "renewal": 4,
    "service": 5, "tools": 5,
    "cli": 6, "__main__": 7,
}


def group_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def modules() -> list[tuple[str, Path]]:
    found = []
    for path in sorted(AGENT.rglob("*.py")):
        rel = path.relative_to(AGENT.parent).with_suffix("")
        name = ".".join(rel.parts)
        found.append((name.removesuffix(".__init__"), path))
    return found


def imports_of(path: Path, module: str) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "agent")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            if target.split(".")[0] != "agent":
                continue
            if target == "agent":  # from agent import x: x is a submodule or a name in agent/__init__
                out.update(f"agent.{a.name}" if (AGENT / a.name).exists() or (AGENT / f"{a.name}.py").exists()
                           else "agent" for a in node.names)
            elif node.module is None:  # from . import sibling
                out.update(f"{target}.{a.name}" for a in node.names)
            else:
                out.add(target)
    return out


def test_every_module_belongs_to_a_known_group() -> None:
    unknown = sorted({group_of(name) for name, _ in modules()} - RANKS.keys())
    assert unknown == [], f"add these groups to RANKS (and to README's layout): {unknown}"


@pytest.mark.parametrize(("module", "path"), modules(), ids=[name for name, _ in modules()])
def test_imports_point_down(module: str, path: Path) -> None:
    mine = group_of(module)
    wrong = []
    for target in sorted(imports_of(path, module)):
        theirs = group_of(target)
        if theirs == mine or RANKS.get(theirs, 99) < RANKS[mine]:
            continue
        wrong.append(f"{module} imports {target} ({theirs}, rank {RANKS.get(theirs)} >= {mine}, rank {RANKS[mine]})")
    assert wrong == []


def test_the_reader_sees_imports_inside_functions_and_relative_ones(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("from . import sibling\n\ndef f():\n"
                      "    from agent.service.app import run\n    import agent.tls\n")
    assert imports_of(sample, "agent.commands.sample") == {"agent.commands.sibling", "agent.service.app", "agent.tls"}


def test_only_the_connection_package_imports_paho() -> None:
    """paho stays behind agent/connection/ (adapter, pump, session, probe, forward); agent.paho_version only
    reads a string."""
    outside = []
    for name, path in modules():
        if group_of(name) == "connection" or name == "agent":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            mods = ([a.name for a in node.names] if isinstance(node, ast.Import)
                    else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            outside += [f"{name} imports {m}" for m in mods if m.split(".")[0] == "paho"]
    assert outside == []


# The connection package's pure core: decisions over plain values, tested without a broker. None of them may
# reach paho, directly or through what it imports.
PURE_CONNECTION = ("agent.connection.backoff", "agent.connection.classify", "agent.connection.ends",
                   "agent.connection.events", "agent.connection.subscriptions", "agent.connection.tuner")


def imports_paho(path: Path) -> bool:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        mods = ([a.name for a in node.names] if isinstance(node, ast.Import)
                else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
        if any(m.split(".")[0] == "paho" for m in mods):
            return True
    return False


@pytest.mark.parametrize("pure", PURE_CONNECTION)
def test_the_pure_connection_modules_never_reach_paho(pure: str) -> None:
    paths = dict(modules())
    seen, todo, chain = {pure}, [pure], {pure: pure}
    while todo:
        name = todo.pop()
        path = paths.get(name)
        if path is None:  # "from agent.x import name": the module is agent.x
            continue
        assert not imports_paho(path), f"{chain[name]} imports paho"
        for target in imports_of(path, name):
            while target not in paths and "." in target:
                target = target.rsplit(".", 1)[0]
            if target not in seen:
                seen.add(target)
                chain[target] = f"{chain[name]} -> {target}"
                todo.append(target)
