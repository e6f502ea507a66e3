"""Remote reward transports (HTTP, Redis Streams) and the combined (weighted-sum) client.

Modules here are imported lazily by ``trainer.reward_client.REWARD_TRANSPORTS`` so that the
``local`` transport needs neither httpx nor redis. See docs/transport.md.
"""
