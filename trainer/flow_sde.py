"""The flow-matching SDE step with its exact Gaussian log-probability (SD3 / SD3.5 family).

A rectified-flow model predicts a velocity v at noise level sigma s (s = 1: pure noise, s = 0:
data); diffusers' ``FlowMatchEulerDiscreteScheduler`` integrates the ODE with Euler steps
x_next = x + (s_next - s) v. For RL the step is made stochastic (the reverse SDE with the same
marginals, Flow-GRPO), with noise level a:
    dt      = s_next - s                                  (< 0)
    std_s   = a * sqrt(s / (1 - s))                       (at s = 1: 1 - [largest sigma below 1])
    mean    = x (1 + std_s^2 / (2 s) dt) + v (1 + std_s^2 (1 - s) / (2 s)) dt
    std     = std_s * sqrt(-dt)
    x_next  = mean + std z,   log p = mean over non-batch dims of the Gaussian log-density.
a = 0 is the deterministic Euler step (``flow_step_deterministic``, equal to the scheduler's own
step); it has no density, so asking for a log-prob at a = 0 is refused. All math is fp32 whatever
the model dtype (bf16 log-densities overflow).
"""

from __future__ import annotations

import torch

from trainer.ddim import _per_sample, gaussian_step, per_sample_timesteps


def step_sigmas(
    scheduler, timestep: float | torch.Tensor, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigma, sigma_next) of the step that starts at ``timestep``, shape (batch,), fp32 on the CPU.

    ``timestep`` is an entry of ``scheduler.timesteps`` (or a per-sample tensor of them); the
    step's index is found by value, so the schedule must be the one the sample was drawn with.
    """
    if scheduler.num_inference_steps is None or getattr(scheduler, "sigmas", None) is None:
        raise ValueError("call scheduler.set_timesteps(num_steps) before stepping")
    t = per_sample_timesteps(timestep, batch_size, torch.float32)
    schedule = scheduler.timesteps.detach().to("cpu", torch.float32)
    distance = (t.unsqueeze(1) - schedule.unsqueeze(0)).abs()
    gap, index = distance.min(dim=1)
    if bool((gap > 1e-3 * max(1.0, float(schedule.abs().max()))).any()):
        bad = t[gap.argmax()].item()
        raise ValueError(
            f"timestep {bad} is not in the scheduler's timesteps {schedule.tolist()}: "
            "set_timesteps with the number of steps the samples were drawn with"
        )
    sigmas = scheduler.sigmas.detach().to("cpu", torch.float32)
    return sigmas[index], sigmas[index + 1]


def _largest_sigma_below_one(scheduler) -> torch.Tensor:
    sigmas = scheduler.sigmas.detach().to("cpu", torch.float32)
    below = sigmas[sigmas < 1]
    return below.max()


def flow_step_deterministic(
    scheduler, model_output: torch.Tensor, timestep: float | torch.Tensor, sample: torch.Tensor
) -> torch.Tensor:
    """The Euler step x + (s_next - s) v (noise level 0): the scheduler's own ``step``, in fp32."""
    sigma, sigma_next = step_sigmas(scheduler, timestep, sample.shape[0])
    x = sample.to(torch.float32)
    dt = _per_sample((sigma_next - sigma).to(x.device), x.ndim)
    return (x + dt * model_output.to(torch.float32)).to(sample.dtype)


def flow_transition(
    scheduler,
    model_output: torch.Tensor,
    timestep: float | torch.Tensor,
    sample: torch.Tensor,
    noise_level: float = 0.7,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Gaussian of one SDE step, in fp32: (mean like ``sample``, std broadcastable, one per sample)."""
    if noise_level <= 0:
        raise ValueError(
            f"sample.noise_level must be > 0 for a log-probability (got {noise_level}): at noise level 0 "
            "the flow-matching step is the deterministic Euler step"
        )
    sigma, sigma_next = step_sigmas(scheduler, timestep, sample.shape[0])
    below_one = _largest_sigma_below_one(scheduler)
    denominator = 1 - torch.where(sigma >= 1, below_one, sigma)
    std_s = noise_level * torch.sqrt(sigma / denominator)
    dt = sigma_next - sigma
    x = sample.to(torch.float32)
    v = model_output.to(torch.float32)
    device, ndim = x.device, x.ndim
    x_coef = _per_sample((1 + std_s**2 / (2 * sigma) * dt).to(device), ndim)
    v_coef = _per_sample(((1 + std_s**2 * (1 - sigma) / (2 * sigma)) * dt).to(device), ndim)
    mean = x * x_coef + v * v_coef
    std = _per_sample((std_s * torch.sqrt(-dt)).to(device), ndim)
    return mean, std


def sde_step_with_logprob(
    scheduler,
    model_output: torch.Tensor,
    timestep: float | torch.Tensor,
    sample: torch.Tensor,
    noise_level: float = 0.7,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One SDE step s -> s_next; returns (prev_sample, log_prob of it), log_prob shape (batch,).

    The twin of ``trainer.ddim.ddim_step_with_logprob``: with ``prev_sample`` given (training) its
    log-prob under this step is returned, otherwise one is drawn with ``generator`` (one, or one
    per sample). ``noise_level`` 0 samples the deterministic Euler step and returns a log-prob of
    NaN (a point mass has no density); training at noise level 0 is refused.
    """
    if noise_level <= 0:
        if prev_sample is not None:
            flow_transition(scheduler, model_output, timestep, sample, noise_level)  # raises
        prev = flow_step_deterministic(scheduler, model_output, timestep, sample)
        return prev, torch.full((sample.shape[0],), float("nan"), device=sample.device)
    mean, std = flow_transition(scheduler, model_output, timestep, sample, noise_level)
    return gaussian_step(mean, std, sample.dtype, prev_sample, generator)
