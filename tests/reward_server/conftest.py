"""Fixtures of the reward-server tests."""

from tests.reward_server.server_utils import start_reward_server  # noqa: F401  (fixture)
