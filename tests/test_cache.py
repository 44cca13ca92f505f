import json

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from distill.data.indexed import IndexedDataset
from distill.errors import DistillError
from distill.losses.logits import kd_loss
from distill.outputs import Outputs, as_batch
from distill.teachers import Teacher
from distill.teachers.store import AugmentedCopies, CachedTeacher, reconstruct_logits, store_info, write_store


def _data(n=40, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, d, generator=g), torch.randint(0, 5, (n,), generator=g))


class Net(nn.Module):
    def __init__(self, d=6, c=5, fail_after=None):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(d, 8), nn.ReLU())
        self.head = nn.Linear(8, c)
        self.calls, self.fail_after = 0, fail_after

    def forward(self, x):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError("interrupted")
        return self.head(self.body(x))


class Jitter(torch.utils.data.Dataset):
    """Random augmentation: noise drawn from torch's global RNG on every read."""

    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        return x + 0.1 * torch.randn_like(x), y


def _batches(ds, bs=16):
    return [as_batch(b) for b in DataLoader(IndexedDataset(ds), batch_size=bs, shuffle=True)]


def test_full_logits_and_features_equal_live_teacher(tmp_path):
    ds, model = _data(), Net()
    info = write_store(model, ds, tmp_path / "s", topk=None, taps=["body"], shard_size=16, log=None)
    assert info.rows == 40 and info.bytes_per_sample > 0
    live = Teacher(Net(), taps=["body"])
    cached = CachedTeacher(tmp_path / "s", dataset=ds, teacher=live)
    cached.add_taps(["body"])
    for b in _batches(ds):
        a, c = live(b), cached(b)
        torch.testing.assert_close(c.logits, a.logits, atol=2e-3, rtol=2e-3)  # float16 storage
        torch.testing.assert_close(c.features["body"], a.features["body"], atol=2e-3, rtol=2e-3)


def test_float32_store_is_exact(tmp_path):
    ds, model = _data(), Net()
    write_store(model, ds, tmp_path / "s", topk=None, dtype="float32", shard_size=7, log=None)
    cached = CachedTeacher(tmp_path / "s", dataset=ds, teacher=model)
    for b in _batches(ds):
        # equal up to float32 rounding (batch composition changes the matmul's summation order)
        torch.testing.assert_close(cached(b).logits, Teacher(model)(b).logits, atol=1e-6, rtol=1e-6)


def test_fingerprint_refusals_name_what_differs(tmp_path):
    ds, model = _data(), Net()
    write_store(model, ds, tmp_path / "s", log=None)
    other = Net()
    with torch.no_grad():
        other.head.bias += 1
    with pytest.raises(DistillError, match="teacher weights"):
        CachedTeacher(tmp_path / "s", dataset=ds, teacher=other)
    with pytest.raises(DistillError, match="dataset length"):
        CachedTeacher(tmp_path / "s", dataset=_data(n=41), teacher=model)
    with pytest.raises(DistillError, match="dataset content"):
        CachedTeacher(tmp_path / "s", dataset=_data(seed=1), teacher=model)
    # the same data wrapped for indices is the same data
    CachedTeacher(tmp_path / "s", dataset=IndexedDataset(ds), teacher=model)


def test_transform_is_part_of_the_fingerprint(tmp_path):
    ds = _data()
    ds.transform = "Normalize(mean=0.5)"
    write_store(Net(), ds, tmp_path / "s", log=None)
    ds2 = _data()
    ds2.transform = "Normalize(mean=0.4)"
    with pytest.raises(DistillError, match="input transform"):
        CachedTeacher(tmp_path / "s", dataset=ds2)


def test_interrupted_write_resumes_from_done_shards(tmp_path):
    ds = _data(n=50)
    failing = Net(fail_after=3)  # batch 8, shard 16: 2 calls per shard -> dies in shard 2
    with pytest.raises(RuntimeError, match="interrupted"):
        write_store(failing, ds, tmp_path / "s", batch_size=8, shard_size=16, log=None)
    assert not (tmp_path / "s").exists()
    manifest = json.loads((tmp_path / "s.partial" / "manifest.json").read_text())
    assert manifest["shards_done"] == [0] and not manifest["complete"]
    model = Net()  # same weights
    write_store(model, ds, tmp_path / "s", batch_size=8, shard_size=16, log=None)
    assert model.calls == 2 + 2 + 1  # shards 1..3 only (16, 16, 2 samples)
    assert not (tmp_path / "s.partial").exists()
    cached = CachedTeacher(tmp_path / "s", dataset=ds, teacher=model)
    for b in _batches(ds):
        torch.testing.assert_close(cached(b).logits, Teacher(model)(b).logits, atol=2e-3, rtol=2e-3)


