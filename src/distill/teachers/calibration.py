"""Teacher calibration: expected calibration error, reliability bins, temperature scaling.

A teacher's calibration decides what its softened outputs teach; `distill teachers` reports these
for each candidate, and the fitted temperature can be applied before distilling.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.adapters import Adapter, auto_adapter
from distill.checkpoint import atomic_write
from distill.outputs import as_batch


def ece(probs: Tensor, targets: Tensor, bins: int = 15) -> float:
    """Expected calibration error: Σ_b (|B_b| / N) · |accuracy(B_b) − confidence(B_b)|.

    Samples are binned by their top-1 confidence into `bins` equal-width bins over (0, 1]
    (bin b holds confidences in (b/bins, (b+1)/bins]).

    Args:
        probs: (N, C) predicted probabilities.
        targets: (N,) labels.
    """
    conf, pred = probs.float().max(-1)
    correct = (pred == targets.reshape(-1)).float()
    stats = reliability(conf, correct, bins)
    n = conf.numel()
    return float(
        sum(c / n * abs(a - m) for c, a, m in zip(stats["count"], stats["accuracy"], stats["confidence"]))
    )


def reliability(conf: Tensor, correct: Tensor, bins: int = 15) -> dict[str, list[float]]:
    """Per-bin sample count, accuracy and mean confidence (empty bins: count 0, values 0)."""
    # ceil(conf * bins) - 1 puts conf in (b/bins, (b+1)/bins] into bin b; conf = 0 goes to bin 0.
    idx = (torch.ceil(conf.double() * bins).long() - 1).clamp(0, bins - 1)
    out: dict[str, list[float]] = {"count": [], "accuracy": [], "confidence": []}
    for b in range(bins):
        m = idx == b
        k = int(m.sum())
        out["count"].append(k)
        out["accuracy"].append(float(correct[m].mean()) if k else 0.0)
        out["confidence"].append(float(conf[m].double().mean()) if k else 0.0)
    return out


def fit_temperature(logits: Tensor, targets: Tensor) -> float:
    """The temperature T minimising NLL of softmax(logits / T) (a log-spaced grid, 0.05..20)."""
    z = logits.float()
    y = targets.reshape(-1).long()
    grid = torch.exp(torch.linspace(math.log(0.05), math.log(20.0), 300))
    nll = torch.stack([F.cross_entropy(z / t, y) for t in grid])
    return float(grid[int(nll.argmin())])


class TemperatureScaled:
    """An adapter whose logits are the wrapped adapter's divided by `temperature`: a teacher
    calibrated by temperature scaling (Guo et al. 2017; the temperature from `fit_temperature` on
    held-out data). Its top-1 prediction is unchanged; its softened outputs are what it teaches."""

    def __init__(self, adapter: Adapter, temperature: float):
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.adapter, self.temperature = adapter, float(temperature)

    def __call__(self, model: nn.Module, batch):
        out = self.adapter(model, batch)
        if out.logits is not None:
            out.logits = out.logits / self.temperature
        return out


# --------------------------------------------------------------------------- recipe


@torch.inference_mode()
def collect_logits(
    model: nn.Module,
    loader,
    adapter: Adapter = auto_adapter,
    device: torch.device | None = None,
    shift: bool = False,
    ignore_index: int = -100,
) -> tuple[Tensor, Tensor]:
    """(N, C) logits and (N,) labels of `model` over `loader`, in eval mode, without autograd.

    Token logits (B, T, V) give one row per position the token losses count, with the same mask
    and shift (`distill.losses.sequence.token_mask` / `token_targets`): labels equal to
    `ignore_index` and attention-mask zeros are left out, and with `shift` (causal LMs) the logits
    at position t are paired with token t+1. Class logits (B, C) give one row per sample.
    """
    from distill.losses.sequence import token_mask, token_targets

    device = device or next(model.parameters()).device
    was = model.training
    model.eval()
    zs, ys = [], []
    try:
        for raw in loader:
            batch = as_batch(raw).to(device)
            z = adapter(model, batch).require_logits("teacher").float()
            y = batch.targets
            if z.dim() == 3 and isinstance(y, Tensor) and y.shape == z.shape[:2]:  # (B, T, V) tokens
                keep = token_mask(batch, z, shift, ignore_index)
                zs.append(z[keep].cpu())
                ys.append(token_targets(y.to(z.device), shift, ignore_index)[keep].cpu())
            else:
                zs.append(z.reshape(-1, z.shape[-1]).cpu())
                ys.append(y.reshape(-1).cpu())
    finally:
        model.train(was)
    return torch.cat(zs), torch.cat(ys)


def token_shift(evaluator: Any = None, model: nn.Module | None = None) -> bool:
    """Whether token logits predict the next token (causal LMs): the recipe evaluator's `shift`
    (the perplexity evaluator shifts for a causal LM, not for a masked LM), else whether the model
    is an `hf` causal LM. Class logits: False."""
    if hasattr(evaluator, "shift"):
        return bool(evaluator.shift)
    return getattr(model, "distill_task", None) == "causal_lm"


def score_logits(logits: Tensor, targets: Tensor, bins: int = 15) -> dict[str, Any]:
    """accuracy, nll, ece, and temperature-scaled nll/ece for (N, C) logits."""
    keep = targets != -100
    z, y = logits[keep].float(), targets[keep].long()
    probs = F.softmax(z, -1)
    t = fit_temperature(z, y)
    conf, pred = probs.max(-1)
    return {
        "accuracy": float((pred == y).float().mean()),
        "nll": float(F.cross_entropy(z, y)),
        "ece": ece(probs, y, bins),
        "temperature": t,
        "ece_at_temperature": ece(F.softmax(z / t, -1), y, bins),
        "nll_at_temperature": float(F.cross_entropy(z / t, y)),
        "mean_confidence": float(conf.mean()),
        "reliability": reliability(conf, (pred == y).float(), bins),
    }


def plot_reliability(rows: list[dict[str, Any]], path: Path) -> bool:
    """One reliability diagram per row: per-bin accuracy against the diagonal of perfect calibration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if "reliability" in r]
    if not rows:
        return False
    fig, axes = plt.subplots(1, len(rows), figsize=(3.2 * len(rows), 3.3), squeeze=False)
    for ax, r in zip(axes[0], rows):
        rel = r["reliability"]
        n = len(rel["count"])
        centers = [(b + 0.5) / n for b in range(n)]
        acc = [a if c else 0 for a, c in zip(rel["accuracy"], rel["count"])]
        ax.bar(centers, acc, width=1 / n, edgecolor="black", alpha=0.7, label="accuracy")
        # the gap bar spans accuracy..confidence, above the bar when over-confident, below when under
        lo = [min(a, m) if c else 0 for a, m, c in zip(rel["accuracy"], rel["confidence"], rel["count"])]
        gap = [abs(m - a) if c else 0 for a, m, c in zip(rel["accuracy"], rel["confidence"], rel["count"])]
        ax.bar(
            centers,
            gap,
            bottom=lo,
            width=1 / n,
            color="red",
            alpha=0.3,
            hatch="//",
            label="gap to confidence",
        )
        ax.plot([0, 1], [0, 1], "k--", lw=1)
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", title=f"{r['name']}\nECE {r['ece']:.3f}")
    axes[0][0].set_ylabel("accuracy")
    axes[0][0].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return True
