import argparse
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distill.errors import ConfigError
from distill.teacher_choice import TeachersRecipe, TeacherThresholds, assess, candidate_row, run_teachers
from distill.teachers.calibration import ece, fit_temperature, reliability


def test_ece_against_hand_computation():
    # 4 samples, 3 bins of width 1/3.
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.4, 0.6], [0.55, 0.45]])
    y = torch.tensor([0, 1, 1, 0])
    # confidences 0.9, 0.8 -> bin 2 (acc 1/2, conf 0.85); 0.6, 0.55 -> bin 1 (acc 1, conf 0.575)
    expected = 2 / 4 * abs(0.5 - 0.85) + 2 / 4 * abs(1.0 - 0.575)
    assert ece(probs, y, bins=3) == pytest.approx(expected)
    rel = reliability(probs.max(-1).values, (probs.argmax(-1) == y).float(), 3)
    assert rel["count"] == [0, 2, 2]


def test_ece_bin_edges_are_right_closed():
    probs = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
    rel = reliability(probs.max(-1).values, torch.ones(2), bins=2)
    assert rel["count"] == [1, 1]  # 0.5 is in (0, 0.5], 1.0 in (0.5, 1]


def test_perfectly_confident_and_right_has_zero_ece():
    y = torch.arange(5)
    assert ece(F.one_hot(y, 5).float(), y) == pytest.approx(0.0)


def test_fit_temperature_recovers_a_known_scale():
    torch.manual_seed(0)
    z = torch.randn(4000, 5) * 2
    y = torch.distributions.Categorical(logits=z).sample()
    t = fit_temperature(z * 3, y)  # logits 3x too sharp: the best T is about 3
    assert 2.5 < t < 3.6


class _Bigram(nn.Module):
    """A causal LM whose logits at position t are `scale` times the true log-probabilities of
    token t+1 given token t (so its best temperature is `scale`)."""

    def __init__(self, table, scale):
        super().__init__()
        self.table = nn.Parameter(table.clone())
        self.scale = scale

    def forward(self, input_ids):
        return self.scale * self.table[input_ids]  # (B, T, V)


def _bigram_batches(table, n=64, t=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.empty(n, t, dtype=torch.long)
    ids[:, 0] = torch.randint(0, table.shape[0], (n,), generator=g)
    for k in range(1, t):  # token k drawn from softmax(table[token k-1])
        ids[:, k] = torch.multinomial(F.softmax(table[ids[:, k - 1]], -1), 1, generator=g)[:, 0]
    labels, attn = ids.clone(), torch.ones_like(ids)
    labels[::2, -5:] = -100  # padded tails: never counted
    attn[::2, -5:] = 0
    return [{"input_ids": ids[i : i + 16], "labels": labels[i : i + 16], "attention_mask": attn[i : i + 16]}
            for i in range(0, n, 16)]  # fmt: skip


def test_calibrating_a_causal_lm_pairs_position_t_with_token_t_plus_1():
    from distill.engine.evaluate import PerplexityEvaluator
    from distill.outputs import Outputs
    from distill.teachers.calibration import collect_logits, token_shift

    table = torch.randn(12, 12, generator=torch.Generator().manual_seed(1)) * 2
    model = _Bigram(table, scale=3.0)
    adapter = lambda m, b: Outputs(m(b.inputs["input_ids"]))  # noqa: E731
    shift = token_shift(PerplexityEvaluator())  # what a causal LM recipe's evaluator says
    assert shift and not token_shift(PerplexityEvaluator(shift=False)) and not token_shift(None)
    z, y = collect_logits(model, _bigram_batches(table), adapter, shift=shift)
    assert not z.requires_grad  # no autograd graph kept over the whole split
    # 64 sequences of 24 tokens, 23 next-token pairs each, minus the 5 padded ones of every other
    assert z.shape == (64 * 23 - 32 * 5, 12) and (y != -100).all()
    t = fit_temperature(z, y)
    assert 2.5 < t < 3.6  # logits 3x too sharp: T about 3, not the end of the grid (20)
    ids = torch.cat([b["input_ids"] for b in _bigram_batches(table)])
    best = float((table.argmax(-1)[ids[:, :-1]] == ids[:, 1:]).float().mean())  # the true bigram's argmax
    assert abs(float((z.argmax(-1) == y).float().mean()) - best) < 0.05 and best > 0.3


class _Linear(nn.Module):
    def __init__(self, w, scale=1.0):
        super().__init__()
        self.w = nn.Parameter(w.clone())
        self.scale = scale

    def forward(self, x):
        return self.scale * x @ self.w


def _calibrated_data(n=3000, c=4, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d, c, generator=g)
    x = torch.randn(n, d, generator=g)
    y = torch.multinomial(F.softmax(x @ w, -1), 1, generator=g)[:, 0]  # labels drawn from the model
    return w, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=500)


