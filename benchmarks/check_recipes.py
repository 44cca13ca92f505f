"""Wall time of `distill check` on every top-level recipe in recipes/, each in a fresh process
(start-up and imports included), as a user runs it. Benchmark settings files (`benchmark:`) and
recipes whose data or extras this machine lacks are listed with the reason instead.

    python benchmarks/check_recipes.py               # prints a markdown table
    python benchmarks/check_recipes.py --threads 1   # OMP_NUM_THREADS for each check
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# CIFAR-100 is not on most machines: the compression recipe is checked on the generated stand-in.
OVERRIDES = {
    "compress_cifar.yaml": ["data.name=cifar100_standin", "data.init_args={n_train: 64, n_test: 32}"]
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    src = str(ROOT / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    print("| recipe | exit | seconds | note |\n|---|---:|---:|---|")
    total = 0.0
    for path in sorted((ROOT / "recipes").glob("*.yaml")):
        cmd = [sys.executable, "-m", "distill", "check", str(path), *OVERRIDES.get(path.name, [])]
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        dt = time.perf_counter() - t0
        total += dt
        note = r.stdout.strip().splitlines()[-1] if r.returncode == 0 else r.stderr.strip().splitlines()[-1]
        print(f"| {path.name} | {r.returncode} | {dt:.1f} | {note[:110]} |")
    print(f"\ntotal: {total:.1f} s")


if __name__ == "__main__":
    main()
