"""The digits base model: a tiny text-to-image Stable Diffusion pretrained here, in minutes, on CPU.

DDPO needs a base that can already draw, imperfectly, what prompts ask for; a random network gives
RL nothing to improve. This module pretrains one from the digits world of ``shared/digits.py``
(scikit-learn's handwritten digits as coloured 32x32 pictures, "a red seven on a blue background"),
with the real diffusers/transformers classes, saved with ``save_pretrained``:

1. a frozen, randomly initialized 2-layer CLIP text encoder over a word-level BPE vocabulary
   (trained jointly with the UNet instead, its digit words collapsed to chance: measured);
2. an ``AutoencoderKL`` (32x32x3 <-> 4x4x4: four levels) trained for reconstruction (+ a small KL
   term); its ``scaling_factor`` is set to 1 / std of the latents, as SD does;
3. a ``UNet2DConditionModel`` (two levels, 4x4 and 2x2, cross-attention at both) trained with the
   epsilon loss on those latents, with 10 % of the prompts replaced by "" so classifier-free
   guidance works.

Why a 4x4x4 latent: the policy gradient of a DDIM step is a zeroth-order estimate over that step's
noise, whose dimension is the latent's size; with 16x16x4 (1,024 numbers) RL moved caption accuracy
by about 3 points in 5,120 reward queries more than a no-update control, with 8x8x4 by 5, with
4x4x4 by 18-21 (docs/learning.md).
It also makes sampling a few times cheaper, and colours, a latent's mean, easy for the base.

Held-out (digit, background) combinations are never shown (the RL generalization test). The recipe is seeded;
the result is cached under ``<cache>/digits-base-<hash of the recipe>`` (written to a temporary
folder, then renamed: a half-written model is never used), so a second run reuses it.
``model.pretrained: digits`` builds or reuses it; ``python -m trainer.digits_model`` builds it on
its own (``--out DIR`` to copy it elsewhere). Loadable as it is:
``StableDiffusionPipeline.from_pretrained(path)``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from shared import digits
from trainer.tiny import assemble_sd_pipeline, build_word_tokenizer, default_cache_dir, sd_v1_ddim_scheduler

log = logging.getLogger(__name__)

DIGITS_MODEL_NAME = "digits"
MARKER = "ddpo_digits.json"
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "model_index.json")


@dataclass(frozen=True)
class DigitsRecipe:
    """Everything that decides the base model's weights; its hash names the cache folder."""

    version: str = "digits-base-v2"  # bump when the code below changes what it builds
    seed: int = 0
    batch_size: int = 32  # UNet
    vae_batch_size: int = 64
    max_shift: int = 1  # random translation of the digits, pixels
    vae_steps: int = 800
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-6
    unet_steps: int = 2000
    unet_lr: float = 2e-3
    prompt_dropout: float = 0.1  # fraction of "" prompts (classifier-free guidance)
    text_width: int = 64
    text_layers: int = 2  # transformer layers of the frozen random text encoder
    # One VAE level each: the latent side is 32 / 2^(levels - 1), here 4x4x4 (see the module docstring).
    vae_channels: tuple[int, ...] = (16, 32, 32, 32)
    vae_lr_schedule: Literal["constant", "cosine"] = "cosine"  # cosine: decays to 0 over vae_steps
    unet_channels: tuple[int, ...] = (64, 128)
    unet_attention_from: int = 0  # first UNet level (0 = full latent resolution) with cross-attention

    def digest(self) -> str:
        text = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


# -- data ----------------------------------------------------------------------------------------
class DigitsData:
    """Random coloured digits of the training split and the training prompts, as float images."""

    def __init__(self, recipe: DigitsRecipe):
        scans, self.labels = digits.digit_scans("train")
        self.masks = np.stack([digits.ink_mask(s) for s in scans])  # (N, 32, 32), ink in [0, 1]
        self.specs = [spec for spec in digits.all_specs() if not spec.heldout]
        self.scans_of = [np.flatnonzero(self.labels == d) for d in range(len(digits.DIGIT_WORDS))]
        self.max_shift = recipe.max_shift
        self.rng = np.random.default_rng(recipe.seed)

    def batch(self, size: int) -> tuple[torch.Tensor, list[str]]:
        """(size, 3, 32, 32) images in [-1, 1] and their prompts."""
        rng = self.rng
        specs = [self.specs[i] for i in rng.integers(0, len(self.specs), size)]
        idx = np.array([rng.choice(self.scans_of[spec.digit]) for spec in specs])
        masks = self.masks[idx]
        if self.max_shift:
            shifts = rng.integers(-self.max_shift, self.max_shift + 1, (size, 2))
            masks = np.stack([np.roll(m, tuple(s), axis=(0, 1)) for m, s in zip(masks, shifts, strict=True)])
        fg = np.array([digits.COLORS[s.stroke] for s in specs], np.float32)[:, :, None, None] / 255.0
        bg = np.array([digits.COLORS[s.background] for s in specs], np.float32)[:, :, None, None] / 255.0
        alpha = masks[:, None]
        images = bg * (1 - alpha) + fg * alpha
        prompts = [spec.prompt for spec in specs]
        return torch.from_numpy(images * 2 - 1), prompts


