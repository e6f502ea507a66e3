"""``ddpo-reward-server``: run the reward server under uvicorn.

Every ``ServerSettings`` field is a flag (``--max-batch-size``, ``--vlm-base-url``, ...); flags
override the environment (``DDPO_REWARD_*``), which overrides the defaults. Prefer the environment
for secrets (``DDPO_REWARD_API_KEY``): command lines are visible to other users in ``ps``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import typing
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from reward_server.settings import ServerSettings, describe_settings_error


def _flag_type(annotation: Any) -> dict[str, Any]:
    """argparse options for one settings field."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}
    if origin is list:
        return {"nargs": "+", "metavar": "NAME"}
    if origin is dict:
        return {"type": json.loads, "metavar": "JSON"}
    if origin is typing.Literal:
        return {"choices": list(args)}
    if args:  # X | None
        return _flag_type(args[0])
    if annotation in (int, float, str):
        return {"type": annotation}
    return {"type": str}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ddpo-reward-server",
        description="Serve DDPO rewards over HTTP (JSON in and out). Flags override DDPO_REWARD_* variables.",
    )
    for name, field in ServerSettings.model_fields.items():
        default = field.default_factory() if field.default_factory else field.default  # type: ignore[call-arg]
        if name in ("api_key", "vlm_api_key") and default is not None:
            default = "***"
        parser.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            default=argparse.SUPPRESS,  # unset flags leave the environment / default in charge
            help=f"{field.description} (env DDPO_REWARD_{name.upper()}; default: {default})",
            **_flag_type(field.annotation),
        )
    return parser


def settings_from_args(argv: Sequence[str] | None = None) -> tuple[ServerSettings, dict[str, Any]]:
    """Settings from env + flags, and the flags that were given."""
    overrides = vars(build_parser().parse_args(argv))
    if "rewards" in overrides:  # also accept "a,b" as one argument
        overrides["rewards"] = [r for item in overrides["rewards"] for r in item.split(",") if r]
    return ServerSettings(**overrides), overrides


def _env_value(value: Any) -> str:
    """How pydantic-settings reads a value back from the environment."""
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def main(argv: Sequence[str] | None = None) -> None:
    import uvicorn

    try:
        settings, overrides = settings_from_args(argv)
    except ValidationError as err:
        print(f"ddpo-reward-server: invalid settings:\n{describe_settings_error(err)}", file=sys.stderr)
        raise SystemExit(2) from None
    common = {"host": settings.host, "port": settings.port, "log_level": settings.log_level}
    if settings.workers == 1:
        from reward_server.app import create_app

        uvicorn.run(create_app(settings), **common)
        return
    # Worker processes build their own app from the environment: hand them the flags that way.
    for name, value in overrides.items():
        os.environ[f"DDPO_REWARD_{name.upper()}"] = _env_value(value)
    uvicorn.run("reward_server.app:app_from_env", factory=True, workers=settings.workers, **common)


if __name__ == "__main__":
    main()
