"""How long `distill --help` takes, against a bare `import torch` (which it must not pay for).

    python benchmarks/help_time.py [--repeats 5]

Runs each in a fresh interpreter and prints the median wall time.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time


def wall(cmd: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    rows = [
        ("python -c pass", [sys.executable, "-c", "pass"]),
        ("python -m distill --help", [sys.executable, "-m", "distill", "--help"]),
        ("python -m distill run --help", [sys.executable, "-m", "distill", "run", "--help"]),
        ("python -c 'import torch'", [sys.executable, "-c", "import torch"]),
    ]
    print(f"| command | median wall time (s), {args.repeats} runs |\n| --- | --- |")
    for name, cmd in rows:
        print(f"| `{name}` | {wall(cmd, args.repeats):.3f} |")


if __name__ == "__main__":
    main()
