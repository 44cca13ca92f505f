"""A stored teacher with a transfer set and with mixing (`teacher.cache` + `data.transfer` /
`trainer.mix`): the store covers the transfer inputs, and mixing reads K fixed mixed views."""

import json

import numpy as np
import pytest
import torch
import yaml
from torch import nn
from torch.utils.data import TensorDataset

from distill.engine.mix import MixedViews, Mixer
from distill.errors import ConfigError
from distill.outputs import as_batch
from distill.teachers.store import CachedTeacher, write_store


def _data(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 1, 4, 4, generator=g), torch.randint(0, 3, (n,), generator=g))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.f = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))

    def forward(self, x):
        return self.f(x)


@pytest.mark.parametrize("name", ["cutmix", "mixup"])
def test_mixed_views_are_fixed_and_epoch_reads_view_e_mod_k(name):
    ds = _data()
    views = MixedViews(ds, 3, Mixer(name, alpha=1.0, prob=1.0, num_classes=3, seed=5))
    rows = views.rows()
    assert len(rows) == 3 * len(ds) and len(views) == len(ds)
    a, b = rows[30], rows[30]
    assert torch.equal(a["inputs"], b["inputs"]) and torch.equal(a["soft_targets"], b["soft_targets"])
    assert not torch.equal(a["inputs"], ds[30 % len(ds)][0])  # mixed, not the plain sample
    assert float(a["soft_targets"].sum()) == pytest.approx(1.0)
    for epoch in (0, 1, 4):
        views.set_epoch(epoch)
        item = views[7]
        r = (epoch % 3) * len(ds) + 7
        assert item["index"] == r and torch.equal(item["inputs"], rows[r]["inputs"])
    # another seed gives other views: the seed is part of what the store's fingerprint hashes
    other = MixedViews(ds, 3, Mixer(name, 1.0, 1.0, 3, seed=6)).rows()
    assert not torch.equal(other[30]["inputs"], a["inputs"])


def test_unlabelled_samples_mix_in_as_zero_labels():
    x, _ = _data(8).tensors
    ds = TensorDataset(x, torch.full((8,), -100))
    rows = MixedViews(ds, 2, Mixer("mixup", 1.0, 1.0, 3, seed=0)).rows()
    assert all(float(rows[r]["soft_targets"].abs().sum()) == 0 for r in range(16))


def test_store_of_mixed_views_serves_the_teachers_view_of_each_mixed_input(tmp_path):
    """Training from the store gives the same losses as the live teacher on the same mixed views."""
    from distill.engine.trainer import Trainer
    from distill.losses.logits import KD, CrossEntropy
    from distill.objective import Objective

    ds, teacher = _data(), Net()
    views = MixedViews(ds, 2, Mixer("cutmix", 1.0, 1.0, 3, seed=0))
    write_store(teacher, views.rows(), tmp_path / "s", dtype="float32", log=None)
    losses = {}
    for name, t in (
        ("online", teacher),
        ("cached", CachedTeacher(tmp_path / "s", dataset=views.rows(), teacher=teacher)),
    ):
        torch.manual_seed(1)
        obj = Objective({"ce": CrossEntropy(), "kd": KD(2.0)}, {"ce": 0.5, "kd": 0.5})
        out = tmp_path / name
        Trainer(
            nn.Sequential(nn.Flatten(), nn.Linear(16, 3)),
            obj,
            MixedViews(ds, 2, Mixer("cutmix", 1.0, 1.0, 3, seed=0)),
            teacher=t,
            epochs=3,  # epochs 0, 1, 2 read views 0, 1, 0
            batch_size=8,
            device="cpu",
            progress="off",
            log_every=1,
            tensorboard=False,
            out_dir=out,
        ).fit()
        recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses[name] = [r["loss"] for r in recs if r["split"] == "train"]
    assert len(losses["online"]) == 9
    np.testing.assert_allclose(losses["cached"], losses["online"], rtol=1e-5)


# --------------------------------------------------------------------------- through the recipe


