"""Checkpoints that resume exactly, with LoRA weights that diffusers loads as they are.

A checkpoint folder holds:
    lora/pytorch_lora_weights.safetensors   ``pipe.load_lora_weights(folder / "lora")`` (LoRA runs)
    unet/                                   ``UNet2DConditionModel.from_pretrained`` (full fine-tuning)
    training_state.pt                       epoch, global step, optimizer, LR scheduler, stat-tracker
                                            buffers, RNG states and the exact fp32 trained weights
The epoch is stored explicitly (never derived from a folder counter: a known pitfall).
"""

from __future__ import annotations

import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

TRAINING_STATE = "training_state.pt"
LATEST = "latest"


@dataclass
class TrainingState:
    next_epoch: int  # the first epoch still to run
    global_step: int
    trainable: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    lr_scheduler: dict[str, Any]
    stat_tracker: dict[str, Any] | None
    rng: dict[str, Any]
    ema: dict[str, torch.Tensor] | None = None  # run.eval_ema_decay's average of the trained weights
    # train.max_staleness 1: the next epoch's samples, drawn before this checkpoint's last update
    # (their rewards are requested again on resume).
    pending: dict[str, Any] | None = None


def capture_rng() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        # A run resumed on fewer GPUs than it was saved on restores the devices it has.
        for device, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device)


def save_lora(unet: torch.nn.Module, folder: Path) -> None:
    """Write the UNet's LoRA adapters so that ``pipe.load_lora_weights(folder)`` restores them exactly.

    The peft key format is saved as it is (diffusers reads it); converting to the older diffusers
    key names lost the attention adapters on load once conv layers carry LoRA too. The adapter
    config (rank, alpha, targets) travels in the file's metadata, so alpha != rank survives.
    """
    import inspect

    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    from trainer.families import family_of_denoiser

    family = family_of_denoiser(unet)
    if family is not None and family.name != "sd":  # SDXL / SD3: that pipeline's file layout
        family.save_lora(folder, get_peft_model_state_dict(unet), unet.peft_config["default"].to_dict())
        return
    kwargs = {}
    accepted = inspect.signature(StableDiffusionPipeline.save_lora_weights).parameters
    if "unet_lora_adapter_metadata" in accepted:  # diffusers >= 0.34
        kwargs["unet_lora_adapter_metadata"] = unet.peft_config["default"].to_dict()
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=get_peft_model_state_dict(unet), safe_serialization=True, **kwargs
    )


def save_checkpoint(
    checkpoints_dir: Path, state: TrainingState, unet: torch.nn.Module, use_lora: bool, keep: int
) -> Path:
    """Write ``epoch_XXXX`` atomically (temp folder + rename), point ``latest`` at it, prune old ones."""
    name = f"epoch_{state.next_epoch:04d}"
    final = checkpoints_dir / name
    tmp = checkpoints_dir / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if use_lora:
        save_lora(unet, tmp / "lora")
    else:
        unet.save_pretrained(tmp / "unet")
    torch.save(state.__dict__, tmp / TRAINING_STATE)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    (checkpoints_dir / LATEST).write_text(name + "\n")
    # Prune only older checkpoints: after a resume from an earlier one, later (abandoned) ones stay.
    older = sorted(p for p in checkpoints_dir.glob("epoch_*") if p.is_dir() and p.name < name)
    for old in older[: max(0, len(older) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run folder / checkpoints folder whose ``latest`` names one."""
    path = Path(path)
    for candidate in (path, path / "checkpoints"):
        if (candidate / TRAINING_STATE).exists():
            return candidate
        if (candidate / LATEST).exists():
            checkpoint = candidate / (candidate / LATEST).read_text().strip()
            if (checkpoint / TRAINING_STATE).exists():
                return checkpoint
    raise FileNotFoundError(f"run.resume: no checkpoint found at {path}")


def _numpy_rng_globals() -> list[Any]:
    """What the pickled ``np.random.get_state()`` needs (a uint32 ndarray), and nothing else."""
    return [
        np.ndarray,
        np.dtype,
        type(np.dtype(np.uint32)),
        (getattr(np, "_core", None) or np.core).multiarray._reconstruct,
    ]


def load_training_state(checkpoint: Path) -> TrainingState:
    # weights_only=True: a run folder from elsewhere must not run code on resume; the only
    # non-tensor classes allowed are the ones the numpy RNG state is pickled with.
    with torch.serialization.safe_globals(_numpy_rng_globals()):
        data = torch.load(checkpoint / TRAINING_STATE, map_location="cpu", weights_only=True)
    return TrainingState(**data)
