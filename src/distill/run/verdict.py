"""Did distillation help? The paired gain of each distilled row over its scratch twin, over seeds.

Each seed trains the scratch twin and the distilled student from the same initial weights on the
same data order, so the per-seed difference is a paired measurement: its mean, a 95% interval from
the t-distribution, one line that says whether distillation helped, and, when it did not, the
measured reasons this run can see (with the option to try for each).
"""

from __future__ import annotations

import math
import statistics
from typing import Any

# Two-sided 95% quantiles of Student's t, t_{0.975, df} for df = 1..30.
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042]  # fmt: skip
# The first one a row has is the verdict's (and the report's curves and trade-off plot). Perplexity
# comes first: a row that has it is a language model's (causal or masked LM), whose per-token
# accuracy is not the measure; its gain is scratch perplexity - distilled perplexity (positive =
# lower = better), its interval in perplexity.
METRICS = ("perplexity", "accuracy", "map", "cosine")
LOWER_IS_BETTER = {"perplexity"}


def headline_metric(records: list[dict[str, Any]], every: bool = False) -> str | None:
    """The first of `METRICS` that any (`every=False`) or every record has; None if none."""
    has = all if every else any
    return next((m for m in METRICS if records and has(m in r for r in records)), None)


BASELINE = "student_scratch"

# Thresholds of the reasons; each names a measured quantity.
NEAR_ONE_HOT = 0.98  # teacher's mean top-1 probability on its own training inputs
FOLLOW_MIN = 0.95  # distilled student's top-1 agreement with the teacher on the training inputs
CAPACITY_RATIO = 10.0  # teacher params / student params
TEACHER_MARGIN = 0.005  # teacher metric - scratch metric below this: no better than scratch
TEACHER_MARGIN_PPL = 0.01  # perplexity (no fixed scale): the teacher less than 1% lower than scratch


def t975(df: int) -> float:
    """t_{0.975} for `df` degrees of freedom (table to 30, then the normal quantile + 2.4/df)."""
    if df < 1:
        return float("nan")
    return _T975[df - 1] if df <= len(_T975) else 1.96 + 2.4 / df


def paired_interval(gains: list[float]) -> tuple[float, float, float]:
    """(mean, low, high): the mean paired gain and its 95% t-interval (NaN bounds for one seed)."""
    n = len(gains)
    mean = statistics.fmean(gains)
    if n < 2:
        return mean, float("nan"), float("nan")
    half = t975(n - 1) * statistics.stdev(gains) / math.sqrt(n)
    return mean, mean - half, mean + half


