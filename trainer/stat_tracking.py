"""Per-prompt reward normalization (advantages), as in DDPO.

Each prompt keeps its last ``buffer_size`` rewards. ``update`` first appends the batch's rewards to
their prompts' buffers, then normalizes each reward by its prompt's buffer mean and std, or, while
that buffer holds fewer than ``min_count`` rewards, by the whole batch's. std is the population
std (ddof 0) + 1e-6. The buffers are part of a checkpoint (``state_dict``/``load_state_dict``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import numpy as np

STD_EPS = 1e-6


class PerPromptStatTracker:
    def __init__(self, buffer_size: int, min_count: int):
        if buffer_size < 1 or min_count < 1:
            raise ValueError("buffer_size and min_count must be >= 1")
        self.buffer_size = buffer_size
        self.min_count = min_count
        self.buffers: dict[str, deque[float]] = {}

    def update(self, prompts: Sequence[str], rewards: np.ndarray) -> np.ndarray:
        rewards = np.asarray(rewards, dtype=np.float64)
        if rewards.ndim != 1 or len(prompts) != rewards.shape[0]:
            raise ValueError(
                f"expected one reward per prompt, got {rewards.shape} for {len(prompts)} prompts"
            )
        prompts = list(prompts)
        for prompt, reward in zip(prompts, rewards, strict=True):
            self.buffers.setdefault(prompt, deque(maxlen=self.buffer_size)).append(float(reward))
        batch_mean, batch_std = rewards.mean(), rewards.std() + STD_EPS
        advantages = np.empty_like(rewards)
        for prompt in set(prompts):
            mask = np.array([p == prompt for p in prompts])
            buffer = self.buffers[prompt]
            if len(buffer) < self.min_count:
                mean, std = batch_mean, batch_std
            else:
                values = np.fromiter(buffer, dtype=np.float64)
                mean, std = values.mean(), values.std() + STD_EPS
            advantages[mask] = (rewards[mask] - mean) / std
        return advantages

    def state_dict(self) -> dict:
        return {
            "buffer_size": self.buffer_size,
            "min_count": self.min_count,
            "buffers": {prompt: list(buffer) for prompt, buffer in self.buffers.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.buffers = {
            prompt: deque(values, maxlen=self.buffer_size) for prompt, values in state["buffers"].items()
        }


def normalize_globally(rewards: np.ndarray) -> np.ndarray:
    """Whole-batch normalization, for runs without per-prompt tracking."""
    rewards = np.asarray(rewards, dtype=np.float64)
    return (rewards - rewards.mean()) / (rewards.std() + STD_EPS)