# -- the components ------------------------------------------------------------------------------
def build_components(recipe: DigitsRecipe):
    """Untrained tokenizer, text encoder, VAE, UNet and the SD v1 DDIM scheduler (seeded)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    # Prompts are 7 words (one token each): 16 positions hold them with <bos>/<eos>.
    tokenizer, vocab = build_word_tokenizer(list(digits.VOCABULARY), model_max_length=16)
    torch.manual_seed(recipe.seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=recipe.text_width,
            intermediate_size=2 * recipe.text_width,
            num_hidden_layers=recipe.text_layers,
            num_attention_heads=4,
            max_position_embeddings=16,
            bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=vocab["<|endoftext|>"],
        )
    )
    torch.manual_seed(recipe.seed + 1)
    levels = len(recipe.vae_channels)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=recipe.vae_channels,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=digits.IMAGE_SIZE,
    )
    torch.manual_seed(recipe.seed + 2)
    c, plain = recipe.unet_channels, recipe.unet_attention_from
    unet = UNet2DConditionModel(
        sample_size=digits.IMAGE_SIZE // 2 ** (levels - 1),
        in_channels=4,
        out_channels=4,
        block_out_channels=c,
        layers_per_block=1,
        # Cross-attention from level `unet_attention_from` down (at a large level it dominates the
        # step time: it tripled it at 16x16).
        down_block_types=("DownBlock2D",) * plain + ("CrossAttnDownBlock2D",) * (len(c) - plain),
        up_block_types=("CrossAttnUpBlock2D",) * (len(c) - plain) + ("UpBlock2D",) * plain,
        cross_attention_dim=recipe.text_width,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    return tokenizer, text_encoder, vae, unet, sd_v1_ddim_scheduler()


# -- training ------------------------------------------------------------------------------------
def train_vae(vae, data: DigitsData, recipe: DigitsRecipe, progress: bool) -> float:
    """Reconstruction + small KL; returns the final reconstruction MSE (images in [-1, 1])."""
    optimizer = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        (lambda step: 0.5 * (1 + np.cos(np.pi * min(step, recipe.vae_steps) / recipe.vae_steps)))
        if recipe.vae_lr_schedule == "cosine"
        else (lambda step: 1.0),
    )
    vae.train()
    recon_loss = float("nan")
    for _ in tqdm(range(recipe.vae_steps), desc="digits base: VAE", disable=not progress):
        images, _ = data.batch(recipe.vae_batch_size)
        posterior = vae.encode(images).latent_dist
        recon = vae.decode(posterior.sample()).sample
        mse = torch.nn.functional.mse_loss(recon, images)
        loss = mse + recipe.vae_kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        recon_loss = mse.item()
    vae.eval()
    vae.requires_grad_(False)
    with torch.no_grad():  # SD's convention: scaled latents have unit variance
        latents = torch.cat([vae.encode(data.batch(256)[0]).latent_dist.mean for _ in range(4)])
        vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    return recon_loss


def train_unet(unet, vae, text_encoder, tokenizer, scheduler, data, recipe, progress: bool) -> float:
    """The epsilon loss on scaled latents; returns the mean loss of the last 50 steps."""

    @torch.no_grad()
    def embed(prompts: list[str]) -> torch.Tensor:
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids  # fmt: skip
        return text_encoder(ids)[0]

    params = list(unet.parameters())
    optimizer = torch.optim.AdamW(params, lr=recipe.unet_lr, weight_decay=1e-4)
    # Short linear warm-up, then cosine decay to 0: a short run ends at its best loss.
    warmup = max(1, recipe.unet_steps // 20)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: (
            min(1.0, (step + 1) / warmup)
            * 0.5
            * (1 + np.cos(np.pi * min(step, recipe.unet_steps) / recipe.unet_steps))
        ),
    )
    gen = torch.Generator().manual_seed(recipe.seed + 3)
    unet.train()
    losses: list[float] = []
    bar = tqdm(range(recipe.unet_steps), desc="digits base: UNet", disable=not progress)
    for _ in bar:
        images, prompts = data.batch(recipe.batch_size)
        drop = torch.rand(len(prompts), generator=gen) < recipe.prompt_dropout
        prompts = ["" if d else p for p, d in zip(prompts, drop.tolist(), strict=True)]
        with torch.no_grad():
            x0 = vae.encode(images).latent_dist.sample(gen) * vae.config.scaling_factor
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x0),), generator=gen)
        noisy = scheduler.add_noise(x0, noise, t)
        pred = unet(noisy, t, encoder_hidden_states=embed(prompts)).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        lr_schedule.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
    unet.eval()
    return float(np.mean(losses[-50:]))


def build_digits_pipeline(recipe: DigitsRecipe | None = None, progress: bool = True):
    """Pretrain the digits base -> (StableDiffusionPipeline, stats). Minutes on two CPU cores."""

    recipe = recipe or DigitsRecipe()
    # Seeded; bit-exact for a given torch version and thread count (torch's CPU reductions split
    # work by thread), which is why the thread count is not part of the recipe.
    with torch.random.fork_rng(devices=[]):
        started = time.perf_counter()
        tokenizer, text_encoder, vae, unet, scheduler = build_components(recipe)
        text_encoder.requires_grad_(False).eval()
        data = DigitsData(recipe)
        vae_mse = train_vae(vae, data, recipe, progress)
        unet_loss = train_unet(unet, vae, text_encoder, tokenizer, scheduler, data, recipe, progress)
        seconds = time.perf_counter() - started
    pipe = assemble_sd_pipeline(vae, text_encoder, tokenizer, unet, scheduler)
    stats = {"vae_recon_mse": vae_mse, "unet_final_loss": unet_loss, "build_seconds": round(seconds, 1)}
    return pipe, stats


# -- the cache -----------------------------------------------------------------------------------
def is_complete(folder: Path) -> bool:
    """A finished build: its marker and every component are there."""
    return (folder / MARKER).is_file() and all((folder / c).exists() for c in COMPONENTS)


def ensure_digits_model(cache_dir: Path | None = None, recipe: DigitsRecipe | None = None,
                        progress: bool = True) -> Path:  # fmt: skip
    """The folder of the pretrained digits base, built (minutes) on first use, then reused.

    Concurrent callers serialize on a file lock; the build is written to a temporary folder and
    renamed into place, so a crash never leaves a folder that looks complete. A folder without
    its marker or a component (e.g. copied half-way) is moved aside and rebuilt, with a warning
    naming it.
    """
    import fcntl

    recipe = recipe or DigitsRecipe()
    root = Path(cache_dir or default_cache_dir())
    folder = root / f"digits-base-{recipe.digest()}"
    if is_complete(folder):
        return folder
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if is_complete(folder):
            return folder
        if folder.exists():
            log.warning("digits base %s is incomplete (no %s or a component); rebuilding it", folder, MARKER)
            shutil.rmtree(folder)
        if torch.distributed.is_initialized():
            # transformers writes weights only on rank 0 of a process group: build outside it.
            import subprocess
            import sys

            subprocess.run(
                [sys.executable, "-m", "trainer.digits_model", "--cache-dir", str(root)], check=True
            )
            return folder
        pipe, stats = build_digits_pipeline(recipe, progress=progress)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=root))
        try:
            pipe.save_pretrained(tmp)
            info = {"recipe": dataclasses.asdict(recipe), **stats}
            (tmp / MARKER).write_text(json.dumps(info, indent=2) + "\n")
            tmp.rename(folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("digits base built in %.0f s: %s", stats["build_seconds"], folder)
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.digits_model",
        description="Build (or reuse) the pretrained digits base model and print its folder.",
    )
    parser.add_argument("--cache-dir", help="cache root (default: $DDPO_CACHE or ~/.cache/ddpo-stack)")
    parser.add_argument("--out", help="also copy the model to this folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    folder = ensure_digits_model(Path(args.cache_dir) if args.cache_dir else None)
    if args.out:
        shutil.copytree(folder, args.out, dirs_exist_ok=True)
        folder = Path(args.out)
    print(folder)


if __name__ == "__main__":
    main()
