import json

import pytest

from distill.cli import main


@pytest.mark.slow
def test_demo_distilled_student_beats_scratch_over_three_seeds(tmp_path, capsys):
    """The demo's claim, measured: the KD student's mean test accuracy over 3 seeds is above the
    scratch student's (same seeds, same budget)."""
    out = tmp_path / "demo"
    assert main(["demo", "--seeds", "3", "--out", str(out)]) == 0
    rows = {r["name"]: r for r in json.loads((out / "summary.json").read_text())["rows"]}
    assert rows["teacher"]["accuracy"] > 0.97
    assert rows["student_kd"]["accuracy"] > rows["student_scratch"]["accuracy"]
    assert rows["student_kd"]["agreement"] > rows["student_scratch"]["agreement"]
    assert rows["student_kd"]["params"] < rows["teacher"]["params"] / 5
    assert "student_kd" in capsys.readouterr().out
