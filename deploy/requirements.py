"""Print ddpo-stack's runtime requirements from pyproject.toml, one per line (for `pip install -r`).

Used by the Dockerfiles so that the images install the dependency ranges pyproject.toml declares
(in a layer of their own, cached until pyproject.toml changes) and then the project itself with
``--no-deps``.

    python deploy/requirements.py pyproject.toml            # everything
    python deploy/requirements.py pyproject.toml --light    # the reward worker: no torch stack

``--light`` leaves out what a JPEG-reward worker never imports: torch and everything that pulls
it in (diffusers, peft, accelerate, transformers, bert-score), the HTTP server (fastapi, uvicorn)
and trainer-only packages. Model-based rewards (aesthetic, llava_*) in a worker need the full set:
run the worker from the reward-server image instead.
"""

from __future__ import annotations

import re
import sys

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11: the copy pip vendors
    from pip._vendor import tomli as tomllib  # type: ignore[no-redef]

HEAVY = {
    "torch",
    "diffusers",
    "peft",
    "transformers",
    "accelerate",
    "safetensors",
    "bert-score",
    "matplotlib",
    "tqdm",
    "fastapi",
    "uvicorn",
}


def requirement_name(requirement: str) -> str:
    """'pydantic-settings>=2.3' -> 'pydantic-settings' (normalized: lower case, '_' and '.' -> '-')."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if not match:
        raise ValueError(f"cannot parse requirement {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def requirements(pyproject: str, light: bool = False) -> list[str]:
    with open(pyproject, "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    return [d for d in deps if not (light and requirement_name(d) in HEAVY)]


def main(argv: list[str]) -> int:
    args = [a for a in argv if not a.startswith("--")]
    if len(args) != 1 or set(argv) - {*args, "--light"}:
        print("usage: requirements.py PYPROJECT [--light]", file=sys.stderr)
        return 2
    print("\n".join(requirements(args[0], light="--light" in argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
