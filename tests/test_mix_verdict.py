"""trainer.mix (mixup / cutmix before both models), soft-target cross-entropy, and the verdict."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from distill import KD, CrossEntropy, Objective
from distill.engine.mix import Mixer, soft_labels
from distill.engine.trainer import Trainer
from distill.errors import ConfigError, DistillError
from distill.losses import DKD, soft_target_cross_entropy
from distill.outputs import Batch, Outputs
from distill.run.verdict import paired_interval, t975, verdict, verdict_markdown
from helpers import blobs


def test_soft_target_ce_matches_hard_ce_on_one_hot_and_skips_unlabelled():
    torch.manual_seed(0)
    z = torch.randn(6, 4)
    y = torch.tensor([0, 1, 2, 3, 1, 0])
    q = F.one_hot(y, 4).float()
    assert torch.allclose(soft_target_cross_entropy(z, q), F.cross_entropy(z, y), atol=1e-6)
    assert torch.allclose(
        soft_target_cross_entropy(z, q, 0.1), F.cross_entropy(z, y, label_smoothing=0.1), atol=1e-6
    )
    # a zero row is a sample without a label: it adds nothing, the rest is the mean over labelled
    q[2] = 0
    assert torch.allclose(
        soft_target_cross_entropy(z, q), F.cross_entropy(z[[0, 1, 3, 4, 5]], y[[0, 1, 3, 4, 5]])
    )
    # a mixed row is the lam-weighted sum of the two cross-entropies (mixup's label loss)
    lam = 0.3
    mixed = lam * F.one_hot(y, 4).float() + (1 - lam) * F.one_hot(y.flip(0), 4).float()
    ref = lam * F.cross_entropy(z, y) + (1 - lam) * F.cross_entropy(z, y.flip(0))
    assert torch.allclose(soft_target_cross_entropy(z, mixed), ref, atol=1e-6)
    assert float(soft_target_cross_entropy(z, torch.zeros(6, 4))) == 0.0


def test_ce_with_every_label_ignored_is_zero_not_nan():
    z = torch.randn(4, 3, requires_grad=True)
    loss = CrossEntropy()(Outputs(z), None, Batch(inputs=None, targets=torch.full((4,), -100)))
    assert float(loss.detach()) == 0.0
    y = torch.tensor([0, -100, 2, 1])
    ref = F.cross_entropy(z, y, ignore_index=-100)
    assert torch.allclose(CrossEntropy()(Outputs(z), None, Batch(inputs=None, targets=y)), ref)


def test_soft_labels_one_hot_missing_and_out_of_range():
    y = torch.tensor([1, -100, 0])
    assert soft_labels(y, 3, 3).tolist() == [[0, 1, 0], [0, 0, 0], [1, 0, 0]]
    assert soft_labels(None, 2, 3).sum() == 0
    with pytest.raises(DistillError, match="label 7 is out of range for 3 classes"):
        soft_labels(torch.tensor([7, 0]), 2, 3)


@pytest.mark.parametrize("name", ["mixup", "cutmix"])
def test_mixer_mixes_inputs_and_labels_alike_and_repeats(name):
    torch.manual_seed(0)
    x = torch.rand(8, 1, 8, 8)
    y = torch.arange(8) % 4
    m = Mixer(name, alpha=1.0, prob=1.0, num_classes=4, seed=3)
    a = m(Batch(x, y), epoch=2, i=5)
    b = m(Batch(x, y), epoch=2, i=5)
    assert (
        a.targets is None and torch.equal(a.inputs, b.inputs) and torch.equal(a.soft_targets, b.soft_targets)
    )
    assert torch.allclose(a.soft_targets.sum(-1), torch.ones(8))
    assert not torch.equal(a.inputs, x)
    # each mixed input is lam * own + (1 - lam) * partner, with the label's lam the same
    lam = a.soft_targets[torch.arange(8), y]  # own class weight (partner may share the class)
    assert (lam >= 0).all() and (lam <= 1 + 1e-6).all()
    c = m(Batch(x, y), epoch=2, i=6)
    assert not torch.equal(a.inputs, c.inputs)  # another batch draws anew
    # a transfer sample without a label mixes in as a zero label
    d = m(Batch(x, torch.full((8,), -100)), epoch=2, i=5)
    assert d.soft_targets.sum() == 0


def test_mixup_is_the_convex_combination_of_inputs_and_labels():
    x = torch.rand(4, 3)
    out = Mixer("mixup", alpha=0.5, prob=1.0, num_classes=4, seed=0)(Batch(x, torch.arange(4)), 0, 0)
    q = out.soft_targets  # one class per sample: row i holds lam at i and 1 - lam at its partner
    for i in range(4):
        lam = float(q[i, i])
        partner = int(torch.argsort(q[i])[-2]) if lam < 1 else i
        if lam < 0.5:
            partner = int(q[i].argmax())
        expected = lam * x[i] + (1 - lam) * x[partner]
        assert torch.allclose(out.inputs[i], expected, atol=1e-6)


def test_prob_zero_leaves_batches_untouched():
    x, y = torch.rand(4, 3), torch.tensor([0, 1, 0, 1])
    out = Mixer("mixup", 1.0, 0.0, 2)(Batch(x, y), 0, 0)
    assert out.targets is y and out.soft_targets is None


def _kd_obj(ce=True):
    terms = {"kd": KD(temperature=1.0)}
    if ce:
        terms["ce"] = CrossEntropy()
    return Objective(terms)


def test_trainer_mix_teacher_sees_the_mixed_batch_and_learns():
    seen = []

    class Spy(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 3)

        def forward(self, x):
            seen.append(x.detach().clone())
            return self.lin(x)

    data = blobs()
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    tr = Trainer(student, _kd_obj(), data, teacher=Spy(), val_data=blobs(seed=1), epochs=3, batch_size=16,
                 progress="off", mix={"name": "mixup", "alpha": 1.0})  # fmt: skip
    seen.clear()
    res = tr.fit()
    raw = data.tensors[0]
    # the teacher's inputs during training are not samples of the dataset: they were mixed
    train_seen = seen[: len(seen) - 1]
    assert any(not any(torch.equal(r, s_) for s_ in raw) for s in train_seen[:3] for r in s[:2])
    assert res["accuracy"] > 0.8


def test_mix_refuses_token_inputs_in_one_line():
    tokens = TensorDataset(torch.randint(0, 10, (16, 5)), torch.randint(0, 3, (16,)))
    model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(20, 3))
    with pytest.raises(
        ConfigError, match=r"trainer.mix: mixup interpolates floating-point inputs .* integer \(token\)"
    ):
        Trainer(
            model, Objective({"ce": CrossEntropy()}), tokens, epochs=1, progress="off", mix={"name": "mixup"}
        )


def test_mix_refuses_a_term_that_needs_class_indices():
    torch.manual_seed(0)
    obj = Objective({"dkd": DKD()})
    with pytest.raises(ConfigError, match="trainer.mix: a mixed batch carries mixed labels"):
        Trainer(nn.Linear(8, 3), obj, blobs(), teacher=nn.Linear(8, 3), epochs=1, progress="off",
                mix={"name": "cutmix"})  # fmt: skip


def test_mix_setting_validates():
    with pytest.raises(Exception, match="mix"):
        Trainer(nn.Linear(8, 3), Objective({"ce": CrossEntropy()}), blobs(), mix={"name": "mixdown"})


# --------------------------------------------------------------------------- verdict


def test_t_interval_against_known_values():
    assert t975(4) == pytest.approx(2.776) and t975(1000) == pytest.approx(1.9624, abs=1e-3)
    mean, lo, hi = paired_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    # sd = 1.5811, se = 0.7071, t = 2.776 -> half width 1.963
    assert (
        mean == 3.0 and lo == pytest.approx(3 - 1.963, abs=1e-3) and hi == pytest.approx(3 + 1.963, abs=1e-3)
    )


def _summary(seed, scratch, kd, teacher=0.99, conf=0.999, follow=0.99):
    return {
        "seed": seed,
        "rows": [
            {"name": "teacher", "accuracy": teacher, "params": 100_000, "train_confidence": conf},
            {"name": "student_scratch", "accuracy": scratch, "params": 10_000},
            {"name": "student_kd", "accuracy": kd, "params": 10_000, "train_agreement": follow},
        ],
    }


def test_verdict_helped_and_not_helped_with_reasons():
    good = verdict([_summary(s, 0.95, 0.96 + 0.001 * s) for s in range(5)])
    assert good["helped"] and good["line"].startswith(
        "distillation helped here: student_kd gains 1.20 points"
    )
    assert good["rows"]["student_kd"]["gains"] == pytest.approx([0.01, 0.011, 0.012, 0.013, 0.014])
    assert good["reasons"] == []
    bad = verdict(
        [_summary(s, 0.95, 0.95 + (0.003 if s % 2 else -0.003), teacher=0.952, follow=0.9) for s in range(4)]
    )
    assert not bad["helped"] and "did not clearly help" in bad["line"]
    text = " ".join(bad["reasons"])
    assert "no better than the scratch student" in text and "near one-hot" in text
    assert "follows the teacher on only 90.0%" in text and "capacity gap" in text
    hurt = verdict([_summary(s, 0.95, 0.93 + 0.001 * s) for s in range(3)])
    assert "distillation hurt here" in hurt["line"]
    md = "\n".join(verdict_markdown(bad))
    assert "## Verdict" in md and "| student_kd vs student_scratch |" in md
    json.dumps(verdict([_summary(0, 0.9, 0.91)]), allow_nan=False)  # one seed: no NaN in JSON


def _lm_summary(seed, scratch_ppl, kd_ppl, scratch_acc, kd_acc, teacher_ppl=20.0):
    return {
        "seed": seed,
        "rows": [
            {"name": "teacher", "perplexity": teacher_ppl, "accuracy": 0.5, "params": 400_000},
            {
                "name": "student_scratch",
                "perplexity": scratch_ppl,
                "accuracy": scratch_acc,
                "params": 100_000,
            },
            {"name": "student_kd", "perplexity": kd_ppl, "accuracy": kd_acc, "params": 100_000},
        ],
    }


def test_verdict_of_a_language_model_follows_perplexity_not_token_accuracy():
    # distillation lowers perplexity by 2..2.4 while the token accuracy drops: it helped
    runs = [_lm_summary(s, 40.0, 38.0 - 0.1 * s, 0.30, 0.29) for s in range(5)]
    v = verdict(runs)
    assert v["metric"] == "perplexity" and v["helped"]
    assert v["rows"]["student_kd"]["gains"] == pytest.approx([2.0, 2.1, 2.2, 2.3, 2.4])  # scratch - kd
    lo, hi = v["rows"]["student_kd"]["ci95"]
    assert 1.9 < lo < 2.2 < hi < 2.5  # in perplexity, around the mean gain 2.2
    assert v["line"].startswith("distillation helped here: student_kd lowers perplexity by 2.20 over")
    assert "(student_scratch - distilled perplexity)" in v["line"]
    assert "scratch - distilled: positive is better" in "\n".join(verdict_markdown(v))
    # better token accuracy with a higher perplexity: it hurt
    worse = verdict([_lm_summary(s, 40.0, 42.0 + 0.1 * s, 0.30, 0.35) for s in range(5)])
    assert not worse["helped"] and worse["line"].startswith(
        "distillation hurt here: student_kd raises perplexity"
    )
    # a teacher whose perplexity is within 1% of the scratch student's is named as the reason
    flat = verdict([_lm_summary(s, 40.0, 40.0 + (0.1 if s % 2 else -0.1), 0.3, 0.3, 39.8) for s in range(4)])
    assert "the teacher (39.8000) is no better than the scratch student (40.0000" in flat["reasons"][0]


def test_report_plots_perplexity_for_language_models(tmp_path):
    from distill.run.report import _plot_tradeoff, curves_figure

    rows = [
        {**r, "latency_ms_b1": 1.0 + i} for i, r in enumerate(_lm_summary(0, 40.0, 38.0, 0.3, 0.29)["rows"])
    ]
    assert _plot_tradeoff(rows, tmp_path / "t.png") == "perplexity" and (tmp_path / "t.png").exists()
    val = [
        {"stage": "student_kd", "split": "val", "epoch": e, "perplexity": 50 - e, "accuracy": 0.2}
        for e in (1, 2)
    ]
    fig = curves_figure([val])
    assert fig.axes[-1].get_ylabel() == "validation perplexity"
    classification = [{"name": "a", "accuracy": 0.9, "latency_ms_b1": 1.0}]
    assert _plot_tradeoff(classification, tmp_path / "c.png") == "accuracy"


def test_verdict_also_judges_against_the_unmixed_scratch_student():
    def s(seed, twin, unmixed, kd):
        out = _summary(seed, twin, kd)
        out["rows"].insert(2, {"name": "student_scratch_unmixed", "accuracy": unmixed, "params": 10_000})
        return out

    v = verdict([s(k, 0.94, 0.964, 0.962 + 0.001 * k) for k in range(5)])
    assert (
        v["rows"]["student_kd"]["helped"] and not v["rows"]["student_kd vs student_scratch_unmixed"]["helped"]
    )
    assert not v["helped"] and "over student_scratch_unmixed" in v["line"]
    assert v["reasons"][0].startswith("the distilled student beats its mixed scratch twin but not clearly")
    assert "| student_kd vs student_scratch_unmixed |" in "\n".join(verdict_markdown(v))


@pytest.mark.slow
def test_run_seeds_writes_the_verdict_to_summary_and_report(tmp_path):
    from distill.run.pipeline import run_seeds
    from helpers import tiny_recipe

    cfg = tiny_recipe(
        tmp_path, **{"trainer.mix": {"name": "cutmix"}, "baselines": ["scratch", "scratch_unmixed"]}
    )
    run_seeds(cfg, tmp_path / "run", seeds=2)
    v = json.loads((tmp_path / "run" / "summary.json").read_text())["verdict"]
    seeds = [json.loads((tmp_path / "run" / f"seed{k}" / "summary.json").read_text()) for k in (0, 1)]
    # the verdict is the paired one over the seeds' own rows, recomputed here from their summaries
    assert v == json.loads(json.dumps(verdict(seeds)))
    assert set(v["rows"]) == {"student_kd", "student_kd vs student_scratch_unmixed"}
    acc = [{r["name"]: r["accuracy"] for r in s["rows"]} for s in seeds]
    assert v["rows"]["student_kd"]["gains"] == pytest.approx(
        [a["student_kd"] - a["student_scratch"] for a in acc]
    )
    unmixed = v["rows"]["student_kd vs student_scratch_unmixed"]["gains"]
    assert unmixed == pytest.approx([a["student_kd"] - a["student_scratch_unmixed"] for a in acc])
    assert v["line"].startswith("distillation ") and "over student_scratch_unmixed" in v["line"]
    # the twin was mixed and the unmixed one was not: same initial weights and data order, yet
    # their first training losses differ (cutmix changed the inputs and labels of the twin alone)
    lines = [json.loads(x) for x in (tmp_path / "run" / "seed0" / "metrics.jsonl").read_text().splitlines()]

    def first_loss(stage):
        return next(r["loss"] for r in lines if r["stage"] == stage and r["split"] == "train")

    assert first_loss("student_scratch") != pytest.approx(first_loss("student_scratch_unmixed"), rel=1e-3)
    assert 0 < seeds[0]["rows"][0]["train_confidence"] <= 1
    assert "## Verdict" in (tmp_path / "run" / "report.md").read_text()


def test_patient_recipe_is_the_benchmarked_variant():
    """docs/payoff.md's `cutmix_kd_t1_e90_u` row was measured as digits.yaml + these overrides."""
    from pathlib import Path

    from distill.run.config import apply_overrides, load_recipe, load_yaml, parse_recipe

    root = Path(__file__).resolve().parents[1] / "recipes"
    over = [
        "trainer.mix.name=cutmix",
        "trainer.epochs=90",
        "objective.terms={kd: {name: kd, init_args: {temperature: 1}}}",
        "baselines=[scratch,scratch_unmixed]",
    ]
    variant = parse_recipe(apply_overrides(load_yaml(root / "digits.yaml"), over))
    assert load_recipe(root / "digits_patient.yaml").model_copy(update={"name": "digits"}) == variant


