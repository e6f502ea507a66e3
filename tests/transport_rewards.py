"""Test-only rewards, registered when imported (in the test process, or in a real server/worker
process via ``--extra-rewards-module tests.transport_rewards``).

- ``test_slow_jpeg``: jpeg_compressibility plus a sleep of $DDPO_TEST_REWARD_DELAY_S per scorer batch
  (a slow reward service with a known latency).
- ``test_every_other_refused``: jpeg_compressibility that refuses every second request (422).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from reward_server.rewards import REWARD_REGISTRY, RewardOutput, Scorer, register_reward
from reward_server.rewards.jpeg import JpegCompressibility

if "test_slow_jpeg" not in REWARD_REGISTRY:  # imported twice (by path and by name): register once

    @register_reward("test_slow_jpeg")
    class SlowJpeg(Scorer):
        def __init__(self, delay_s: float):
            self.delay_s = delay_s
            self.inner = JpegCompressibility()

        @classmethod
        def from_settings(cls, settings: Any = None) -> SlowJpeg:
            return cls(float(os.environ.get("DDPO_TEST_REWARD_DELAY_S", "0")))

        def score(
            self, images: Sequence[np.ndarray], prompts: Sequence[str], metadata: Sequence[dict[str, Any]]
        ) -> list[RewardOutput]:
            time.sleep(self.delay_s)
            return self.inner.score(images, prompts, metadata)

    @register_reward("test_every_other_refused")
    class EveryOtherRefused(Scorer):
        def __init__(self) -> None:
            self.inner = JpegCompressibility()
            self.calls = 0
            self.lock = threading.Lock()

        def check_inputs(self, prompts: Sequence[str], metadata: Sequence[dict[str, Any]]) -> None:
            with self.lock:
                self.calls += 1
                if self.calls % 2 == 0:
                    raise ValueError(f"refused request number {self.calls} (test reward)")

        def score(
            self, images: Sequence[np.ndarray], prompts: Sequence[str], metadata: Sequence[dict[str, Any]]
        ) -> list[RewardOutput]:
            return self.inner.score(images, prompts, metadata)