def _row(summary: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((r for r in summary.get("rows", []) if r.get("name") == name), None)


def _scale(metric: str) -> tuple[float, str]:
    return (100.0, " points") if metric == "accuracy" else (1.0, "")


def verdict(summaries: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The verdict over per-seed summaries (each with a `student_scratch` row); None without one."""
    if not summaries or _row(summaries[0], BASELINE) is None:
        return None
    metric = headline_metric([_row(summaries[0], BASELINE)])
    if metric is None:
        return None
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
    scale, unit = _scale(metric)
    names = [r["name"] for r in summaries[0]["rows"] if r["name"].startswith("student")]
    baselines = [n for n in names if n.startswith(BASELINE)]  # the twin, and the unmixed scratch student
    rows: dict[str, Any] = {}
    for name in [n for n in names if n not in baselines]:
        for base in baselines:
            pairs = [(_row(s, name), _row(s, base)) for s in summaries]
            if any(a is None or b is None or metric not in a or metric not in b for a, b in pairs):
                continue
            gains = [sign * (a[metric] - b[metric]) for a, b in pairs]
            mean, lo, hi = paired_interval(gains)
            lo, hi = (None, None) if math.isnan(lo) else (lo, hi)  # one seed: no interval (JSON has no NaN)
            rows[name if base == BASELINE else f"{name} vs {base}"] = {
                "row": name,
                "baseline": base,
                "metric": metric,
                "gains": gains,
                "mean": mean,
                "ci95": [lo, hi],
                "seeds_better": sum(g > 1e-12 for g in gains),
                "helped": lo is not None and lo > 0,
            }
    twins = [k for k, r in rows.items() if r["baseline"] == BASELINE]
    if not twins:
        return None
    best = max(twins, key=lambda n: rows[n]["mean"])
    others = [r for r in rows.values() if r["row"] == best and r["baseline"] != BASELINE]
    r = rows[best]

    def said(r: dict[str, Any]) -> tuple[str, str, str]:
        """(what it did, the same without the metric's name, its interval)."""
        n = len(r["gains"])
        amount = f"{abs(r['mean']) * scale:.2f}{unit}"
        if metric in LOWER_IS_BETTER:  # gains are scratch - distilled: positive means lower
            verb = f"{'lowers' if r['mean'] >= 0 else 'raises'} {metric} by {amount}"
            short, of = verb, f" ({BASELINE} - distilled {metric})"
        else:
            verb = f"{'gains' if r['mean'] >= 0 else 'loses'} {amount} of {metric}"
            short, of = verb.split(" of ")[0], ""
        interval = (
            f"95% interval {r['ci95'][0] * scale:+.2f} to {r['ci95'][1] * scale:+.2f}{unit}{of}, {n} seeds"
            if n > 1
            else "one seed: run --seeds 5 for an interval"
        )
        return verb, short, interval

    verb, _, interval = said(r)
    line = f"{best} {verb} over its scratch twin ({interval})"
    for o in others:  # the scratch student without mixing: what a user would train alone
        _, short2, interval2 = said(o)
        line += f" and {short2} over {o['baseline']} ({interval2})"
    helped = r["helped"] and all(o["helped"] for o in others)
    reasons: list[str] = []
    if helped:
        line = f"distillation helped here: {line}"
    else:
        hurt = r["ci95"][1] is not None and r["ci95"][1] < 0
        line = f"distillation {'hurt' if hurt else 'did not clearly help'} here: {line}"
        reasons = reasons_for(summaries, best, metric)
        if r["helped"] and others:
            reasons.insert(
                0,
                "the distilled student beats its mixed scratch twin but not clearly the scratch student "
                "trained without mixing: the mixing costs the label-only student more than it gives the "
                "distilled one; try a longer schedule or another trainer.mix",
            )
    return {"metric": metric, "best": best, "helped": helped, "line": line, "reasons": reasons, "rows": rows}


def _mean(summaries: list[dict[str, Any]], name: str, key: str) -> float | None:
    vals = [row[key] for s in summaries if (row := _row(s, name)) is not None and key in row]
    return statistics.fmean(vals) if vals else None


def reasons_for(summaries: list[dict[str, Any]], student: str, metric: str) -> list[str]:
    """The measured reasons distillation did not help, each with the option to try."""
    scale, unit = _scale(metric)
    out = []
    teacher = _mean(summaries, "teacher", metric)
    scratch = _mean(summaries, BASELINE, metric)
    if teacher is not None and scratch is not None:
        gap = (scratch - teacher) if metric in LOWER_IS_BETTER else (teacher - scratch)
        margin = TEACHER_MARGIN_PPL * scratch if metric in LOWER_IS_BETTER else TEACHER_MARGIN
        if gap < margin:
            out.append(
                f"the teacher ({teacher:.4f}) is no better than the scratch student ({scratch:.4f}, "
                f"{gap * scale:+.2f}{unit}): distil from a stronger teacher (more epochs, a bigger model)"
            )
    conf = _mean(summaries, "teacher", "train_confidence")
    if conf is not None and conf >= NEAR_ONE_HOT:
        mix = summaries[0].get("mix", "none")
        first = (
            f"already mixing ({mix}): try a longer schedule (patient teaching), cutmix if mixup, "
            if mix != "none"
            else "try trainer.mix (mixup or cutmix seen by both models, with a KD-only objective, and "
            "a longer schedule), "
        )
        out.append(
            f"the teacher is near one-hot on its training data (mean top-1 probability {conf:.3f}): its "
            f"soft labels there add little to the label; {first}a transfer set (data.transfer) or an "
            "earlier teacher checkpoint (teacher.use: best or epoch N)"
        )
    follow = _mean(summaries, student, "train_agreement")
    if follow is not None and follow < FOLLOW_MIN:
        out.append(
            f"the student follows the teacher on only {follow:.1%} of the training inputs: too small to "
            "follow it; try a wider student, more epochs, or a teacher assistant (distill chain)"
        )
    t_params, s_params = _mean(summaries, "teacher", "params"), _mean(summaries, student, "params")
    if t_params and s_params and t_params / s_params >= CAPACITY_RATIO:
        out.append(
            f"a large capacity gap (the teacher has {t_params / s_params:.0f}x the student's parameters): "
            "try a teacher assistant (distill chain) or a smaller teacher"
        )
    if not out:
        out.append(
            "no measured cause stands out (teacher better than scratch, soft on its training data, "
            "followed by the student): the gain may be below this run's noise; try more seeds or "
            "trainer.mix with a longer schedule"
        )
    return out


def verdict_markdown(v: dict[str, Any]) -> list[str]:
    """report.md's verdict section."""
    scale, unit = _scale(v["metric"])
    lines = ["## Verdict", "", f"**{v['line'][0].upper()}{v['line'][1:]}.**", ""]
    what = f"{v['metric']}{unit}"
    if v["metric"] in LOWER_IS_BETTER:
        what = f"{v['metric']}, scratch - distilled: positive is better"
    lines += [
        f"| row | paired gain per seed ({what}) | mean | 95% interval |",
        "|---|---|---:|---|",
    ]
    for r in v["rows"].values():
        per = ", ".join(f"{g * scale:+.2f}" for g in r["gains"])
        lo, hi = r["ci95"]
        ci = f"{lo * scale:+.2f} to {hi * scale:+.2f}" if lo is not None else "—"
        lines.append(f"| {r['row']} vs {r['baseline']} | {per} | {r['mean'] * scale:+.2f} | {ci} |")
    if v["reasons"]:
        lines += ["", "Measured reasons:", ""] + [f"- {x}" for x in v["reasons"]]
    return lines + [""]
