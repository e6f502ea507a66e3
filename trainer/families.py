"""Model families: what differs between SD 1.x/2.x, SDXL and SD3, behind one small interface.

The sampler and the trainer ask the policy's family for
- the pipeline (``load_pipeline``: diffusers class, scheduler the trainer steps with),
- prompt conditioning (``encode_prompts``) and one denoiser call (``forward``),
- one denoising step with its log-prob (``step_with_logprob``), the deterministic step used outside
  a training window (``step_deterministic``) and the step's Gaussian (``transition``: mean and std,
  for the closed-form KL to the reference),
- latents -> VAE input (``unscale_latents``), LoRA target modules and the LoRA file's layout.

Conditioning travels as ONE tensor per sample, (B, L, D) fp32, so trajectories, minibatch
indexing, DDP and the training loop stay family-agnostic: a family whose denoiser needs more than
the text sequence (SDXL: pooled text embedding + size/crop time ids; SD3: pooled embedding) appends
those vectors as trailing rows (zero-padded to width D) and splits them off in ``forward``.

  sd    StableDiffusionPipeline    UNet2DConditionModel   DDIM (eta)     one CLIP encoder
  sdxl  StableDiffusionXLPipeline  UNet2DConditionModel   DDIM (eta)     two CLIP, pooled, time ids
  sd3   StableDiffusion3Pipeline   SD3Transformer2DModel  flow SDE (a)   two CLIP + T5, pooled
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch

from trainer.ddim import ddim_step_deterministic, ddim_step_with_logprob, ddim_transition
from trainer.flow_sde import flow_step_deterministic, flow_transition, sde_step_with_logprob

SD_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def pack_conditioning(sequence: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
    """(B, L, D) sequence + (B, P) vectors -> (B, L + ceil(P / D), D): the vectors as trailing rows."""
    batch, _, width = sequence.shape
    rows = math.ceil(extra.shape[1] / width)
    padded = torch.zeros(batch, rows * width, dtype=sequence.dtype, device=sequence.device)
    padded[:, : extra.shape[1]] = extra.to(sequence.dtype)
    return torch.cat([sequence, padded.reshape(batch, rows, width)], dim=1)


def unpack_conditioning(packed: torch.Tensor, extra_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of ``pack_conditioning``: (sequence, extra vectors of width ``extra_dim``)."""
    rows = math.ceil(extra_dim / packed.shape[2])
    extra = packed[:, -rows:].reshape(packed.shape[0], -1)[:, :extra_dim]
    return packed[:, :-rows], extra


class ModelFamily:
    """One model family; subclasses set the class attributes and override what differs."""

    name: ClassVar[str]
    pipeline_class: ClassVar[str]  # diffusers class name, as in model_index.json's _class_name
    denoiser_name: ClassVar[str] = "unet"  # pipeline attribute; also the LoRA file's key prefix
    default_lora_targets: ClassVar[tuple[str, ...]] = SD_LORA_TARGETS
    timestep_dtype: ClassVar[torch.dtype] = torch.long  # how trajectories store timesteps
    load_kwargs: ClassVar[dict[str, Any]] = {}

    def __init__(self, pipeline):
        self.pipeline = pipeline

    # -- loading ---------------------------------------------------------------------------
    @classmethod
    def pipeline_cls(cls):
        import diffusers

        return getattr(diffusers, cls.pipeline_class)

    @classmethod
    def load_pipeline(cls, source: str | Path, revision: str | None, dtype: torch.dtype):
        try:
            pipe = cls.pipeline_cls().from_pretrained(
                source, revision=revision, torch_dtype=dtype, **cls.load_kwargs
            )
        except (OSError, ValueError) as err:
            raise ValueError(
                f"model.pretrained: cannot load a {cls.pipeline_class} from {str(source)!r}: {err}"
            ) from err
        pipe.scheduler = cls.make_scheduler(pipe.scheduler)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @classmethod
    def make_scheduler(cls, scheduler):
        raise NotImplementedError

    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self.pipeline, self.denoiser_name)

    def frozen_modules(self) -> list[torch.nn.Module]:
        """Every network of the pipeline (all frozen; LoRA is added to the denoiser afterwards)."""
        return [m for m in self.pipeline.components.values() if isinstance(m, torch.nn.Module)]

    def lora_target_modules(self, configured: Sequence[str]) -> list[str]:
        """``model.lora_target_modules``; its default (SD's attention projections) means the family's."""
        if tuple(configured) == SD_LORA_TARGETS:
            return list(self.default_lora_targets)
        return list(configured)

    def save_lora(self, folder: Path, layers: dict[str, torch.Tensor], metadata: dict | None) -> None:
        """Write LoRA layers so that this family's ``pipe.load_lora_weights(folder)`` restores them."""
        import inspect

        save = self.pipeline_cls().save_lora_weights
        kwargs: dict[str, Any] = {f"{self.denoiser_name}_lora_layers": layers, "safe_serialization": True}
        meta_arg = f"{self.denoiser_name}_lora_adapter_metadata"
        if metadata is not None and meta_arg in inspect.signature(save).parameters:  # diffusers >= 0.34
            kwargs[meta_arg] = metadata
        save(folder, **kwargs)

    # -- conditioning and the denoiser -----------------------------------------------------
    def encode_prompts(self, prompts: Sequence[str], device: torch.device, image_size: int) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, denoiser, latents: torch.Tensor, timesteps: torch.Tensor, embeds: torch.Tensor):
        raise NotImplementedError

    def unscale_latents(self, vae, latents: torch.Tensor) -> torch.Tensor:
        return latents.to(vae.dtype) / vae.config.scaling_factor

    # -- the step --------------------------------------------------------------------------
    def step_with_logprob(
        self, scheduler, model_output, timestep, sample, cfg, prev_sample=None, generator=None
    ):
        raise NotImplementedError

    def step_deterministic(self, scheduler, model_output, timestep, sample):
        raise NotImplementedError

    def transition(self, scheduler, model_output, timestep, sample, cfg):
        raise NotImplementedError


