import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distill.chain import ChainRecipe, Cohort, CohortEvaluator, Mutual, chain_stages, mutual_loss, run_chain
from distill.checkpoint import load_weights_file
from distill.errors import DistillError
from distill.objective import Objective
from distill.outputs import Batch, Outputs


def _tiny_chain(**kw) -> ChainRecipe:
    fast = {"epochs": 2, "progress": "off", "tensorboard": False, "device": "cpu"}
    return ChainRecipe.model_validate(
        {
            "name": "chain_test",
            "data": {"name": "digits", "init_args": {"train_limit": 120}, "batch_size": 32},
            "teacher": {"name": "mlp", "init_args": {"hidden": [32]}, "train": fast},
            "assistants": [{"name": "mlp", "init_args": {"hidden": [16]}}],
            "student": {"name": "mlp", "init_args": {"hidden": [8]}},
            "trainer": {**fast, "checkpoint_every": 1},
            "report": {"latency_batch_sizes": [1], "latency_repeats": 2},
            **kw,
        }
    )


def test_chain_stage_order_and_born_again_generations():
    cfg = _tiny_chain()
    assert [n for n, _ in chain_stages(cfg)] == ["teacher", "assistant1", "student"]
    cfg = _tiny_chain(assistants=[], generations=3)
    assert [n for n, _ in chain_stages(cfg)] == ["teacher", "student_gen1", "student_gen2", "student_gen3"]


def test_chain_runs_each_stage_in_its_folder_and_reports_each(tmp_path):
    summary = run_chain(_tiny_chain(), tmp_path / "run")
    names = [r["name"] for r in summary["rows"]]
    assert names == ["teacher", "assistant1", "student", "student_scratch"]
    by = {r["name"]: r for r in summary["rows"]}
    assert by["assistant1"]["taught_by"] == "teacher" and by["student"]["taught_by"] == "assistant1"
    assert by["student"]["params"] < by["assistant1"]["params"] < by["teacher"]["params"]
    for k, n in enumerate(["teacher", "assistant1", "student"]):
        assert (tmp_path / "run" / "stages" / f"{k}_{n}" / "checkpoints" / n / "final.safetensors").exists()
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["rows"][2]["name"] == "student"
    assert (tmp_path / "run" / "report.md").exists()


def test_chain_resumes_mid_stage_to_the_same_weights(tmp_path, monkeypatch):
    cfg = _tiny_chain(baselines=[])
    ref = run_chain(cfg, tmp_path / "ref")

    from distill import trainer as trainer_mod

    real_step = trainer_mod.Trainer._train_epoch
    calls = {"n": 0}

    def crash_in_assistant(self, bar):
        if self.stage == "assistant1" and self.epoch == 1:
            calls["n"] += 1
            raise KeyboardInterrupt  # killed part-way through the assistant stage
        return real_step(self, bar)

    monkeypatch.setattr(trainer_mod.Trainer, "_train_epoch", crash_in_assistant)
    with pytest.raises(KeyboardInterrupt):
        run_chain(cfg, tmp_path / "run")
    stage = tmp_path / "run" / "stages" / "1_assistant1" / "checkpoints" / "assistant1"
    assert (stage / "last.safetensors").exists() and not (stage / "final.safetensors").exists()
    teacher_final = (
        tmp_path / "run" / "stages" / "0_teacher" / "checkpoints" / "teacher" / "final.safetensors"
    )
    mtime = teacher_final.stat().st_mtime_ns
    monkeypatch.setattr(trainer_mod.Trainer, "_train_epoch", real_step)
    summary = run_chain(cfg, tmp_path / "run", resume=True)
    assert teacher_final.stat().st_mtime_ns == mtime  # the finished stage is not retrained
    assert calls["n"] == 1
    for name, k in [("assistant1", 1), ("student", 2)]:
        a = load_weights_file(
            tmp_path / "ref" / "stages" / f"{k}_{name}" / "checkpoints" / name / "final.safetensors"
        )
        b = load_weights_file(
            tmp_path / "run" / "stages" / f"{k}_{name}" / "checkpoints" / name / "final.safetensors"
        )
        for key in a:
            torch.testing.assert_close(a[key], b[key])
    assert [r["accuracy"] for r in summary["rows"]] == [r["accuracy"] for r in ref["rows"]]
    # The interrupted stage's metrics hold each step once.
    lines = (tmp_path / "run" / "stages" / "1_assistant1" / "metrics.jsonl").read_text().splitlines()
    steps = [(json.loads(x)["split"], json.loads(x)["step"]) for x in lines]
    assert len(steps) == len(set(steps))