def _recipe(tmp_path, **changes):
    from distill.checkpoint import save_weights
    from distill.data.bundle import build_data
    from distill.models.build import build_model
    from distill.run.config import RecipeConfig

    cfg = RecipeConfig()
    data = build_data("digits", init_args={"train_limit": 40})
    teacher = build_model(cfg.teacher.spec(), data)
    save_weights(tmp_path / "t.safetensors", teacher.state_dict())
    recipe = cfg.model_dump(mode="json")
    recipe["data"].update(
        init_args={"train_limit": 40}, transfer={"name": "digits", "init_args": {"train_limit": 30}}
    )
    recipe["teacher"].update(checkpoint=str(tmp_path / "t.safetensors"), train=None)
    recipe["baselines"] = []
    for k, v in changes.items():
        recipe[k].update(v)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path, recipe


def _cli(argv):
    import argparse

    from distill.cli import cache as cli_cache

    parser = argparse.ArgumentParser(prog="distill")
    cli_cache.add_parser(parser.add_subparsers(dest="command"))
    return cli_cache.main(parser.parse_args(argv))


def _served(recipe, store):
    from distill.data.bundle import build_data
    from distill.run.config import parse_recipe
    from distill.run.pipeline import add_transfer, build_objective, build_teachers, serve_store

    cfg = parse_recipe({**recipe, "teacher": {**recipe["teacher"], "cache": str(store)}})
    data = build_data(cfg.data.name, init_args=cfg.data.init_args, seed=cfg.seed)
    teacher, model, _ = build_teachers(cfg, data, store.parent)
    objective = build_objective(cfg)
    return (*serve_store(cfg, add_transfer(cfg, data, objective), objective, teacher, model), teacher)


def test_store_with_a_transfer_set_covers_its_inputs(tmp_path, capsys):
    path, recipe = _recipe(tmp_path)
    assert _cli(["cache-teacher", str(path), "--out", str(tmp_path / "store"), "--dtype", "float32"]) == 0
    cached, data, trainer_cfg, live = _served(recipe, tmp_path / "store")
    assert cached.rows == len(data.train) > 40  # the labelled set and the transfer set
    assert trainer_cfg.mix.name == "none"
    batch = as_batch(
        torch.utils.data.default_collate([data.train[i] for i in range(len(data.train) - 8, len(data.train))])
    )
    assert (batch.targets == -100).all()  # transfer samples: no label, only the teacher's outputs
    torch.testing.assert_close(cached(batch).logits, live(batch).logits, rtol=1e-5, atol=1e-5)


def test_mixing_with_a_plain_store_is_refused_naming_mix_views(tmp_path, capsys):
    path, recipe = _recipe(tmp_path)
    assert _cli(["cache-teacher", str(path), "--out", str(tmp_path / "store")]) == 0
    mixed = {**recipe, "trainer": {**recipe["trainer"], "mix": {"name": "cutmix"}}}
    with pytest.raises(ConfigError, match="--mix-views K") as e:
        _served(mixed, tmp_path / "store")
    assert "\n" not in str(e.value)
    # and cache-teacher itself says so for a mixing recipe, in one line
    path.write_text(yaml.safe_dump(mixed))
    assert _cli(["cache-teacher", str(path), "--out", str(tmp_path / "store2")]) == 2
    err = capsys.readouterr().err.strip()
    assert "--mix-views K" in err and len(err.splitlines()) == 1


def test_store_of_mixed_views_through_the_recipe(tmp_path):
    path, recipe = _recipe(tmp_path, trainer={"mix": {"name": "cutmix"}})
    store = tmp_path / "store"
    assert (
        _cli(["cache-teacher", str(path), "--out", str(store), "--mix-views", "3", "--dtype", "float32"]) == 0
    )
    cached, data, trainer_cfg, live = _served(recipe, store)
    assert isinstance(data.train, MixedViews) and data.train.views == 3
    assert cached.rows == 3 * len(data.train)
    assert trainer_cfg.mix.name == "none"  # the views are mixed already: no batch mixing on top
    data.train.set_epoch(4)  # view 1
    batch = as_batch(torch.utils.data.default_collate([data.train[i] for i in range(10)]))
    assert batch.soft_targets is not None and int(batch.index[0]) == len(data.train)
    torch.testing.assert_close(cached(batch).logits, live(batch).logits, rtol=1e-5, atol=1e-5)
    # a store of mixed views for other mixing settings is refused by its fingerprint
    other = {**recipe, "trainer": {**recipe["trainer"], "mix": {"name": "mixup"}}}
    with pytest.raises(Exception, match="does not match"):
        _served(other, store)
