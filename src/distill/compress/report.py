"""The compression report: one table row per model, and accuracy against latency and size with
the Pareto front (the models no other model beats on both axes)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from distill.checkpoint import atomic_write, atomic_write_text
from distill.errors import DistillError
from distill.run.report import table

_STAGE_NOTE = {
    "baseline": "the model as given",
    "pruned": "pruning alone (no recovery)",
    "pruned_finetune": "pruning + fine-tuning recovery",
    "pruned_kd": "pruning + distillation recovery",
    "kd_student": "distillation alone: the pruned architecture, fresh init, KD from the baseline",
    "baseline_int8": "quantization alone",
    "pruned_kd_int8": "pruning + distillation + INT8",
    "pruned_finetune_int8": "pruning + fine-tuning + INT8",
    "kd_student_int8": "distillation + INT8",
    "pruned_int8": "pruning + INT8 (no recovery)",
}


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points (cost, accuracy) not dominated: no other point has cost <= and
    accuracy >= with one of them strict. Sorted by cost."""
    keep = []
    for i, (c, a) in enumerate(points):
        dominated = any(
            (c2 <= c and a2 >= a) and (c2 < c or a2 > a) for j, (c2, a2) in enumerate(points) if j != i
        )
        if not dominated:
            keep.append(i)
    return sorted(keep, key=lambda i: points[i][0])


def _columns(rows: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    cols = [("params", "params", "{:,.0f}"), ("size_mb", "ONNX (MB)", "{:.3f}")]
    sizes = sorted({int(k[len("latency_ms_b") :]) for r in rows for k in r if _is_p50(k)})
    for b in sizes:
        cols += [
            (f"latency_ms_b{b}", f"b{b} p50 (ms)", "{:.3f}"),
            (f"latency_ms_b{b}_p95", f"b{b} p95 (ms)", "{:.3f}"),
        ]
    cols += [("accuracy", "accuracy", "{:.4f}"), ("agreement", "agreement", "{:.4f}")]
    return [c for c in cols if any(c[0] in r for r in rows)]


def _is_p50(k: str) -> bool:
    return k.startswith("latency_ms_b") and not k.endswith("_p95") and not k.endswith("_std")


def _plot(rows: list[dict[str, Any]], path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    lat = next((k for k in ("latency_ms_b32", "latency_ms_b1") if all(k in r for r in rows)), None)
    if not rows or lat is None or not all("accuracy" in r for r in rows):
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in (
        (axes[0], lat, f"ONNX Runtime CPU {lat[11:]} p50 (ms)"),
        (axes[1], "size_mb", "ONNX file (MB)"),
    ):
        pts = [(r[key], r["accuracy"]) for r in rows]
        front = pareto_front(pts)
        for i, r in enumerate(rows):
            ax.errorbar(
                r[key],
                r["accuracy"],
                yerr=r.get("accuracy_std", 0),
                fmt="o" if i in front else "x",
                color="C0" if i in front else "C7",
                capsize=3,
            )
            ax.annotate(
                r["name"], (r[key], r["accuracy"]), fontsize=7, xytext=(4, 4), textcoords="offset points"
            )
        fx, fy = zip(*[pts[i] for i in front])
        ax.step(fx, fy, where="post", color="C0", alpha=0.6, label="Pareto front")
        ax.set(xlabel=label, ylabel="test accuracy")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("accuracy vs latency and size")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return True


def write_compress_report(run_dir: str | Path) -> Path:
    """Writes report.md (+ tradeoff.png) from the run folder's summary.json."""
    run_dir = Path(run_dir)
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DistillError(f"{run_dir} has no readable summary.json ({e}); rerun with --resume") from e
    rows = summary.get("rows", [])
    seeds = summary.get("seeds")
    lines = [f"# {summary.get('recipe', 'run')}: compress", ""]
    lines.append(
        f"Seeds: {', '.join(map(str, seeds))} (mean ± std)." if seeds else f"Seed: {summary.get('seed', 0)}."
    )
    lines += [
        f"Wall time: {summary.get('wall_seconds', 0)} s. Every row is measured as an ONNX model on ONNX Runtime "
        "(CPU, fixed intra-op threads): file size, forward latency p50/p95, test accuracy and top-1 "
        "agreement with the baseline.",
        "",
    ]
    if summary.get("error"):
        lines += [f"**Stopped at stage `{summary.get('failed_stage')}`:** {summary['error']}", ""]
    if rows:
        lines += [table(rows, _columns(rows)), ""]
        lines += ["| row | what it is |", "|---|---|"]
        lines += [f"| {r['name']} | {_STAGE_NOTE.get(r['name'], '')} |" for r in rows]
        lines.append("")
        if _plot(rows, run_dir / "tradeoff.png"):
            lines += ["![accuracy vs latency and size](tradeoff.png)", ""]
    atomic_write_text(run_dir / "report.md", "\n".join(lines))
    return run_dir / "report.md"
