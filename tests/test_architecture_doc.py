"""docs/architecture.md is true of the code, so it cannot go stale silently.

What it writes in backticks is checked against the source (read with ``ast``, nothing imported):
- a path (``trainer/sampling.py``, ``docs/transport.md``): the file or folder exists;
- a dotted name starting with a package (``trainer.ddim.ddim_step_with_logprob``,
  ``trainer.train.Trainer.update``): the module exists and defines the name (a method: in that class);
- ``Class.member`` (``RewardService.score``): some module of the three packages defines that class
  with that member in its body;
- ``name()``: a function, class or method of that name is defined in a module the same line names
  before it (a path or a dotted module), or anywhere in the packages if the line names none.
Other code spans (flags, config fields such as ``reward.transport``, file names) are not checked.
And every module of trainer/, reward_server/ and shared/ has its line in the module map.
"""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "architecture.md"
PACKAGES = ("trainer", "reward_server", "shared")

SPAN = re.compile(r"`([^`\n]+)`")
IDENT = r"[A-Za-z_]\w*"
DOTTED = re.compile(rf"^{IDENT}(?:\.{IDENT})+(?:\(\))?$")
CALL = re.compile(rf"^({IDENT})\(\)$")
PATH = re.compile(r"^[\w.-]+(?:/[\w.-]+)*/?$")
# A project path anywhere (also inside fenced blocks): <package or top folder>/...
BARE_PATH = re.compile(
    r"(?<![\w/.])((?:trainer|reward_server|shared|tests|docs|scripts|deploy|benchmarks)/[\w./-]*\w)"
)


def module_file(dotted: str, root: Path = ROOT) -> Path | None:
    path = root / Path(*dotted.split("."))
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return None


@functools.cache
def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _body_names(body: list[ast.stmt]) -> dict[str, ast.AST]:
    """Names a module or class body defines: defs, classes, assignments, imports (re-exports)."""
    names: dict[str, ast.AST] = {}
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names[node.name] = node
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    names[target.id] = node
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names[node.target.id] = node
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                names[alias.asname or alias.name.split(".")[0]] = node
        elif isinstance(node, (ast.If, ast.Try)):
            names.update(_body_names(node.body))
    return names


def defines(path: Path, parts: list[str]) -> bool:
    """Does the module at ``path`` define ``parts[0]`` (and, in that class, ``parts[1]``, ...)?"""
    body = _tree(path).body
    for part in parts:
        node = _body_names(body).get(part)
        if node is None:
            return False
        body = node.body if isinstance(node, ast.ClassDef) else []
    return True


@functools.cache
def package_modules(root: Path = ROOT) -> tuple[Path, ...]:
    return tuple(p for package in PACKAGES for p in sorted((root / package).rglob("*.py")))


def resolve_dotted(name: str, root: Path = ROOT) -> tuple[Path | None, bool]:
    """(module file, whether it defines the rest) for ``package.module[.Name[.member]]``."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        path = module_file(".".join(parts[:cut]), root)
        if path is not None:
            return path, defines(path, parts[cut:])
    return None, False


def problems(text: str, root: Path = ROOT) -> list[str]:
    """Every reference of ``text`` (the doc's markdown) that the code under ``root`` does not back."""
    found: list[str] = []
    for match in BARE_PATH.finditer(text):
        if not (root / match.group(1)).exists():
            found.append(f"path {match.group(1)!r} does not exist")
    in_fence = False
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            in_fence = not in_fence
        if in_fence or line.startswith("```"):
            continue
        context: list[Path] = []  # modules this line names, in order
        for span in SPAN.findall(line):
            span = span.strip()
            where = f"line {number}: `{span}`"
            if "/" in span or span.endswith(".py"):
                if "<" in span or not PATH.match(span):
                    continue  # a pattern such as rewards/<name>.py, or a command line
                path = root / span
                if not path.exists():
                    if not BARE_PATH.fullmatch(span):  # else already reported above
                        found.append(f"{where}: no such file")
                elif path.suffix == ".py":
                    context.append(path)
                continue
            if DOTTED.match(span):
                name = span.removesuffix("()")
                head = name.split(".")[0]
                if head in PACKAGES:
                    path, ok = resolve_dotted(name, root)
                    if path is None:
                        found.append(f"{where}: no such module")
                    elif not ok:
                        found.append(f"{where}: not defined in {path.relative_to(root)}")
                    else:
                        context.append(path)
                elif head[0].isupper():  # Class.member
                    if not any(defines(p, name.split(".")) for p in package_modules(root)):
                        found.append(f"{where}: no class {head} with that member in the packages")
                continue
            call = CALL.match(span)
            if call:
                name = call.group(1)
                candidates = context or list(package_modules(root))
                if not any(_defined_anywhere_in(p, name) for p in candidates):
                    scope = ", ".join(str(p.relative_to(root)) for p in context) or "the packages"
                    found.append(f"{where}: not defined in {scope}")
    return found


def _defined_anywhere_in(path: Path, name: str) -> bool:
    """A top-level name of the module, or a method/attribute of one of its classes."""
    names = _body_names(_tree(path).body)
    if name in names:
        return True
    return any(isinstance(n, ast.ClassDef) and name in _body_names(n.body) for n in names.values())


def test_every_reference_in_the_doc_exists_in_the_code():
    found = problems(DOC.read_text())
    assert not found, "docs/architecture.md is out of date:\n" + "\n".join(found)


def test_every_module_has_its_line_in_the_map():
    text = DOC.read_text()
    missing = [
        str(path.relative_to(ROOT))
        for path in package_modules()
        if path.name not in ("__init__.py", "__main__.py") and f"`{path.relative_to(ROOT)}`" not in text
    ]
    assert not missing, "modules missing from the map in docs/architecture.md: " + ", ".join(missing)


def test_the_checker_reports_bogus_references():
    """The checker itself: each kind of reference is caught when it names nothing."""
    bogus = "\n".join(
        [
            "`trainer/no_such_module.py`",
            "`trainer.no_such_module.f`",
            "`trainer.ddim.no_such_function`",
            "`trainer.train.Trainer.no_such_method`",
            "`Trainer.no_such_method`",
            "`trainer/sampling.py`: `no_such_function()`",
            "see trainer/transports/no_such.py",
        ]
    )
    found = problems(bogus)
    assert len(found) == 7, found
    good = "\n".join(
        [
            "`trainer/sampling.py`: `sample_trajectories()`, `Trajectories.cat`",
            "`trainer.ddim.ddim_step_with_logprob`, `trainer.train.Trainer.update`, `RewardService.score`",
            "`reward.transport`, `--preset`, `metrics.jsonl`, `reward_server/rewards/<name>.py`",
        ]
    )
    assert problems(good) == []
