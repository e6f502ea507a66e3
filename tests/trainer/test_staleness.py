"""Pipelined epochs (train.max_staleness 1): the next epoch samples while this one's rewards are
outstanding, stale samples train with decoupled PPO, and a resumed run repeats an uninterrupted one."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.checkpoint import TRAINING_STATE
from trainer.config import ConfigError, build_config
from trainer.losses import ppo_clip_loss
from trainer.train import Trainer


def _weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return trainer.policy.trainable_state_dict()


def test_decoupled_ppo_loss_by_hand():
    """Each sample's clipped term times its behaviour weight, ratios to the proximal policy."""
    adv = torch.tensor([1.0, -2.0, 0.5])
    new, prox = torch.tensor([0.02, 0.3, -0.1]), torch.tensor([0.0, 0.0, 0.0])
    w = torch.tensor([0.5, 2.0, 1.0])
    loss, _ = ppo_clip_loss(adv, new, prox, 0.1, 5.0, w)
    terms = []
    for a, r, wi in zip(adv.tolist(), np.exp((new - prox).numpy()).tolist(), w.tolist(), strict=True):
        terms.append(wi * max(-a * r, -a * min(max(r, 0.9), 1.1)))
    assert float(loss) == pytest.approx(float(np.mean(terms)), rel=1e-6)


@pytest.mark.parametrize("algorithm", ["ddpo_sf", "p3o"])
def test_staleness_is_refused_where_undefined(algorithm):
    with pytest.raises(ConfigError, match=r"train\.max_staleness must be 0 for " + algorithm):
        build_config(
            "tiny",
            {
                "train": {"algorithm": algorithm, "max_staleness": 1, "gradient_accumulation_steps": 4},
                "sample": {"images_per_prompt": 2},
            },
        )


def interrupted_run(make_tiny_config, tmp_path, num_epochs: int):
    """A pipelined (staleness 1) run saved after epoch 2 -> (cfg, the run, its history, the epoch-2
    checkpoint in a copy of its run folder: what a run interrupted there leaves)."""
    cfg = make_tiny_config(
        train={"max_staleness": 1},
        run={"num_epochs": num_epochs, "save_every": 2, "eval_before_training": False, "eval_every": 100},
    )
    full = Trainer(cfg)
    history = full.run()
    copy = tmp_path / "copy"
    shutil.copytree(full.run_folder.path, copy)
    return cfg, full, history, copy / "checkpoints" / "epoch_0002"


def resumed_from(cfg, checkpoint: Path) -> Trainer:
    return Trainer(cfg.model_copy(update={"run": cfg.run.model_copy(update={"resume": str(checkpoint)})}))


def test_pipelined_run_logs_staleness_and_resumes_exactly(make_tiny_config, tmp_path):
    cfg, full, history, checkpoint = interrupted_run(make_tiny_config, tmp_path, num_epochs=4)
    assert [m["staleness"] for m in history] == [0, 1, 1, 1]
    # The stale epochs trained on decoupled PPO: the first ratio is no longer exactly 1 there.
    assert history[0]["first_ratio"] == 1.0

    # Interrupted after epoch 2 (its checkpoint holds epoch 2's samples, drawn before update 1),
    # resumed: the same weights as the uninterrupted run.
    resumed = resumed_from(cfg, checkpoint)
    assert resumed._pending is not None and resumed._pending.epoch == 2
    resumed.run()
    final, again = _weights(full), _weights(resumed)
    assert all(torch.equal(final[k], again[k]) for k in final)


def test_without_the_pending_samples_resume_differs(make_tiny_config, tmp_path):
    """The check above can fail: dropping the checkpoint's pending epoch changes the result."""
    cfg, full, _, checkpoint = interrupted_run(make_tiny_config, tmp_path, num_epochs=3)
    resumed = resumed_from(cfg, checkpoint)
    resumed._pending = None  # sample epoch 2 afresh, with the updated policy
    resumed.run()
    final, again = _weights(full), _weights(resumed)
    assert any(not torch.equal(final[k], again[k]) for k in final)


def test_a_pending_epoch_saved_without_final_latents_is_sampled_again(make_tiny_config, tmp_path, caplog):
    """Checkpoints written before trajectories kept x_0 resume (with a warning), not crash."""
    cfg, _, _, checkpoint = interrupted_run(make_tiny_config, tmp_path, num_epochs=3)
    state = torch.load(checkpoint / TRAINING_STATE, weights_only=False)
    del state["pending"]["samples"]["final_latents"]
    torch.save(state, checkpoint / TRAINING_STATE)
    with caplog.at_level("WARNING", logger="trainer.train"):
        resumed = resumed_from(cfg, checkpoint)
    assert resumed._pending is None and "predates final_latents" in caplog.text
    assert [m["epoch"] for m in resumed.run()] == [2]


def test_stale_samples_train_against_the_policy_at_the_start_of_their_update(make_tiny_config):
    """The proximal log-probs (computed while the rewards are outstanding) are those of the policy
    the update starts from, computed here independently at the update's start: not the sampling
    policy's, and not a policy of an update earlier."""
    cfg = make_tiny_config(
        train={"max_staleness": 1},
        run={"num_epochs": 3, "eval_before_training": False, "eval_every": 100, "save_every": 100},
    )
    trainer = Trainer(cfg)
    seen = []
    original_update = trainer.update

    def update(epoch, samples, advantages, **kwargs):
        proximal = kwargs.get("proximal_log_probs")
        if proximal is not None:
            seen.append((proximal.clone(), samples.log_probs.clone(), _log_probs_by_hand(trainer, samples)))
        return original_update(epoch, samples, advantages, **kwargs)

    trainer.update = update
    history = trainer.run()
    assert [m["staleness"] for m in history] == [0, 1, 1]
    assert len(seen) == 2
    for proximal, behaviour, by_hand in seen:
        torch.testing.assert_close(proximal, by_hand, rtol=0, atol=1e-5)
        assert (proximal - behaviour).abs().max() > 1e-4  # the policy did move since sampling
    # Ratios to the proximal policy start at 1 (up to batch-composition rounding).
    assert history[1]["first_ratio"] == pytest.approx(1.0, abs=1e-5)


def _log_probs_by_hand(trainer: Trainer, samples) -> torch.Tensor:
    """log N(x_t' ; mean, std^2) of every recorded step under the current policy, summed per
    dimension in float64 from the DDIM transition's mean and std (the trainer's log-prob is the mean
    over dimensions)."""
    policy, s = trainer.policy, trainer.cfg.sample
    policy.scheduler.set_timesteps(s.num_steps)
    out = torch.empty(samples.log_probs.shape, dtype=torch.float64)
    with torch.no_grad():
        for j in range(samples.timesteps.shape[1]):
            x_t, t_j = samples.latents[:, j], samples.timesteps[:, j]
            pred = policy.model_pred(
                x_t, t_j, samples.prompt_embeds, samples.negative_embeds, s.guidance_scale
            )
            mean, std = policy.family.transition(policy.scheduler, pred, t_j, x_t, s)
            mean, std, x = mean.double(), std.double().expand_as(mean), samples.next_latents[:, j].double()
            log_density = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * np.log(2 * np.pi)
            out[:, j] = log_density.flatten(1).mean(1)
    return out.float()
