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


def test_eval_num_steps_samples_evals_with_their_own_step_count(make_tiny_config, monkeypatch):
    """run.eval_num_steps: evals denoise with that many steps (every step stochastic), training keeps
    its own schedule and window."""
    import trainer.train as train_module
    from trainer.sampling import sample_trajectories

    cfg = make_tiny_config(
        sample={"num_steps": 4, "window_size": 1, "window_start": 1},
        run={"eval_num_steps": 6, "num_epochs": 1, "eval_every": 1},
    )
    calls = []

    def spy(policy, prompts, sample_cfg, seeds, keep_trajectory=True, **kwargs):
        out = sample_trajectories(policy, prompts, sample_cfg, seeds, keep_trajectory, **kwargs)
        calls.append((sample_cfg.num_steps, sample_cfg.window_size, keep_trajectory, list(seeds), out))
        return out

    monkeypatch.setattr(train_module, "sample_trajectories", spy)
    trainer = Trainer(cfg)
    trainer.run()
    evals = [c for c in calls if not c[2]]
    trained = [c for c in calls if c[2]]
    assert evals and all(c[:2] == (6, 0) for c in evals)
    assert trained and all(c[:2] == (4, 1) for c in trained)
    assert all(c[4].timesteps.shape[1] == 1 for c in trained)  # the window's one step, recorded

    # The last eval's images are a 6-step chain at the eval seeds, not the 4-step one.
    prompts, seeds = trainer.eval_plan()
    last = next(c for c in reversed(evals) if c[3] == seeds)[4].images
    with torch.no_grad():
        six = cfg.sample.model_copy(update={"num_steps": 6, "window_size": 0, "window_start": 0})
        expected = sample_trajectories(trainer.policy, prompts, six, seeds, keep_trajectory=False).images
        four = sample_trajectories(trainer.policy, prompts, cfg.sample, seeds, keep_trajectory=False).images
    assert np.array_equal(last, expected) and not np.array_equal(last, four)
