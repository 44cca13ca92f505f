"""Data-parallel helpers: `torchrun` sets RANK / WORLD_SIZE / LOCAL_RANK; without it these are no-ops."""

from __future__ import annotations

import os

import torch
from torch import nn


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def init_if_needed(device: torch.device) -> None:
    """Starts the process group under torchrun (nccl on CUDA, gloo on CPU)."""
    if world_size() > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.distributed.init_process_group(backend)


def wrap_ddp(module: nn.Module, device: torch.device) -> nn.Module:
    """Wraps only the trainable task (student + adapters) in DDP when several processes run."""
    if world_size() <= 1:
        return module
    init_if_needed(device)
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index] if device.type == "cuda" else None
    return DDP(module, device_ids=ids, find_unused_parameters=True)


def all_reduce_mean(metrics: dict[str, float], device: torch.device) -> dict[str, float]:
    """Averages numeric metrics over ranks (each rank evaluated its shard)."""
    if world_size() <= 1 or not torch.distributed.is_initialized():
        return metrics
    keys = sorted(k for k, v in metrics.items() if isinstance(v, int | float))
    t = torch.tensor([float(metrics[k]) for k in keys], device=device, dtype=torch.float64)
    torch.distributed.all_reduce(t)
    t /= world_size()
    return {**metrics, **dict(zip(keys, t.tolist()))}
