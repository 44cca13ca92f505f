"""The methods benchmark's table: relative CPU time per seed and paired differences by seed."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "methods_digits.py"


def _module():
    spec = importlib.util.spec_from_file_location("methods_digits", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(acc, cpu):
    return {"accuracy": acc, "agreement": 0.9, "epoch_s": 9.0, "epoch_cpu_s": cpu}


def test_table_relative_time_and_paired_differences():
    results = {
        "teacher": [{"accuracy": 0.99, "epoch_s": None, "epoch_cpu_s": None}] * 3,
        "scratch": [_run(0.90, 1.0), _run(0.91, 2.0), _run(0.92, 4.0)],
        "kd": [_run(0.95, 2.0), _run(0.95, 4.0), _run(0.95, 4.0)],
        "kd_adaptive": [_run(0.96, 3.0), _run(0.95, 6.0), _run(0.94, 12.0)],
    }
    rows = {line.split(" | ")[0][2:]: line for line in _module().table(results, "kd").splitlines()[2:]}
    # CPU time over the same seed's scratch time, median over seeds: kd 2, 2, 1 -> 2x (a ratio of
    # means would give 1.43x); adaptive 3x at every seed.
    assert "| 2.00× |" in rows["kd"]
    assert "| 3.00× |" in rows["kd_adaptive"]
    # Paired by seed against kd: +1, 0, -1 points -> mean 0, one better, one equal, one worse.
    assert "+0.00 ± 0.82 | 1 / 1 / 1 |" in rows["kd_adaptive"]
    assert "-4.00 ± 0.82 | 0 / 0 / 3 |" in rows["scratch"]
    assert rows["teacher"].endswith("| — | — | — |")
