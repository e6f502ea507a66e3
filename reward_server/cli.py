"""``ddpo-reward-server``: run the reward server under uvicorn.

Every ``ServerSettings`` field is a flag (``--max-batch-size``, ``--vlm-base-url``, ...), made from
the field itself by pydantic-settings (shared/cli.py: the same mechanism as ``ddpo-train`` and
``ddpo-reward-worker``), so ``--help`` shows each field's description, default and variable.
Precedence: flags > ``--config FILE`` (YAML or JSON, field names as keys) > the environment
(``DDPO_REWARD_*``) > the defaults. Prefer the environment for secrets (``DDPO_REWARD_API_KEY``):
command lines are visible to other users in ``ps``.

Three flags are about the process, not settings: ``--config FILE``, ``--extra-rewards-module M``
(repeatable) imports a plugin that registers more rewards before the reward names are checked, and
``--parent-pid P`` makes the server exit when process P is gone (a trainer that starts its own
server, killed without clean-up).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

from pydantic import ValidationError
from pydantic_settings import CliSettingsSource

from reward_server.rewards import import_extra_rewards
from reward_server.settings import ServerSettings, describe_settings_error
from shared.cli import (
    ArgumentParser,
    CommandLineError,
    add_config_flag,
    add_settings_flags,
    config_then_flags,
)

DESCRIPTION = """\
Serve DDPO rewards over HTTP. Every setting is a flag and a variable: --max-batch-size is
DDPO_REWARD_MAX_BATCH_SIZE (lists and dicts as JSON there). Flags override --config FILE (YAML or
JSON), which overrides the environment, which overrides the defaults. Secrets: prefer the environment
(DDPO_REWARD_API_KEY, DDPO_REWARD_VLM_API_KEY), command lines are visible in `ps`."""


# --config FILE of ddpo-reward-server and ddpo-reward-worker.
CONFIG_HELP = (
    "YAML or JSON file of settings (field names as keys, e.g. max_batch_size: 64); "
    "flags override it, it overrides the environment."
)


def add_extra_rewards_flag(parser: Any) -> None:
    """``--extra-rewards-module M`` (repeatable) on a parser or an argument group."""
    parser.add_argument(
        "--extra-rewards-module",
        action="append",
        default=[],
        metavar="MODULE",
        help="Import this module (dotted name or .py path) first; it may register more rewards. Repeatable.",
    )


def add_process_flags(parser: argparse.ArgumentParser) -> None:
    """The flags about the server process itself (not ``ServerSettings`` fields)."""
    group = parser.add_argument_group("process (not settings)")
    add_config_flag(group, CONFIG_HELP)
    add_extra_rewards_flag(group)
    group.add_argument(
        "--parent-pid",
        type=int,
        default=None,
        metavar="PID",
        help="Exit (SIGTERM to self) once this process is no longer our parent, e.g. a trainer that died.",
    )


def _command_line() -> tuple[ArgumentParser, CliSettingsSource[Any]]:
    parser = ArgumentParser(
        prog="ddpo-reward-server",
        usage="ddpo-reward-server [--config FILE] [--SETTING VALUE ...]   (--help lists every setting)",
        description=DESCRIPTION,
    )
    add_process_flags(parser)
    return parser, add_settings_flags(parser, ServerSettings, group="settings")


def build_parser() -> ArgumentParser:
    """The whole command line: process flags and one flag per ``ServerSettings`` field."""
    return _command_line()[0]


def parse_command_line(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, dict[str, Any]]:
    """(process flags, the settings given by flags or ``--config``), nothing validated yet."""
    parser, source = _command_line()
    namespace = parser.parse_args(argv)
    return namespace, config_then_flags(namespace, [source])[0]


def settings_from_args(argv: Sequence[str] | None = None) -> tuple[ServerSettings, dict[str, Any]]:
    """Settings from flags > config file > env > defaults, and the values flags/file gave."""
    _process, overrides = parse_command_line(argv)
    return ServerSettings(**overrides), overrides


@contextlib.contextmanager
def exit_2_on_bad_settings(prog: str) -> Iterator[None]:
    """A command line argparse refused or a setting that does not validate ends ``prog`` with its
    message on stderr and exit status 2, without a traceback (ddpo-reward-server and -worker)."""
    try:
        yield
    except CommandLineError as err:
        print(f"{prog}: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except ValidationError as err:
        print(f"{prog}: invalid settings:\n{describe_settings_error(err)}", file=sys.stderr)
        raise SystemExit(2) from None


def exit_with_parent(parent_pid: int, interval_s: float = 1.0) -> None:
    """SIGTERM ourselves once ``parent_pid`` is no longer our parent (it exited or was killed).

    (Not prctl(PR_SET_PDEATHSIG): it fires when the *thread* that started the server exits.)
    """

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(interval_s)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _env_value(value: Any) -> str:
    """How pydantic-settings reads a (JSON-mode) value back from the environment."""
    return value if isinstance(value, str) else json.dumps(value)


def main(argv: Sequence[str] | None = None) -> None:
    import uvicorn

    with exit_2_on_bad_settings("ddpo-reward-server"):
        process, overrides = parse_command_line(argv)
        if process.parent_pid is not None:
            exit_with_parent(process.parent_pid)
        # Plugins register their rewards before the settings check the names.
        import_extra_rewards(process.extra_rewards_module)
        settings = ServerSettings(**overrides)
    from reward_server.timeouts import uvicorn_options

    # Header/body/keep-alive timeouts and the connection limit: the same protocol and options in
    # every worker (uvicorn pickles its Config, protocol class included, into spawned workers).
    common = {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level,
        **uvicorn_options(settings),
    }
    if settings.workers == 1:
        from reward_server.app import create_app

        uvicorn.run(create_app(settings), **common)
        return
    # Worker processes build their own app from the environment: hand them the given values that way.
    for name, value in settings.model_dump(mode="json", include=set(overrides)).items():
        os.environ[f"DDPO_REWARD_{name.upper()}"] = _env_value(value)
    uvicorn.run("reward_server.app:app_from_env", factory=True, workers=settings.workers, **common)


if __name__ == "__main__":
    main()
