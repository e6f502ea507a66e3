"""The one place for the DDIM step with its exact Gaussian log-probability.

DDPO treats each DDIM step with eta > 0 as a Gaussian policy
    x_{t'} ~ N(mean(x_t, eps_hat, t), (eta * sigma_t)^2 I),  t' = t - T / num_inference_steps,
and needs log p(x_{t'} | x_t) both while sampling (old policy) and while training (new policy):
    x0_hat  = (x_t - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t)      (epsilon prediction)
    sigma^2 = (1 - abar_t') / (1 - abar_t) * (1 - abar_t / abar_t')
    mean    = sqrt(abar_t') x0_hat + sqrt(1 - abar_t' - (eta sigma)^2) eps_hat
    log p   = mean over non-batch dims of -(x_t' - mean)^2 / (2 std^2) - log std - log sqrt(2 pi)
The math runs in fp32 whatever the model dtype, so sampling and training agree bit for bit.
"""

from __future__ import annotations

import math

import torch
from diffusers import DDIMScheduler
from diffusers.utils.torch_utils import randn_tensor

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def _per_sample(values: torch.Tensor, ndim: int) -> torch.Tensor:
    """(batch,) -> (batch, 1, 1, ...) to broadcast against a (batch, ...) sample."""
    return values.reshape(values.shape[0], *([1] * (ndim - 1)))


def per_sample_timesteps(timestep: float | torch.Tensor, batch_size: int, dtype: torch.dtype) -> torch.Tensor:
    """``timestep`` (one for the batch, or one per sample) as a (batch,) tensor of ``dtype`` on the CPU."""
    t = torch.as_tensor(timestep).detach().to("cpu", dtype).reshape(-1)
    if t.numel() == 1:
        t = t.expand(batch_size)
    elif t.numel() != batch_size:
        raise ValueError(f"timestep has {t.numel()} entries for a batch of {batch_size}")
    return t


def gaussian_step(
    mean: torch.Tensor,
    std: torch.Tensor,
    out_dtype: torch.dtype,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One draw from N(mean, std^2 I) in fp32 (or ``prev_sample``), rounded to ``out_dtype``, and the
    log-prob of exactly that rounded value (what is returned and stored), a mean over non-batch
    dims, shape (batch,). Every step's policy (DDIM here, the flow SDE in trainer/flow_sde.py)."""
    if prev_sample is None:
        noise = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=torch.float32)
        prev = mean + std * noise
    else:
        prev = prev_sample
    prev = prev.to(out_dtype).to(torch.float32)
    log_prob = -((prev.detach() - mean) ** 2) / (2 * std**2) - torch.log(std) - _LOG_SQRT_2PI
    return prev.to(out_dtype), log_prob.mean(dim=tuple(range(1, mean.ndim)))


def step_alphas(
    scheduler: DDIMScheduler, timestep: int | torch.Tensor, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """alphas_cumprod at t and at t' = t - T / num_inference_steps, shape (batch,).

    t' < 0 (the last step) uses the scheduler's final_alpha_cumprod.
    """
    if scheduler.num_inference_steps is None:
        raise ValueError("call scheduler.set_timesteps(num_steps) before stepping")
    t = per_sample_timesteps(timestep, batch_size, torch.long)
    prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    # On the CPU: diffusers' add_noise/get_velocity move scheduler.alphas_cumprod to the samples' device.
    alphas_cumprod = scheduler.alphas_cumprod.to("cpu", torch.float32)
    alpha_t = alphas_cumprod[t]
    final = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float32)
    alpha_prev = torch.where(prev_t >= 0, alphas_cumprod[prev_t.clamp(min=0)], final)
    return alpha_t, alpha_prev


