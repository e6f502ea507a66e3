"""The policy: a diffusers pipeline whose denoiser (UNet, or SD3's transformer) carries trainable LoRA.

What differs between model families (SD 1.x/2.x, SDXL, SD3) is asked of ``self.family``
(trainer/families.py); ``self.unet`` is the denoiser whatever its class.

Frozen weights may be fp16/bf16; trainable (LoRA) parameters are always fp32, so the first
on-policy ratio is exactly 1 and small updates are not lost to rounding. The UNet is called
through ``self.unet_forward`` so a DDP-wrapped module can be put there (LoRA gradients are then
synced: the pitfall of wrapping only attention processors).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from trainer.config import ModelConfig, SampleConfig

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"model.device: {name!r} requested but CUDA is not available")
    return device


def resolve_pretrained(name: str) -> str:
    """The folder or hub id to load: 'tiny', 'tiny-sdxl', 'tiny-sd3' and 'digits' are built here
    (cached) on first use."""
    from trainer.digits_model import DIGITS_MODEL_NAME, ensure_digits_model
    from trainer.tiny import TINY_MODEL_NAME, ensure_tiny_model
    from trainer.tiny_families import BUILDERS, ensure_tiny_family_model

    if name == TINY_MODEL_NAME:
        return str(ensure_tiny_model())
    if name == DIGITS_MODEL_NAME:
        return str(ensure_digits_model())
    if name in BUILDERS:
        return str(ensure_tiny_family_model(name))
    return name


def load_pipeline(cfg: ModelConfig, dtype: torch.dtype):
    """The family's pipeline (``model.family``, checked against the checkpoint's model_index.json)
    with the scheduler the trainer steps with ('tiny*'/'digits': built here)."""
    from trainer.families import check_family

    source: str | Path = resolve_pretrained(cfg.pretrained)
    return check_family(cfg.family, source, cfg.revision).load_pipeline(source, cfg.revision, dtype)


class DiffusionPolicy:
    def __init__(self, cfg: ModelConfig, device: torch.device | str | None = None, seed: int = 0):
        self.cfg = cfg
        self.device = resolve_device(cfg.device) if device is None else torch.device(device)
        if self.device.type == "cpu" and cfg.dtype != "fp32":
            raise ValueError(f"model.dtype: {cfg.dtype} is for GPUs; use fp32 on CPU")
        self.dtype = DTYPES[cfg.dtype]
        if self.device.type == "cuda" and cfg.allow_tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

        from trainer.families import get_family

        self.pipeline = load_pipeline(cfg, self.dtype)
        self.pipeline.to(self.device)
        self.family = get_family(cfg.family)(self.pipeline)
        self.unet = self.family.denoiser  # the denoiser: a UNet, or SD3's transformer
        self.unet._ddpo_family = self.family  # checkpoints save LoRA in this family's file layout
        self.vae = self.pipeline.vae
        self.text_encoder = self.pipeline.text_encoder
        self.tokenizer = self.pipeline.tokenizer
        self.scheduler = self.pipeline.scheduler
        for module in self.family.frozen_modules():
            module.requires_grad_(False)
            module.eval()

        if cfg.use_lora:
            from peft import LoraConfig

            # The adapters' random init comes from the run's seed, not whatever the global RNG holds.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                self.unet.add_adapter(
                    LoraConfig(
                        r=cfg.lora_rank,
                        lora_alpha=cfg.lora_alpha or cfg.lora_rank,
                        init_lora_weights="gaussian",
                        target_modules=self.family.lora_target_modules(cfg.lora_target_modules),
                    )
                )
            # LoRA params in fp32 even when the frozen weights are fp16/bf16.
            for param in self.unet.parameters():
                if param.requires_grad:
                    param.data = param.data.to(torch.float32)
        else:
            if self.dtype != torch.float32:
                raise ValueError("model.dtype must be fp32 for full fine-tuning (use_lora=false)")
            self.unet.requires_grad_(True)
        if cfg.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        # Replaced by a DDP wrapper in multi-process runs (trainer.distributed).
        self.unet_forward: nn.Module = self.unet
        self._reference_unet: nn.Module | None = None

    # -- parameters --------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.unet.parameters() if p.requires_grad]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained weights only (LoRA adapters, or the whole UNet for full fine-tuning)."""
        if self.cfg.use_lora:
            from peft.utils import get_peft_model_state_dict

            return {k: v.detach().clone() for k, v in get_peft_model_state_dict(self.unet).items()}
        return {k: v.detach().clone() for k, v in self.unet.state_dict().items()}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if self.cfg.use_lora:
            from peft.utils import set_peft_model_state_dict

            ranks = {v.shape[0] for k, v in state.items() if "lora_A" in k and v.ndim >= 2}
            if ranks and ranks != {self.cfg.lora_rank}:
                raise ValueError(
                    f"model.lora_rank is {self.cfg.lora_rank} but the checkpoint's LoRA has rank "
                    f"{', '.join(map(str, sorted(ranks)))}: resume with --model.lora_rank {min(ranks)}"
                )
            try:
                result = set_peft_model_state_dict(self.unet, state)
            except RuntimeError as err:  # shape mismatch: target modules
                raise ValueError(
                    f"the checkpoint's LoRA weights do not fit this model's adapters: {err}"
                ) from None
            unexpected = getattr(result, "unexpected_keys", [])
            if unexpected:
                raise ValueError(f"checkpoint LoRA keys do not match the model: {unexpected[:5]}")
        else:
            self.unet.load_state_dict(state)

    # -- forward pieces ----------------------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed precision on GPU for fp16/bf16 weights; nothing on CPU/fp32."""
        if self.device.type == "cuda" and self.dtype != torch.float32:
            return torch.autocast("cuda", dtype=self.dtype)
        return contextlib.nullcontext()

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], image_size: int | None = None) -> torch.Tensor:
        """The family's conditioning of ``prompts``, one (B, L, D) fp32 tensor (see trainer/families.py).

        ``image_size``: the sampled images' side in pixels (SDXL's size conditioning); default native.
        """
        return self.family.encode_prompts(prompts, self.device, image_size or self.native_resolution())

    def model_pred(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        prompt_embeds: torch.Tensor,
        negative_embeds: torch.Tensor,
        guidance_scale: float,
    ) -> torch.Tensor:
        """The network's output under CFG, out_u + w (out_c - out_u), in fp32.

        What the output is (eps, x0 or v) is the scheduler's ``prediction_type``. With w = 1 the
        unconditional forward is skipped (CFG-free: half the UNet work); otherwise one UNet call
        on the doubled batch.
        """
        batch = latents.shape[0]
        timesteps = torch.as_tensor(timesteps, device=self.device).reshape(-1).expand(batch)
        if guidance_scale > 1.0:
            model_in = torch.cat([latents, latents])
            t_in = torch.cat([timesteps, timesteps])
            embeds = torch.cat([negative_embeds, prompt_embeds])
        else:
            model_in, t_in, embeds = latents, timesteps, prompt_embeds
        # Gradients go through the DDP wrapper (synced); sampling/eval (no grad) call the UNet directly.
        unet = self.unet_forward if torch.is_grad_enabled() else self.unet
        with self.autocast():
            out = self.family.forward(unet, model_in.to(self.dtype), t_in, embeds.to(self.dtype))
        out = out.to(torch.float32)
        if guidance_scale > 1.0:
            uncond, cond = out.chunk(2)
            return uncond + guidance_scale * (cond - uncond)
        return out

    predict_noise = model_pred  # the name before prediction types other than eps were supported

    @torch.no_grad()
    def reference_model_pred(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        prompt_embeds: torch.Tensor,
        negative_embeds: torch.Tensor,
        guidance_scale: float,
    ) -> torch.Tensor:
        """``model_pred`` of the reference policy (the base model), for the KL penalty.

        With LoRA the same UNet with its adapter disabled (no second copy in memory); with full
        fine-tuning the frozen copy made by ``keep_reference``.
        """
        if not self.cfg.use_lora:
            if self._reference_unet is None:
                raise RuntimeError("full fine-tuning: call keep_reference() before training")
            trained, self.unet = self.unet, self._reference_unet
            try:
                return self.model_pred(latents, timesteps, prompt_embeds, negative_embeds, guidance_scale)
            finally:
                self.unet = trained
        self.unet.disable_adapters()
        try:
            return self.model_pred(latents, timesteps, prompt_embeds, negative_embeds, guidance_scale)
        finally:
            self.unet.enable_adapters()

    def keep_reference(self) -> None:
        """With full fine-tuning, keep a frozen copy of the base UNet as the KL reference."""
        if not self.cfg.use_lora and self._reference_unet is None:
            import copy

            self._reference_unet = copy.deepcopy(self.unet).requires_grad_(False).eval()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> uint8 RGB images (B, H, W, 3), rounded as diffusers' image processor does."""
        scaled = self.family.unscale_latents(self.vae, latents)
        images = self.vae.decode(scaled, return_dict=False)[0].to(torch.float32)
        images = (images / 2 + 0.5).clamp(0, 1)
        return (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()

    def native_resolution(self) -> int:
        return self.unet.config.sample_size * 2 ** (len(self.vae.config.block_out_channels) - 1)

    def latent_shape(self, batch: int, sample_cfg: SampleConfig) -> tuple[int, int, int, int]:
        scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        resolution = sample_cfg.resolution or self.unet.config.sample_size * scale
        if resolution % scale:
            raise ValueError(f"sample.resolution must be a multiple of {scale} for this VAE")
        side = resolution // scale
        return (batch, self.unet.config.in_channels, side, side)
