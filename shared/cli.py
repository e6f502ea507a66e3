"""The one way our programs turn pydantic settings into a command line (``ddpo-train``,
``ddpo-reward-server``, ``ddpo-reward-worker``).

pydantic-settings' ``CliSettingsSource`` adds one flag per field of a settings model to an
argparse parser: the field's description, default and (for ``BaseSettings`` with an env prefix)
its environment variable are its ``--help`` line, booleans get ``--x/--no-x``, lists accept
``a,b``, ``'["a","b"]'`` or (``CliVariadicArg``) ``a b``, and nested models become
``--section.field``. The source only reads the command line and returns the values that were
given; the caller decides what they override (presets, config files, the environment) and
validates once, so a bad value is a pydantic error that names the field.

Options that are not settings (``--config``, ``--preset``, ``--print-config``, a plugin to import)
are plain argparse arguments on the same parser, so ``--help`` lists everything in one place.
``--config FILE`` is the same option in every program (``add_config_flag()``), and "the file, then
the flags" is one layering (``config_then_flags()``); what that overrides in turn (a preset, the
environment) is each program's.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic_settings import BaseSettings, CliSettingsSource, SettingsError

# pydantic-settings names a default_factory in --help ("default factory: WorkerSettings.<lambda>").
_FACTORY_DEFAULT = re.compile(r"\(default factory: ([^)]*)\)")
_FACTORY_SHOWN = {"list": "(default: [])", "dict": "(default: {})"}


def _readable_defaults(help_text: str) -> str:
    """``[]``/``{}`` for the list/dict factories; other factories compute the default at start-up
    (from the environment, the host name, ...): the field's description says how."""
    return _FACTORY_DEFAULT.sub(lambda m: _FACTORY_SHOWN.get(m.group(1), "(default: computed)"), help_text)


class CommandLineError(ValueError):
    """A command line argparse refused (unknown flag, missing value); the message names the flag."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse without abbreviations (``--run.num`` is not ``--run.num_epochs``); errors raise."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(allow_abbrev=False, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        unknown = "unrecognized arguments: "
        if message.startswith(unknown):  # name the flags only: a value may be a secret for another program
            flags = [arg.split("=", 1)[0] for arg in message.removeprefix(unknown).split() if arg[:1] == "-"]
            message = f"{unknown}{' '.join(flags) or '(positional values)'}; --help lists the valid flags"
        raise CommandLineError(message)


def add_settings_flags(
    parser: argparse.ArgumentParser,
    settings_cls: type[BaseSettings],
    *,
    kebab_case: bool = True,
    group: str | None = None,
    group_description: str | None = None,
) -> CliSettingsSource[Any]:
    """One flag per field of ``settings_cls`` on ``parser`` (in argument group ``group`` if given;
    a nested model's fields get a group of their own).

    ``kebab_case``: ``--max-batch-size`` for ``max_batch_size`` (booleans as ``--x/--no-x``); off:
    the field names as they are (``--train.learning_rate VALUE``, booleans take a value).
    Read the given values back with ``given_settings(source, namespace)``.
    """
    target: Any = parser.add_argument_group(group, group_description) if group else None

    def add_argument(container: Any, *args: Any, **kwargs: Any) -> Any:
        # container: the parser, or the group pydantic-settings made for a nested model (a section).
        if isinstance(kwargs.get("help"), str):
            kwargs["help"] = _readable_defaults(kwargs["help"])
        return (target or container).add_argument(*args, **kwargs)

    return CliSettingsSource(
        settings_cls,
        root_parser=parser,
        cli_kebab_case=kebab_case,
        cli_implicit_flags=kebab_case,
        cli_show_env_vars=bool(settings_cls.model_config.get("env_prefix")),
        cli_hide_none_type=True,
        cli_exit_on_error=False,
        add_argument_method=add_argument,
    )


def given_settings(source: CliSettingsSource[Any], namespace: argparse.Namespace) -> dict[str, Any]:
    """The fields set on the command line (nested dicts for ``--section.field``), not yet validated.

    A value pydantic-settings cannot decode (bad JSON for a list or dict) is a ``CommandLineError``.
    """
    try:
        return source(parsed_args=namespace)()
    except SettingsError as err:
        raise CommandLineError(str(err)) from None


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML or JSON config file (``.json``: JSON; anything else: YAML, a superset of JSON).

    Raises ``CommandLineError`` naming the file for a missing file, bad syntax or a non-mapping.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise CommandLineError(f"cannot read config file {path}: {err}") from None
    if path.suffix.lower() == ".json":
        load, errors = json.loads, (ValueError,)
    else:
        try:
            import yaml
        except ImportError:
            raise CommandLineError(
                f"config file {path}: reading YAML needs PyYAML (pip install pyyaml), or use a .json file"
            ) from None
        load, errors = yaml.safe_load, (yaml.YAMLError,)
    try:
        data = load(text)
    except errors as err:
        raise CommandLineError(f"cannot read config file {path}: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CommandLineError(f"config file {path} must hold a mapping, not {type(data).__name__}")
    return data


def add_config_flag(parser: Any, help: str) -> None:
    """``--config FILE`` (``namespace.config``) on a parser or an argument group; ``help`` says
    what the file overrides and what overrides it. Read it with ``config_then_flags()``."""
    parser.add_argument("--config", metavar="FILE", help=help)


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``override`` on top, dicts merged key by key (at every depth), anything else replaced."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def config_then_flags(
    namespace: argparse.Namespace, sources: Sequence[CliSettingsSource[Any]], *, sections: bool = False
) -> list[dict[str, Any]]:
    """Per source of ``sources`` (``add_settings_flags()``'s, one per settings class): the values of
    ``--config FILE`` (none without one) overridden by those its flags gave, not yet validated.

    Flat settings (the default): each key of the file goes to the class that has that field, a key
    no class has is a ``CommandLineError`` naming the file, and a flag replaces the file's value
    whole (a dict setting is not merged). ``sections`` (one class whose fields are sections,
    ``--section.field``): file and flags are merged with ``deep_merge()``, field by field, and the
    file's keys are left to validation, which names an unknown one with its section.
    """
    from_file = read_config_file(namespace.config) if namespace.config else {}
    if sections:
        (source,) = sources
        return [deep_merge(from_file, given_settings(source, namespace))]
    fields = [source.settings_cls.model_fields for source in sources]
    values = []
    for source, known in zip(sources, fields, strict=True):
        mine = {k: v for k, v in from_file.items() if k in known}
        values.append({**mine, **given_settings(source, namespace)})
    unknown = sorted(set(from_file).difference(*fields))
    if unknown:
        raise CommandLineError(f"config file {namespace.config}: unknown settings {unknown}")
    return values
