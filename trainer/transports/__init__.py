"""Reward transports: in-process (``local``), HTTP, Redis Streams, and the combined (weighted-sum) client.

Each implements ``trainer.reward_api.RewardClient`` and imports only that interface, ``shared/``
and its own client library, never the factory ``trainer.reward_client`` (which imports them
lazily from ``REWARD_TRANSPORTS``, so the ``local`` transport needs neither httpx nor redis).
See docs/transport.md.
"""
