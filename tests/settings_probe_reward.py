"""A test-only reward that reports the settings it was built with, registered when imported (in the
test process, or in a server process via ``--extra-rewards-module tests.settings_probe_reward``).

``test_settings_probe``: reward 0 per image; each sample's details hold the scorer's ``device``,
``vlm_model`` and ``vlm_question``, so a test can see what configured it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from reward_server.rewards import REWARD_REGISTRY, RewardOutput, Scorer, register_reward

PROBED = ("device", "vlm_model", "vlm_question")

if "test_settings_probe" not in REWARD_REGISTRY:  # imported twice (by path and by name): register once

    @register_reward("test_settings_probe")
    class SettingsProbe(Scorer):
        def __init__(self, seen: dict[str, Any]):
            self.seen = seen

        @classmethod
        def from_settings(cls, settings: Any = None) -> SettingsProbe:
            return cls({name: getattr(settings, name, None) for name in PROBED})

        def score(
            self, images: Sequence[np.ndarray], prompts: Sequence[str], metadata: Sequence[dict[str, Any]]
        ) -> list[RewardOutput]:
            return [RewardOutput(0.0, dict(self.seen)) for _ in images]
