"""Wire schemas and codecs shared by the trainer and the reward server (HTTP and Redis alike)."""
