"""Multi-process training with torch.distributed, as launched by torchrun (no home-made launcher).

``torchrun --nproc-per-node N -m trainer ...`` sets RANK / WORLD_SIZE / LOCAL_RANK (and the
rendezvous variables for multi-node runs). NCCL on GPUs, gloo on CPU: the same code.
What the ranks share:
- the sampling plan: every epoch's global batch (prompts + noise seeds) is drawn from
  (seed, epoch, batch) and rank r samples its slice, so ranks never produce the same images;
- the rewards: gathered in global order before advantages, so every rank's per-prompt stat
  tracker sees (and holds) the same global batch;
- the LoRA gradients: averaged by DistributedDataParallel around the UNet.
Only rank 0 writes the run folder (logs, images, checkpoints).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    def device(self, requested: str) -> str | None:
        """Under torchrun each rank takes its own GPU (LOCAL_RANK); None = the config decides."""
        if self.is_distributed and torch.cuda.is_available() and requested in ("auto", "cuda"):
            return f"cuda:{self.local_rank}"
        return None


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group torchrun describes in the environment (no-op for one process).

    ``device`` is the config's ``model.device``: NCCL for CUDA, gloo for the CPU.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    if device.startswith("cuda:"):
        raise ValueError("model.device: with torchrun each rank takes the GPU of its LOCAL_RANK; use 'cuda'")
    if not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank)


def wrap_ddp(module: torch.nn.Module, info: DistInfo, device: torch.device) -> torch.nn.Module:
    """DDP around the UNet: the UNet call goes through it, so LoRA gradients are all-reduced."""
    if not info.is_distributed:
        return module
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids)


def gather_global(values: np.ndarray | list[Any], info: DistInfo, num_batches: int) -> list[Any]:
    """Gather each rank's per-sample values into the global order (batch-major, then rank).

    Locally the samples are ordered (batch, index in the rank's slice); globally, batch b holds
    rank 0's slice, then rank 1's, ... exactly as a single process would have sampled them.
    """
    local = list(values)
    if not info.is_distributed:
        return local
    gathered: list[list[Any]] = [None] * info.world_size  # type: ignore[list-item]
    dist.all_gather_object(gathered, local)
    per_batch = len(local) // num_batches
    ordered = []
    for b in range(num_batches):
        for rank_values in gathered:
            ordered.extend(rank_values[b * per_batch : (b + 1) * per_batch])
    return ordered


def local_slice(global_values: np.ndarray, info: DistInfo, num_batches: int) -> np.ndarray:
    """This rank's part of a global, batch-major array (inverse of ``gather_global``)."""
    per_rank = global_values.reshape(num_batches, info.world_size, -1)
    return per_rank[:, info.rank].reshape(-1)


def mean_across_ranks(values: dict[str, float], info: DistInfo) -> dict[str, float]:
    if not info.is_distributed:
        return values
    keys = sorted(values)
    tensor = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor)
    return {k: float(v) / info.world_size for k, v in zip(keys, tensor.tolist(), strict=True)}


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