def test_partial_store_refused_by_reader_and_other_teacher(tmp_path):
    ds = _data()
    write_store(Net(), ds, tmp_path / "s", shard_size=8, max_shards=1, log=None)
    with pytest.raises(DistillError, match="interrupted write"):
        CachedTeacher(tmp_path / "s")
    other = Net()
    with torch.no_grad():
        other.head.weight.mul_(2)
    with pytest.raises(DistillError, match="teacher weights"):
        write_store(other, ds, tmp_path / "s", shard_size=8, log=None)


def test_complete_store_is_not_rewritten(tmp_path, capsys):
    ds = _data()
    write_store(Net(), ds, tmp_path / "s")
    model = Net()
    write_store(model, ds, tmp_path / "s")
    assert model.calls == 0
    out = capsys.readouterr().out
    assert "per sample" in out and "already complete" in out


def test_random_augmentation_is_refused(tmp_path):
    with pytest.raises(DistillError, match="random"):
        write_store(Net(), Jitter(_data()), tmp_path / "s", log=None)


def test_augment_copies_replay_the_cached_views(tmp_path):
    base = Jitter(_data(n=20))
    model = Net()
    write_store(model, base, tmp_path / "s", augment_copies=3, shard_size=16, log=None)
    train = AugmentedCopies(base, 3)
    assert len(train) == 60
    cached = CachedTeacher(tmp_path / "s", dataset=train, teacher=model)
    for b in [as_batch(b) for b in DataLoader(train, batch_size=16, shuffle=True)]:
        torch.testing.assert_close(cached(b).logits, Teacher(model)(b).logits, atol=2e-3, rtol=2e-3)
    # two views of one sample differ: the copies are real augmentations
    assert not torch.equal(train[0][0], train[20][0])
    with pytest.raises(DistillError, match="augment_copies"):
        CachedTeacher(tmp_path / "s", dataset=AugmentedCopies(base, 2), teacher=model)


def test_topk_reconstruction():
    torch.manual_seed(0)
    logits = torch.randn(32, 50) * 3
    k = 10
    vals, idx = logits.topk(k, -1)
    lse = torch.logsumexp(logits, -1)
    tail = reconstruct_logits(vals, idx, 50, lse, "tail")
    # kept classes keep their values; the T=1 distribution is exact on them, and its tail mass too
    assert torch.equal(tail.gather(-1, idx), vals)
    p, q = logits.softmax(-1), tail.softmax(-1)
    torch.testing.assert_close(q.gather(-1, idx), p.gather(-1, idx), atol=1e-5, rtol=1e-4)
    # renorm: all mass on the top-k support, proportional to the teacher's
    r = reconstruct_logits(vals, idx, 50, fill="renorm").softmax(-1)
    torch.testing.assert_close(r.gather(-1, idx), p.gather(-1, idx) / p.gather(-1, idx).sum(-1, keepdim=True))
    assert float(r.sum(-1).min()) > 0.999
    # KD against reconstructions is close to KD against the full logits, tail closest at T=1
    s = torch.randn(32, 50)
    full = kd_loss(s, logits, 1.0)
    err = {
        f: abs(float(kd_loss(s, reconstruct_logits(vals, idx, 50, lse, f), 1.0) - full))
        for f in ("tail", "min", "renorm")
    }
    assert err["tail"] < err["min"] and err["tail"] < 0.2 * float(full)
    with pytest.raises(DistillError, match="lse"):
        reconstruct_logits(vals, idx, 50, None, "tail")


def test_topk_store_roundtrip(tmp_path):
    ds = _data()
    model = Net(c=5)
    info = write_store(model, ds, tmp_path / "s", topk=2, log=None)
    assert set(info.fields) == {"topk_values", "topk_indices", "lse"}
    assert np.load(tmp_path / "s" / "topk_indices.00000.npy").dtype == np.int32
    cached = CachedTeacher(tmp_path / "s", dataset=ds, teacher=model)
    b = _batches(ds)[0]
    live = Teacher(model)(b).logits
    got = cached(b).logits
    assert torch.equal(got.argmax(-1), live.argmax(-1))
    top = live.topk(2, -1)
    torch.testing.assert_close(got.gather(-1, top.indices), top.values, atol=2e-3, rtol=2e-3)
    assert store_info(tmp_path / "s").rows == 40


