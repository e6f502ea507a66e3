"""Policy-gradient losses of DDPO and the RWR baseline, one value per trajectory batch.

A = advantage clipped to [-adv_clip_max, adv_clip_max], one per trajectory.
- DDPO-IS: ratio = exp(logp_new - logp_old); loss = mean(max(-A ratio, -A clip(ratio, 1-eps, 1+eps))).
- DDPO-SF: loss = mean(-A logp_new).
- RWR: the ordinary denoising loss, weighted per sample by softmax(reward / T) or a top-quantile filter.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class LossInfo:
    approx_kl: float
    clipfrac: float
    ratio_mean: float


def ppo_clip_loss(
    advantages: torch.Tensor,
    log_prob_new: torch.Tensor,
    log_prob_old: torch.Tensor,
    clip_range: float,
    adv_clip_max: float,
    behavior_weights: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
) -> tuple[torch.Tensor, LossInfo]:
    """DDPO-IS loss for one timestep of a minibatch (all tensors shape (batch,)).

    ``behavior_weights`` (decoupled PPO for stale samples): ``log_prob_old`` is then the proximal
    policy's, and each sample's term is multiplied by its truncated weight min(w, w_max),
    w = exp(logp_prox - logp_behavior). ``keep`` (1 or 0 per sample): the loss is the mean over
    the kept samples only (GRPO's zero-advantage samples leave it); the info covers all.
    """
    adv = advantages.clamp(-adv_clip_max, adv_clip_max)
    ratio = torch.exp(log_prob_new - log_prob_old)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    per_sample = torch.maximum(unclipped, clipped)
    if behavior_weights is not None:
        per_sample = behavior_weights * per_sample
    loss = per_sample.mean() if keep is None else (per_sample * keep).sum() / keep.sum().clamp(min=1)
    with torch.no_grad():
        info = LossInfo(
            approx_kl=float(0.5 * ((log_prob_new - log_prob_old) ** 2).mean()),
            clipfrac=float(((ratio - 1.0).abs() > clip_range).float().mean()),
            ratio_mean=float(ratio.mean()),
        )
    return loss, info


def score_function_loss(
    advantages: torch.Tensor, log_prob_new: torch.Tensor, log_prob_old: torch.Tensor, adv_clip_max: float
) -> tuple[torch.Tensor, LossInfo]:
    """DDPO-SF (REINFORCE) loss for one timestep of a minibatch."""
    adv = advantages.clamp(-adv_clip_max, adv_clip_max)
    loss = (-adv * log_prob_new).mean()
    with torch.no_grad():
        ratio = torch.exp(log_prob_new - log_prob_old)
        info = LossInfo(
            approx_kl=float(0.5 * ((log_prob_new - log_prob_old) ** 2).mean()),
            clipfrac=0.0,
            ratio_mean=float(ratio.mean()),
        )
    return loss, info


def rwr_weights(rewards: np.ndarray, weighting: str, temperature: float, percentile: float) -> np.ndarray:
    """Per-sample RWR weights with mean 1 over the epoch's samples.

    softmax: exp(z / T) normalized, where z are the rewards standardized over the epoch (so T
    does not depend on the reward's units); filter: 1 for rewards at or above the quantile.
    """
    rewards = np.asarray(rewards, dtype=np.float64)
    n = rewards.shape[0]
    if weighting == "softmax":
        z = (rewards - rewards.mean()) / (rewards.std() + 1e-6) / temperature
        w = np.exp(z - z.max())
        return w / w.sum() * n
    if weighting == "filter":
        keep = rewards >= np.quantile(rewards, percentile)
        return keep.astype(np.float64) / keep.mean()
    raise ValueError(f"unknown rwr weighting {weighting!r}; valid: softmax, filter")


def rwr_loss(noise_pred: torch.Tensor, noise: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """mean_i( w_i * mean over pixels of (noise_pred_i - noise_i)^2 )."""
    per_sample = ((noise_pred.float() - noise.float()) ** 2).mean(dim=tuple(range(1, noise.ndim)))
    return (weights * per_sample).mean()
