"""DDPO training loop: sample -> reward -> advantages -> policy-gradient update, every epoch.

Read top to bottom, one epoch is:
  1. Sample  ``num_batches_per_epoch`` batches of trajectories with DDIM (eta > 0) + CFG, keeping the
     per-step log-probs; each batch's images go to the reward client as soon as they are decoded
     (rewards are computed while the next batch samples).
  2. Reward  wait for this epoch's rewards (the only place training waits on the reward service).
  3. Advantages  per-prompt (or global) normalization of the rewards.
  4. Update  ``num_inner_epochs`` passes: shuffle samples, permute timesteps per sample, recompute
     log p(x_t' | x_t) under the current policy with the same CFG, clipped policy-gradient loss
     (or SF, or RWR), accumulate over the trained timesteps and minibatches, clip, step.
  5. Log, plot, sample the fixed-seed grid, checkpoint.
Every random stream is derived from (seed, epoch, batch, rank), so a resumed run repeats exactly
what an uninterrupted one would have done.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import resource
import time
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from trainer.algorithms import RewardBatch, TrainedStep, group_ids, make_algorithm, minibatch_order
from trainer.checkpoint import (
    TrainingState,
    capture_rng,
    find_checkpoint,
    load_training_state,
    restore_rng,
    save_checkpoint,
)
from trainer.config import Config, SampleConfig
from trainer.ddim import gaussian_kl_same_std
from trainer.distributed import DistInfo, gather_global, local_slice, mean_across_ranks, wrap_ddp
from trainer.loggers import make_loggers
from trainer.losses import LossInfo
from trainer.policy import DiffusionPolicy, resolve_pretrained
from trainer.prompts import load_heldout_prompts, load_prompts
from trainer.reward_client import RewardClient, RewardResult, make_reward_client
from trainer.run_folder import RunFolder
from trainer.sampling import Trajectories, sample_trajectories
from trainer.stat_tracking import PerPromptStatTracker
from trainer.transports.errors import RewardError

log = logging.getLogger(__name__)

EVAL_STREAM = 2**31 - 1  # the fixed-seed eval grid's stream id, distinct from every epoch
WINDOW_STREAM = 2**31 - 2  # the per-epoch draw of the training window's position


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from a tuple of ints (independent streams for every (seed, epoch, ...) key)."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1


def caption_accuracy(details: Sequence[dict[str, Any]]) -> float | None:
    """Fraction of samples whose caption states the prompt (``caption_correct``), if the reward says."""
    flags = [d.get("caption_correct") for d in details]
    if not flags or any(not isinstance(f, bool) for f in flags):
        return None
    return float(np.mean(flags))


def zero_std_ratio(prompts: Sequence[str], rewards: np.ndarray) -> float:
    """Fraction of prompts whose samples this epoch all got the same reward (no signal to learn)."""
    groups: dict[str, list[float]] = {}
    for prompt, reward in zip(prompts, rewards, strict=True):
        groups.setdefault(prompt, []).append(float(reward))
    return float(np.mean([np.ptp(g) == 0 for g in groups.values()]))


def diversity(images: np.ndarray, per_prompt: int) -> float:
    """Mean pairwise RMS distance (pixels in [0, 1]) between images of the same prompt.

    ``images`` holds ``per_prompt`` consecutive images of each prompt. Mode collapse, the usual
    face of over-optimization, shows as this falling towards 0.
    """
    x = images.astype(np.float64).reshape(-1, per_prompt, *images.shape[1:]) / 255.0
    x = x.reshape(x.shape[0], per_prompt, -1)
    distances = [
        np.sqrt(np.mean((x[:, i] - x[:, j]) ** 2, axis=-1))
        for i in range(per_prompt)
        for j in range(i + 1, per_prompt)
    ]
    return float(np.mean(distances))


@dataclasses.dataclass
class SampledEpoch:
    """One epoch's samples and their outstanding rewards."""

    epoch: int
    samples: Trajectories
    futures: list[Future[RewardResult]]
    policy_epoch: int  # updates applied to the policy that sampled them (staleness = epoch - this)


def kept_rows(futures: list[Future[RewardResult]], batch_size: int) -> torch.Tensor:
    """The sample rows of the sampling batches whose reward came (the futures are done)."""
    kept = [b for b, future in enumerate(futures) if future.exception() is None]
    return torch.tensor(
        [i for b in kept for i in range(b * batch_size, (b + 1) * batch_size)], dtype=torch.long
    )


@dataclasses.dataclass
class UpdateBatch:
    """What every minibatch of one update reads: this rank's samples and their training signal."""

    samples: Trajectories
    advantages: torch.Tensor  # (B,) fp32: the algorithm's advantages (RWR: its weights)
    groups: torch.Tensor  # (B,) long: group ids
    num_timesteps: int  # trained steps per sample
    proximal_log_probs: torch.Tensor | None  # (B, S): stale samples only (decoupled PPO)


