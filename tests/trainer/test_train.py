"""The training loop on the tiny model: on-policy ratio, what changes, exact resume, LoRA export."""

import json
from concurrent.futures import Future

import numpy as np
import pytest
import torch

from trainer.checkpoint import find_checkpoint
from trainer.config import ConfigError
from trainer.reward_client import LocalRewardClient
from trainer.train import Trainer, derive_seed
from trainer.transports.errors import RewardUnavailableError


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_first_on_policy_ratio_is_exactly_one(make_tiny_config):
    # One sampling batch, train batch = sampling batch, no accumulation, fp32.
    cfg = make_tiny_config(
        sample={"num_batches_per_epoch": 1}, train={"batch_size": 4}, run={"num_epochs": 1, "save_every": 100}
    )
    trainer = Trainer(cfg)
    captured = {}
    original = trainer._pg_minibatch

    def spy(samples, idx, perm, adv_all, num_timesteps, infos, scale, boundary=True):
        out = original(samples, idx, perm, adv_all, num_timesteps, infos, scale, boundary)
        captured.setdefault("infos", list(infos))
        return out

    trainer._pg_minibatch = spy
    metrics = trainer.run()[0]
    assert metrics["first_ratio"] == 1.0
    # Every timestep of the first (pre-update) minibatch: new log-prob == old log-prob exactly.
    assert all(info.ratio_mean == 1.0 and info.approx_kl == 0.0 for info in captured["infos"])


@pytest.mark.parametrize("algorithm", ["ddpo_is", "ddpo_sf", "rwr"])
def test_training_changes_only_lora_parameters(make_tiny_config, algorithm):
    train = {"algorithm": algorithm, "clip_range": 0.1}
    if algorithm == "ddpo_sf":
        train["gradient_accumulation_steps"] = 2
    cfg = make_tiny_config(train=train, run={"num_epochs": 1, "save_every": 100})
    trainer = Trainer(cfg)
    policy = trainer.policy
    before = {
        name: _snapshot(m)
        for name, m in [("unet", policy.unet), ("vae", policy.vae), ("text", policy.text_encoder)]
    }
    metrics = trainer.run()[0]
    assert np.isfinite(metrics["loss"]) and metrics["optimizer_steps"] >= 1

    changed_lora, changed_base = [], []
    for key, value in policy.unet.state_dict().items():
        if not torch.equal(value, before["unet"][key]):
            (changed_lora if "lora_" in key else changed_base).append(key)
    assert changed_base == []
    assert len(changed_lora) > 0
    for name, module in [("vae", policy.vae), ("text", policy.text_encoder)]:
        assert all(torch.equal(v, before[name][k]) for k, v in module.state_dict().items())
    assert all(p.dtype == torch.float32 for p in policy.trainable_parameters())


