"""JPEG (in)compressibility: the size of the image saved by PIL as JPEG at quality 95."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from reward_server.rewards.base import RewardOutput, Scorer, register_reward

JPEG_QUALITY = 95


def jpeg_size_kb(image: np.ndarray, quality: int = JPEG_QUALITY) -> float:
    """Size in kB (bytes / 1000) of an HxWx3 uint8 RGB image saved as JPEG by PIL."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 uint8 image, got shape {image.shape} dtype {image.dtype}")
    buffer = io.BytesIO()
    Image.fromarray(image, mode="RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.tell() / 1000.0


@register_reward("jpeg_compressibility")
class JpegCompressibility(Scorer):
    """Reward = -(JPEG size in kB): smaller files score higher."""

    sign = -1.0

    def score(
        self, images: Sequence[np.ndarray], prompts: Sequence[str], metadata: Sequence[dict[str, Any]]
    ) -> list[RewardOutput]:
        outputs = []
        for image in images:
            size = jpeg_size_kb(image)
            outputs.append(RewardOutput(reward=self.sign * size, details={"jpeg_kb": size}))
        return outputs


@register_reward("jpeg_incompressibility")
class JpegIncompressibility(JpegCompressibility):
    """Reward = +(JPEG size in kB): larger files score higher."""

    sign = 1.0
