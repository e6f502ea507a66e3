"""Shared helpers of the deployment checks: paths, YAML loading, compose-style interpolation."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    from pip._vendor import tomli as tomllib  # type: ignore[no-redef]

yaml = pytest.importorskip("yaml", reason="PyYAML is needed to parse docker-compose.yml and the manifests")

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"

# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?msg}, ${VAR?msg}; "$$" is a literal "$".
_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])((?:[^{}]|\{[^{}]*\})*))?\}|\$([A-Za-z_]\w*)")


def load_yaml(path: Path) -> object:
    return yaml.safe_load(path.read_text())


def load_yaml_all(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def console_scripts() -> dict[str, str]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["scripts"]


def references(text: str) -> list[tuple[str, str | None, str]]:
    """Every variable a compose file interpolates: (name, operator or None, default/message)."""
    refs = []
    for m in _VAR.finditer(text):
        if m.group(0) == "$$":
            continue
        if m.group(4):  # bare $VAR
            refs.append((m.group(4), None, ""))
        else:
            refs.append((m.group(1), m.group(2), m.group(3) or ""))
    return refs


class MissingVariable(KeyError):
    pass


def interpolate(value: object, env: dict[str, str]) -> object:
    """Compose's interpolation (the subset above) applied to every string in a parsed file."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def repl(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(4)
        op, arg = m.group(2), m.group(3) or ""
        current = env.get(name)
        unset = current is None or (op is not None and op.startswith(":") and current == "")
        if op in (":-", "-"):
            return arg if unset else current
        if op in (":?", "?"):
            if unset:
                raise MissingVariable(f"{name}: {arg}")
            return current
        return current or ""

    return _VAR.sub(repl, value)


def url_port(url: str) -> int:
    parts = urlsplit(url)
    return parts.port or {"http": 80, "https": 443, "redis": 6379}[parts.scheme]


@pytest.fixture(scope="session")
def python() -> str:
    return sys.executable