def test_missing_index_and_taps_are_clear_errors(tmp_path):
    ds, model = _data(), Net()
    write_store(model, ds, tmp_path / "s", log=None)
    cached = CachedTeacher(tmp_path / "s", dataset=ds, teacher=model)
    x, y = next(iter(DataLoader(ds, batch_size=4)))
    with pytest.raises(DistillError, match="IndexedDataset"):
        cached(as_batch((x, y)))
    with pytest.raises(DistillError, match="--tap body"):
        cached.add_taps(["body"])
    with_fallback = CachedTeacher(tmp_path / "s", fallback=model)
    torch.testing.assert_close(
        with_fallback(as_batch((x, y))).logits, Teacher(model)(as_batch((x, y))).logits
    )
    with pytest.raises(DistillError, match="not a teacher store"):
        CachedTeacher(tmp_path / "nothing")


def test_trainer_with_cached_teacher_matches_online(tmp_path):
    from distill.engine.trainer import Trainer
    from distill.losses.logits import KD, CrossEntropy
    from distill.objective import Objective

    ds, teacher = _data(n=64), Net()
    write_store(teacher, ds, tmp_path / "s", dtype="float32", log=None)
    losses = {}
    for name, t in (
        ("online", teacher),
        ("cached", CachedTeacher(tmp_path / "s", dataset=ds, teacher=teacher)),
    ):
        torch.manual_seed(1)
        student = nn.Linear(6, 5)
        obj = Objective({"ce": CrossEntropy(), "kd": KD(2.0)}, {"ce": 0.5, "kd": 0.5})
        tr = Trainer(
            student,
            obj,
            IndexedDataset(ds),
            teacher=t,
            epochs=2,
            batch_size=16,
            device="cpu",
            progress="off",
            log_every=1,
            tensorboard=False,
            out_dir=tmp_path / name,
        )
        tr.fit()
        losses[name] = [
            json.loads(line)["loss"]
            for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["split"] == "train"
        ]
    np.testing.assert_allclose(losses["cached"], losses["online"], rtol=1e-5)


def _cli(argv):
    import argparse

    from distill.cli import cache as cli_cache

    parser = argparse.ArgumentParser(prog="distill")
    cli_cache.add_parser(parser.add_subparsers(dest="command"))
    return cli_cache.main(parser.parse_args(argv))


