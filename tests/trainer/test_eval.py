"""Eval guards against over-optimization: the EMA of the trained weights, and eval-only rewards."""

import numpy as np
import torch

from trainer.checkpoint import find_checkpoint, load_training_state
from trainer.train import Trainer


def test_ema_follows_every_optimizer_step_and_eval_uses_it(make_tiny_config):
    decay = 0.6
    cfg = make_tiny_config(run={"eval_ema_decay": decay, "num_epochs": 2, "eval_before_training": False})
    trainer = Trainer(cfg)
    names = [n for n, _ in trainer._trained_parameters()]
    expected = {n: p.detach().clone() for n, p in trainer._trained_parameters()}
    steps = []
    step = trainer._optimizer_step

    def recording_step():
        norm = step()
        steps.append({n: p.detach().clone() for n, p in trainer._trained_parameters()})
        return norm

    trainer._optimizer_step = recording_step
    trainer.run()
    assert len(steps) >= 2
    for weights in steps:  # by hand: ema <- d * ema + (1 - d) * weights, after every step
        expected = {n: decay * expected[n] + (1 - decay) * weights[n] for n in names}
    for n in names:
        torch.testing.assert_close(trainer.ema[n], expected[n], rtol=1e-6, atol=1e-7)
    assert any(not torch.equal(trainer.ema[n], steps[-1][n]) for n in names)

    # The checkpoint carries it.
    saved = load_training_state(find_checkpoint(str(trainer.run_folder.path)))
    assert all(torch.equal(saved.ema[n], trainer.ema[n]) for n in names)

    # Eval samples with the EMA weights, and leaves the trained ones in place.
    current = {n: p.detach().clone() for n, p in trainer._trained_parameters()}
    prompts, seeds = trainer.eval_plan()
    from trainer.sampling import sample_trajectories

    with torch.no_grad():
        for n, p in trainer._trained_parameters():
            p.copy_(trainer.ema[n])
        by_hand = sample_trajectories(
            trainer.policy, prompts, cfg.sample, seeds, keep_trajectory=False
        ).images
        for n, p in trainer._trained_parameters():
            p.copy_(current[n])
        with trainer._eval_weights():
            swapped = sample_trajectories(
                trainer.policy, prompts, cfg.sample, seeds, keep_trajectory=False
            ).images
        plain = sample_trajectories(trainer.policy, prompts, cfg.sample, seeds, keep_trajectory=False).images
    assert np.array_equal(swapped, by_hand) and not np.array_equal(plain, by_hand)
    assert all(torch.equal(p, current[n]) for n, p in trainer._trained_parameters())


def test_eval_only_rewards_are_logged_and_never_trained_on(make_tiny_config):
    """jpeg_incompressibility scored beside the trained jpeg_compressibility: on the same eval images
    it is exactly minus the trained reward (an independent check of what was scored)."""
    cfg = make_tiny_config(
        reward={
            "name": "jpeg_compressibility",
            "transport": "local",
            "eval_components": [{"name": "jpeg_incompressibility"}],
        },
        run={"num_epochs": 1},
    )
    trainer = Trainer(cfg)
    history = trainer.run()
    metrics = trainer.run_folder.read_metrics()
    evals = [m for m in metrics if "eval_reward_mean" in m]
    assert evals and all(
        m["eval_jpeg_incompressibility_mean"] == -m["eval_reward_mean"]
        and m[
            "eval_heldout_jpeg_incompressibility_mean"
            if "eval_heldout_reward_mean" in m
            else "eval_reward_mean"
        ]
        is not None
        for m in evals
    )
    assert all("jpeg_incompressibility" not in str(m.get("reward_name")) for m in history)