def test_report_ranks_calibration_of_models_with_known_calibration():
    w, loader = _calibrated_data()
    th = TeacherThresholds(ece_max=0.05, param_ratio_max=100)
    student = {"accuracy": 0.3, "params": 24}
    calibrated = candidate_row("calibrated", _Linear(w), loader, student, th)
    over = candidate_row("overconfident", _Linear(w, 4.0), loader, student, th)
    under = candidate_row("underconfident", _Linear(w, 0.25), loader, student, th)
    assert calibrated["ece"] < 0.04
    assert over["ece"] > 0.1 and under["ece"] > 0.1
    assert over["accuracy"] == calibrated["accuracy"]  # scaling changes confidence, not the argmax
    assert not any("calibrated" in m for m in calibrated["warnings"])
    assert any("over-confident" in m for m in over["warnings"])
    assert any("under-confident" in m for m in under["warnings"])
    assert 3.0 < over["temperature"] < 5.5 and over["ece_at_temperature"] < 0.04
    assert over["nll"] > calibrated["nll"]


def test_assess_warns_on_weak_teacher_and_large_gap():
    th = TeacherThresholds(ece_max=0.5, param_ratio_max=10)
    row = {
        "accuracy": 0.9,
        "ece": 0.01,
        "mean_confidence": 0.9,
        "temperature": 1.0,
        "ece_at_temperature": 0.01,
    }
    w = assess({**row, "param_ratio": 50}, {"accuracy": 0.95}, th)
    assert any("no better than the scratch student" in m for m in w)
    assert any("teacher assistant" in m for m in w)
    assert assess({**row, "param_ratio": 2}, {"accuracy": 0.8}, th) == []


def test_teachers_command_on_digits(tmp_path):
    from distill.cli.teachers import add_parser, main

    fast = {"epochs": 2, "progress": "off", "tensorboard": False, "device": "cpu"}
    recipe = {
        "name": "teachers_test",
        "data": {"name": "digits", "init_args": {"train_limit": 200}},
        "student": {"name": "mlp", "init_args": {"hidden": [8]}},
        "trainer": fast,
        "candidates": [
            {"label": "cnn", "name": "cnn", "init_args": {"channels": [8, 16]}, "train": fast},
            {"label": "mlp", "name": "mlp", "init_args": {"hidden": [64]}, "train": fast},
        ],
        "thresholds": {"param_ratio_max": 5},
        "report": {"latency_batch_sizes": [1], "latency_repeats": 2},
    }
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps(recipe))  # JSON is YAML
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["teachers", str(path), "--out", str(tmp_path / "run")])
    assert main(args) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert [r["name"] for r in summary["rows"]] == ["cnn", "mlp"]
    for r in summary["rows"]:
        assert {
            "accuracy",
            "nll",
            "ece",
            "params",
            "size_mb",
            "latency_ms_b1",
            "param_ratio",
            "accuracy_gap",
        } <= set(r)
        assert r["param_ratio"] == pytest.approx(r["params"] / summary["student"]["params"])
    assert any("teacher assistant" in w for w in summary["rows"][1]["warnings"])  # mlp[64] is >5x mlp[8]
    assert (tmp_path / "run" / "reliability.png").exists()
    assert "## Warnings" in (tmp_path / "run" / "report.md").read_text()
    # A bad key is a one-line error naming it.
    path.write_text(json.dumps({**recipe, "candidatez": []}))
    args = parser.parse_args(["teachers", str(path), "--out", str(tmp_path / "run2")])
    assert main(args) == 2


def test_teachers_recipe_validates_candidates():
    with pytest.raises(Exception, match="candidates"):
        TeachersRecipe.model_validate({"candidates": [{"name": "cnn", "bogus": 1}]})
    with pytest.raises(ConfigError, match="unique"):
        run_teachers(
            TeachersRecipe.model_validate(
                {"candidates": [{"name": "cnn", "label": "a"}, {"name": "mlp", "label": "a"}]}
            ),
            "/nonexistent/never",
        )
