"""Vision-language-model backends that answer a question about an image (the judge of alignment rewards)."""

from reward_server.vlm.base import VLM_BACKENDS, VLMBackend, VLMError, build_vlm_backend, register_vlm_backend

__all__ = ["VLM_BACKENDS", "VLMBackend", "VLMError", "build_vlm_backend", "register_vlm_backend"]
