"""The run folder: what a researcher opens after (or during) a run.

<run>/config.json          resolved configuration
<run>/metrics.jsonl        one JSON object per epoch (plot it with anything)
<run>/reward_curve.png     reward mean +- std per epoch and the fixed-seed eval reward; caption
                           accuracy and diversity panels when the run logs them
<run>/samples/epoch_0003.png    fixed prompts + seeds every eval epoch, so progress is visible
<run>/samples/epoch_0003_heldout.png  the same for held-out prompts (never trained on)
<run>/samples/base.png     the base model before training (same prompts and seeds)
<run>/before_after.png     base vs last eval, side by side (training and held-out prompts)
<run>/samples/epoch_0003.jsonl  every training sample: prompt, reward, advantage, details (VLM answers)
<run>/checkpoints/epoch_0005/   LoRA (diffusers format) + training_state.pt; `latest` names the newest
<run>/tensorboard/, <run>/wandb/  with run.loggers: metrics lines and grids mirrored (trainer/loggers.py)
"""

from __future__ import annotations

import json
import math
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from trainer.loggers import Loggers


class RunFolder:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.samples_dir = self.path / "samples"
        self.checkpoints_dir = self.path / "checkpoints"
        for folder in (self.path, self.samples_dir, self.checkpoints_dir):
            folder.mkdir(parents=True, exist_ok=True)
        # run.loggers (TensorBoard, W&B): every metrics line and grid below is mirrored to them.
        self.loggers = Loggers()

    @staticmethod
    def new(output_dir: str | Path, name: str) -> RunFolder:
        """A fresh folder <output_dir>/<name>, or <name>-2, -3, ... if taken."""
        base = Path(output_dir) / name
        path, n = base, 1
        while path.exists() and any(path.iterdir()):
            n += 1
            path = base.with_name(f"{name}-{n}")
        return RunFolder(path)

    # -- config and metrics ------------------------------------------------------------------
    def write_config(self, config: dict[str, Any]) -> None:
        (self.path / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    def write_run_info(self, info: dict[str, Any]) -> None:
        """How the run was launched (world size, device): not part of the config, needed to read it."""
        (self.path / "run.json").write_text(json.dumps(info, indent=2) + "\n")

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.exists():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]

    def truncate_metrics(self, before_epoch: int) -> None:
        """On resume: drop epochs the checkpoint does not include (they will be redone)."""
        kept = [m for m in self.read_metrics() if m["epoch"] < before_epoch]
        self.metrics_path.write_text("".join(json.dumps(m) + "\n" for m in kept))

    def append_metrics(self, metrics: dict[str, Any]) -> None:
        """One metrics line; the loggers get it (step = its epoch) with the grids saved since the last."""
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(metrics) + "\n")
        self.loggers.log_metrics(metrics)

    def write_sample_log(self, epoch: int, rows: Sequence[dict[str, Any]]) -> None:
        with (self.samples_dir / f"epoch_{epoch:04d}.jsonl").open("w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")

    # -- pictures ----------------------------------------------------------------------------
    def plot_rewards(self) -> Path:
        """reward_curve.png: reward per epoch, plus caption accuracy and diversity when logged.

        Epoch -1 is the base model's eval (before training).
        """
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        metrics = self.read_metrics()
        out = self.path / "reward_curve.png"
        trained = [m for m in metrics if "reward_mean" in m]
        if not trained:
            return out

        def series(key: str) -> tuple[list[int], list[float]]:
            points = [(m["epoch"], m[key]) for m in metrics if key in m]
            return [p[0] for p in points], [p[1] for p in points]

        panels = [
            ("reward", [("eval_reward_mean", "eval, training prompts"),
                        ("eval_heldout_reward_mean", "eval, held-out prompts")]),
            ("caption accuracy", [("caption_accuracy", "training samples"),
                                  ("eval_caption_accuracy", "eval, training prompts"),
                                  ("eval_heldout_caption_accuracy", "eval, held-out prompts")]),
            ("diversity (RMS px distance)", [("eval_diversity", "eval, training prompts"),
                                             ("eval_heldout_diversity", "eval, held-out prompts")]),
        ]  # fmt: skip
        # Eval-only rewards (reward.eval_components): over-optimization shows as these falling.
        trained_keys = {"eval_reward_mean", "eval_heldout_reward_mean"}
        extra = sorted(
            {k for m in metrics for k in m if k.startswith("eval_") and k.endswith("_mean")} - trained_keys
        )
        panels.append(
            ("eval-only rewards", [(k, k.removeprefix("eval_").removesuffix("_mean")) for k in extra])
        )
        panels = [panels[0]] + [p for p in panels[1:] if any(series(k)[0] for k, _ in p[1])]
        fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), dpi=100, squeeze=False)
        epochs = [m["epoch"] for m in trained]
        mean = np.array([m["reward_mean"] for m in trained])
        std = np.array([m["reward_std"] for m in trained])
        axes[0, 0].plot(epochs, mean, marker="o", label="training samples (mean)")
        axes[0, 0].fill_between(epochs, mean - std, mean + std, alpha=0.2, label="± std")
        for ax, (ylabel, lines) in zip(axes[0], panels, strict=True):
            for key, label in lines:
                xs, ys = series(key)
                if xs:
                    ax.plot(xs, ys, marker="s", label=label)
            ax.set_xlabel("epoch (-1: base model)")
            ax.set_ylabel(ylabel if ylabel != "reward" else trained[-1].get("reward_name", "reward"))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out)
        plt.close(fig)
        return out

    def save_grid(
        self,
        name: str,
        images: np.ndarray,
        prompts: Sequence[str],
        rewards: Sequence[float],
        details: Sequence[dict[str, Any]] | None = None,
    ) -> Path:
        """samples/<name>.png: images in a grid, each captioned with its prompt and reward.

        A ``caption_correct`` detail adds "ok"/"wrong" (what the judge saw agrees with the prompt).
        """
        n, h, w, _ = images.shape
        cols = math.ceil(math.sqrt(n))
        rows = math.ceil(n / cols)
        tile_w = max(w, 128)
        tile_h = h * tile_w // w
        caption = 40
        grid = Image.new("RGB", (cols * tile_w, rows * (tile_h + caption)), "white")
        draw = ImageDraw.Draw(grid)
        for i in range(n):
            r, c = divmod(i, cols)
            x, y = c * tile_w, r * (tile_h + caption)
            grid.paste(Image.fromarray(images[i]).resize((tile_w, tile_h), Image.NEAREST), (x, y))
            lines = textwrap.wrap(prompts[i], 21)[:2] or [""]
            verdict = (details[i] if details else {}).get("caption_correct")
            lines.append(f"r={rewards[i]:.3f}" + {True: " ok", False: " wrong", None: ""}[verdict])
            for k, line in enumerate(lines):
                draw.text((x + 2, y + tile_h + 1 + 12 * k), line, fill="black")
        out = self.samples_dir / f"{name}.png"
        grid.save(out)
        # One image series per prompt set, the epoch (-1: base) as its step.
        self.loggers.add_image("samples/eval_heldout" if name.endswith("_heldout") else "samples/eval", out)
        return out

    def save_before_after(self) -> Path | None:
        """before_after.png: the base model's eval grids beside the newest ones (same prompts, seeds)."""
        newest = sorted(self.samples_dir.glob("epoch_[0-9][0-9][0-9][0-9].png"))
        if not (self.samples_dir / "base.png").exists() or not newest:
            return None
        last = newest[-1].stem
        rows = [("base", last)]
        if (self.samples_dir / "base_heldout.png").exists():
            rows.append(("base_heldout", last + "_heldout"))
        pictures = [
            [Image.open(self.samples_dir / f"{n}.png").convert("RGB") for n in pair]
            for pair in rows
            if (self.samples_dir / f"{pair[1]}.png").exists()
        ]
        header, gap = 18, 12
        width = max(sum(p.width for p in pair) + gap for pair in pictures)
        height = sum(max(p.height for p in pair) + header for pair in pictures)
        canvas = Image.new("RGB", (width, height), "white")
        draw = ImageDraw.Draw(canvas)
        y = 0
        for (before_name, after_name), (before, after) in zip(rows, pictures, strict=False):
            draw.text((2, y + 3), f"before: {before_name}", fill="black")
            draw.text((before.width + gap + 2, y + 3), f"after: {after_name}", fill="black")
            canvas.paste(before, (0, y + header))
            canvas.paste(after, (before.width + gap, y + header))
            y += max(before.height, after.height) + header
        out = self.path / "before_after.png"
        canvas.save(out)
        self.loggers.add_image("before_after", out)
        return out