def _x0_and_eps(
    scheduler: DDIMScheduler, model_output: torch.Tensor, x: torch.Tensor, alpha_t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The network's output -> (x0_hat, eps_hat) in fp32, by ``prediction_type`` (DDIM eq. 12 terms).

    x0 is clipped/thresholded as the scheduler does; eps stays as predicted.
    """
    model_output = model_output.to(torch.float32)
    alpha_t_b = _per_sample(alpha_t.to(x.device), x.ndim)
    beta_t_b = 1 - alpha_t_b
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        eps = model_output
        x0 = (x - beta_t_b.sqrt() * eps) / alpha_t_b.sqrt()
    elif prediction_type == "sample":
        x0 = model_output
        eps = (x - alpha_t_b.sqrt() * x0) / beta_t_b.sqrt()
    elif prediction_type == "v_prediction":
        x0 = alpha_t_b.sqrt() * x - beta_t_b.sqrt() * model_output
        eps = alpha_t_b.sqrt() * model_output + beta_t_b.sqrt() * x
    else:
        raise ValueError(f"unsupported prediction_type {prediction_type!r}")
    if scheduler.config.thresholding:
        x0 = scheduler._threshold_sample(x0)
    elif scheduler.config.clip_sample:
        limit = scheduler.config.clip_sample_range
        x0 = x0.clamp(-limit, limit)
    return x0, eps


def ddim_step_deterministic(
    scheduler: DDIMScheduler, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor
) -> torch.Tensor:
    """One DDIM step with eta = 0: x_t' = sqrt(abar_t') x0_hat + sqrt(1 - abar_t') eps_hat (no noise).

    The steps outside a training window (``sample.window_size``): no randomness, no log-prob.
    """
    alpha_t, alpha_prev = step_alphas(scheduler, timestep, sample.shape[0])
    x = sample.to(torch.float32)
    x0, eps = _x0_and_eps(scheduler, model_output, x, alpha_t)
    alpha_prev_b = _per_sample(alpha_prev.to(x.device), x.ndim)
    return (alpha_prev_b.sqrt() * x0 + (1 - alpha_prev_b).sqrt() * eps).to(sample.dtype)


def ddim_transition(
    scheduler: DDIMScheduler,
    model_output: torch.Tensor,
    timestep: int | torch.Tensor,
    sample: torch.Tensor,
    eta: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Gaussian of one DDIM step (DDIM eq. 12 with sigma = eta * sigma_t, eq. 16), in fp32:
    (mean, std), mean shaped like ``sample`` and std broadcastable to it (one per sample)."""
    if eta <= 0:
        raise ValueError(
            f"eta must be > 0 for a log-probability (got {eta}): with eta = 0 DDIM is deterministic"
        )
    batch = sample.shape[0]
    alpha_t, alpha_prev = step_alphas(scheduler, timestep, batch)
    variance = (1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)
    std = eta * variance.sqrt()
    if bool((std <= 0).any()):
        raise ValueError(
            "a DDIM step has zero variance (scheduler with set_alpha_to_one=True at its last step?); "
            "its log-probability is undefined: use set_alpha_to_one=False"
        )
    if bool((1 - alpha_prev - std**2 < 0).any()):
        raise ValueError(
            f"eta = {eta} is too large: the DDIM direction term becomes imaginary (use eta <= 1)"
        )
    x = sample.to(torch.float32)
    x0, eps = _x0_and_eps(scheduler, model_output, x, alpha_t)
    alpha_prev_b = _per_sample(alpha_prev.to(x.device), x.ndim)
    std_b = _per_sample(std.to(x.device), x.ndim)
    mean = alpha_prev_b.sqrt() * x0 + (1 - alpha_prev_b - std_b**2).sqrt() * eps
    return mean, std_b


def gaussian_kl_same_std(mean_p: torch.Tensor, mean_q: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL(N(mean_p, std^2 I) || N(mean_q, std^2 I)) as a mean over non-batch dims, shape (batch,)."""
    kl = (mean_p - mean_q) ** 2 / (2 * std**2)
    return kl.mean(dim=tuple(range(1, kl.ndim)))


def ddim_step_with_logprob(
    scheduler: DDIMScheduler,
    model_output: torch.Tensor,
    timestep: int | torch.Tensor,
    sample: torch.Tensor,
    eta: float = 1.0,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step x_t -> x_t'; returns (prev_sample, log_prob of prev_sample), log_prob shape (batch,).

    ``timestep`` is an int or a per-sample tensor. With ``prev_sample`` given (training), its
    log-prob under this step is returned; otherwise a new one is sampled with ``generator``
    (one generator, or one per sample for per-sample noise streams).
    """
    mean, std_b = ddim_transition(scheduler, model_output, timestep, sample, eta)
    return gaussian_step(mean, std_b, sample.dtype, prev_sample, generator)
