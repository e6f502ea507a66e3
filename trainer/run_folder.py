"""The run folder: what a researcher opens after (or during) a run.

<run>/config.json          resolved configuration
<run>/metrics.jsonl        one JSON object per epoch (plot it with anything)
<run>/reward_curve.png     reward mean +- std per epoch, and the fixed-seed eval reward
<run>/samples/epoch_0003.png    fixed prompts + seeds every eval epoch, so progress is visible
<run>/samples/epoch_0003.jsonl  every training sample: prompt, reward, advantage, details (VLM answers)
<run>/checkpoints/epoch_0005/   LoRA (diffusers format) + training_state.pt; `latest` names the newest
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw


class RunFolder:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.samples_dir = self.path / "samples"
        self.checkpoints_dir = self.path / "checkpoints"
        for folder in (self.path, self.samples_dir, self.checkpoints_dir):
            folder.mkdir(parents=True, exist_ok=True)

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
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(metrics) + "\n")

    def write_sample_log(self, epoch: int, rows: Sequence[dict[str, Any]]) -> None:
        with (self.samples_dir / f"epoch_{epoch:04d}.jsonl").open("w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")

    # -- pictures ----------------------------------------------------------------------------
    def plot_rewards(self) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        metrics = self.read_metrics()
        out = self.path / "reward_curve.png"
        if not metrics:
            return out
        epochs = [m["epoch"] for m in metrics]
        mean = np.array([m["reward_mean"] for m in metrics])
        std = np.array([m["reward_std"] for m in metrics])
        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        ax.plot(epochs, mean, marker="o", label="train reward (mean)")
        ax.fill_between(epochs, mean - std, mean + std, alpha=0.2, label="± std")
        eval_points = [(m["epoch"], m["eval_reward_mean"]) for m in metrics if "eval_reward_mean" in m]
        if eval_points:
            ax.plot(*zip(*eval_points, strict=True), marker="s", label="fixed-seed eval (mean)")
        ax.set_xlabel("epoch")
        ax.set_ylabel(metrics[-1].get("reward_name", "reward"))
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out)
        plt.close(fig)
        return out

    def save_grid(
        self, epoch: int, images: np.ndarray, prompts: Sequence[str], rewards: Sequence[float]
    ) -> Path:
        """Images in a grid, each captioned with its prompt and reward."""
        n, h, w, _ = images.shape
        cols = math.ceil(math.sqrt(n))
        rows = math.ceil(n / cols)
        tile_w = max(w, 128)
        tile_h = h * tile_w // w
        caption = 28
        grid = Image.new("RGB", (cols * tile_w, rows * (tile_h + caption)), "white")
        draw = ImageDraw.Draw(grid)
        for i in range(n):
            r, c = divmod(i, cols)
            x, y = c * tile_w, r * (tile_h + caption)
            grid.paste(Image.fromarray(images[i]).resize((tile_w, tile_h), Image.NEAREST), (x, y))
            draw.text((x + 2, y + tile_h + 1), prompts[i][:22], fill="black")
            draw.text((x + 2, y + tile_h + 14), f"r={rewards[i]:.3f}", fill="black")
        out = self.samples_dir / f"epoch_{epoch:04d}.png"
        grid.save(out)
        return out