class _DDIMFamily(ModelFamily):
    """DDIM with eta > 0 (``trainer.ddim``), epsilon / v / sample prediction."""

    def step_with_logprob(
        self, scheduler, model_output, timestep, sample, cfg, prev_sample=None, generator=None
    ):
        return ddim_step_with_logprob(
            scheduler,
            model_output,
            timestep,
            sample,
            eta=cfg.eta,
            prev_sample=prev_sample,
            generator=generator,
        )

    def step_deterministic(self, scheduler, model_output, timestep, sample):
        return ddim_step_deterministic(scheduler, model_output, timestep, sample)

    def transition(self, scheduler, model_output, timestep, sample, cfg):
        return ddim_transition(scheduler, model_output, timestep, sample, cfg.eta)


class SDFamily(_DDIMFamily):
    """Stable Diffusion 1.x / 2.x: one CLIP text encoder."""

    name = "sd"
    pipeline_class = "StableDiffusionPipeline"
    load_kwargs: ClassVar[dict[str, Any]] = {"safety_checker": None, "requires_safety_checker": False}

    @classmethod
    def make_scheduler(cls, scheduler):
        from diffusers import DDIMScheduler

        return DDIMScheduler.from_config(scheduler.config)

    def frozen_modules(self) -> list[torch.nn.Module]:
        return [self.pipeline.vae, self.pipeline.text_encoder, self.pipeline.unet]

    def encode_prompts(self, prompts, device, image_size):
        tokenizer = self.pipeline.tokenizer
        tokens = tokenizer(
            list(prompts),
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(device)
        return self.pipeline.text_encoder(tokens)[0].to(torch.float32)

    def forward(self, denoiser, latents, timesteps, embeds):
        return denoiser(latents, timesteps, encoder_hidden_states=embeds, return_dict=False)[0]


class SDXLFamily(_DDIMFamily):
    """SDXL: two CLIP encoders (hidden states side by side), the second's pooled embedding and the
    (original size, crop, target size) time ids as added conditioning of the UNet."""

    name = "sdxl"
    pipeline_class = "StableDiffusionXLPipeline"
    load_kwargs: ClassVar[dict[str, Any]] = {"add_watermarker": False}

    @classmethod
    def make_scheduler(cls, scheduler):
        from diffusers import DDIMScheduler

        config = dict(scheduler.config)
        # SDXL ships an Euler config without set_alpha_to_one; DDIM's default (True) would make the
        # last step's std 0 (no log-prob), so the final alpha is alphas_cumprod[0] as in SD v1.
        config.setdefault("set_alpha_to_one", False)
        return DDIMScheduler.from_config(config)

    @property
    def _extra_dim(self) -> int:
        return self.pipeline.text_encoder_2.config.projection_dim + 6

    def encode_prompts(self, prompts, device, image_size):
        pipe = self.pipeline
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt=list(prompts), device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        size = (image_size, image_size)
        time_ids = pipe._get_add_time_ids(
            size,
            (0, 0),
            size,
            dtype=torch.float32,
            text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim,
        )
        extra = torch.cat([pooled.to(torch.float32), time_ids.to(device).expand(len(prompts), -1)], dim=1)
        return pack_conditioning(embeds.to(torch.float32), extra)

    def forward(self, denoiser, latents, timesteps, embeds):
        sequence, extra = unpack_conditioning(embeds, self._extra_dim)
        pooled, time_ids = extra[:, :-6], extra[:, -6:]
        return denoiser(
            latents,
            timesteps,
            encoder_hidden_states=sequence,
            added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
            return_dict=False,
        )[0]


class SD3Family(ModelFamily):
    """SD3 / SD3.5: two CLIP encoders + T5 into a joint-attention transformer (MMDiT), rectified
    flow sampled with ``FlowMatchEulerDiscreteScheduler``, trained with the SDE step of
    ``trainer.flow_sde`` (noise level ``sample.noise_level``)."""

    name = "sd3"
    pipeline_class = "StableDiffusion3Pipeline"
    denoiser_name = "transformer"
    default_lora_targets = (*SD_LORA_TARGETS, "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
    timestep_dtype = torch.float32
    max_sequence_length = 256  # T5 tokens, the pipeline's default

    @classmethod
    def make_scheduler(cls, scheduler):
        from diffusers import FlowMatchEulerDiscreteScheduler

        if not isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
            raise ValueError(
                f"sd3 needs a FlowMatchEulerDiscreteScheduler, the checkpoint has {type(scheduler).__name__}"
            )
        if scheduler.config.get("use_dynamic_shifting"):
            raise ValueError("sd3: schedulers with use_dynamic_shifting are not supported yet")
        return scheduler

    @property
    def _pooled_dim(self) -> int:
        return self.pipeline.transformer.config.pooled_projection_dim

    def encode_prompts(self, prompts, device, image_size):
        embeds, _, pooled, _ = self.pipeline.encode_prompt(
            prompt=list(prompts),
            prompt_2=None,
            prompt_3=None,
            device=device,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        return pack_conditioning(embeds.to(torch.float32), pooled.to(torch.float32))

    def forward(self, denoiser, latents, timesteps, embeds):
        sequence, pooled = unpack_conditioning(embeds, self._pooled_dim)
        return denoiser(
            hidden_states=latents,
            timestep=timesteps,
            encoder_hidden_states=sequence,
            pooled_projections=pooled,
            return_dict=False,
        )[0]

    def unscale_latents(self, vae, latents):
        return latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor

    def step_with_logprob(
        self, scheduler, model_output, timestep, sample, cfg, prev_sample=None, generator=None
    ):
        return sde_step_with_logprob(
            scheduler,
            model_output,
            timestep,
            sample,
            noise_level=cfg.noise_level,
            prev_sample=prev_sample,
            generator=generator,
        )

    def step_deterministic(self, scheduler, model_output, timestep, sample):
        return flow_step_deterministic(scheduler, model_output, timestep, sample)

    def transition(self, scheduler, model_output, timestep, sample, cfg):
        return flow_transition(scheduler, model_output, timestep, sample, cfg.noise_level)


FAMILIES: dict[str, type[ModelFamily]] = {f.name: f for f in (SDFamily, SDXLFamily, SD3Family)}
PIPELINE_FAMILIES: dict[str, str] = {f.pipeline_class: f.name for f in FAMILIES.values()}


def get_family(name: str) -> type[ModelFamily]:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"model.family: unknown family {name!r}; valid: {', '.join(FAMILIES)}") from None


def detect_family(source: str | Path, revision: str | None = None) -> tuple[str | None, str | None]:
    """(family name, pipeline class) from the checkpoint's model_index.json; (None, None) if unreadable."""
    from diffusers import DiffusionPipeline

    try:
        config = DiffusionPipeline.load_config(str(source), revision=revision)
    except (OSError, ValueError):
        return None, None  # loading reports the real error
    class_name = config.get("_class_name")
    return PIPELINE_FAMILIES.get(class_name), class_name


def check_family(name: str, source: str | Path, revision: str | None = None) -> type[ModelFamily]:
    """The configured family, after checking it against the checkpoint's model_index.json."""
    family = get_family(name)
    detected, class_name = detect_family(source, revision)
    if class_name is not None and detected != name:
        what = f"family {detected!r}" if detected else f"no supported family (valid: {', '.join(FAMILIES)})"
        raise ValueError(
            f"model.family is {name!r} but {str(source)!r} holds a {class_name} ({what})"
            + (f": set --model.family {detected}" if detected else "")
        )
    return family


def family_of_denoiser(denoiser: torch.nn.Module) -> ModelFamily | None:
    """The family a LoRA-carrying denoiser was loaded as (set by DiffusionPolicy), if any."""
    return getattr(denoiser, "_ddpo_family", None)
