"""The LAION aesthetic predictor: a linear MLP on L2-normalized CLIP image embeddings.

CLIP ViT-L/14 (projection dim 768) -> 768 -> 1024 -> 128 -> 64 -> 16 -> 1, with dropouts between
the first layers and no activations, as in LAION's improved-aesthetic-predictor; its released
state dict uses the keys ``layers.{0,2,4,6,7}.{weight,bias}``. torch/transformers are imported
inside the functions so that listing rewards stays cheap.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from reward_server.rewards.base import RewardOutput, Scorer, register_reward

# Linear layer widths after the input; dropouts sit after the first three (indices 1, 3, 5).
HIDDEN_SIZES = (1024, 128, 64, 16, 1)
DROPOUTS = (0.2, 0.2, 0.1)


def build_aesthetic_mlp(input_size: int) -> Any:
    """The LAION MLP as a module whose state-dict keys match the released weights."""
    from torch import nn

    layers: list[nn.Module] = []
    width = input_size
    for i, out in enumerate(HIDDEN_SIZES):
        layers.append(nn.Linear(width, out))
        if i < len(DROPOUTS):
            layers.append(nn.Dropout(DROPOUTS[i]))
        width = out
    module = nn.Module()
    module.layers = nn.Sequential(*layers)
    return module


def load_state_dict(path: str | Path) -> dict[str, Any]:
    """Tensors from .safetensors, or from a torch file with the restricted (no code) unpickler."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"aesthetic MLP weights not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    # weights_only=True refuses anything but tensors and plain containers: no arbitrary pickle.
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
    return state


def load_aesthetic_mlp(path: str | Path) -> Any:
    state = load_state_dict(path)
    if "layers.0.weight" not in state:
        raise ValueError(f"{path}: not a LAION aesthetic MLP state dict (no 'layers.0.weight')")
    mlp = build_aesthetic_mlp(int(state["layers.0.weight"].shape[1]))
    mlp.load_state_dict(state, strict=True)
    return mlp.eval()


def load_clip_image_processor(model: str) -> Any:
    """CLIP's image processor; without torchvision, transformers' PIL implementation."""
    from transformers import AutoImageProcessor
    from transformers.utils import is_torchvision_available

    if not is_torchvision_available():
        try:
            from transformers import CLIPImageProcessorPil as processor_class
        except ImportError:  # transformers < 5: the default one is PIL-based already
            from transformers import CLIPImageProcessor as processor_class
        return processor_class.from_pretrained(model)
    return AutoImageProcessor.from_pretrained(model)


@register_reward("aesthetic")
class AestheticScorer(Scorer):
    """Reward = LAION aesthetic score (roughly 1..10 for the released weights)."""

    def __init__(self, clip_model: str, mlp_path: str | Path, device: str = "cpu"):
        import torch
        from transformers import CLIPVisionModelWithProjection

        self.device = torch.device(device)
        self.processor = load_clip_image_processor(clip_model)
        self.clip = CLIPVisionModelWithProjection.from_pretrained(clip_model).to(self.device).eval()
        self.mlp = load_aesthetic_mlp(mlp_path).to(self.device)
        embed_dim = self.clip.config.projection_dim
        mlp_in = self.mlp.layers[0].in_features
        if embed_dim != mlp_in:
            raise ValueError(f"CLIP projection dim {embed_dim} does not match the MLP input size {mlp_in}")

    @classmethod
    def from_settings(cls, settings: Any = None) -> AestheticScorer:
        if settings is None or settings.aesthetic_mlp_path is None:
            raise ValueError("the aesthetic reward needs aesthetic_mlp_path (the LAION MLP weights)")
        return cls(settings.aesthetic_clip_model, settings.aesthetic_mlp_path, settings.device)

    def embed(self, images: Sequence[np.ndarray]) -> Any:
        """L2-normalized CLIP image embeddings, shape (batch, projection_dim)."""
        import torch

        # Our arrays are always H x W x 3: said explicitly, since the processor otherwise guesses the
        # channel axis and takes an image 1 or 3 pixels high for channels-first.
        pixels = self.processor(images=list(images), return_tensors="pt", input_data_format="channels_last")
        pixels = pixels["pixel_values"].to(self.device)
        with torch.inference_mode():
            embeds = self.clip(pixel_values=pixels).image_embeds
        return embeds / embeds.norm(dim=-1, keepdim=True)

    def score(
        self, images: Sequence[np.ndarray], prompts: Sequence[str], metadata: Sequence[dict[str, Any]]
    ) -> list[RewardOutput]:
        import torch

        with torch.inference_mode():
            scores = self.mlp.layers(self.embed(images))[:, 0].float().cpu().numpy()
        return [RewardOutput(reward=float(s), details={"aesthetic": float(s)}) for s in scores]
