"""Memory of a long cached-teacher run: is the process's resident set flat over many thousand steps?

    python benchmarks/cache_memory.py                      # 20k steps, 50k samples, 100 classes, CPU
    python benchmarks/cache_memory.py --steps 5000 --topk 10

A teacher (a small MLP, untrained: only its outputs' shape matters here) is cached with
`distill.teachers.store.write_store` over `--samples` random 32-dimensional inputs with `--classes` classes;
then a tiny student (Linear 32 -> 32 -> classes) is trained with `distill.engine.trainer.Trainer` on KD + CE
from `CachedTeacher` for `--steps` optimizer steps (batch 64: 20k steps are ~26 epochs of 50k). The
process's resident set (psutil RSS; file-backed pages of the memory-mapped store count in it) is
recorded every `--every` steps, from inside the teacher call of each step. Printed: RSS before the
first step, after the first epoch (every store page touched once), at the end and at its maximum, and
the slope of a least-squares line through the samples after the first epoch, in MB per 1k steps.
Nothing is asserted: these are measurements (docs/reliability.md quotes them).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import torch
from torch import nn
from torch.utils.data import TensorDataset

from distill import KD, CrossEntropy, Objective
from distill.data.indexed import IndexedDataset
from distill.engine.trainer import Trainer
from distill.teachers.store import CachedTeacher, write_store

MB = 1024 * 1024


class RecordingTeacher(CachedTeacher):
    """A `CachedTeacher` that records the process RSS every `every` calls (one call per step)."""

    def __init__(self, *a, every: int, **k):
        super().__init__(*a, **k)
        self.every, self.calls, self.samples = every, 0, []
        self.proc = psutil.Process()

    def __call__(self, batch):
        if self.calls % self.every == 0:
            self.samples.append((self.calls, self.proc.memory_info().rss / MB))
        self.calls += 1
        return super().__call__(batch)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=50_000)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--steps", type=int, default=20_000)
    ap.add_argument("--every", type=int, default=250, help="record RSS every N steps")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--topk", default="auto", help="'auto' (all 100 logits) or K")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="also write the samples here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.samples, 32, generator=g)
    y = torch.randint(0, args.classes, (args.samples,), generator=g)
    data = TensorDataset(x, y)
    teacher = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, args.classes))
    topk = "auto" if args.topk == "auto" else int(args.topk)

    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        t0 = time.perf_counter()
        info = write_store(teacher, data, store, topk=topk, batch_size=1024, shard_size=8192, log=None)
        print(f"store: {info.describe()} (written in {time.perf_counter() - t0:.1f} s)")

        cached = RecordingTeacher(store, dataset=data, teacher=teacher, every=args.every)
        student = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, args.classes))
        per_epoch = math.ceil(args.samples / args.batch_size)
        trainer = Trainer(
            student,
            Objective({"ce": CrossEntropy(), "kd": KD(temperature=4.0)}, {"ce": 0.5, "kd": 0.5}),
            IndexedDataset(data),
            teacher=cached,
            batch_size=args.batch_size,
            epochs=math.ceil(args.steps / per_epoch),
            max_steps=args.steps,
            progress="off",
            tensorboard=False,
        )
        rss_before = psutil.Process().memory_info().rss / MB
        t0 = time.perf_counter()
        trainer.fit()
        wall = time.perf_counter() - t0
        rss_end = psutil.Process().memory_info().rss / MB

    steps = np.array([s for s, _ in cached.samples], dtype=float)
    rss = np.array([r for _, r in cached.samples])
    warm = steps >= per_epoch
    slope = float(np.polyfit(steps[warm], rss[warm], 1)[0] * 1000) if warm.sum() >= 2 else float("nan")
    slope_all = float(np.polyfit(steps, rss, 1)[0] * 1000)
    after_epoch = float(rss[warm][0]) if warm.any() else float("nan")
    print(
        f"{cached.calls} steps in {wall:.0f} s ({per_epoch} steps per epoch), RSS sampled every "
        f"{args.every} steps ({len(rss)} samples)"
    )
    print(
        f"RSS MB: Trainer built {rss_before:.1f}, first step {rss[0]:.1f}, after epoch 1 {after_epoch:.1f}, "
        f"end {rss_end:.1f}, max {rss.max():.1f}"
    )
    print(f"slope after epoch 1: {slope:+.3f} MB per 1k steps (over all samples: {slope_all:+.3f})")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"args": vars(args), "samples": cached.samples, "slope_mb_per_1k": slope})
        )


if __name__ == "__main__":
    main()