def test_resume_equals_uninterrupted_run(make_tiny_config, tmp_path):
    common = {"train": {"clip_range": 0.05}, "sample": {"num_batches_per_epoch": 2}}
    straight = Trainer(
        make_tiny_config(**common, run={"num_epochs": 4, "name": "straight", "save_every": 100})
    )
    straight_history = straight.run()

    first = Trainer(make_tiny_config(**common, run={"num_epochs": 2, "name": "split", "save_every": 2}))
    first.run()
    run_dir = first.run_folder.path
    assert find_checkpoint(run_dir).name == "epoch_0002"
    resumed = Trainer(
        make_tiny_config(**common, run={"num_epochs": 4, "name": "split", "resume": str(run_dir)})
    )
    assert resumed.next_epoch == 2 and resumed.run_folder.path == run_dir
    resumed_history = resumed.run()

    assert [m["epoch"] for m in resumed_history] == [2, 3]
    for a, b in zip(straight_history[2:], resumed_history, strict=True):
        assert a["loss"] == b["loss"]
        assert a["reward_mean"] == b["reward_mean"]
        assert a["global_step"] == b["global_step"]
    state_a, state_b = straight.policy.trainable_state_dict(), resumed.policy.trainable_state_dict()
    assert state_a.keys() == state_b.keys()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    # The run folder's metrics hold each epoch once (-1: the base model's eval, before training).
    epochs = [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [-1, 0, 1, 2, 3]


def test_saved_lora_loads_in_diffusers_and_changes_output(make_tiny_config):
    from diffusers import StableDiffusionPipeline

    from trainer.tiny import ensure_tiny_model

    # alpha != rank: the adapter's scale must survive the round trip too.
    cfg = make_tiny_config(
        model={"lora_alpha": 8},
        train={"learning_rate": 3e-2, "clip_range": 0.5},
        run={"num_epochs": 1, "save_every": 1},
    )
    trainer = Trainer(cfg)
    trainer.run()
    lora_dir = find_checkpoint(trainer.run_folder.path) / "lora"
    assert (lora_dir / "pytorch_lora_weights.safetensors").exists()

    pipe = StableDiffusionPipeline.from_pretrained(ensure_tiny_model(), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500])
    embeds = trainer.policy.encode_prompts(["a cat"])
    with torch.no_grad():
        base = pipe.unet(latents, t, encoder_hidden_states=embeds).sample
        pipe.load_lora_weights(lora_dir)
        loaded = pipe.unet(latents, t, encoder_hidden_states=embeds).sample
        trained = trainer.policy.unet(latents, t, encoder_hidden_states=embeds).sample
    assert not torch.allclose(base, loaded)
    torch.testing.assert_close(loaded, trained, rtol=1e-5, atol=1e-5)


