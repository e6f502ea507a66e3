"""Dependencies point one way: trainer and reward server share only ``shared/`` and the reward
registry's interface (``reward_server.rewards``), and the trainer's reward client has no import circle.

Two kinds of proof: each package is imported in a fresh interpreter with the other one blocked
(what actually runs), and every import statement in the source, function-level ones included, is
checked against the allowed directions (what a lazy import would hide until it runs).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("trainer", "reward_server", "shared")
# The only part of the reward server the trainer may import (lazily, for the "local" transport).
REGISTRY_INTERFACE = "reward_server.rewards"


def modules_of(package: str) -> list[str]:
    """Every module of a package, from its files (``__main__`` excluded: importing it runs it)."""
    names = []
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__main__":
            continue
        if parts[-1] == "__init__":
            parts.pop()
        names.append(".".join(parts))
    return names


def import_with_blocked(modules: list[str], blocked: list[str]) -> dict[str, str]:
    """Import ``modules`` in a fresh interpreter where importing ``blocked`` packages fails.

    Returns {module: error} for the ones that failed, and also reports a blocked package that
    got imported some other way.
    """
    script = textwrap.dedent(
        f"""
        import importlib, json, sys, traceback
        blocked = {blocked!r}
        for name in blocked:
            sys.modules[name] = None  # any "import name[.x]" now raises ImportError
        errors = {{}}
        for module in {modules!r}:
            try:
                importlib.import_module(module)
            except BaseException:
                errors[module] = traceback.format_exc(limit=-3)
        for name in blocked:
            if sys.modules.get(name) is not None:
                errors[name] = "imported although blocked"
        print(json.dumps(errors))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=600, check=False
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    ("package", "blocked"),
    [
        ("trainer", ["reward_server"]),
        ("reward_server", ["trainer"]),
        ("shared", ["trainer", "reward_server"]),
    ],
)
def test_each_package_imports_with_the_other_blocked(package: str, blocked: list[str]) -> None:
    errors = import_with_blocked(modules_of(package), blocked)
    assert not errors, "\n".join(f"{module}:\n{error}" for module, error in errors.items())


# -- static: every import statement, module- and function-level -----------------------------------


def imports_of(path: Path, module: str) -> list[tuple[str, int, bool]]:
    """(imported module, line, at module level?) for every import in a file.

    ``from X import Y`` yields both ``X`` and ``X.Y`` (Y may be a submodule); relative imports are
    resolved against ``module``.
    """
    tree = ast.parse(path.read_text(), filename=str(path))
    top_level = {id(node) for node in tree.body}
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[str, int, bool]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno, id(node) in top_level) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.append((base, node.lineno, id(node) in top_level))
            found += [(f"{base}.{alias.name}", node.lineno, id(node) in top_level) for alias in node.names]
    return found


def all_imports() -> dict[str, list[tuple[str, int, bool]]]:
    result = {}
    for package in PACKAGES:
        for module in modules_of(package):
            path = ROOT / (module.replace(".", "/") + ".py")
            if not path.exists():
                path = ROOT / module.replace(".", "/") / "__init__.py"
            result[module] = imports_of(path, module)
    return result


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def test_imports_point_one_way() -> None:
    bad = []
    for module, imports in all_imports().items():
        for name, line, top in imports:
            if within(module, "shared") and (within(name, "trainer") or within(name, "reward_server")):
                bad.append(f"{module}:{line} imports {name} (shared/ must import neither side)")
            if within(module, "reward_server") and within(name, "trainer"):
                bad.append(f"{module}:{line} imports {name} (the server must not import the trainer)")
            if within(module, "trainer") and within(name, "reward_server"):
                if not within(name, REGISTRY_INTERFACE):
                    bad.append(f"{module}:{line} imports {name} (only {REGISTRY_INTERFACE} is shared)")
                elif top:
                    bad.append(f"{module}:{line} imports {name} at module level (import it lazily)")
    assert not bad, "\n".join(bad)


def test_no_import_circle_between_reward_client_and_transports() -> None:
    imports = all_imports()
    bad = []
    for module, found in imports.items():
        names = {name for name, _, _ in found}
        if within(module, "trainer.transports") and "trainer.reward_client" in names:
            bad.append(f"{module} imports the factory trainer.reward_client")
        if module == "trainer.reward_api" and any(
            within(n, "trainer.transports") or n == "trainer.reward_client" for n in names
        ):
            bad.append("trainer.reward_api (the interface) imports a transport or the factory")
    assert not bad, "\n".join(bad)
    # And no circle at all among the trainer's modules (function-level imports included).
    graph = {
        module: {name for name, _, _ in found if name in imports and name != module}
        for module, found in imports.items()
        if within(module, "trainer")
    }
    assert find_cycle(graph) is None, f"import circle: {' -> '.join(find_cycle(graph) or [])}"


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of ``graph`` as a path that returns to its start, or None (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_old_names_still_import_from_reward_client() -> None:
    from trainer import reward_api, reward_client
    from trainer.transports.local import LocalRewardClient

    for name in ("RewardClient", "RewardResult"):
        assert getattr(reward_client, name) is getattr(reward_api, name)
    assert reward_client.LocalRewardClient is LocalRewardClient
    assert set(reward_client.REWARD_TRANSPORTS) == {"local", "http", "redis"}
