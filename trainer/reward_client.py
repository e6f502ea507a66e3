"""Build the reward client of a ``RewardConfig``: one transport by name, or a weighted sum.

The trainer submits each batch as soon as it is decoded and keeps sampling; it waits on the
futures only when the epoch's update needs them. Transports (in-process, HTTP, Redis) are
registered by name in ``REWARD_TRANSPORTS``; remote ones import httpx/redis only when chosen.

Imports point one way: this factory -> ``trainer.transports.*`` -> ``trainer.reward_api`` (the
interface). ``RewardClient``, ``RewardResult`` (the interface) and ``LocalRewardClient`` are
re-exported here for code that imports them from this module.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from trainer.reward_api import RewardClient, RewardResult
from trainer.transports.local import LocalRewardClient, local_client_from_config

__all__ = [
    "REWARD_TRANSPORTS",
    "LocalRewardClient",
    "RewardClient",
    "RewardResult",
    "make_reward_client",
]


def _http_client(cfg: Any) -> RewardClient:
    from trainer.transports.http import http_client_from_config

    if not cfg.embed_server or cfg.urls:
        return http_client_from_config(cfg)
    from trainer.embedded import EmbeddedRewardServer
    from trainer.transports.combined import OwningClient

    # The server process gets reward.server_settings as its own command-line flags.
    server = EmbeddedRewardServer([cfg.name], settings=cfg.server_settings).start()
    try:
        return OwningClient(http_client_from_config(cfg, [server.url]), [server.stop])
    except BaseException:
        server.stop()
        raise


def _redis_client(cfg: Any) -> RewardClient:
    from trainer.transports.redis import redis_client_from_config

    return redis_client_from_config(cfg)


# name -> factory(reward_config).
REWARD_TRANSPORTS: dict[str, Callable[[Any], RewardClient]] = {
    "local": local_client_from_config,
    "http": _http_client,
    "redis": _redis_client,
}


def _single_client(cfg: Any) -> RewardClient:
    try:
        factory = REWARD_TRANSPORTS[cfg.transport]
    except KeyError:
        valid = ", ".join(sorted(REWARD_TRANSPORTS))
        raise ValueError(f"reward.transport: unknown transport {cfg.transport!r}; valid: {valid}") from None
    return factory(cfg)


def make_reward_client(cfg: Any) -> RewardClient:
    """Build the reward client of a ``RewardConfig``: one transport, or a weighted sum of components."""
    if not getattr(cfg, "components", None):
        return _single_client(cfg)
    from trainer.transports.combined import CombinedRewardClient, Component

    parts: list[Component] = []
    try:
        for component in cfg.components:
            parts.append(Component(component.name, component.weight, _single_client(cfg.single(component))))
    except BaseException:
        for part in parts:
            part.client.close()
        raise
    return CombinedRewardClient(parts)