def test_mutual_loss_matches_hand_formula():
    torch.manual_seed(0)
    peers = torch.randn(3, 5, 4)
    y = torch.randint(0, 4, (5,))
    t, alpha = 2.0, 0.5
    got = mutual_loss(peers, y, alpha, t, "mean")
    expected = 0.0
    for i in range(3):
        q = torch.stack([F.softmax(peers[j] / t, -1) for j in range(3) if j != i]).mean(0)
        kl = (q * (q.log() - F.log_softmax(peers[i] / t, -1))).sum(-1).mean()
        expected = expected + F.cross_entropy(peers[i], y) + alpha * t * t * kl
    torch.testing.assert_close(got, expected)
    each = mutual_loss(peers, y, alpha, t, "each")
    expected = 0.0
    for i in range(3):
        kls = [
            F.kl_div(F.log_softmax(peers[i] / t, -1), F.softmax(peers[j] / t, -1), reduction="batchmean")
            for j in range(3)
            if j != i
        ]
        expected = expected + F.cross_entropy(peers[i], y) + alpha * t * t * sum(kls) / 2
    torch.testing.assert_close(each, expected)


def test_mutual_gradient_flows_to_each_member_only_through_its_own_prediction():
    peers = torch.randn(2, 3, 4, requires_grad=True)
    y = torch.tensor([0, 1, 2])
    # Member 0's loss alone: gradient must not reach member 1 (peers are detached targets).
    z = peers
    loss0 = F.cross_entropy(z[0], y)
    q = F.softmax(z[1], -1).detach()
    loss0 = loss0 + (q * (q.log() - F.log_softmax(z[0], -1))).sum(-1).mean()
    full = mutual_loss(peers, y)
    g_full = torch.autograd.grad(full, peers)[0]
    g0 = torch.autograd.grad(loss0, peers)[0]
    torch.testing.assert_close(g_full[0], g0[0])


def test_cohort_trains_with_the_plain_trainer(tmp_path):
    from distill.engine.trainer import Trainer

    torch.manual_seed(0)
    x = torch.randn(96, 1, 8, 8)
    y = x.flatten(1)[:, :3].argmax(1)  # learnable labels
    ds = torch.utils.data.TensorDataset(x, y)
    members = [
        nn.Sequential(nn.Flatten(), nn.Linear(64, 3)),
        nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 3)),
    ]
    cohort = Cohort(members)
    out = cohort(x[:2])
    assert out.extras["peers"].shape == (2, 2, 3)
    torch.testing.assert_close(out.logits, members[0](x[:2]))
    before = [p.clone() for p in members[1].parameters()]
    tr = Trainer(
        cohort,
        Objective({"dml": Mutual(alpha=1.0)}),
        ds,
        val_data=ds,
        out_dir=tmp_path,
        epochs=8,
        batch_size=16,
        optimizer={"lr": 0.02},
        evaluator=CohortEvaluator(),
        progress="off",
        tensorboard=False,
    )
    metrics = tr.fit()
    assert metrics["accuracy"] > 0.6
    assert {"accuracy_m0", "accuracy_m1", "accuracy_ensemble"} <= set(metrics)
    assert metrics["accuracy_m0"] == metrics["accuracy"]
    assert any(not torch.equal(a, b) for a, b in zip(before, members[1].parameters()))
    with pytest.raises(DistillError, match="Cohort"):
        Mutual()(Outputs(logits=torch.zeros(2, 3)), None, Batch(x[:2], y[:2]))
    with pytest.raises(DistillError, match="at least 2"):
        Cohort(members[:1])


def test_shipped_chain_and_teachers_recipes_parse():
    from pathlib import Path

    from distill.chain import load_chain_recipe
    from distill.teacher_choice import load_teachers_recipe

    root = Path(__file__).resolve().parents[1] / "recipes"
    cfg = load_chain_recipe(root / "chain_digits.yaml")
    assert [n for n, _ in chain_stages(cfg)] == ["teacher", "assistant1", "student"]
    t = load_teachers_recipe(root / "teachers_digits.yaml")
    assert [c.label for c in t.candidates] == ["cnn", "wide_mlp", "small_mlp"]
    with pytest.raises(DistillError, match="generations"):
        load_chain_recipe(root / "chain_digits.yaml", ["generations=0"])


def test_chain_cli_reports_bad_recipe_in_one_line(tmp_path, capsys):
    import argparse

    from distill.cli.chain import add_parser, main

    bad = tmp_path / "r.yaml"
    bad.write_text("assistans: []\n")
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    assert main(parser.parse_args(["chain", str(bad), "--out", str(tmp_path / "o")])) == 2
    err = capsys.readouterr().err
    assert "assistants" in err and err.count("\n") == 1
