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


def latency_ms(
    model: nn.Module,
    example: torch.Tensor,
    batch_size: int,
    repeats: int = 50,
    warmup: int = 5,
    threads: int | None = 1,
) -> dict[str, float]:
    """CPU forward latency of one model at `batch_size`, in ms: see `interleaved_latency`."""
    return interleaved_latency({"model": model}, example, batch_size, repeats, warmup, threads)["model"]


@torch.inference_mode()
def interleaved_latency(
    models: dict[str, nn.Module],
    example: torch.Tensor,
    batch_size: int,
    repeats: int = 50,
    warmup: int = 5,
    threads: int | None = 1,
) -> dict[str, dict[str, float]]:
    """Forward latency of several models at `batch_size`, measured in turns, in ms.

    Each of `repeats` rounds runs every model once, starting from a different one each round, so a
    machine that slows down for a while (another process, frequency scaling) slows every model
    alike: measured one after another, two identical students once read 11.6 and 5.8 ms. The
    thread count is fixed (default 1) so numbers compare across machines and runs.

    Returns:
        Per model: `p50` (the median), `p25` / `p75` (the spread: the middle half of the runs)
        and `p95`.
    """
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    names = list(models)
    times: dict[str, list[float]] = {n: [] for n in names}
    try:
        inputs = {}
        for n in names:
            model = models[n].eval()
            device = next(model.parameters()).device
            inputs[n] = example[:1].expand(batch_size, *example.shape[1:]).contiguous().to(device)
            for _ in range(warmup):
                model(inputs[n])
        for r in range(repeats):
            for j in range(len(names)):
                n = names[(r + j) % len(names)]
                times[n].append(_timed(models[n], inputs[n]))
    finally:
        torch.set_num_threads(old)
    return {n: _quantiles(t) for n, t in times.items()}


def _timed(model: nn.Module, x: torch.Tensor) -> float:
    cuda = x.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    model(x)
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


def _quantiles(times: list[float]) -> dict[str, float]:
    times = sorted(times)

    def q(f: float) -> float:
        return times[min(len(times) - 1, int(f * len(times)))]

    return {"p50": statistics.median(times), "p25": q(0.25), "p75": q(0.75), "p95": q(0.95)}


def noise_groups(spread: dict[str, tuple[float, float]]) -> dict[str, str]:
    """Letters for latencies that do not differ beyond noise: rows sharing a letter have
    overlapping spreads (the middle half of their runs), so their difference is within noise.

    Args:
        spread: per row, its (p25, p75) latency.

    Returns:
        Per row that shares a letter with another, its letters ("a", "ab", ...); rows distinct
        from every other are left out.
    """
    cliques: list[frozenset[str]] = []
    for _, hi in sorted(spread.values(), key=lambda v: v[1]):  # the rows whose spread holds `hi`
        group = frozenset(n for n, (a, b) in spread.items() if a <= hi <= b)
        if len(group) > 1 and not any(group <= c for c in cliques):
            cliques = [c for c in cliques if not c <= group] + [group]
    letters: dict[str, str] = {}
    for i, group in enumerate(cliques):
        for n in sorted(group):
            letters[n] = letters.get(n, "") + "abcdefghijklmnopqrstuvwxyz"[i % 26]
    return letters
