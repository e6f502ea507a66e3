"""A tiny Stable Diffusion of the real diffusers/transformers classes, random weights, built here.

Nothing can be downloaded at run time on our CI machines, so the default run and the tests use
this: a UNet2DConditionModel, AutoencoderKL, CLIPTextModel + CLIPTokenizer and DDIMScheduler
configured like SD v1.x (DDIM with ``set_alpha_to_one=False``, ``steps_offset=1``), only small.
It is saved with ``save_pretrained`` and loaded back with ``from_pretrained`` like real weights,
so the loading code under test is the real one. It shows the machinery, not image quality.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

TINY_MODEL_NAME = "tiny"
TINY_VERSION = "tiny-sd-v1"  # bump when the architecture below changes


def default_cache_dir() -> Path:
    return Path(os.environ.get("DDPO_CACHE", Path.home() / ".cache" / "ddpo-stack"))


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level alphabet: every byte maps to a printable unicode character."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def build_tiny_tokenizer_files(words: list[str]) -> tuple[dict[str, int], list[str]]:
    """A small CLIP BPE vocabulary: all single bytes, plus merges that spell out ``words``."""
    alphabet = list(_bytes_to_unicode().values())
    vocab_tokens = alphabet + [c + "</w>" for c in alphabet]
    merges: list[str] = []
    seen = set(vocab_tokens)
    for word in sorted(set(words)):
        symbols = [*word[:-1], word[-1] + "</w>"]
        current = symbols[0]
        for symbol in symbols[1:]:
            merge = f"{current} {symbol}"
            current = current + symbol
            if current not in seen:
                merges.append(merge)
                vocab_tokens.append(current)
                seen.add(current)
    vocab_tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(vocab_tokens)}, merges


def build_word_tokenizer(words: list[str], model_max_length: int):
    """A CLIPTokenizer whose BPE spells each of ``words`` as one token -> (tokenizer, vocab)."""
    from transformers import CLIPTokenizer

    vocab, merges = build_tiny_tokenizer_files(words)
    with tempfile.TemporaryDirectory() as tmp:
        # Files, passed positionally: the one constructor form transformers 4.x and 5.x share.
        vocab_file, merges_file = Path(tmp, "vocab.json"), Path(tmp, "merges.txt")
        vocab_file.write_text(json.dumps(vocab), encoding="utf-8")
        merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        tokenizer = CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=model_max_length)
    return tokenizer, vocab


def assemble_sd_pipeline(vae, text_encoder, tokenizer, unet, scheduler):
    """A StableDiffusionPipeline of these parts, without safety checker."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def sd_v1_ddim_scheduler():
    """The SD v1.x DDIM configuration (final alpha = alphas_cumprod[0], so every step has std > 0)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def tiny_clip_text_encoder(vocab: dict[str, int], hidden: int, seed: int, projection_dim: int | None = None):
    """A 2-layer CLIP text encoder over ``vocab`` (``build_word_tokenizer``'s), seeded random weights;
    with ``projection_dim``, the ``CLIPTextModelWithProjection`` (pooled output) of SDXL/SD3."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
        **({"projection_dim": projection_dim} if projection_dim else {}),
    )
    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(config) if projection_dim else CLIPTextModel(config)


def tiny_vae(seed: int, sample_size: int, latent_channels: int = 4, **extra):
    """A 3-level ``AutoencoderKL`` (8x down), seeded random weights; ``extra``: more of its arguments."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=sample_size,
        **extra,
    )


def build_tiny_pipeline(seed: int = 0, sample_size: int = 64):
    """Build (in memory) a tiny StableDiffusionPipeline with seeded random weights."""
    from diffusers import UNet2DConditionModel

    from trainer.prompts import all_prompt_words

    tokenizer, vocab = build_word_tokenizer(all_prompt_words(), model_max_length=77)
    text_encoder = tiny_clip_text_encoder(vocab, 32, seed)
    vae = tiny_vae(seed + 1, sample_size)
    latent_size = sample_size // 4
    torch.manual_seed(seed + 2)
    unet = UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    return assemble_sd_pipeline(vae, text_encoder, tokenizer, unet, sd_v1_ddim_scheduler())


def ensure_tiny_model(cache_dir: Path | None = None) -> Path:
    """Return the folder of the cached tiny model, building and saving it on first use."""
    return ensure_built(TINY_VERSION, build_tiny_pipeline, [sys.executable, "-m", "trainer.tiny"], cache_dir)


def ensure_built(version: str, build, command: list[str], cache_dir: Path | None = None) -> Path:
    """The folder ``<cache>/<version>``, where ``build()``'s pipeline is saved on first use.

    Concurrent callers (torchrun ranks, parallel test sessions) serialize on a file lock: one
    builds, the others wait and load what it saved. ``command`` + [folder] builds it in a fresh
    process (used inside an initialized process group).
    """
    import fcntl

    folder = (cache_dir or default_cache_dir()) / version
    marker = folder / "ddpo_tiny.json"
    if marker.exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{version}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not marker.exists():
            shutil.rmtree(folder, ignore_errors=True)  # a build interrupted before its marker
            if torch.distributed.is_initialized():
                # transformers' save_pretrained writes weights only on rank 0 of an initialized
                # process group: build in a fresh process, outside the group.
                subprocess.run([*command, str(folder)], check=True)
            else:
                build().save_pretrained(folder)
            marker.write_text(json.dumps({"version": version}))
    return folder


if __name__ == "__main__":
    build_tiny_pipeline().save_pretrained(sys.argv[1])
