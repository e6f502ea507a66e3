"""Model families: registry and detection, SDXL and SD3 samplers against their diffusers pipelines,
LoRA files that the pipelines load, and short SD3 training runs (groups, KL, window, CFG-free, P3O)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from shared.cli import deep_merge
from trainer.checkpoint import save_lora
from trainer.config import ConfigError, build_config
from trainer.families import FAMILIES, get_family, pack_conditioning, unpack_conditioning
from trainer.policy import DiffusionPolicy, resolve_pretrained
from trainer.sampling import sample_generators, sample_trajectories
from trainer.train import Trainer

SMALL = {
    "sample": {"num_steps": 4, "batch_size": 4, "num_batches_per_epoch": 2, "resolution": 32},
    "train": {"batch_size": 4, "gradient_accumulation_steps": 1},
    "advantage": {"buffer_size": 8, "min_count": 4},
    "reward": {"transport": "local"},
    "run": {"progress": False, "num_epochs": 2, "eval_every": 100, "eval_before_training": False},
}


def family_config(tmp_path, preset, **sections):
    return build_config(preset, deep_merge(SMALL, {"run": {"output_dir": str(tmp_path)}, **sections}))


def _perturb_lora(policy, seed=0, scale=0.3):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in policy.unet.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * scale)


# -- registry, detection, conditioning packing ------------------------------------------------
def test_unknown_family_lists_the_valid_ones():
    with pytest.raises(ValueError, match="sd, sdxl, sd3"):
        get_family("flux")
    assert set(FAMILIES) == {"sd", "sdxl", "sd3"}


@pytest.mark.parametrize(
    ("pretrained", "family", "holds"),
    [("tiny", "sd3", "StableDiffusionPipeline"), ("tiny-sd3", "sdxl", "StableDiffusion3Pipeline")],
)
def test_checkpoint_of_another_family_is_refused_naming_both(pretrained, family, holds):
    cfg = build_config("tiny", {"model": {"pretrained": pretrained, "family": family}})
    with pytest.raises(ValueError, match=rf"model.family is '{family}' but .* holds a {holds} \(family"):
        DiffusionPolicy(cfg.model)


def test_unsupported_pipeline_class_is_refused(tmp_path):
    folder = tmp_path / "other"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    cfg = build_config("tiny", {"model": {"pretrained": str(folder)}})
    with pytest.raises(ValueError, match=r"holds a FluxPipeline .*no supported family"):
        DiffusionPolicy(cfg.model)


def test_pack_unpack_roundtrip():
    seq, extra = torch.randn(3, 5, 4), torch.randn(3, 10)
    packed = pack_conditioning(seq, extra)
    assert packed.shape == (3, 8, 4)
    back_seq, back_extra = unpack_conditioning(packed, 10)
    assert torch.equal(back_seq, seq) and torch.equal(back_extra, extra)


# -- SD3 -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sd3_policy(tmp_path_factory):
    cfg = family_config(tmp_path_factory.mktemp("sd3"), "tiny-sd3")
    return cfg, DiffusionPolicy(cfg.model)


def test_sd3_sampler_at_noise_level_zero_equals_pipeline(sd3_policy):
    cfg, policy = sd3_policy
    sample = cfg.sample.model_copy(update={"guidance_scale": 3.0, "negative_prompt": "a dog"})
    prompts, seeds = ["a cat", "an ant riding a bike", "a cow"], [11, 12, 13]
    ours = sample_trajectories(policy, prompts, sample, seeds, deterministic=True)
    shape = policy.latent_shape(3, sample)
    latents = torch.stack([torch.randn(shape[1:], generator=g) for g in sample_generators(seeds)])
    out = policy.pipeline(
        prompts,
        negative_prompt=[sample.negative_prompt] * 3,
        num_inference_steps=sample.num_steps,
        guidance_scale=sample.guidance_scale,
        latents=latents,
        height=sample.resolution,
        width=sample.resolution,
        output_type="np",
    )
    theirs = (out.images * 255).round().astype(np.uint8)
    assert ours.images.shape == theirs.shape == (3, 32, 32, 3)
    assert np.abs(ours.images.astype(int) - theirs.astype(int)).max() <= 1
    # The SDE (a > 0) changes the images: the stochastic path is really taken.
    noisy = sample_trajectories(policy, prompts, sample, seeds)
    assert np.abs(noisy.images.astype(int) - theirs.astype(int)).max() > 1


def test_sd3_trajectory_log_probs_recomputed_exactly(sd3_policy):
    """On-policy: the training-time log-prob of each recorded step equals the sampled one."""
    cfg, policy = sd3_policy
    traj = sample_trajectories(policy, ["a cat", "a dog"], cfg.sample, [1, 2])
    assert traj.timesteps.dtype == torch.float32
    assert traj.timesteps[0].tolist() == policy.scheduler.timesteps.tolist()
    assert torch.equal(traj.latents[:, 1:], traj.next_latents[:, :-1])
    for j in range(traj.timesteps.shape[1]):
        t = traj.timesteps[:, j]
        pred = policy.model_pred(traj.latents[:, j], t, traj.prompt_embeds, traj.negative_embeds, 4.5)
        _, logp = policy.family.step_with_logprob(
            policy.scheduler, pred, t, traj.latents[:, j], cfg.sample, prev_sample=traj.next_latents[:, j]
        )
        torch.testing.assert_close(logp, traj.log_probs[:, j], rtol=0, atol=1e-5)


def test_sd3_guidance_one_skips_the_unconditional_branch(sd3_policy):
    cfg, policy = sd3_policy
    embeds = policy.encode_prompts(["a cat", "a dog"], 32)
    negative = policy.encode_prompts(["", ""], 32)
    x = torch.randn(policy.latent_shape(2, cfg.sample))
    policy.scheduler.set_timesteps(4)
    t = policy.scheduler.timesteps[0]
    calls = []
    hook = policy.unet.register_forward_hook(
        lambda m, a, k, out: calls.append(k["hidden_states"].shape[0]), with_kwargs=True
    )
    try:
        free = policy.model_pred(x, t, embeds, negative, 1.0)
    finally:
        hook.remove()
    with torch.no_grad():
        both = policy.family.forward(
            policy.unet, torch.cat([x, x]), t.expand(4), torch.cat([negative, embeds])
        )
    uncond, cond = both.chunk(2)
    torch.testing.assert_close(free, uncond + 1.0 * (cond - uncond), rtol=1e-4, atol=1e-5)
    assert calls == [2]  # one forward on the batch of 2, not on the doubled batch


def test_sd3_lora_loads_with_stable_diffusion3_pipeline(sd3_policy, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    cfg, _ = sd3_policy
    policy = DiffusionPolicy(cfg.model)
    _perturb_lora(policy)
    save_lora(policy.unet, tmp_path / "lora")
    pipe = StableDiffusion3Pipeline.from_pretrained(resolve_pretrained("tiny-sd3"))
    base_out = _sd3_forward(policy, pipe.transformer)
    pipe.load_lora_weights(tmp_path / "lora")
    x_out = _sd3_forward(policy, pipe.transformer)
    ours = _sd3_forward(policy, policy.unet)
    torch.testing.assert_close(x_out, ours, rtol=1e-5, atol=1e-6)
    assert (base_out - ours).abs().max() > 1e-3  # the adapter changes the output


def _sd3_forward(policy, transformer):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    embeds = policy.encode_prompts(["a cat", "a dog"], 32)
    with torch.no_grad():
        return policy.family.forward(transformer, x, torch.tensor([500.0, 800.0]), embeds)


@pytest.mark.parametrize(
    "variant",
    [
        {"train": {"algorithm": "grpo", "kl_beta": 0.04}, "sample": {"images_per_prompt": 2}},
        {
            "train": {"algorithm": "ddpo_is"},
            "sample": {"window_size": 2, "window_start": 1, "guidance_scale": 1.0},
        },
        {"train": {"algorithm": "p3o"}, "sample": {"images_per_prompt": 2}},
    ],
    ids=["grpo-kl", "window-cfgfree", "p3o"],
)
def test_sd3_training_runs(tmp_path, variant):
    from diffusers import StableDiffusion3Pipeline

    cfg = family_config(tmp_path, "tiny-sd3", **variant)
    trainer = Trainer(cfg)
    history = trainer.run()
    assert len(history) == 2
    for m in history:
        assert all(np.isfinite(v) for v in m.values() if isinstance(v, float))
    assert history[0]["first_ratio"] == 1.0  # on-policy: sampled and recomputed log-probs agree
    # Every adapter moved from zero but the last block's text queries (that block's text output is
    # discarded: context_pre_only, so add_q_proj gets no gradient there).
    lora_b = {k: v for k, v in trainer.policy.trainable_state_dict().items() if "lora_B" in k}
    unmoved = [k for k, v in lora_b.items() if v.abs().max() == 0]
    assert len(lora_b) == 15 and unmoved == ["transformer_blocks.1.attn.add_q_proj.lora_B.weight"]
    if cfg.train.kl_beta > 0:
        assert history[1]["kl_ref"] > 0
    # The run's LoRA loads into the diffusers pipeline.
    lora = sorted((trainer.run_folder.checkpoints_dir).glob("epoch_*/lora"))[-1]
    pipe = StableDiffusion3Pipeline.from_pretrained(resolve_pretrained("tiny-sd3"))
    pipe.load_lora_weights(lora)
    assert _sd3_forward(trainer.policy, pipe.transformer).allclose(
        _sd3_forward(trainer.policy, trainer.policy.unet), rtol=1e-5, atol=1e-6
    )


def test_sd3_zero_noise_level_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"sample\.noise_level"):
        family_config(tmp_path, "tiny-sd3", sample={"noise_level": 0.0})


# -- SDXL ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sdxl_policy(tmp_path_factory):
    cfg = family_config(tmp_path_factory.mktemp("sdxl"), "tiny-sdxl")
    return cfg, DiffusionPolicy(cfg.model)


def test_sdxl_sampler_equals_pipeline(sdxl_policy):
    cfg, policy = sdxl_policy
    sample = cfg.sample.model_copy(update={"guidance_scale": 3.0, "eta": 0.7, "negative_prompt": "a dog"})
    prompts, seeds = ["a cat", "an ant riding a bike", "a cow"], [11, 12, 13]
    ours = sample_trajectories(policy, prompts, sample, seeds)
    assert torch.isfinite(ours.log_probs).all()
    generators = sample_generators(seeds)
    shape = policy.latent_shape(3, sample)
    latents = torch.stack([torch.randn(shape[1:], generator=g) for g in generators])
    out = policy.pipeline(
        prompts,
        negative_prompt=[sample.negative_prompt] * 3,
        num_inference_steps=sample.num_steps,
        guidance_scale=sample.guidance_scale,
        eta=sample.eta,
        latents=latents,
        generator=generators,
        height=sample.resolution,
        width=sample.resolution,
        output_type="np",
    )
    theirs = (out.images * 255).round().astype(np.uint8)
    assert ours.images.shape == theirs.shape == (3, 32, 32, 3)
    assert np.abs(ours.images.astype(int) - theirs.astype(int)).max() <= 1


def test_sdxl_lora_loads_with_sdxl_pipeline(sdxl_policy, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    cfg, _ = sdxl_policy
    policy = DiffusionPolicy(cfg.model)
    _perturb_lora(policy)
    save_lora(policy.unet, tmp_path / "lora")
    pipe = StableDiffusionXLPipeline.from_pretrained(resolve_pretrained("tiny-sdxl"), add_watermarker=False)

    def forward(unet):
        gen = torch.Generator().manual_seed(3)
        x = torch.randn(2, 4, 8, 8, generator=gen)
        with torch.no_grad():
            return policy.family.forward(
                unet, x, torch.tensor([500, 800]), policy.encode_prompts(["a cat", "a"], 32)
            )

    base = forward(pipe.unet)
    pipe.load_lora_weights(tmp_path / "lora")
    torch.testing.assert_close(forward(pipe.unet), forward(policy.unet), rtol=1e-5, atol=1e-6)
    assert (base - forward(policy.unet)).abs().max() > 1e-3


def test_sdxl_training_run(tmp_path):
    trainer = Trainer(family_config(tmp_path, "tiny-sdxl", train={"kl_beta": 0.04}))
    history = trainer.run()
    assert history[0]["first_ratio"] == 1.0 and history[1]["kl_ref"] > 0


def test_lora_rank_mismatch_on_resume_names_the_field(tmp_path):
    first = Trainer(family_config(tmp_path / "a", "tiny-sd3", run={"num_epochs": 1}))
    first.run()
    resumed = family_config(
        tmp_path / "b", "tiny-sd3", model={"lora_rank": 4}, run={"resume": str(first.run_folder.path)}
    )
    with pytest.raises(ValueError, match=r"model.lora_rank is 4 but the checkpoint's LoRA has rank 8"):
        Trainer(resumed)
