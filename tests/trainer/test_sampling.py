"""Our sampler against the plain diffusers pipeline on the same tiny model, noise and CFG."""

import numpy as np
import torch

from trainer.policy import DiffusionPolicy
from trainer.sampling import sample_generators, sample_trajectories


def test_sampler_images_equal_diffusers_pipeline(make_tiny_config):
    cfg = make_tiny_config(sample={"guidance_scale": 3.0, "eta": 0.7, "negative_prompt": "a dog"})
    policy = DiffusionPolicy(cfg.model)
    prompts, seeds = ["a cat", "an ant riding a bike", "a cow"], [11, 12, 13]
    ours = sample_trajectories(policy, prompts, cfg.sample, seeds)

    # Same streams for the pipeline: initial latents drawn first, then the per-step noise.
    generators = sample_generators(seeds)
    shape = policy.latent_shape(len(prompts), cfg.sample)
    latents = torch.stack([torch.randn(shape[1:], generator=g) for g in generators])
    out = policy.pipeline(
        prompts,
        negative_prompt=[cfg.sample.negative_prompt] * 3,
        num_inference_steps=cfg.sample.num_steps,
        guidance_scale=cfg.sample.guidance_scale,
        eta=cfg.sample.eta,
        latents=latents,
        generator=generators,
        height=cfg.sample.resolution,
        width=cfg.sample.resolution,
        output_type="np",
    )
    theirs = (out.images * 255).round().astype(np.uint8)
    assert ours.images.shape == theirs.shape == (3, 32, 32, 3)
    assert np.abs(ours.images.astype(int) - theirs.astype(int)).max() <= 1


def test_trajectory_shapes_and_chain(make_tiny_config):
    cfg = make_tiny_config()
    policy = DiffusionPolicy(cfg.model)
    traj = sample_trajectories(policy, ["a cat", "a dog"], cfg.sample, [0, 1])
    steps = cfg.sample.num_steps
    assert traj.latents.shape == (2, steps, 4, 8, 8) and traj.next_latents.shape == traj.latents.shape
    assert traj.log_probs.shape == (2, steps) and traj.timesteps.shape == (2, steps)
    # Each step starts where the previous one ended.
    assert torch.equal(traj.latents[:, 1:], traj.next_latents[:, :-1])
    assert torch.isfinite(traj.log_probs).all()
    assert traj.timesteps[0].tolist() == policy.scheduler.timesteps.tolist()
    assert traj.images.dtype == np.uint8


def test_sample_depends_only_on_its_own_seed(make_tiny_config):
    cfg = make_tiny_config()
    policy = DiffusionPolicy(cfg.model)
    pair = sample_trajectories(policy, ["a cat", "a dog"], cfg.sample, [5, 6])
    single = sample_trajectories(policy, ["a dog"], cfg.sample, [6])
    # Same noise; only float batch effects (different BLAS blocking) differ.
    torch.testing.assert_close(pair.next_latents[1:], single.next_latents, rtol=1e-3, atol=1e-4)
    different = sample_trajectories(policy, ["a dog"], cfg.sample, [7])
    assert not torch.allclose(different.next_latents, single.next_latents)


def test_window_steps_outside_are_deterministic_ddim(make_tiny_config):
    """W = 2 of 6 steps starting at step 2: replayed with diffusers' own DDIM step at eta = 0
    outside the window and the recorded samples inside it, the chain ends at the same image."""
    cfg = make_tiny_config(
        sample={"num_steps": 6, "window_size": 2, "window_start": 2, "guidance_scale": 3.0}
    )
    policy = DiffusionPolicy(cfg.model)
    prompts, seeds = ["a cat", "a dog"], [3, 4]
    traj = sample_trajectories(policy, prompts, cfg.sample, seeds)
    assert traj.latents.shape[1] == traj.log_probs.shape[1] == traj.timesteps.shape[1] == 2
    assert traj.timesteps[0].tolist() == policy.scheduler.timesteps[2:4].tolist()
    assert torch.isfinite(traj.log_probs).all()

    scheduler = policy.scheduler
    shape = policy.latent_shape(2, cfg.sample)
    x = torch.stack([torch.randn(shape[1:], generator=g) for g in sample_generators(seeds)])
    embeds, negative = policy.encode_prompts(prompts), policy.encode_prompts([""] * 2)
    for i, t in enumerate(scheduler.timesteps):
        if i in (2, 3):  # inside: the recorded step starts where the deterministic chain arrived
            torch.testing.assert_close(traj.latents[:, i - 2], x, rtol=1e-4, atol=1e-5)
            x = traj.next_latents[:, i - 2]
            continue
        eps = policy.predict_noise(x, t, embeds, negative, cfg.sample.guidance_scale)
        x = scheduler.step(eps, t, x, eta=0.0).prev_sample
    replayed = policy.decode(x).numpy()
    assert np.abs(replayed.astype(int) - traj.images.astype(int)).max() <= 1


def test_window_of_every_step_is_the_plain_sampler(make_tiny_config):
    plain_cfg = make_tiny_config(sample={"num_steps": 5})
    window_cfg = make_tiny_config(sample={"num_steps": 5, "window_size": 5})
    policy = DiffusionPolicy(plain_cfg.model)
    plain = sample_trajectories(policy, ["a cat", "a dog"], plain_cfg.sample, [1, 2])
    window = sample_trajectories(policy, ["a cat", "a dog"], window_cfg.sample, [1, 2])
    assert torch.equal(plain.next_latents, window.next_latents)
    assert torch.equal(plain.log_probs, window.log_probs)
    assert np.array_equal(plain.images, window.images)
