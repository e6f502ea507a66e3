"""The flow-matching SDE step against an independent float64 computation, and a = 0 against diffusers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from trainer.config import ConfigError, build_config
from trainer.flow_sde import flow_step_deterministic, sde_step_with_logprob, step_sigmas

SHAPE = (3, 4, 6, 6)


def _scheduler(steps: int = 10, shift: float = 3.0) -> FlowMatchEulerDiscreteScheduler:
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    scheduler.set_timesteps(steps)
    return scheduler


def _reference(sigmas: np.ndarray, i: int, x: np.ndarray, v: np.ndarray, a: float):
    """The step written out in float64 from the schedule's sigmas alone: (mean, std)."""
    s, s_next = float(sigmas[i]), float(sigmas[i + 1])
    below_one = max(float(v_) for v_ in sigmas if v_ < 1)
    std_s = a * math.sqrt(s / (1 - (below_one if s >= 1 else s)))
    dt = s_next - s
    mean = x * (1 + std_s**2 / (2 * s) * dt) + v * (1 + std_s**2 * (1 - s) / (2 * s)) * dt
    return mean, std_s * math.sqrt(-dt)


def _logpdf(prev: np.ndarray, mean: np.ndarray, std: float) -> np.ndarray:
    d = -((prev - mean) ** 2) / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi)
    return d.reshape(d.shape[0], -1).mean(axis=1)


@pytest.mark.parametrize("a", [0.7, 0.3])
def test_every_step_matches_float64(a):
    scheduler = _scheduler()
    sigmas = scheduler.sigmas.double().numpy()
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0  # the first step starts at sigma = 1, the last ends at 0
    gen = torch.Generator().manual_seed(0)
    for i, t in enumerate(scheduler.timesteps):
        x = torch.randn(SHAPE, generator=gen)
        v = torch.randn(SHAPE, generator=gen)
        mean64, std64 = _reference(sigmas, i, x.double().numpy(), v.double().numpy(), a)
        # Sampling: the draw is mean + std z with z from the generator.
        z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(100 + i))
        prev, logp = sde_step_with_logprob(
            scheduler, v, t, x, noise_level=a, generator=torch.Generator().manual_seed(100 + i)
        )
        np.testing.assert_allclose(
            prev.double().numpy(), mean64 + std64 * z.double().numpy(), rtol=1e-5, atol=1e-5
        )
        np.testing.assert_allclose(
            logp.double().numpy(), _logpdf(prev.double().numpy(), mean64, std64), atol=2e-4
        )
        # Training: the log-prob of a given next sample (here one far from the mean).
        other = torch.randn(SHAPE, generator=gen)
        _, logp_other = sde_step_with_logprob(scheduler, v, t, x, noise_level=a, prev_sample=other)
        expected = _logpdf(other.double().numpy(), mean64, std64)
        np.testing.assert_allclose(logp_other.double().numpy(), expected, rtol=1e-4, atol=1e-3)


def test_per_sample_timesteps_equal_one_at_a_time():
    scheduler = _scheduler(steps=6)
    ts = scheduler.timesteps[[0, 3, 5]]  # sigma = 1, a middle step, the last step
    x, v, nxt = torch.randn(SHAPE), torch.randn(SHAPE), torch.randn(SHAPE)
    _, together = sde_step_with_logprob(scheduler, v, ts, x, prev_sample=nxt)
    for b in range(3):
        _, alone = sde_step_with_logprob(
            scheduler, v[b : b + 1], ts[b], x[b : b + 1], prev_sample=nxt[b : b + 1]
        )
        torch.testing.assert_close(together[b : b + 1], alone, rtol=0, atol=0)
    sigma, sigma_next = step_sigmas(scheduler, ts, 3)
    assert sigma[0] == 1 and sigma_next[2] == 0


def test_noise_level_zero_is_diffusers_euler_step():
    scheduler = _scheduler(steps=8)
    reference = _scheduler(steps=8)
    x = torch.randn(SHAPE)
    ours = theirs = x
    for t in scheduler.timesteps:
        v = torch.randn(SHAPE)
        ours_next, logp = sde_step_with_logprob(scheduler, v, t, ours, noise_level=0.0)
        assert torch.equal(ours_next, flow_step_deterministic(scheduler, v, t, ours))
        assert torch.isnan(logp).all()  # a point mass has no density
        theirs = reference.step(v, t, theirs, return_dict=False)[0]
        ours = ours_next
        assert torch.equal(ours, theirs)


def test_noise_level_zero_refused_for_training():
    scheduler = _scheduler()
    x = torch.randn(SHAPE)
    with pytest.raises(ValueError, match="noise_level"):
        sde_step_with_logprob(scheduler, x, scheduler.timesteps[0], x, noise_level=0.0, prev_sample=x)
    with pytest.raises(ConfigError, match=r"sample\.noise_level"):
        build_config("tiny", {"sample": {"noise_level": 0}})


def test_bf16_sample_log_prob_in_fp32_is_finite():
    scheduler = _scheduler()
    x = torch.randn(SHAPE).to(torch.bfloat16)
    v = torch.randn(SHAPE).to(torch.bfloat16)
    prev, logp = sde_step_with_logprob(scheduler, v, scheduler.timesteps[-1], x, generator=torch.Generator())
    assert prev.dtype == torch.bfloat16 and logp.dtype == torch.float32 and torch.isfinite(logp).all()
    _, again = sde_step_with_logprob(scheduler, v, scheduler.timesteps[-1], x, prev_sample=prev)
    torch.testing.assert_close(again, logp, rtol=0, atol=0)


def test_unknown_timestep_is_an_error():
    scheduler = _scheduler()
    x = torch.randn(SHAPE)
    with pytest.raises(ValueError, match="not in the scheduler's timesteps"):
        sde_step_with_logprob(scheduler, x, 123.456, x)
