"""The reward side: scorers (a registry) and the FastAPI service that serves them."""
