"""``ddpo-train``: train with a preset and any field overridden from the command line.

The command line is made by pydantic-settings from the config's own fields (shared/cli.py: the same
mechanism as ``ddpo-reward-server`` and ``ddpo-reward-worker``): one ``--section.field VALUE`` flag
per field, documented in ``--help`` by its description. The library only *reads* the flags; the
layering stays ours because a preset chosen on the same command line must be the base the flags
override, which a settings-source priority cannot express: preset < ``--config FILE`` (YAML or JSON)
< flags, then one validation (``build_config``), so a bad value is a ``ConfigError`` naming the field.
Flags keep the field names as they are (``--run.output_dir``, like config.json and the manifests).
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from typing import Any

from pydantic_settings import CliSettingsSource

from shared.cli import ArgumentParser, CommandLineError, add_config_flag, config_then_flags, deep_merge
from trainer.config import PRESETS, Config, ConfigError, add_config_flags, build_config, load_config_file

USAGE = """ddpo-train [--preset NAME] [--config FILE] [--section.field VALUE ...] [--print-config]

Fine-tune a diffusion model with DDPO. Start from a preset, optionally a YAML or JSON config file
(e.g. a run folder's config.json), then override any field, e.g.:

  ddpo-train --preset tiny                                  # a few minutes on CPU
  ddpo-train --preset compressibility --model.pretrained /models/sd-v1-4
  ddpo-train --preset tiny --train.learning_rate 1e-3 --run.num_epochs 5
  ddpo-train --run.resume runs/tiny    # continue a run exactly, with its own config.json

Values: numbers and strings as they are, booleans true/false, null for None, lists as a,b or JSON.
"""


def build_parser() -> tuple[ArgumentParser, CliSettingsSource[Any]]:
    """The whole command line, and the source that reads the ``--section.field`` values back."""
    parser = ArgumentParser(prog="ddpo-train", usage=USAGE, epilog=f"presets: {', '.join(sorted(PRESETS))}")
    parser.add_argument("--preset", choices=sorted(PRESETS), metavar="NAME", help="start from this preset")
    add_config_flag(
        parser, "YAML or JSON config file (sections as keys) applied on top of the preset; flags override it"
    )
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return parser, add_config_flags(parser)


def parse_command_line(argv: list[str] | None = None) -> tuple[argparse.Namespace, Config]:
    """(the options, the validated config): preset < --config file < flags; ConfigError names the field."""
    parser, source = build_parser()
    try:
        args = parser.parse_args(argv)
        (overrides,) = config_then_flags(args, [source], sections=True)
    except CommandLineError as err:
        raise ConfigError(str(err)) from None
    resume = overrides.get("run", {}).get("resume")
    if resume:
        # A resumed run continues with its own config; command-line overrides still apply on top.
        overrides = deep_merge(stored_run_config(resume), overrides)
    return args, build_config(args.preset, overrides)


def main(argv: list[str] | None = None) -> int:
    try:
        args, cfg = parse_command_line(argv)
    except (ConfigError, FileNotFoundError) as err:
        print(f"ddpo-train: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        print(cfg.model_dump_json(indent=2))
        return 0

    from trainer.distributed import init_distributed, shutdown_distributed

    try:
        info = init_distributed(cfg.model.device)  # torchrun's environment; one process otherwise
    except ValueError as err:
        print(f"ddpo-train: {err}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.INFO if info.rank == 0 else logging.WARNING,
        format=f"%(asctime)s %(levelname)s [rank {info.rank}] %(name)s: %(message)s",
    )
    quiet_libraries()
    from trainer.train import Trainer

    try:
        try:
            trainer = Trainer(cfg, dist_info=info)
        except (ValueError, FileNotFoundError) as err:
            print(f"ddpo-train: {err}", file=sys.stderr)
            return 2
        if trainer.run_folder is not None:
            print(f"run folder: {trainer.run_folder.path} (world size {info.world_size})", flush=True)
        history = trainer.run()
    finally:
        shutdown_distributed()
    if history and info.rank == 0:
        first, last = history[0], history[-1]
        print(
            f"done: {len(history)} epochs, reward {first['reward_mean']:.4f} -> {last['reward_mean']:.4f} "
            f"({cfg.reward.name}); run folder: {trainer.run_folder.path if trainer.run_folder else '-'}"
        )
    return 0


def stored_run_config(resume: str) -> dict:
    """The config.json of the run that holds the checkpoint ``resume`` points at."""
    from trainer.checkpoint import find_checkpoint

    stored = load_config_file(find_checkpoint(resume).parent.parent / "config.json")
    stored.get("run", {}).pop("resume", None)
    return stored


def quiet_libraries() -> None:
    """Our progress bars and logs only: no per-component loading bars or library deprecation chatter."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per reward request otherwise


if __name__ == "__main__":
    sys.exit(main())
