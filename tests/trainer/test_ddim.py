"""ddim_step_with_logprob against independent computations: diffusers' own DDIM step for the mean
and torch.distributions.Normal for the density."""

import math

import pytest
import torch
from diffusers import DDIMScheduler

from trainer.ddim import ddim_step_with_logprob


def make_scheduler(prediction_type="epsilon", steps=10, clip_sample=False):
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=clip_sample,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    scheduler.set_timesteps(steps)
    return scheduler


def reference_logprob(scheduler, model_output, t, sample, prev_sample, eta):
    """Mean from diffusers' DDIMScheduler.step with zero noise; std from its variance; Normal density."""
    t = int(t)
    prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    std = eta * math.sqrt(float(scheduler._get_variance(t, prev_t)))
    out = scheduler.step(
        model_output, t, sample, eta=eta, variance_noise=torch.zeros_like(sample), return_dict=True
    )
    mean = out.prev_sample.double()
    dist = torch.distributions.Normal(mean, std)
    return dist.log_prob(prev_sample.double()).mean(dim=(1, 2, 3)), mean, std


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("step_index", [0, 4, 9])  # first, middle, last step (t' < 0 uses final alpha)
@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_logprob_matches_normal_density(prediction_type, step_index, eta):
    torch.manual_seed(step_index)
    scheduler = make_scheduler(prediction_type)
    t = scheduler.timesteps[step_index]
    sample = torch.randn(3, 4, 8, 8)
    model_output = torch.randn(3, 4, 8, 8)
    prev = torch.randn(3, 4, 8, 8)
    _, log_prob = ddim_step_with_logprob(scheduler, model_output, t, sample, eta=eta, prev_sample=prev)
    expected, _, _ = reference_logprob(scheduler, model_output, t, sample, prev, eta)
    assert log_prob.shape == (3,)
    torch.testing.assert_close(log_prob.double(), expected, rtol=1e-4, atol=1e-4)


def test_sampled_step_has_the_scheduler_mean_and_std():
    torch.manual_seed(0)
    scheduler = make_scheduler()
    t = scheduler.timesteps[3]
    sample, eps = torch.randn(512, 4, 8, 8), torch.randn(512, 4, 8, 8)
    prev, _ = ddim_step_with_logprob(
        scheduler, eps, t, sample, eta=1.0, generator=torch.Generator().manual_seed(1)
    )
    _, mean, std = reference_logprob(scheduler, eps, t, sample, prev, 1.0)
    residual = (prev.double() - mean) / std
    assert abs(residual.mean().item()) < 0.01
    assert abs(residual.std().item() - 1.0) < 0.01


def test_prev_sample_reproduces_recorded_logprob():
    scheduler = make_scheduler()
    sample, eps = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    gens = [torch.Generator().manual_seed(i) for i in range(4)]
    for t in scheduler.timesteps:
        prev, logp_sampled = ddim_step_with_logprob(scheduler, eps, t, sample, eta=1.0, generator=gens)
        _, logp_again = ddim_step_with_logprob(scheduler, eps, t, sample, eta=1.0, prev_sample=prev)
        assert torch.equal(logp_sampled, logp_again)


def test_per_sample_timesteps_equal_scalar_steps():
    scheduler = make_scheduler()
    ts = scheduler.timesteps[[0, 5, 9]]
    sample, eps, prev = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    _, batched = ddim_step_with_logprob(scheduler, eps, ts, sample, eta=1.0, prev_sample=prev)
    for i, t in enumerate(ts):
        _, single = ddim_step_with_logprob(
            scheduler, eps[i : i + 1], int(t), sample[i : i + 1], eta=1.0, prev_sample=prev[i : i + 1]
        )
        torch.testing.assert_close(batched[i : i + 1], single)


def test_per_sample_noise_streams_do_not_depend_on_batch():
    scheduler = make_scheduler()
    t = scheduler.timesteps[2]
    sample, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    both, _ = ddim_step_with_logprob(
        scheduler,
        eps,
        t,
        sample,
        generator=[torch.Generator().manual_seed(7), torch.Generator().manual_seed(8)],
    )
    second, _ = ddim_step_with_logprob(
        scheduler, eps[1:], t, sample[1:], generator=[torch.Generator().manual_seed(8)]
    )
    assert torch.equal(both[1:], second)


def test_eta_zero_is_refused():
    scheduler = make_scheduler()
    x = torch.randn(1, 4, 8, 8)
    with pytest.raises(ValueError, match="eta must be > 0"):
        ddim_step_with_logprob(scheduler, x, scheduler.timesteps[0], x, eta=0.0)


def test_zero_variance_last_step_is_refused():
    scheduler = DDIMScheduler(set_alpha_to_one=True)
    scheduler.set_timesteps(10)
    x = torch.randn(1, 4, 8, 8)
    with pytest.raises(ValueError, match="zero variance"):
        ddim_step_with_logprob(scheduler, x, scheduler.timesteps[-1], x, eta=1.0)


def test_clip_sample_matches_scheduler():
    scheduler = make_scheduler(clip_sample=True)
    t = scheduler.timesteps[1]
    sample, eps, prev = 3 * torch.randn(2, 4, 8, 8), 3 * torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    _, log_prob = ddim_step_with_logprob(scheduler, eps, t, sample, eta=1.0, prev_sample=prev)
    expected, _, _ = reference_logprob(scheduler, eps, t, sample, prev, 1.0)
    torch.testing.assert_close(log_prob.double(), expected, rtol=1e-4, atol=1e-4)


def test_eta_above_one_is_refused_where_the_direction_term_is_imaginary():
    scheduler = make_scheduler(steps=50)
    x = torch.randn(1, 4, 8, 8)
    with pytest.raises(ValueError, match="too large"):
        for t in scheduler.timesteps:
            ddim_step_with_logprob(scheduler, x, t, x, eta=1.5)


def test_deterministic_step_is_diffusers_ddim_at_eta_zero():
    from trainer.ddim import ddim_step_deterministic

    scheduler = DDIMScheduler(num_train_timesteps=1000, set_alpha_to_one=False)
    scheduler.set_timesteps(10)
    gen = torch.Generator().manual_seed(0)
    for t in scheduler.timesteps[[0, 4, 9]]:
        sample, eps = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 4, 8, 8, generator=gen)
        ours = ddim_step_deterministic(scheduler, eps, t, sample)
        theirs = scheduler.step(eps, t, sample, eta=0.0).prev_sample
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
