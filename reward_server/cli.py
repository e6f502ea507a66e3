"""``ddpo-reward-server``: run the reward server under uvicorn.

Every ``ServerSettings`` field is a flag (``--max-batch-size``, ``--vlm-base-url``, ...); flags
override the environment (``DDPO_REWARD_*``), which overrides the defaults. Prefer the environment
for secrets (``DDPO_REWARD_API_KEY``): command lines are visible to other users in ``ps``.

Two flags are about the process, not settings: ``--extra-rewards-module M`` (repeatable) imports
a plugin that registers more rewards before the reward names are checked, and ``--parent-pid P``
makes the server exit when process P is gone (a trainer that starts its own server, killed
without clean-up).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
import typing
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from reward_server.rewards import import_extra_rewards
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


def add_process_flags(parser: argparse.ArgumentParser) -> None:
    """The flags about the server process itself (not ``ServerSettings`` fields)."""
    group = parser.add_argument_group("process (not settings)")
    group.add_argument(
        "--extra-rewards-module",
        action="append",
        default=[],
        metavar="MODULE",
        help="Import this module (dotted name or .py path) first; it may register more rewards. Repeatable.",
    )
    group.add_argument(
        "--parent-pid",
        type=int,
        default=None,
        metavar="PID",
        help="Exit (SIGTERM to self) once this process is no longer our parent, e.g. a trainer that died.",
    )


def exit_with_parent(parent_pid: int, interval_s: float = 1.0) -> None:
    """SIGTERM ourselves once ``parent_pid`` is no longer our parent (it exited or was killed).

    (Not prctl(PR_SET_PDEATHSIG): it fires when the *thread* that started the server exits.)
    """

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(interval_s)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def main(argv: Sequence[str] | None = None) -> None:
    import uvicorn

    # Process flags first: plugins must register their rewards before the settings check the names.
    process_flags = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    add_process_flags(process_flags)
    process, rest = process_flags.parse_known_args(argv)
    if "-h" in rest or "--help" in rest:  # one help listing settings and process flags
        parser = build_parser()
        add_process_flags(parser)
        parser.parse_args(rest)
    if process.parent_pid is not None:
        exit_with_parent(process.parent_pid)
    import_extra_rewards(process.extra_rewards_module)
    try:
        settings, overrides = settings_from_args(rest)
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
