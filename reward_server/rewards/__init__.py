"""The registry of rewards. Importing this package registers the built-in ones.

Heavy rewards (aesthetic, VLM) keep their model imports inside their constructors, so listing
names stays cheap.
"""

from reward_server.rewards import aesthetic, jpeg, llava  # noqa: F401  (registers the built-in rewards)
from reward_server.rewards.base import (
    REWARD_REGISTRY,
    InputLimitError,
    RewardOutput,
    Scorer,
    ScoringError,
    UnknownRewardError,
    build_scorer,
    get_reward_class,
    import_extra_rewards,
    register_reward,
    reward_names,
    scorer_settings,
)

__all__ = [
    "REWARD_REGISTRY",
    "InputLimitError",
    "RewardOutput",
    "Scorer",
    "ScoringError",
    "UnknownRewardError",
    "build_scorer",
    "get_reward_class",
    "import_extra_rewards",
    "register_reward",
    "reward_names",
    "scorer_settings",
]
