"""Size and speed of a model, measured the same way for every row of a report."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from distill.checkpoint import save_weights


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def size_mb(model: nn.Module) -> float:
    """Size on disk of the model's weights as a safetensors file, in MB (10^6 bytes)."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "m.safetensors"
        save_weights(path, model.state_dict())
        return path.stat().st_size / 1e6


@torch.inference_mode()
def latency_ms(
    model: nn.Module,
    example: torch.Tensor,
    batch_size: int,
    repeats: int = 50,
    warmup: int = 5,
    threads: int | None = 1,
) -> dict[str, float]:
    """CPU forward latency at `batch_size`: median and 95th percentile over `repeats` runs, in ms.

    The thread count is fixed (default 1) so numbers compare across machines and runs.
    """
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        model = model.eval()
        x = example[:1].expand(batch_size, *example.shape[1:]).contiguous()
        device = next(model.parameters()).device
        x = x.to(device)
        for _ in range(warmup):
            model(x)
        times = []
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            model(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) * 1e3)
    finally:
        torch.set_num_threads(old)
    times.sort()
    return {"p50": statistics.median(times), "p95": times[min(len(times) - 1, int(0.95 * len(times)))]}