def test_run_folder_contents(make_tiny_config):
    trainer = Trainer(make_tiny_config(run={"num_epochs": 2, "save_every": 2}))
    history = trainer.run()
    folder = trainer.run_folder.path
    for name in [
        "config.json",
        "metrics.jsonl",
        "reward_curve.png",
        "samples/epoch_0000.png",
        "samples/epoch_0001.jsonl",
    ]:
        assert (folder / name).exists(), name
    keys = {
        "reward_mean",
        "reward_std",
        "reward_min",
        "reward_max",
        "loss",
        "approx_kl",
        "clipfrac",
        "lr",
        "samples_per_s",
        "time_sampling_s",
        "time_reward_wait_s",
        "time_training_s",
        "eval_reward_mean",
    }
    assert keys <= history[0].keys()
    rows = [json.loads(x) for x in (folder / "samples/epoch_0001.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and {"prompt", "reward", "advantage", "details"} <= rows[0].keys()
    assert rows[0]["details"]["jpeg_kb"] == pytest.approx(-rows[0]["reward"])


@pytest.mark.slow
def test_tiny_preset_raises_jpeg_compressibility(tmp_path):
    """The default run's claim: a seeded tiny run makes images more compressible over its epochs."""
    from trainer.config import build_config

    cfg = build_config(
        "tiny",
        {"run": {"output_dir": str(tmp_path), "progress": False, "num_epochs": 12, "eval_every": 100,
                 "save_every": 100}},
    )  # fmt: skip
    history = Trainer(cfg).run()
    rewards = [m["reward_mean"] for m in history]
    first, last = np.mean(rewards[:3]), np.mean(rewards[-3:])
    # Observed here: about +0.09 kB-1 (-4.235 -> -4.146); the reward's batch std is about 0.03.
    assert last - first > 0.03, rewards


class _FailingSecondBatch(LocalRewardClient):
    """The in-process scorer, except that the 2nd request of every 3 fails as a remote one would."""

    def __init__(self):
        super().__init__("jpeg_compressibility")
        self.calls = 0

    def submit(self, images, prompts, metadata=None, request_id=None):
        self.calls += 1
        if self.calls % 3 == 2:
            failed: Future = Future()
            failed.set_exception(RewardUnavailableError("reward server unreachable (test)"))
            return failed
        return super().submit(images, prompts, metadata, request_id)


def test_dropped_batch_still_steps_on_the_remaining_samples(make_tiny_config):
    # 3 batches of 4 -> 3 minibatches, one optimizer step per epoch (ddpo_sf); one batch dropped
    # leaves 2 minibatches: a short accumulation group that must still make its step.
    cfg = make_tiny_config(
        sample={"num_batches_per_epoch": 3},
        train={"algorithm": "ddpo_sf", "gradient_accumulation_steps": 3},
        reward={"on_failure": "drop"},
        run={"num_epochs": 1, "eval_every": 100, "save_every": 100},
    )
    client = _FailingSecondBatch()
    metrics = Trainer(cfg, reward_client=client).run()[0]
    client.close()
    assert metrics["num_dropped"] == 4 and metrics["num_samples"] == 8
    assert metrics["optimizer_steps"] == 1


def test_images_per_prompt_makes_groups_and_k1_keeps_the_plan(make_tiny_config):
    from trainer.train import zero_std_ratio

    single = Trainer(make_tiny_config())
    grouped = Trainer(make_tiny_config(sample={"images_per_prompt": 2}))
    prompts, seeds = grouped.epoch_batch_plan(epoch=0, batch=0)
    assert prompts[0] == prompts[1] and prompts[2] == prompts[3] and len(set(seeds)) == 4
    # K = 1 draws exactly the plan of a run without groups (the same prompts as before the option).
    rng = np.random.default_rng(derive_seed(single.cfg.run.seed, 0, 0, 0))
    expected = [single.prompts[i] for i in rng.integers(0, len(single.prompts), 4)]
    assert single.epoch_batch_plan(epoch=0, batch=0)[0] == expected
    assert zero_std_ratio(["a", "a", "b", "b"], np.array([1.0, 1.0, 0.0, 2.0])) == 0.5


def test_images_per_prompt_must_divide_the_batch(make_tiny_config):
    with pytest.raises(ConfigError, match=r"sample.*images_per_prompt \(3\) must divide batch_size \(4\)"):
        make_tiny_config(sample={"images_per_prompt": 3})


@pytest.mark.parametrize("algorithm", ["ddpo_is", "ddpo_sf"])
def test_update_raises_the_log_prob_of_positive_advantages(make_tiny_config, algorithm):
    """The update's direction, checked on the samples themselves: after one step, the trajectory
    with a positive advantage is more likely and the one with a negative advantage less likely,
    by the log-probs recomputed independently of the update's own bookkeeping."""
    from trainer.ddim import ddim_step_with_logprob

    cfg = make_tiny_config(
        sample={"num_batches_per_epoch": 1},
        train={"algorithm": algorithm, "learning_rate": 1e-3},
        run={"eval_before_training": False},
    )
    trainer = Trainer(cfg)
    samples, futures = trainer.sample_epoch(0)
    [f.result() for f in futures]

    @torch.no_grad()
    def trajectory_log_probs() -> torch.Tensor:
        policy, s = trainer.policy, cfg.sample
        policy.scheduler.set_timesteps(s.num_steps)
        steps = []
        for j in range(samples.timesteps.shape[1]):
            eps = policy.predict_noise(
                samples.latents[:, j], samples.timesteps[:, j], samples.prompt_embeds,
                samples.negative_embeds, s.guidance_scale,
            )  # fmt: skip
            _, log_prob = ddim_step_with_logprob(
                policy.scheduler, eps, samples.timesteps[:, j], samples.latents[:, j], eta=s.eta,
                prev_sample=samples.next_latents[:, j],
            )  # fmt: skip
            steps.append(log_prob)
        return torch.stack(steps, 1).sum(1)

    before = trajectory_log_probs()
    advantages = np.zeros(len(samples))
    advantages[0], advantages[1] = 2.0, -2.0
    trainer.update(0, samples, advantages)
    delta = trajectory_log_probs() - before
    assert delta[0] > 0 > delta[1], delta
    assert delta[0] > delta[2:].max() and delta[1] < delta[2:].min(), delta
