"""The algorithms module: registry, GRPO's advantages, P3O's defining properties, KL to the reference.

Every expected value is computed independently (numpy by hand, diffusers' own DDIM step), never by
calling the code under test twice.
"""

import copy

import numpy as np
import pytest
import torch

from trainer.algorithms import (
    ALGORITHMS,
    P3O,
    RewardBatch,
    TrainedStep,
    group_pairs,
    group_relative_advantages,
    make_algorithm,
    minibatch_order,
)
from trainer.config import ConfigError, algorithms, build_config
from trainer.train import Trainer


def test_every_configurable_algorithm_is_registered():
    assert set(algorithms()) == set(ALGORITHMS)
    cfg = build_config("tiny").train.model_copy(update={"algorithm": "nope"})
    with pytest.raises(ValueError, match="valid: ddpo_is, ddpo_sf, grpo, p3o, rwr"):
        make_algorithm(cfg)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"train": {"algorithm": "grpo"}}, r"train\.algorithm grpo needs groups"),
        ({"train": {"algorithm": "p3o"}}, r"train\.algorithm p3o needs groups"),
        (
            {"train": {"algorithm": "p3o", "batch_size": 2}, "sample": {"images_per_prompt": 4}},
            r"train\.batch_size \(2\) must be a multiple of sample\.images_per_prompt",
        ),
        ({"train": {"kl_beta": -0.1}}, r"train\.kl_beta"),
        ({"train": {"algorithm": "rwr", "kl_beta": 0.1}}, r"train\.kl_beta applies to policy-gradient"),
        (
            {"train": {"algorithm": "rwr", "log_kl_ref": True}},
            r"train\.log_kl_ref applies to policy-gradient",
        ),
        ({"sample": {"images_per_prompt": 3}}, r"images_per_prompt \(3\) must divide batch_size"),
        (
            {"train": {"algorithm": "rwr"}, "model": {"family": "sd3"}},
            r"rwr is not supported for model\.family sd3",
        ),
    ],
)
def test_bad_algorithm_configs_name_the_field(overrides, match):
    with pytest.raises(ConfigError, match=match):
        build_config("tiny", overrides)


def test_group_relative_advantages_by_hand():
    rewards = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 5.0, 0.0, 10.0])
    groups = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    g0 = np.array([1.0, 2.0, 3.0, 4.0])
    expected = np.concatenate(
        [
            (g0 - 2.5) / (np.sqrt(np.mean((g0 - 2.5) ** 2)) + 1e-4),
            [0.0, 0.0],
            [-5 / (5 + 1e-4), 5 / (5 + 1e-4)],
        ]
    )
    np.testing.assert_allclose(group_relative_advantages(rewards, groups), expected, rtol=1e-12)
    global_std = np.sqrt(np.mean((rewards - rewards.mean()) ** 2))
    np.testing.assert_allclose(
        group_relative_advantages(rewards, groups, std="global")[:4], (g0 - 2.5) / (global_std + 1e-4)
    )


def test_grpo_skip_zero_advantage_leaves_them_out_of_the_mean():
    cfg = build_config(
        "tiny",
        {
            "train": {"algorithm": "grpo", "skip_zero_advantage": True, "clip_range": 0.2},
            "sample": {"images_per_prompt": 2},
        },
    )
    grpo = make_algorithm(cfg.train)
    log_prob = torch.tensor([0.1, -0.1, 0.3, 0.0], requires_grad=True)
    old = torch.zeros(4)
    adv = torch.tensor([1.0, -1.0, 0.0, 0.0])
    loss, _ = grpo.step_loss(TrainedStep(log_prob, old, adv, torch.tensor([0, 0, 1, 1])))
    ratio = np.exp([0.1, -0.1])
    by_hand = (max(-1 * ratio[0], -1 * min(ratio[0], 1.2)) + max(1 * ratio[1], 1 * max(ratio[1], 0.8))) / 2
    assert float(loss) == pytest.approx(by_hand, rel=1e-6)
    plain = make_algorithm(cfg.train.model_copy(update={"skip_zero_advantage": False}))
    diluted, _ = plain.step_loss(TrainedStep(log_prob, old, adv, torch.tensor([0, 0, 1, 1])))
    assert float(diluted) == pytest.approx(by_hand / 2, rel=1e-6)


