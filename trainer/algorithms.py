"""The RL algorithms: how rewards become per-sample advantages, and the loss on one trained step.

The loop (``trainer/train.py``) asks the configured algorithm two things and never branches on its
name:
  ``advantages(batch)``  the global batch's rewards -> one number per sample for the update;
  ``step_loss(step)``    the loss on one trained denoising step of a minibatch (policy gradient),
or, for algorithms whose ``objective`` is ``"denoising"`` (RWR), ``denoising_loss``: the
pretraining loss on the sampled images, weighted per sample.

Notation (``../shared/design.md``): logp = log p(x_t' | x_t), old = under the sampling policy,
ratio = exp(logp - old), A = advantage clipped to [-adv_clip_max, adv_clip_max], eps = clip_range.
- ddpo_is  PPO clip: mean(max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps))); A from DDPO's
           per-prompt tracker (or whole-batch normalization).
- ddpo_sf  score function: mean(-A logp), on-policy.
- grpo     the PPO clip loss with group-relative A = (r - mean_group) / (std + 1e-4), std of the
           group or of the whole batch; optionally zero-advantage samples leave the loss's mean.
- p3o      pairwise PPO over every pair (i, j) of a group: D = (r_i - r_j) / 2, no normalization;
           separate clipping (PPO clip of i with +D and of j with -D) or joint clipping of
           exp((logp_i - old_i) - (logp_j - old_j)).
- rwr      reward-weighted regression: the denoising loss weighted by softmax(z / T) or a top-quantile
           filter (not a policy gradient; the paper's baseline).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import torch

from trainer.config import TrainConfig
from trainer.losses import LossInfo, ppo_clip_loss, rwr_loss, rwr_weights, score_function_loss
from trainer.stat_tracking import PerPromptStatTracker, normalize_globally

GROUP_STD_EPS = 1e-4


@dataclass
class RewardBatch:
    """The global batch of one epoch, in global sample order."""

    prompts: list[str]
    rewards: np.ndarray  # (N,) float64
    groups: np.ndarray  # (N,) int: samples with equal ids are one group (same prompt, same batch)
    tracker: PerPromptStatTracker | None  # DDPO's per-prompt history (None: whole-batch)


@dataclass
class TrainedStep:
    """One trained denoising step of a minibatch; all tensors (B,)."""

    log_prob: torch.Tensor  # under the current policy, with grad
    old_log_prob: torch.Tensor  # under the policy that sampled
    advantages: torch.Tensor  # what ``advantages`` returned for these samples
    groups: torch.Tensor  # group ids (whole groups are in the minibatch when keeps_groups_together)
    # Stale samples (train.max_staleness): old_log_prob is the proximal policy's and these are the
    # truncated behaviour weights min(exp(logp_prox - logp_behavior), w_max); None when fresh.
    behavior_weights: torch.Tensor | None = None


class Algorithm:
    """Base class: one subclass per ``train.algorithm`` value, registered in ``ALGORITHMS``."""

    name: ClassVar[str]
    objective: ClassVar[Literal["policy_gradient", "denoising"]] = "policy_gradient"
    min_group_size: ClassVar[int] = 1  # K (sample.images_per_prompt) it needs
    keeps_groups_together: ClassVar[bool] = False  # minibatches and trained steps shared by a group
    on_policy: ClassVar[bool] = False  # one optimizer step per sampled epoch

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg

    def advantages(self, batch: RewardBatch) -> np.ndarray:
        raise NotImplementedError

    def step_loss(self, step: TrainedStep) -> tuple[torch.Tensor, LossInfo]:
        raise NotImplementedError


def clipped_loss(
    step: TrainedStep, c: TrainConfig, keep: torch.Tensor | None = None
) -> tuple[torch.Tensor, LossInfo]:
    """``trainer.losses.ppo_clip_loss`` of ``step`` under ``c`` (DDPO-IS, GRPO); ``keep``: see there."""
    return ppo_clip_loss(
        step.advantages,
        step.log_prob,
        step.old_log_prob,
        c.clip_range,
        c.adv_clip_max,
        step.behavior_weights,
        keep,
    )


class DDPOImportanceSampling(Algorithm):
    name = "ddpo_is"

    def advantages(self, batch: RewardBatch) -> np.ndarray:
        if batch.tracker is not None:
            return batch.tracker.update(batch.prompts, batch.rewards)
        return normalize_globally(batch.rewards)

    def step_loss(self, step: TrainedStep) -> tuple[torch.Tensor, LossInfo]:
        return clipped_loss(step, self.cfg)


class DDPOScoreFunction(DDPOImportanceSampling):
    name = "ddpo_sf"
    on_policy = True  # the score-function gradient is unbiased only on-policy

    def step_loss(self, step: TrainedStep) -> tuple[torch.Tensor, LossInfo]:
        return score_function_loss(step.advantages, step.log_prob, step.old_log_prob, self.cfg.adv_clip_max)


def group_relative_advantages(rewards: np.ndarray, groups: np.ndarray, std: str = "group") -> np.ndarray:
    """(r - mean of its group) / (std + 1e-4); std of the group, or of the whole batch ('global')."""
    rewards = np.asarray(rewards, dtype=np.float64)
    advantages = np.empty_like(rewards)
    global_std = rewards.std()
    for g in np.unique(groups):
        mask = groups == g
        centred = rewards[mask] - rewards[mask].mean()
        scale = rewards[mask].std() if std == "group" else global_std
        advantages[mask] = centred / (scale + GROUP_STD_EPS)
    return advantages


class GRPO(Algorithm):
    name = "grpo"
    min_group_size = 2

    def advantages(self, batch: RewardBatch) -> np.ndarray:
        return group_relative_advantages(batch.rewards, batch.groups, self.cfg.grpo_std)

    def step_loss(self, step: TrainedStep) -> tuple[torch.Tensor, LossInfo]:
        # Zero-advantage samples (a group whose rewards are all equal) leave the mean.
        keep = (step.advantages != 0).float() if self.cfg.skip_zero_advantage else None
        return clipped_loss(step, self.cfg, keep)


def group_pairs(groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every pair (i, j), i < j, of minibatch positions in the same group."""
    same = groups.unsqueeze(0) == groups.unsqueeze(1)
    i, j = torch.triu(same, diagonal=1).nonzero(as_tuple=True)
    return i, j


