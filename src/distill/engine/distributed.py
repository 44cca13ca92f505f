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


def _default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank())
    return torch.device("cpu")


def barrier() -> None:
    """Waits for every rank (no-op in a single process)."""
    if world_size() <= 1:
        return
    init_if_needed(_default_device())
    torch.distributed.barrier()


def broadcast_object(obj=None):
    """Rank 0's `obj` on every rank (rank 0 gets its own back); single process: `obj`."""
    if world_size() <= 1:
        return obj
    init_if_needed(_default_device())
    box = [obj if is_main() else None]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def rank_zero_first(fn):
    """Runs `fn()` on rank 0; the other ranks wait for it, then get its result, or raise the same
    `DistillError` (so a refusal on rank 0 stops every rank instead of leaving them waiting)."""
    from distill.errors import DistillError

    if world_size() <= 1:
        return fn()
    if is_main():
        try:
            result = fn()
        except DistillError as e:
            broadcast_object(("error", str(e)))
            raise
        broadcast_object(("ok", None))
        return result
    status, message = broadcast_object()
    if status == "error":
        raise DistillError(message)
    return None


def wrap_fsdp2(
    module: nn.Module, device: torch.device, block_params: int = 1_000_000, units: tuple[str, ...] = ()
) -> nn.Module:
    """Shards `module` (the trainable task: student + adapters) across ranks with FSDP2
    (`torch.distributed.fsdp.fully_shard`): each block of a layer stack (a child of an
    `nn.ModuleList` / `nn.Sequential`) holding at least `block_params` parameters becomes its own
    unit, so only one block's full weights exist at a time; the submodules named in `units` (the
    task's `student`, so it can be evaluated on its own) and then the root take the rest. Build
    the optimizer after this call: the parameters become DTensors."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    init_if_needed(device)
    mesh = init_device_mesh(device.type, (world_size(),))
    containers = {name for name, m in module.named_modules() if isinstance(m, nn.ModuleList | nn.Sequential)}
    done: list[str] = []
    for name, m in module.named_modules():  # parents before children: the outermost block wins
        parent = name.rpartition(".")[0]
        if not name or parent not in containers or any(name.startswith(u + ".") for u in done):
            continue
        if sum(p.numel() for p in m.parameters()) >= block_params:
            fully_shard(m, mesh=mesh)
            done.append(name)
    for name in units:
        fully_shard(module.get_submodule(name), mesh=mesh)
    fully_shard(module, mesh=mesh)
    return module
