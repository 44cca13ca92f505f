"""Validation accuracy per epoch of the scratch twin, the unmixed scratch student and the distilled
student, mean over the seeds of one `distill_gain.py` variant (its run folders' metrics.jsonl):

    python benchmarks/distill_gain.py recipes/digits.yaml --seeds 5 --work /tmp/distill_gain \\
        --variant "cutmix_kd_t1_e150_u=trainer.mix.name=cutmix trainer.epochs=150 \\
                   objective.terms={kd: {name: kd, init_args: {temperature: 1}}} baselines=[scratch,scratch_unmixed]"
    python benchmarks/patient_curves.py /tmp/distill_gain/digits/cutmix_kd_t1_e150_u docs/img/patient_curves.png
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STAGES = {
    "student_scratch": "scratch twin (same cutmix, labels)",
    "student_scratch_unmixed": "scratch, no mixing",
    "student_kd": "distilled (cutmix, KD at T = 1)",
}


def curves(folder: Path) -> dict[str, dict[int, list[float]]]:
    out: dict[str, dict[int, list[float]]] = {}
    for metrics in sorted(folder.glob("seed*/metrics.jsonl")):
        for line in metrics.read_text().splitlines():
            r = json.loads(line)
            if r.get("split") == "val" and r.get("stage") in STAGES:
                out.setdefault(r["stage"], {}).setdefault(int(r["epoch"]), []).append(r["accuracy"])
    return out


def main() -> None:
    folder, target = Path(sys.argv[1]), Path(sys.argv[2])
    data = curves(folder)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for stage, label in STAGES.items():
        pts = sorted(data.get(stage, {}).items())
        if pts:
            ax.plot([e for e, _ in pts], [100 * statistics.fmean(v) for _, v in pts], label=label)
    ax.set(xlabel="epoch", ylabel="validation accuracy (%), mean of seeds", ylim=(90, 100))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, dpi=110)
    for stage in STAGES:
        pts = sorted(data.get(stage, {}).items())
        marks = {e: round(100 * statistics.fmean(v), 2) for e, v in pts if e in (10, 30, 60, 90, 120, 150)}
        print(stage, marks)


if __name__ == "__main__":
    main()
