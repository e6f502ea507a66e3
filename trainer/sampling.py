"""Rollouts: sample a batch of images with DDIM (eta > 0) and CFG, recording every step's log-prob."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from trainer.config import SampleConfig
from trainer.policy import DiffusionPolicy


@dataclass
class Trajectories:
    """A batch of denoising trajectories; tensors are fp32, batch first, S = num_steps."""

    prompts: list[str]
    prompt_embeds: torch.Tensor  # (B, L, D)
    negative_embeds: torch.Tensor  # (B, L, D)
    timesteps: torch.Tensor  # (B, S) long; S = the stochastic steps (the window, or every step)
    latents: torch.Tensor  # (B, S, C, h, w): x_t before each step
    next_latents: torch.Tensor  # (B, S, C, h, w): x_t' after each step
    log_probs: torch.Tensor  # (B, S): log p(x_t' | x_t) under the sampling policy
    final_latents: torch.Tensor  # (B, C, h, w): x_0, the latent the images are decoded from
    images: np.ndarray  # (B, H, W, 3) uint8

    def __len__(self) -> int:
        return len(self.prompts)

    @staticmethod
    def cat(parts: Sequence[Trajectories]) -> Trajectories:
        return Trajectories(
            prompts=[p for part in parts for p in part.prompts],
            prompt_embeds=torch.cat([p.prompt_embeds for p in parts]),
            negative_embeds=torch.cat([p.negative_embeds for p in parts]),
            timesteps=torch.cat([p.timesteps for p in parts]),
            latents=torch.cat([p.latents for p in parts]),
            next_latents=torch.cat([p.next_latents for p in parts]),
            log_probs=torch.cat([p.log_probs for p in parts]),
            final_latents=torch.cat([p.final_latents for p in parts]),
            images=np.concatenate([p.images for p in parts]),
        )

    def select(self, index: torch.Tensor) -> Trajectories:
        idx = index.tolist()
        return Trajectories(
            prompts=[self.prompts[i] for i in idx],
            prompt_embeds=self.prompt_embeds[index],
            negative_embeds=self.negative_embeds[index],
            timesteps=self.timesteps[index],
            latents=self.latents[index],
            next_latents=self.next_latents[index],
            log_probs=self.log_probs[index],
            final_latents=self.final_latents[index],
            images=self.images[idx],
        )


def sample_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per sample: each image's noise depends only on its own seed."""
    return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]


@torch.no_grad()
def sample_trajectories(
    policy: DiffusionPolicy,
    prompts: Sequence[str],
    cfg: SampleConfig,
    seeds: Sequence[int],
    keep_trajectory: bool = True,
    window_start: int | None = None,
    initial_seeds: Sequence[int] | None = None,
    deterministic: bool = False,
) -> Trajectories:
    """Run the full DDIM chain for ``prompts``; the noise of sample i comes from ``seeds[i]``.

    With ``cfg.window_size`` W > 0 only steps [window_start, window_start + W) are stochastic and
    recorded (default start: ``cfg.window_start``); the others are deterministic DDIM.
    ``initial_seeds`` (one per sample) draw x_T from their own streams instead of ``seeds``: equal
    initial seeds give equal x_T, while the steps' noise still comes from ``seeds``.
    ``deterministic``: every step deterministic (DDIM eta = 0 / flow noise level 0), nothing recorded.
    The step is the policy's family's (DDIM for SD/SDXL, the flow-matching SDE for SD3).
    """
    batch = len(prompts)
    if len(seeds) != batch:
        raise ValueError(f"{len(seeds)} seeds for {batch} prompts")
    device = policy.device
    generators = sample_generators(seeds)
    image_size = cfg.resolution or policy.native_resolution()
    prompt_embeds = policy.encode_prompts(prompts, image_size)
    negative_embeds = policy.encode_prompts([cfg.negative_prompt] * batch, image_size)
    family = policy.family

    scheduler = policy.scheduler
    scheduler.set_timesteps(cfg.num_steps, device=device)
    shape = policy.latent_shape(batch, cfg)
    init_generators = generators if initial_seeds is None else sample_generators(initial_seeds)
    if len(init_generators) != batch:
        raise ValueError(f"{len(init_generators)} initial seeds for {batch} prompts")
    latents = (
        torch.stack([torch.randn(shape[1:], generator=g, dtype=torch.float32) for g in init_generators]).to(
            device
        )
        * getattr(scheduler, "init_noise_sigma", 1.0)  # flow matching: none (x_T is pure noise)
    )

    start = cfg.window_start if window_start is None else window_start
    stochastic = range(start, start + cfg.window_size) if cfg.window_size else range(len(scheduler.timesteps))
    if deterministic:
        stochastic, keep_trajectory = range(0), False
    all_latents, all_next, all_logp = [], [], []
    for i, t in enumerate(scheduler.timesteps):
        model_pred = policy.model_pred(latents, t, prompt_embeds, negative_embeds, cfg.guidance_scale)
        if i not in stochastic:
            latents = family.step_deterministic(scheduler, model_pred, t, latents)
            continue
        next_latents, log_prob = family.step_with_logprob(
            scheduler, model_pred, t, latents, cfg, generator=generators
        )
        if keep_trajectory:
            all_latents.append(latents)
            all_next.append(next_latents)
            all_logp.append(log_prob)
        latents = next_latents

    images = policy.decode(latents).numpy()
    steps = len(stochastic)
    window_timesteps = scheduler.timesteps[stochastic.start : stochastic.stop]
    timesteps = window_timesteps.to("cpu", family.timestep_dtype).unsqueeze(0).expand(batch, steps).clone()
    if keep_trajectory:
        stacked_latents = torch.stack(all_latents, dim=1)
        stacked_next = torch.stack(all_next, dim=1)
        stacked_logp = torch.stack(all_logp, dim=1)
    else:
        stacked_latents = stacked_next = torch.empty(batch, 0, *shape[1:], device=device)
        stacked_logp = torch.empty(batch, 0, device=device)
    return Trajectories(
        prompts=list(prompts),
        prompt_embeds=prompt_embeds,
        negative_embeds=negative_embeds,
        timesteps=timesteps,
        latents=stacked_latents,
        next_latents=stacked_next,
        log_probs=stacked_logp,
        final_latents=latents,
        images=images,
    )