@pytest.mark.slow
def test_cli_cache_teacher_then_recipe_uses_the_store(tmp_path, capsys):
    import yaml

    from distill.checkpoint import save_weights
    from distill.data.bundle import build_data
    from distill.models.build import build_model
    from distill.run.config import RecipeConfig
    from distill.run.pipeline import run_recipe

    cfg = RecipeConfig()
    data = build_data("digits")
    teacher = build_model(cfg.teacher.spec(), data)
    save_weights(tmp_path / "t.safetensors", teacher.state_dict())
    recipe = cfg.model_dump(mode="json")
    recipe["teacher"].update(checkpoint=str(tmp_path / "t.safetensors"), train=None)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))

    assert _cli(["cache-teacher", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "store")]) == 0
    assert "per sample" in capsys.readouterr().out
    assert _cli(["cache-teacher", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert _cli(["cache-teacher", str(tmp_path / "r.yaml"), "--topk", "zero"]) == 2

    run_cfg = RecipeConfig.model_validate(
        {
            **recipe,
            "teacher": {**recipe["teacher"], "cache": str(tmp_path / "store")},
            "trainer": {**recipe["trainer"], "epochs": 1, "progress": "off", "tensorboard": False},
            "baselines": [],
            "report": {"latency_batch_sizes": [1], "latency_repeats": 2},
        }
    )
    summary = run_recipe(run_cfg, tmp_path / "run")
    assert [r["name"] for r in summary["rows"]] == ["teacher", "student_kd"]
    # a store of another teacher is refused before training
    torch.manual_seed(123)  # run_recipe reseeds the global RNG: draw other weights on purpose
    other = build_model(cfg.teacher.spec(), data)
    save_weights(tmp_path / "t2.safetensors", other.state_dict())
    bad = run_cfg.model_copy(deep=True)
    bad.teacher.checkpoint = str(tmp_path / "t2.safetensors")
    with pytest.raises(DistillError, match="teacher weights"):
        run_recipe(bad, tmp_path / "run2")


class Doubling:
    """A teacher adapter that doubles the model's logits: shows whether the store applied it."""

    def __call__(self, model, batch):
        from distill.outputs import Outputs

        return Outputs(logits=2 * model(batch.inputs))


def test_cache_teacher_applies_the_adapter_and_calibration_and_fingerprints_them(tmp_path, capsys):
    import yaml

    from distill.checkpoint import save_weights
    from distill.data.bundle import build_data
    from distill.models.build import build_model
    from distill.run.pipeline import run_recipe
    from distill.teachers.calibration import fit_temperature
    from distill.teachers.store import outputs_fingerprint
    from helpers import tiny_recipe

    spec = {"class_path": "test_cache.Doubling"}
    over = {"teacher.calibrate": True, "teacher.adapter": spec, "data.init_args": {"train_limit": 64}}
    cfg = tiny_recipe(tmp_path, **over)
    data = build_data("digits", None, cfg.data.init_args)
    torch.manual_seed(0)
    model = build_model(cfg.teacher.spec(), data).eval()
    save_weights(tmp_path / "t.safetensors", model.state_dict())
    recipe = cfg.model_dump(mode="json")
    recipe["teacher"].update(checkpoint=str(tmp_path / "t.safetensors"), train=None)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    store = tmp_path / "store"
    argv = ["cache-teacher", str(tmp_path / "r.yaml"), "--out", str(store), "--dtype", "float32"]
    assert _cli(argv) == 0, capsys.readouterr().err

    def logits(split, idx):
        with torch.no_grad():
            return 2 * model(torch.stack([split[i][0] for i in idx])), torch.as_tensor(
                [split[i][1] for i in idx]
            )

    z, y = logits(data.val, range(len(data.val)))
    t = fit_temperature(z, y)  # of the adapter's (doubled) logits, on the validation split
    fp = json.loads((store / "manifest.json").read_text())["fingerprint"]
    assert fp["teacher_temperature"] == round(t, 4) and fp["teacher_calibrated"] and t != 1
    assert fp["teacher_adapter"] == spec
    served = CachedTeacher(store)(as_batch((None, None, torch.arange(5))))
    assert torch.allclose(served.logits, logits(data.train, range(5))[0] / t, atol=1e-5)

    # the same store is refused for the recipe without calibration, or with another adapter
    plain = tmp_path / "plain.yaml"
    recipe["teacher"].update(calibrate=False, cache=str(store))
    plain.write_text(yaml.safe_dump(recipe))
    from distill.run.config import load_recipe

    with pytest.raises(DistillError, match="teacher calibrated .*: store has True, this run has False"):
        run_recipe(load_recipe(plain), tmp_path / "run")
    with pytest.raises(DistillError, match="teacher adapter"):
        CachedTeacher(store, outputs=outputs_fingerprint(None, t))
    CachedTeacher(store, outputs=outputs_fingerprint(spec, t))  # the recipe's own: accepted


def test_bucket_fill_serves_the_top_k_and_lse_for_the_fkl_tail_bucket(tmp_path):
    from distill.losses import LOSSES

    ds = _data()
    model = Net(c=5)
    write_store(model, ds, tmp_path / "s", topk=2, dtype="float32", log=None)
    b = _batches(ds)[0]
    live = Teacher(model)(b).logits
    out = CachedTeacher(tmp_path / "s", dataset=ds, teacher=model, fill="bucket")(b)
    assert out.logits is None
    torch.testing.assert_close(out.extras["lse"], torch.logsumexp(live, -1), atol=1e-4, rtol=1e-4)
    top = live.topk(2, -1)
    torch.testing.assert_close(out.extras["topk_values"], top.values, atol=1e-4, rtol=1e-4)
    s = torch.randn_like(live)
    got = LOSSES.build("fkl", init_args={"shift_labels": False})(Outputs(logits=s), out, b)
    p = torch.softmax(live.double(), -1).gather(-1, top.indices)
    q = torch.softmax(s.double(), -1).gather(-1, top.indices)
    p3, q3 = (torch.cat([x, 1 - x.sum(-1, keepdim=True)], -1) for x in (p, q))
    torch.testing.assert_close(
        got.double(), (p3 * (p3.log() - q3.log())).sum(-1).mean(), atol=1e-4, rtol=1e-4
    )
    with pytest.raises(DistillError, match="bucket"):
        CachedTeacher(tmp_path / "s", dataset=ds, teacher=model, fill="spread")
