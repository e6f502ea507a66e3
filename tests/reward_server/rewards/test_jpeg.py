"""JPEG rewards against the file size PIL writes, computed here independently."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from reward_server.rewards import build_scorer


def jpeg_bytes(image: np.ndarray) -> int:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "JPEG", quality=95)
    return len(buffer.getvalue())


def test_sizes_and_signs():
    rng = np.random.default_rng(1)
    flat = np.full((64, 48, 3), 128, np.uint8)
    noisy = rng.integers(0, 256, (64, 48, 3), dtype=np.uint8)
    comp = build_scorer("jpeg_compressibility").score([flat, noisy], ["a", "b"], [{}, {}])
    incomp = build_scorer("jpeg_incompressibility").score([flat, noisy], ["a", "b"], [{}, {}])
    expected_kb = [jpeg_bytes(flat) / 1000, jpeg_bytes(noisy) / 1000]
    assert [o.reward for o in comp] == [-kb for kb in expected_kb]
    assert [o.reward for o in incomp] == expected_kb
    assert comp[0].reward > comp[1].reward  # the flat image compresses better
    assert [o.details["jpeg_kb"] for o in comp] == expected_kb