def test_group_pairs_and_grouped_order():
    i, j = group_pairs(torch.tensor([3, 3, 3, 7, 7]))
    assert sorted(zip(i.tolist(), j.tolist(), strict=True)) == [(0, 1), (0, 2), (1, 2), (3, 4)]
    order = minibatch_order(np.repeat(np.arange(5), 4), True, torch.Generator().manual_seed(0))
    assert sorted(order.tolist()) == list(range(20))
    assert all(len(set((order[k : k + 4] // 4).tolist())) == 1 for k in range(0, 20, 4))


@pytest.mark.parametrize("clipping", ["separate", "joint"])
def test_p3o_loss_by_hand(clipping):
    """Joint: the pair's ratio is exp((logp_i - old_i) - (logp_j - old_j)); separate: PPO clip of i
    with +D and of j with -D, D = (r_i - r_j) / 2; computed here pair by pair in plain Python."""
    eps = 0.1
    cfg = build_config(
        "tiny",
        {
            "train": {"algorithm": "p3o", "p3o_clipping": clipping, "clip_range": eps},
            "sample": {"images_per_prompt": 2},
        },
    )
    p3o = make_algorithm(cfg.train)
    assert isinstance(p3o, P3O)
    logp = [0.05, -0.2, 0.3, 0.01, 0.0, 0.02]
    old = [0.0, 0.0, 0.1, 0.0, 0.0, 0.0]
    rewards = [0.9, 0.5, 0.2, 0.4, 0.7, 0.7]
    groups = [0, 0, 0, 1, 1, 2]  # pairs: (0,1), (0,2), (1,2), (3,4); 5 is alone
    step = TrainedStep(torch.tensor(logp), torch.tensor(old), torch.tensor(rewards), torch.tensor(groups))
    loss, _ = p3o.step_loss(step)

    def ppo(a, ratio):
        return max(-a * ratio, -a * min(max(ratio, 1 - eps), 1 + eps))

    terms = []
    for i, j in [(0, 1), (0, 2), (1, 2), (3, 4)]:
        d = (rewards[i] - rewards[j]) / 2
        if clipping == "joint":
            terms.append(ppo(d, np.exp((logp[i] - old[i]) - (logp[j] - old[j]))))
        else:
            terms.append((ppo(d, np.exp(logp[i] - old[i])) + ppo(-d, np.exp(logp[j] - old[j]))) / 2)
    assert float(loss) == pytest.approx(float(np.mean(terms)), rel=1e-5)


def _grouped_config(make_tiny_config, algorithm, **train):
    return make_tiny_config(
        sample={"num_batches_per_epoch": 1, "images_per_prompt": 2},
        train={"algorithm": algorithm, "learning_rate": 1e-3, **train},
        run={"eval_before_training": False},
    )


@pytest.mark.parametrize("clipping", ["separate", "joint"])
def test_p3o_update_ignores_per_prompt_constants(make_tiny_config, clipping):
    """P3O's defining property: adding any constant per prompt (group) to the rewards leaves the
    update bit-identical (dyadic rewards and constants keep the float arithmetic exact)."""
    cfg = _grouped_config(make_tiny_config, "p3o", p3o_clipping=clipping)
    trainer = Trainer(cfg)
    samples, futures = trainer.sample_epoch(0)
    [f.result() for f in futures]
    rewards = np.array([0.75, 0.25, 0.5, 0.625])
    shifted = rewards + np.array([3.0, 3.0, -1.5, -1.5])  # one constant per group of 2
    start = copy.deepcopy((trainer.policy.trainable_state_dict(), trainer.optimizer.state_dict()))
    trainer.update(0, samples, rewards)
    after_plain = trainer.policy.trainable_state_dict()
    trainer.policy.load_trainable_state_dict(start[0])
    trainer.optimizer.load_state_dict(start[1])
    trainer.update(0, samples, shifted)
    after_shifted = trainer.policy.trainable_state_dict()
    assert any(not torch.equal(after_plain[k], start[0][k]) for k in after_plain)
    assert all(torch.equal(after_plain[k], after_shifted[k]) for k in after_plain)
    # A shift that is not per prompt changes the update.
    trainer.policy.load_trainable_state_dict(start[0])
    trainer.optimizer.load_state_dict(start[1])
    trainer.update(0, samples, rewards + np.array([3.0, 0.0, 0.0, 0.0]))
    assert any(not torch.equal(after_plain[k], v) for k, v in trainer.policy.trainable_state_dict().items())


def _trajectory_log_probs(trainer, samples) -> torch.Tensor:
    """Sum over steps of log p(x_t' | x_t) under the current policy, via diffusers' DDIM step."""
    from trainer.ddim import ddim_step_with_logprob

    policy, s = trainer.policy, trainer.cfg.sample
    policy.scheduler.set_timesteps(s.num_steps)
    total = torch.zeros(len(samples))
    with torch.no_grad():
        for j in range(samples.timesteps.shape[1]):
            x_t, t_j = samples.latents[:, j], samples.timesteps[:, j]
            pred = policy.model_pred(
                x_t, t_j, samples.prompt_embeds, samples.negative_embeds, s.guidance_scale
            )
            _, lp = ddim_step_with_logprob(
                policy.scheduler, pred, samples.timesteps[:, j], samples.latents[:, j], s.eta,
                prev_sample=samples.next_latents[:, j],
            )  # fmt: skip
            total += lp
    return total


@pytest.mark.parametrize("algorithm", ["grpo", "p3o"])
def test_grouped_update_raises_the_better_sample_of_a_group(make_tiny_config, algorithm):
    """One step: in the group with rewards (1, 0) the first trajectory becomes more likely and the
    second less; fails with the loss's sign flipped or the gradient zeroed."""
    cfg = _grouped_config(make_tiny_config, algorithm)
    trainer = Trainer(cfg)
    samples, futures = trainer.sample_epoch(0)
    [f.result() for f in futures]
    before = _trajectory_log_probs(trainer, samples)
    rewards = np.array([1.0, 0.0, 0.5, 0.5])  # the second group carries no signal
    advantages = trainer.algorithm.advantages(RewardBatch(samples.prompts, rewards, np.arange(4) // 2, None))
    info = trainer.update(0, samples, advantages)
    delta = _trajectory_log_probs(trainer, samples) - before
    assert info["grad_norm"] > 0
    assert delta[0] > 0 > delta[1], delta


def _diffusers_step_mean_std(scheduler, model_output, t, sample, eta):
    """Mean and std of one DDIM step from diffusers' own code: prev_sample with zero variance
    noise is the mean; the std is eta * sqrt(scheduler._get_variance)."""
    t = int(t)
    prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    std = eta * scheduler._get_variance(t, prev_t) ** 0.5
    mean = scheduler.step(
        model_output, t, sample, eta=eta, variance_noise=torch.zeros_like(sample)
    ).prev_sample
    return mean, std


def test_kl_to_reference_is_zero_at_start_and_matches_an_independent_computation(make_tiny_config):
    cfg = make_tiny_config(
        sample={"num_batches_per_epoch": 1, "guidance_scale": 1.0},
        train={"kl_beta": 0.04},
        run={"eval_before_training": False},
    )
    trainer = Trainer(cfg)
    samples, futures = trainer.sample_epoch(0)
    [f.result() for f in futures]
    policy, s = trainer.policy, cfg.sample
    policy.scheduler.set_timesteps(s.num_steps)
    j = 1
    x_t, t_j = samples.latents[:, j], samples.timesteps[:, j]
    embeds, negative = samples.prompt_embeds, samples.negative_embeds
    with torch.no_grad():
        pred = policy.model_pred(x_t, t_j, embeds, negative, 1.0)
        assert float(trainer._kl_to_reference(pred, x_t, t_j, embeds, negative).abs().max()) == 0.0

        # Perturb the adapter: every lora_B gets random values.
        gen = torch.Generator().manual_seed(0)
        for name, param in policy.unet.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
        pred = policy.model_pred(x_t, t_j, embeds, negative, 1.0)
        ours = trainer._kl_to_reference(pred, x_t, t_j, embeds, negative)

        # Independently: the base model loaded afresh (no adapter) and diffusers' DDIM step.
        from diffusers import StableDiffusionPipeline

        base = StableDiffusionPipeline.from_pretrained(trainer.cfg.model.pretrained, safety_checker=None)
        ref_out = base.unet(x_t, t_j, encoder_hidden_states=embeds).sample
        lora_out = policy.unet(x_t, t_j, encoder_hidden_states=embeds).sample
        expected = []
        for b in range(len(x_t)):
            m_lora, std = _diffusers_step_mean_std(
                policy.scheduler, lora_out[b : b + 1], t_j[b], x_t[b : b + 1], s.eta
            )
            m_ref, _ = _diffusers_step_mean_std(
                policy.scheduler, ref_out[b : b + 1], t_j[b], x_t[b : b + 1], s.eta
            )
            expected.append(float(((m_lora - m_ref) ** 2).mean() / (2 * std**2)))
    assert min(expected) > 0
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-4)


def test_kl_ref_is_logged_and_zero_without_beta(make_tiny_config):
    for beta in (0.0, 0.5):
        cfg = make_tiny_config(train={"kl_beta": beta}, run={"num_epochs": 2, "eval_before_training": False})
        trainer = Trainer(cfg)
        history = trainer.run()
        assert all("kl_ref" in m for m in history)
        if beta == 0:
            assert all(m["kl_ref"] == 0.0 for m in history)
        else:  # epoch 0 starts at the reference (LoRA B = 0); after one update the policy has moved
            assert history[0]["kl_ref"] >= 0 and history[1]["kl_ref"] > 0


def test_log_kl_ref_measures_without_changing_the_update(make_tiny_config):
    """log_kl_ref: kl_ref measured with kl_beta 0 (it grows once the policy moves), weights bit-identical."""
    runs = {}
    for log_kl in (False, True):
        cfg = make_tiny_config(
            train={"log_kl_ref": log_kl}, run={"num_epochs": 2, "eval_before_training": False}
        )
        trainer = Trainer(cfg)
        runs[log_kl] = (trainer.run(), trainer.policy.trainable_state_dict())
    (plain, plain_weights), (logged, logged_weights) = runs[False], runs[True]
    assert all(m["kl_ref"] == 0.0 for m in plain)
    assert logged[0]["kl_ref"] >= 0 and logged[1]["kl_ref"] > 0  # the policy moved away from the base
    assert plain_weights.keys() == logged_weights.keys()
    for name, value in plain_weights.items():
        assert torch.equal(value, logged_weights[name]), name