@dataclasses.dataclass
class Minibatch:
    """One minibatch of an update."""

    idx: torch.Tensor  # (b,) rows of the UpdateBatch
    steps: torch.Tensor  # (b, S): each sample's trained steps, in order (the first num_timesteps count)
    scale: float  # loss scale: a mean over the timesteps and the accumulated minibatches
    sync: bool  # the last minibatch before an optimizer step (DDP all-reduces on its last backward)


@dataclasses.dataclass
class MinibatchStats:
    loss: float
    infos: list[LossInfo]  # per trained step
    kls: list[float]  # per trained step, when KL to the reference is computed


class Trainer:
    def __init__(
        self,
        cfg: Config,
        reward_client: RewardClient | None = None,
        run_folder: RunFolder | None = None,
        dist_info: DistInfo | None = None,
    ):
        self.cfg = cfg = cfg.model_copy(deep=True)
        # config.json records the folder actually loaded ('digits' -> its cache folder).
        cfg.model.pretrained = resolve_pretrained(cfg.model.pretrained)
        self.dist = dist_info or DistInfo()
        self.rank, self.world_size = self.dist.rank, self.dist.world_size
        self.is_main = self.rank == 0
        if cfg.run.num_threads:
            torch.set_num_threads(cfg.run.num_threads)
        if self.dist.is_distributed and cfg.reward.on_failure == "drop":
            # Ranks must run the same number of DDP steps; dropping batches on one rank would hang them.
            raise ValueError("reward.on_failure='drop' is not supported with more than one rank; use 'error'")

        self.policy = DiffusionPolicy(
            cfg.model,
            device=self.dist.device(cfg.model.device),
            seed=derive_seed(cfg.run.seed, EVAL_STREAM, 3),
        )
        self.prompts = load_prompts(cfg.prompts.set, cfg.prompts.path)
        self.heldout_prompts = load_heldout_prompts(cfg.prompts.set, cfg.prompts.heldout)
        self.reward_client = reward_client or make_reward_client(cfg.reward)
        self._owns_reward_client = reward_client is None
        # Rewards scored at eval only (over-optimization shows as these falling).
        self.eval_reward_clients = {
            c.name: make_reward_client(cfg.reward.single(c)) for c in cfg.reward.eval_components
        }
        self.tracker = (
            PerPromptStatTracker(cfg.advantage.buffer_size, cfg.advantage.min_count)
            if cfg.advantage.per_prompt_stat_tracking
            else None
        )
        self.algorithm = make_algorithm(cfg.train)
        if cfg.train.kl_beta > 0 or cfg.train.log_kl_ref:
            self.policy.keep_reference()
        self.optimizer = self._make_optimizer()
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: 1.0)
        self.next_epoch = 0
        self.global_step = 0
        self._pending: SampledEpoch | None = None  # max_staleness 1: the next epoch, already sampled
        # run.eval_ema_decay: an average of the trained weights, used for eval.
        self.ema: dict[str, torch.Tensor] | None = None
        if cfg.run.eval_ema_decay is not None:
            self.ema = {n: p.detach().clone() for n, p in self._trained_parameters()}

        checkpoint = find_checkpoint(cfg.run.resume) if cfg.run.resume else None
        if run_folder is None and self.is_main:
            run_folder = (
                RunFolder(checkpoint.parent.parent)
                if checkpoint
                else RunFolder.new(cfg.run.output_dir, cfg.run.name)
            )
        self.run_folder = run_folder
        if checkpoint is not None:
            self._resume(checkpoint)
        self.policy.unet_forward = wrap_ddp(self.policy.unet, self.dist, self.policy.device)
        if self.run_folder is not None:
            self.run_folder.write_config(cfg.model_dump())
            self.run_folder.write_run_info({"world_size": self.world_size, "device": str(self.policy.device)})
            if self.is_main:  # TensorBoard / W&B (run.loggers) mirror the run folder; rank 0 only
                self.run_folder.loggers = make_loggers(cfg, self.run_folder.path, start_epoch=self.next_epoch)

    # -- set-up ------------------------------------------------------------------------------
    def _make_optimizer(self) -> torch.optim.Optimizer:
        t = self.cfg.train
        params = self.policy.trainable_parameters()
        kwargs = dict(
            lr=t.learning_rate,
            betas=(t.adam_beta1, t.adam_beta2),
            weight_decay=t.adam_weight_decay,
            eps=t.adam_epsilon,
        )
        if t.use_8bit_adam:
            try:
                import bitsandbytes as bnb
            except ImportError:
                raise ValueError(
                    "train.use_8bit_adam needs bitsandbytes: pip install 'ddpo-stack[gpu]'"
                ) from None
            return bnb.optim.AdamW8bit(params, **kwargs)
        return torch.optim.AdamW(params, **kwargs)

    def _resume(self, checkpoint) -> None:
        state = load_training_state(checkpoint)
        self.policy.load_trainable_state_dict(state.trainable)
        self.optimizer.load_state_dict(state.optimizer)
        self.lr_scheduler.load_state_dict(state.lr_scheduler)
        if self.tracker is not None and state.stat_tracker is not None:
            self.tracker.load_state_dict(state.stat_tracker)
        if state.pending is not None and "final_latents" not in state.pending["samples"]:
            # Saved before trajectories kept x_0 (c38b024): the pending epoch is sampled again,
            # under the restored policy, so this run is no longer bit-identical to an unbroken one.
            log.warning("%s: its pending epoch predates final_latents; sampling it again", checkpoint)
        elif state.pending is not None:
            self._pending = self._restore_pending(state.pending)
        if self.ema is not None and state.ema is not None:
            self.ema = {k: v.to(self.policy.device) for k, v in state.ema.items()}
        restore_rng(state.rng)
        self.next_epoch, self.global_step = state.next_epoch, state.global_step
        if self.run_folder is not None:
            self.run_folder.truncate_metrics(before_epoch=self.next_epoch)
        log.info("resumed from %s at epoch %d (step %d)", checkpoint, self.next_epoch, self.global_step)

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> list[dict[str, Any]]:
        """Train from ``next_epoch`` up to ``run.num_epochs``; returns the per-epoch metrics."""
        history = []
        try:
            if self.next_epoch == 0 and self.cfg.run.eval_before_training and self.is_main:
                base = {"epoch": -1, "global_step": 0, "world_size": self.world_size, **self.evaluate("base")}
                if self.run_folder is not None:
                    self.run_folder.append_metrics(base)
            for epoch in range(self.next_epoch, self.cfg.run.num_epochs):
                history.append(self.train_epoch(epoch))
            if self.run_folder is not None and history:
                self.run_folder.save_before_after()
        finally:
            self.close()
        return history

    def close(self) -> None:
        """Flush the loggers and close the reward clients this trainer opened (``run()`` does it)."""
        if self.run_folder is not None:
            self.run_folder.loggers.close()
        if self._owns_reward_client:
            self.reward_client.close()
        for client in self.eval_reward_clients.values():
            client.close()

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        # 1. Sample (rewards are requested batch by batch, while the next batch samples). With
        #    max_staleness 1 this epoch was sampled during the previous one's reward wait, and the
        #    next epoch is sampled now, while this epoch's rewards are outstanding.
        current = self._pending if self._pending is not None else self._sample(epoch)
        if current.epoch != epoch:
            raise RuntimeError(f"pending samples are of epoch {current.epoch}, not {epoch}")
        self._pending = None
        if self.cfg.train.max_staleness and epoch + 1 < self.cfg.run.num_epochs:
            self._pending = self._sample(epoch + 1)
        t_sampled = time.perf_counter()
        staleness = epoch - current.policy_epoch
        # 2. Reward: the update needs this epoch's rewards (a failed batch: error, or dropped if
        #    configured). Stale samples' proximal log-probs (under the current policy: no update
        #    runs before this epoch's) need no reward, so they are computed while the rewards are
        #    outstanding: a slow reward hides their cost.
        proximal = None
        if staleness > 0 and self.algorithm.objective == "policy_gradient":
            proximal = self._log_probs_now(current.samples)
        samples, results, num_dropped = self.gather_rewards(current.samples, current.futures)
        if proximal is not None and num_dropped:
            proximal = proximal[kept_rows(current.futures, self.cfg.sample.batch_size)]
        t_rewarded = time.perf_counter()
        local_rewards = np.concatenate([r.rewards for r in results])
        # Every rank sees the global batch (global sample order), so the stat trackers agree.
        num_batches = len(results)
        prompts = gather_global(samples.prompts, self.dist, num_batches)
        rewards = np.array(gather_global(local_rewards, self.dist, num_batches), dtype=np.float64)
        details = gather_global([d for r in results for d in r.details], self.dist, num_batches)
        accuracy = caption_accuracy(details)
        # 3. Advantages (RWR: weights), on the global batch: a group may span ranks.
        groups = group_ids(len(rewards), self.cfg.sample.images_per_prompt)
        advantages = self.algorithm.advantages(RewardBatch(prompts, rewards, groups, self.tracker))
        local_advantages = local_slice(advantages, self.dist, num_batches)
        local_groups = local_slice(groups, self.dist, num_batches)
        # 4. Update.
        train_info = self.update(
            epoch, samples, local_advantages, groups=local_groups, proximal_log_probs=proximal
        )
        train_info = mean_across_ranks(train_info, self.dist)
        t_trained = time.perf_counter()

        metrics = {
            "epoch": epoch,
            "global_step": self.global_step,
            "reward_name": self.cfg.reward.name,
            "reward_mean": float(rewards.mean()),
            "reward_std": float(rewards.std()),
            "reward_min": float(rewards.min()),
            "reward_max": float(rewards.max()),
            **({"caption_accuracy": accuracy} if accuracy is not None else {}),
            **(
                {"zero_std_ratio": zero_std_ratio(prompts, rewards)}
                if self.cfg.sample.images_per_prompt > 1
                else {}
            ),
            **train_info,
            "lr": self.lr_scheduler.get_last_lr()[0],
            "staleness": staleness,
            "num_samples": len(rewards),
            "num_dropped": num_dropped,
            "world_size": self.world_size,
            "samples_per_s": len(rewards) / (t_trained - t0),
            "time_sampling_s": t_sampled - t0,
            "time_reward_wait_s": t_rewarded - t_sampled,
            "time_training_s": t_trained - t_rewarded,
            "time_epoch_s": t_trained - t0,  # the three above: an epoch without its eval and logging
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
        # 5. Log, grid, checkpoint.
        self.next_epoch = epoch + 1
        if self.run_folder is not None:
            self.run_folder.write_sample_log(
                epoch,
                [
                    {"prompt": p, "reward": float(r), "advantage": float(a), "details": d}
                    for p, r, a, d in zip(prompts, rewards, advantages, details, strict=True)
                ],
            )
        if self.is_main and (
            epoch % self.cfg.run.eval_every == 0 or self.next_epoch == self.cfg.run.num_epochs
        ):
            metrics.update(self.evaluate(f"epoch_{epoch:04d}"))
        if self.run_folder is not None:
            self.run_folder.append_metrics(metrics)
            self.run_folder.plot_rewards()
        if self.next_epoch % self.cfg.run.save_every == 0 or self.next_epoch == self.cfg.run.num_epochs:
            self.save()
        log.info(
            "epoch %d: reward %.4f ± %.4f, loss %.4g, kl %.3g, clipfrac %.3f, %.1f samples/s",
            epoch,
            metrics["reward_mean"],
            metrics["reward_std"],
            metrics["loss"],
            metrics["approx_kl"],
            metrics["clipfrac"],
            metrics["samples_per_s"],
        )
        return metrics

    # -- 1. sampling -------------------------------------------------------------------------
    def epoch_batch_plan(self, epoch: int, batch: int) -> tuple[list[str], list[int]]:
        """This rank's prompts and noise seeds for one sampling batch.

        The global batch (world_size x batch_size samples) is a function of (seed, epoch, batch)
        alone and rank r takes slice r: every sample has its own seed, on whichever rank.
        """
        size, global_size = self.cfg.sample.batch_size, self.cfg.sample.batch_size * self.world_size
        key = (self.cfg.run.seed, epoch, batch)
        rng = np.random.default_rng(derive_seed(*key, 0))
        k = self.cfg.sample.images_per_prompt  # groups of k consecutive samples share a prompt
        prompt_ids = np.repeat(rng.integers(0, len(self.prompts), global_size // k), k)
        base = derive_seed(*key, 1)
        mine = range(self.rank * size, (self.rank + 1) * size)
        return [self.prompts[prompt_ids[i]] for i in mine], [(base + i) % 2**63 for i in mine]

    def initial_seeds(self, epoch: int, batch: int) -> list[int] | None:
        """With ``sample.same_initial_noise``: one x_T seed per group (K consecutive samples), else None."""
        s = self.cfg.sample
        if not s.same_initial_noise:
            return None
        base = derive_seed(self.cfg.run.seed, epoch, batch, 3)
        mine = range(self.rank * s.batch_size, (self.rank + 1) * s.batch_size)
        return [(base + i // s.images_per_prompt) % 2**63 for i in mine]

    def window_start(self, epoch: int) -> int:
        """First stochastic step of this epoch's window: fixed, or drawn from (seed, epoch) alone."""
        s = self.cfg.sample
        if s.window_start_max is None:
            return s.window_start
        rng = np.random.default_rng(derive_seed(self.cfg.run.seed, epoch, WINDOW_STREAM))
        return int(rng.integers(s.window_start, s.window_start_max + 1))

    def _sample(self, epoch: int) -> SampledEpoch:
        samples, futures = self.sample_epoch(epoch)
        return SampledEpoch(epoch, samples, futures, policy_epoch=self.next_epoch)

    def _pending_state(self) -> dict[str, Any] | None:
        """The already-sampled next epoch, for the checkpoint (images as a tensor: weights-only load)."""
        if self._pending is None:
            return None
        samples = self._pending.samples
        fields = {f.name: getattr(samples, f.name) for f in dataclasses.fields(samples)}
        fields["images"] = torch.from_numpy(samples.images)
        return {"epoch": self._pending.epoch, "policy_epoch": self._pending.policy_epoch, "samples": fields}

    def _restore_pending(self, state: dict[str, Any]) -> SampledEpoch:
        """Rebuild the checkpoint's pending epoch and request its rewards again, batch by batch."""
        fields = dict(state["samples"])
        fields["images"] = fields["images"].numpy()
        samples = Trajectories(**fields)
        size = self.cfg.sample.batch_size
        futures = [
            self.reward_client.submit(samples.images[i : i + size], samples.prompts[i : i + size])
            for i in range(0, len(samples), size)
        ]
        return SampledEpoch(state["epoch"], samples, futures, state["policy_epoch"])

    def sample_epoch(self, epoch: int) -> tuple[Trajectories, list[Future[RewardResult]]]:
        self.policy.unet.eval()
        window_start = self.window_start(epoch)
        batches, futures = [], []
        bar = tqdm(
            range(self.cfg.sample.num_batches_per_epoch),
            desc=f"epoch {epoch} sampling",
            disable=not (self.cfg.run.progress and self.is_main),
            leave=False,
        )
        for b in bar:
            prompts, seeds = self.epoch_batch_plan(epoch, b)
            traj = sample_trajectories(
                self.policy,
                prompts,
                self.cfg.sample,
                seeds,
                window_start=window_start,
                initial_seeds=self.initial_seeds(epoch, b),
            )
            futures.append(self.reward_client.submit(traj.images, prompts))
            batches.append(traj)
        return Trajectories.cat(batches), futures

    # -- 2. rewards --------------------------------------------------------------------------
    def gather_rewards(
        self, samples: Trajectories, futures: list[Future[RewardResult]]
    ) -> tuple[Trajectories, list[RewardResult], int]:
        """Wait for each sampling batch's rewards -> (kept samples, their results, samples dropped).

        A batch whose reward could not be obtained (``RewardError``: retry budget, deadline, refused)
        raises, or with ``reward.on_failure = 'drop'`` is left out of the update, counted and logged;
        never a silent 0. Other exceptions (bugs) always raise.
        """
        batch = self.cfg.sample.batch_size
        results: list[RewardResult] = []
        errors: list[str] = []
        for b, future in enumerate(futures):
            try:
                results.append(future.result())
            except RewardError as err:
                if self.cfg.reward.on_failure != "drop":
                    raise
                errors.append(str(err))
                log.warning("dropping sampling batch %d (%d samples) from the update: %s", b, batch, err)
        if not errors:
            return samples, results, 0
        keep = kept_rows(futures, batch)
        if not len(keep):
            raise RewardError(f"no batch of this epoch got its reward; first error: {errors[0]}")
        return samples.select(keep), results, len(samples) - len(keep)

    # -- 4. update ---------------------------------------------------------------------------
    def update(
        self,
        epoch: int,
        samples: Trajectories,
        advantages: np.ndarray,
        sample_weights: np.ndarray | None = None,
        groups: np.ndarray | None = None,
        proximal_log_probs: torch.Tensor | None = None,
    ) -> dict:
        """The algorithm's update on this rank's samples; returns loss statistics.

        ``advantages``: what the algorithm's ``advantages`` gave these samples (for RWR, its
        weights; ``sample_weights`` overrides them); ``groups``: their group ids (default: K
        consecutive samples per group); ``proximal_log_probs`` (B, S): given for samples drawn
        before the last update, their log-probs under the policy at the start of this update
        (decoupled PPO: ratios to this proximal policy, truncated behaviour weights).
        """
        cfg, t = self.cfg, self.cfg.train
        policy, algorithm = self.policy, self.algorithm
        policy.unet.train()
        policy.scheduler.set_timesteps(cfg.sample.num_steps, device=policy.device)
        n, steps = len(samples), samples.timesteps.shape[1]
        if algorithm.objective == "denoising" and sample_weights is not None:
            advantages = sample_weights
        if groups is None:
            groups = group_ids(n, cfg.sample.images_per_prompt)
        batch = UpdateBatch(
            samples,
            torch.as_tensor(advantages, dtype=torch.float32, device=policy.device),
            torch.as_tensor(np.asarray(groups), dtype=torch.long),
            cfg.num_train_timesteps(),
            proximal_log_probs if algorithm.objective == "policy_gradient" else None,
        )

        infos: list[LossInfo] = []
        kls: list[float] = []
        losses: list[float] = []
        grad_norms: list[float] = []
        num_minibatches = -(-n // t.batch_size)  # after a dropped batch the last one may be short
        total_minibatches = t.num_inner_epochs * num_minibatches
        bar = tqdm(
            total=total_minibatches,
            desc=f"epoch {epoch} training",
            disable=not (cfg.run.progress and self.is_main),
            leave=False,
        )
        for inner in range(t.num_inner_epochs):
            gen = torch.Generator().manual_seed(derive_seed(cfg.run.seed, epoch, inner, self.rank, 2))
            order = minibatch_order(batch.groups, algorithm.keeps_groups_together, generator=gen)
            # Each sample trains on its own random subset/order of denoising steps (a group on the
            # same ones when the algorithm compares its samples step by step).
            step_perm = torch.stack([torch.randperm(steps, generator=gen) for _ in range(n)])
            if algorithm.keeps_groups_together:
                first_of_group = {}
                for i, g in enumerate(batch.groups.tolist()):
                    first_of_group.setdefault(g, i)
                step_perm = step_perm[[first_of_group[g] for g in batch.groups.tolist()]]
            self.optimizer.zero_grad(set_to_none=True)
            for mb_index, start in enumerate(range(0, n, t.batch_size)):
                idx = order[start : start + t.batch_size]
                group_start = mb_index - mb_index % t.gradient_accumulation_steps
                group_size = min(t.gradient_accumulation_steps, num_minibatches - group_start)
                # Step at every accumulation boundary and after the last minibatch (a short group
                # when batches were dropped), each group's gradient a mean over its minibatches.
                boundary = mb_index + 1 == group_start + group_size
                minibatch = Minibatch(
                    idx, step_perm[idx], scale=1.0 / (batch.num_timesteps * group_size), sync=boundary
                )
                if algorithm.objective == "denoising":
                    losses.append(self._denoising_minibatch(batch, minibatch, gen))
                else:
                    stats = self._pg_minibatch(batch, minibatch)
                    losses.append(stats.loss)
                    infos += stats.infos
                    kls += stats.kls
                if boundary:
                    grad_norms.append(self._optimizer_step())
                bar.update(1)
        bar.close()
        return {
            "loss": float(np.mean(losses)) if losses else 0.0,
            "approx_kl": float(np.mean([i.approx_kl for i in infos])) if infos else 0.0,
            "clipfrac": float(np.mean([i.clipfrac for i in infos])) if infos else 0.0,
            "ratio_mean": float(np.mean([i.ratio_mean for i in infos])) if infos else 1.0,
            "first_ratio": infos[0].ratio_mean if infos else 1.0,
            "kl_ref": float(np.mean(kls)) if kls else 0.0,
            "grad_norm": float(np.mean(grad_norms)) if grad_norms else 0.0,
            "optimizer_steps": len(grad_norms),
        }

    def _pg_minibatch(self, batch: UpdateBatch, mb: Minibatch) -> MinibatchStats:
        """Policy gradient on one minibatch: backward per trained timestep (memory stays flat).

        loss = the algorithm's step loss + kl_beta * KL(current || reference) on every trained step.
        """
        t, s, policy, samples = self.cfg.train, self.cfg.sample, self.policy, batch.samples
        idx, rows = mb.idx, torch.arange(len(mb.idx)).unsqueeze(1)
        latents = samples.latents[idx][rows, mb.steps]
        next_latents = samples.next_latents[idx][rows, mb.steps]
        old_log_probs = samples.log_probs[idx][rows, mb.steps]
        weights = None
        if batch.proximal_log_probs is not None:  # stale samples: ratios to the proximal policy
            behavior = old_log_probs
            old_log_probs = batch.proximal_log_probs[idx][rows, mb.steps]
            weights = torch.exp(old_log_probs - behavior).clamp(max=t.behavior_weight_max)
        timesteps = samples.timesteps[idx][rows, mb.steps]
        prompt_embeds, negative_embeds = samples.prompt_embeds[idx], samples.negative_embeds[idx]
        adv, groups = batch.advantages[idx], batch.groups[idx]
        stats = MinibatchStats(0.0, [], [])
        for j in range(batch.num_timesteps):
            with self._grad_sync(mb.sync and j == batch.num_timesteps - 1):
                x_t, t_j = latents[:, j], timesteps[:, j]
                model_pred = policy.model_pred(x_t, t_j, prompt_embeds, negative_embeds, s.guidance_scale)
                _, log_prob = policy.family.step_with_logprob(
                    policy.scheduler, model_pred, t_j, x_t, s, prev_sample=next_latents[:, j]
                )
                old = old_log_probs[:, j].to(log_prob.device)
                step_weights = None if weights is None else weights[:, j].to(log_prob.device)
                loss, info = self.algorithm.step_loss(TrainedStep(log_prob, old, adv, groups, step_weights))
                if t.kl_beta > 0 or t.log_kl_ref:  # log_kl_ref alone: measured, no gradient
                    with torch.set_grad_enabled(t.kl_beta > 0):
                        kl = self._kl_to_reference(
                            model_pred, x_t, t_j, prompt_embeds, negative_embeds
                        ).mean()
                    if t.kl_beta > 0:
                        loss = loss + t.kl_beta * kl
                    stats.kls.append(float(kl))
                (loss * mb.scale).backward()
            stats.infos.append(info)
            stats.loss += loss.item() / batch.num_timesteps
        return stats

    @torch.no_grad()
    def _log_probs_now(self, samples: Trajectories) -> torch.Tensor:
        """log p(x_t' | x_t) of every recorded step under the current policy, (B, S)."""
        s, policy = self.cfg.sample, self.policy
        out = torch.empty_like(samples.log_probs)
        for start in range(0, len(samples), self.cfg.train.batch_size):
            idx = slice(start, start + self.cfg.train.batch_size)
            for j in range(samples.timesteps.shape[1]):
                x_t, t_j = samples.latents[idx, j], samples.timesteps[idx, j]
                pred = policy.model_pred(
                    x_t, t_j, samples.prompt_embeds[idx], samples.negative_embeds[idx], s.guidance_scale
                )
                _, out[idx, j] = policy.family.step_with_logprob(
                    policy.scheduler, pred, t_j, x_t, s, prev_sample=samples.next_latents[idx, j]
                )
        return out

    def _kl_to_reference(self, model_pred, x_t, t_j, prompt_embeds, negative_embeds) -> torch.Tensor:
        """Closed-form KL between this step's Gaussian under the current and the reference policy."""
        s, policy = self.cfg.sample, self.policy
        mean, std = policy.family.transition(policy.scheduler, model_pred, t_j, x_t, s)
        ref_pred = policy.reference_model_pred(x_t, t_j, prompt_embeds, negative_embeds, s.guidance_scale)
        ref_mean, _ = policy.family.transition(policy.scheduler, ref_pred, t_j, x_t, s)
        return gaussian_kl_same_std(mean, ref_mean, std)

    def _denoising_minibatch(self, batch: UpdateBatch, mb: Minibatch, gen: torch.Generator) -> float:
        """RWR: the weighted denoising loss on the sampled final latents at random noise levels
        (drawn from ``gen``); returns the minibatch's mean loss.

        The target is what the network predicts (``prediction_type``): the noise, x0 or v.
        """
        policy, idx, num_timesteps = self.policy, mb.idx, batch.num_timesteps
        scheduler = policy.scheduler
        x0 = batch.samples.final_latents[idx]  # (with a window, the last recorded step is not x_0)
        embeds = batch.samples.prompt_embeds[idx]
        total = 0.0
        for j in range(num_timesteps):
            noise = torch.randn(x0.shape, generator=gen).to(x0.device)
            tt = torch.randint(0, scheduler.config.num_train_timesteps, (len(idx),), generator=gen).to(
                x0.device
            )
            noisy = scheduler.add_noise(x0, noise, tt)
            prediction = scheduler.config.prediction_type
            if prediction == "epsilon":
                target = noise
            elif prediction == "sample":
                target = x0
            else:
                target = scheduler.get_velocity(x0, noise, tt)
            with self._grad_sync(mb.sync and j == num_timesteps - 1):
                model_pred = policy.model_pred(noisy, tt, embeds, embeds, guidance_scale=1.0)
                loss = self.algorithm.denoising_loss(model_pred, target, batch.advantages[idx])
                (loss * mb.scale).backward()
            total += loss.item() / num_timesteps
        return total

    def _grad_sync(self, sync: bool) -> contextlib.AbstractContextManager:
        """Under DDP, all-reduce once per optimizer step: on the last backward before it."""
        if not sync and hasattr(self.policy.unet_forward, "no_sync"):
            return self.policy.unet_forward.no_sync()
        return contextlib.nullcontext()

    def _trained_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in self.policy.unet.named_parameters() if p.requires_grad]

    @contextlib.contextmanager
    def _eval_weights(self):
        """The weights eval uses: the EMA when ``run.eval_ema_decay`` is set (swapped in, then back)."""
        if self.ema is None:
            yield
            return
        params = self._trained_parameters()
        current = {n: p.detach().clone() for n, p in params}
        with torch.no_grad():
            for n, p in params:
                p.copy_(self.ema[n])
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in params:
                    p.copy_(current[n])

    def _optimizer_step(self) -> float:
        params = self.policy.trainable_parameters()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.train.max_grad_norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        if self.ema is not None:
            decay = self.cfg.run.eval_ema_decay
            with torch.no_grad():
                for name, param in self._trained_parameters():
                    self.ema[name].mul_(decay).add_(param.detach(), alpha=1 - decay)
        return float(grad_norm)

    # -- 5. eval grid and checkpoints --------------------------------------------------------
    def eval_plan(self, heldout: bool = False) -> tuple[list[str], list[int]]:
        """The same prompts and seeds at every eval, so the grids show progress.

        ``eval_num_images`` training prompts (or held-out ones), each ``eval_images_per_prompt``
        times with its own seed.
        """
        run = self.cfg.run
        pool = self.heldout_prompts if heldout else self.prompts
        rng = np.random.default_rng(derive_seed(run.seed, EVAL_STREAM, 2 if heldout else 0))
        # Distinct prompts while the pool has enough (cycling through a shuffled pool after that).
        order = rng.permutation(len(pool))
        chosen = [pool[order[i % len(pool)]] for i in range(run.eval_num_images)] if pool else []
        prompts = [p for p in chosen for _ in range(run.eval_images_per_prompt)]
        base = derive_seed(run.seed, EVAL_STREAM, 3 if heldout else 1)
        return prompts, [(base + i) % 2**63 for i in range(len(prompts))]

    def eval_sample_config(self) -> SampleConfig:
        """The sampler settings of evals: training's, with ``run.eval_num_steps`` steps if set."""
        steps = self.cfg.run.eval_num_steps
        if steps is None or steps == self.cfg.sample.num_steps:
            return self.cfg.sample
        return self.cfg.sample.model_copy(
            update={"num_steps": steps, "window_size": 0, "window_start": 0, "window_start_max": None}
        )

    def evaluate(self, name: str) -> dict[str, float]:
        """Sample and score the fixed eval prompts (training, then held-out); save their grids.

        Returns ``eval_*`` metrics (``eval_heldout_*`` for held-out prompts): reward mean, caption
        accuracy when the reward reports it, diversity with several images per prompt, and
        ``eval_<name>_mean`` of every eval-only reward (``reward.eval_components``). With
        ``run.eval_ema_decay`` the EMA of the trained weights is evaluated.
        """
        self.policy.unet.eval()
        with self._eval_weights():
            return self._evaluate(name)

    def _evaluate(self, name: str) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for heldout in (False, True):
            prompts, seeds = self.eval_plan(heldout)
            if not prompts:
                continue
            prefix, suffix = ("eval_heldout_", "_heldout") if heldout else ("eval_", "")
            traj = sample_trajectories(
                self.policy, prompts, self.eval_sample_config(), seeds, keep_trajectory=False
            )
            if self.cfg.run.eval_images_per_prompt > 1:
                metrics[prefix + "diversity"] = diversity(traj.images, self.cfg.run.eval_images_per_prompt)
            try:
                result = self.reward_client.submit(traj.images, prompts).result()
            except RewardError as err:  # the grid is for people; a failed score must not stop training
                log.warning("eval %s%s got no reward: %s", name, suffix, err)
                continue
            metrics[prefix + "reward_mean"] = float(result.rewards.mean())
            for reward_name, client in self.eval_reward_clients.items():
                try:
                    extra = client.submit(traj.images, prompts).result()
                except RewardError as err:
                    log.warning("eval %s%s got no %s reward: %s", name, suffix, reward_name, err)
                    continue
                metrics[f"{prefix}{reward_name}_mean"] = float(extra.rewards.mean())
            accuracy = caption_accuracy(result.details)
            if accuracy is not None:
                metrics[prefix + "caption_accuracy"] = accuracy
            if self.run_folder is not None:
                self.run_folder.save_grid(
                    name + suffix, traj.images, prompts, result.rewards.tolist(), result.details
                )
        return metrics

    def save(self) -> None:
        if self.run_folder is None:
            return
        state = TrainingState(
            next_epoch=self.next_epoch,
            global_step=self.global_step,
            trainable=self.policy.trainable_state_dict(),
            optimizer=self.optimizer.state_dict(),
            lr_scheduler=self.lr_scheduler.state_dict(),
            stat_tracker=self.tracker.state_dict() if self.tracker is not None else None,
            rng=capture_rng(),
            ema={k: v.detach().clone() for k, v in self.ema.items()} if self.ema is not None else None,
            pending=self._pending_state(),
        )
        path = save_checkpoint(
            self.run_folder.checkpoints_dir,
            state,
            self.policy.unet,
            self.cfg.model.use_lora,
            self.cfg.run.keep_checkpoints,
        )
        log.info("saved checkpoint %s", path)