class P3O(Algorithm):
    name = "p3o"
    min_group_size = 2
    keeps_groups_together = True

    def advantages(self, batch: RewardBatch) -> np.ndarray:
        # Raw rewards: the loss uses only differences within a group, so any per-prompt constant cancels.
        return np.asarray(batch.rewards, dtype=np.float64)

    def step_loss(self, step: TrainedStep) -> tuple[torch.Tensor, LossInfo]:
        c = self.cfg
        i, j = group_pairs(step.groups)
        if i.numel() == 0:
            raise ValueError("p3o: a minibatch holds no pair of same-group samples")
        pair_adv = ((step.advantages[i] - step.advantages[j]) / 2).clamp(-c.adv_clip_max, c.adv_clip_max)
        log_ratio = step.log_prob - step.old_log_prob
        ratio = torch.exp(log_ratio)
        if c.p3o_clipping == "joint":
            pair_ratio = torch.exp(log_ratio[i] - log_ratio[j])
            clipped = pair_ratio.clamp(1 - c.clip_range, 1 + c.clip_range)
            loss = torch.maximum(-pair_adv * pair_ratio, -pair_adv * clipped).mean()
            clipfrac = ((pair_ratio - 1).abs() > c.clip_range).float().mean()
        else:  # separate: the PPO clip loss of i with +D and of j with -D
            clipped = ratio.clamp(1 - c.clip_range, 1 + c.clip_range)
            loss_i = torch.maximum(-pair_adv * ratio[i], -pair_adv * clipped[i])
            loss_j = torch.maximum(pair_adv * ratio[j], pair_adv * clipped[j])
            loss = (loss_i + loss_j).mean() / 2
            clipfrac = ((ratio - 1).abs() > c.clip_range).float().mean()
        with torch.no_grad():
            info = LossInfo(
                approx_kl=float(0.5 * (log_ratio**2).mean()),
                clipfrac=float(clipfrac),
                ratio_mean=float(ratio.mean()),
            )
        return loss, info


class RWR(Algorithm):
    name = "rwr"
    objective = "denoising"

    def advantages(self, batch: RewardBatch) -> np.ndarray:
        """Per-sample weights with mean 1 (from the global batch's rewards)."""
        c = self.cfg
        return rwr_weights(batch.rewards, c.rwr_weighting, c.rwr_temperature, c.rwr_percentile)

    def denoising_loss(
        self, model_pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        return rwr_loss(model_pred, target, weights)


ALGORITHMS: dict[str, type[Algorithm]] = {
    cls.name: cls for cls in (DDPOImportanceSampling, DDPOScoreFunction, GRPO, P3O, RWR)
}


def make_algorithm(cfg: TrainConfig) -> Algorithm:
    try:
        return ALGORITHMS[cfg.algorithm](cfg)
    except KeyError:
        raise ValueError(
            f"train.algorithm: unknown {cfg.algorithm!r}; valid: {', '.join(ALGORITHMS)}"
        ) from None


def group_ids(num_samples: int, group_size: int) -> np.ndarray:
    """Group ids of a global batch in sampling order: K consecutive samples share a prompt."""
    return np.arange(num_samples) // group_size


def minibatch_order(
    groups: np.ndarray | Sequence[int], keep_groups_together: bool, generator: torch.Generator
) -> torch.Tensor:
    """A random order of the samples; whole groups stay consecutive when the algorithm pairs them."""
    groups = torch.as_tensor(np.asarray(groups))
    n = len(groups)
    if not keep_groups_together:
        return torch.randperm(n, generator=generator)
    ids = torch.unique(groups)
    shuffled = ids[torch.randperm(len(ids), generator=generator)]
    return torch.cat([torch.nonzero(groups == g, as_tuple=True)[0] for g in shuffled])
