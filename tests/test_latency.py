"""Latency rows: models measured in turns, the median with its spread, ties within noise marked."""

import pytest
import torch
from torch import nn

from distill.run import measure


class _Clock:
    """A fake `time.perf_counter`: a forward pass costs `cost` ms, twice that after `slow_after`
    passes of all models (another process takes the machine halfway through)."""

    def __init__(self, slow_after: int):
        self.t, self.calls, self.slow_after = 0.0, 0, slow_after

    def __call__(self) -> float:
        return self.t

    def run(self, cost: float) -> None:
        self.calls += 1
        self.t += cost * (2 if self.calls > self.slow_after else 1) / 1e3


class _Fake(nn.Module):
    def __init__(self, clock: _Clock, cost: float):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.clock, self.cost = clock, cost

    def forward(self, x):
        self.clock.run(self.cost)
        return x


def test_identical_models_read_the_same_when_the_machine_slows_halfway(monkeypatch):
    """issue 28.10: two identical students measured 11.6 and 5.8 ms in one run (one after the
    other, while the machine's speed changed)."""
    clock = _Clock(slow_after=5 + 20)  # as long as one model's warm-up and repeats, then twice as slow
    monkeypatch.setattr(measure.time, "perf_counter", clock)
    models = {"student_scratch": _Fake(clock, 5.0), "student_kd": _Fake(clock, 5.0)}
    got = measure.interleaved_latency(models, torch.zeros(1, 3), 1, repeats=20, warmup=5, threads=None)
    assert got["student_scratch"]["p50"] == pytest.approx(got["student_kd"]["p50"])
    assert measure.noise_groups({n: (q["p25"], q["p75"]) for n, q in got.items()}) == {
        "student_kd": "a",
        "student_scratch": "a",
    }


def test_noise_groups_share_a_letter_only_where_spreads_overlap():
    assert measure.noise_groups({"teacher": (10, 11), "s1": (5, 6), "s2": (5.5, 7)}) == {"s1": "a", "s2": "a"}
    assert measure.noise_groups({"teacher": (10, 11), "s1": (5, 6), "s2": (7, 8)}) == {}
    # a chain: a overlaps b, b overlaps c, a and c are distinct
    assert measure.noise_groups({"a": (1, 3), "b": (2, 5), "c": (4, 6)}) == {"a": "a", "b": "ab", "c": "b"}


def test_the_table_shows_the_spread_and_the_letters():
    from distill.run.report import table

    rows = [
        {"name": "teacher", "latency_ms_b1": 2.0, "latency_ms_b1_iqr": 0.1},
        {
            "name": "student_scratch",
            "latency_ms_b1": 0.52,
            "latency_ms_b1_iqr": 0.03,
            "latency_b1_within_noise": "a",
        },
        {
            "name": "student_kd",
            "latency_ms_b1": 0.5,
            "latency_ms_b1_iqr": 0.02,
            "latency_b1_within_noise": "a",
        },
    ]
    lines = table(rows).splitlines()
    assert lines[0] == "| name | latency b1 (ms) |"
    assert lines[2:] == [
        "| teacher | 2.000 (iqr 0.100) |",
        "| student_scratch | 0.520 (iqr 0.030) ~a |",
        "| student_kd | 0.500 (iqr 0.020) ~a |",
    ]


def test_a_run_reports_every_row_with_its_spread(tmp_path):
    from distill.run.pipeline import run_recipe
    from helpers import tiny_recipe

    summary = run_recipe(tiny_recipe(tmp_path, **{"report.latency_repeats": 3}), tmp_path / "run")
    for row in summary["rows"]:
        for b in (1, 64):
            assert row[f"latency_ms_b{b}"] > 0 and row[f"latency_ms_b{b}_iqr"] >= 0
    assert "(iqr " in (tmp_path / "run" / "report.md").read_text()