def test_transfer_recipe_is_the_benchmarked_variant():
    """docs/payoff.md's `labels200_transfer` row was measured as digits.yaml + these overrides."""
    from pathlib import Path

    from distill.run.config import apply_overrides, load_recipe, load_yaml, parse_recipe

    root = Path(__file__).resolve().parents[1] / "recipes"
    over = ["data.init_args.train_limit=200", "data.transfer={name: digits}"]
    variant = parse_recipe(apply_overrides(load_yaml(root / "digits.yaml"), over))
    assert load_recipe(root / "digits_transfer.yaml").model_copy(update={"name": "digits"}) == variant


@pytest.mark.parametrize("shape", [(6, 1, 40, 101), (6, 40, 101), (6, 64)])
def test_cutmix_on_spectrograms_and_flat_features_keeps_lam_equal_to_the_kept_share(shape):
    torch.manual_seed(0)
    x = torch.rand(*shape)
    out = Mixer("cutmix", 1.0, 1.0, num_classes=6, seed=1)(Batch(x, torch.arange(6)), 0, 0)
    for i in range(6):
        lam = float(out.soft_targets[i, i])  # own class weight = share of the sample kept (classes differ)
        kept = float((out.inputs[i] == x[i]).float().mean())
        assert kept == pytest.approx(lam, abs=1e-6) or lam == pytest.approx(1.0)
