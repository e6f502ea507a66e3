"""Optional experiment trackers beside metrics.jsonl: TensorBoard and Weights & Biases (``run.loggers``).

metrics.jsonl stays the run's record; a logger mirrors what the run folder writes:

- every number of each metrics line, under the same name, at step = the line's ``epoch`` (-1: the
  base model's eval before training);
- the eval grids (samples/epoch_0003.png, ..._heldout.png, samples/base*.png) as images
  ``samples/eval`` and ``samples/eval_heldout`` at the same step, and before_after.png at the end;
- the resolved config (TensorBoard: a text panel; W&B: the run's config).

Only the run folder's owner (rank 0) logs. TensorBoard writes <run>/tensorboard (``tensorboard
--logdir runs/``); W&B writes <run>/wandb, offline by default (no account; ``wandb sync`` uploads it).
A resumed run appends to the same TensorBoard folder (steps from the resume epoch on replace the
earlier process's, as TensorBoard's ``purge_step`` does) and to the same W&B run id (kept in
<run>/wandb/ddpo_run.json; the epochs already logged are not logged again: resume repeats them
exactly). The packages are imported only when selected: ``pip install 'ddpo-stack[tracking]'``.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from trainer.config import Config

EXTRA = "tracking"  # the pyproject extra that installs every logger's package


def _require(logger: str, module: str, package: str) -> ModuleType:
    """Import ``module`` for ``logger``, or a ValueError naming the package and the extra."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ValueError(
            f"run.loggers {logger!r} needs the {package} package ({err}): "
            f"pip install 'ddpo-stack[{EXTRA}]' (or pip install {package})"
        ) from None


def scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of one metrics line (strings such as reward_name are the config's business)."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}


class Logger:
    """One tracker. Subclasses set ``name`` and implement ``log`` and ``close``."""

    name: ClassVar[str]

    def __init__(self, cfg: Config, folder: Path, start_epoch: int):
        """Open the tracker for the run folder ``folder``; ``start_epoch`` > 0 on resume."""

    def log(self, epoch: int, values: dict[str, float], images: dict[str, Path]) -> None:
        """One metrics line's numbers and the images (tag -> PNG file) that belong to its epoch."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class TensorBoardLogger(Logger):
    """torch.utils.tensorboard's SummaryWriter into <run>/tensorboard."""

    name = "tensorboard"

    def __init__(self, cfg: Config, folder: Path, start_epoch: int):
        _require(self.name, "tensorboard", "tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        # On resume, events of the redone epochs (written before the interruption) are dropped.
        self.writer = SummaryWriter(
            str(folder / "tensorboard"), purge_step=start_epoch if start_epoch > 0 else None
        )
        if start_epoch == 0:
            text = json.dumps(cfg.model_dump(), indent=2)
            self.writer.add_text("config", "```json\n" + text + "\n```", 0)

    def log(self, epoch: int, values: dict[str, float], images: dict[str, Path]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, epoch)
        for tag, path in images.items():
            picture = np.asarray(Image.open(path).convert("RGB"))
            self.writer.add_image(tag, picture, epoch, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbLogger(Logger):
    """A W&B run in <run>/wandb (offline by default), x-axis ``epoch``."""

    name = "wandb"
    STATE = "ddpo_run.json"  # under <run>/wandb: the run id and the last epoch logged

    def __init__(self, cfg: Config, folder: Path, start_epoch: int):
        self.wandb = _require(self.name, "wandb", "wandb")
        (folder / "wandb").mkdir(exist_ok=True)
        self.state_path = folder / "wandb" / self.STATE
        state = json.loads(self.state_path.read_text()) if self.state_path.exists() else {}
        # Epochs up to this one were logged by the process this run resumes from.
        self.logged_before: int | None = state.get("logged_through")
        self.logged_through = self.logged_before
        self.run = self.wandb.init(
            project=cfg.run.wandb_project,
            name=folder.name,
            id=state.get("run_id"),  # None: a new run (its id is kept for a resume)
            resume="allow",
            dir=str(folder),
            mode=cfg.run.wandb_mode,
            config=cfg.model_dump(),
            settings=self.wandb.Settings(silent=True),
        )
        self.run.define_metric("epoch")
        self.run.define_metric("*", step_metric="epoch")  # epoch -1 (base model) included
        self._write_state()

    def _write_state(self) -> None:
        state = {"run_id": self.run.id, "logged_through": self.logged_through}
        self.state_path.write_text(json.dumps(state))

    def log(self, epoch: int, values: dict[str, float], images: dict[str, Path]) -> None:
        if self.logged_before is not None and epoch <= self.logged_before:
            return  # logged before the interruption; the resumed run repeats it exactly
        row: dict[str, Any] = {**values, "epoch": epoch}
        row.update({tag: self.wandb.Image(str(path)) for tag, path in images.items()})
        self.run.log(row)
        self.logged_through = epoch
        self._write_state()

    def close(self) -> None:
        self.run.finish()


LOGGERS: dict[str, type[Logger]] = {cls.name: cls for cls in (TensorBoardLogger, WandbLogger)}


class Loggers:
    """The run's selected loggers, fed by the run folder: images wait for their epoch's metrics line."""

    def __init__(self, loggers: list[Logger] | None = None):
        self.loggers = loggers or []
        self._images: dict[str, Path] = {}
        self._last_epoch: int | None = None

    def add_image(self, tag: str, path: Path) -> None:
        """An image of the epoch being logged (sent with the next metrics line, or at close)."""
        if self.loggers:
            self._images[tag] = path

    def log_metrics(self, metrics: Mapping[str, Any]) -> None:
        if not self.loggers:
            return
        epoch, images = int(metrics["epoch"]), self._images
        self._images, self._last_epoch = {}, epoch
        for logger in self.loggers:
            logger.log(epoch, scalars(metrics), images)

    def close(self) -> None:
        """Images saved after the last metrics line (before_after.png) go at its epoch; then close."""
        if self._images and self._last_epoch is not None:
            for logger in self.loggers:
                logger.log(self._last_epoch, {}, self._images)
        self._images = {}
        for logger in self.loggers:
            logger.close()
        self.loggers = []


def make_loggers(cfg: Config, folder: Path, start_epoch: int = 0) -> Loggers:
    """The loggers named by ``cfg.run.loggers`` for the run folder ``folder``."""
    chosen = []
    try:
        for name in cfg.run.loggers:
            if name not in LOGGERS:
                raise ValueError(f"run.loggers: unknown {name!r}; valid: {', '.join(LOGGERS)}")
            chosen.append(LOGGERS[name](cfg, Path(folder), start_epoch))
    except BaseException:
        for logger in chosen:
            logger.close()
        raise
    return Loggers(chosen)
