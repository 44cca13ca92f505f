"""distill compress: pruning, ONNX export, INT8 quantization, the stage pipeline and its errors."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from distill.compress.config import CompressRecipe, PruneConfig, load_compress_recipe, parse_compress_recipe
from distill.compress.prune import classifier_path, load_pruned, prune_model, save_pruned
from distill.errors import ConfigError, DistillError
from distill.models.small import SmallCNN

pytest.importorskip("torch_pruning")
pytest.importorskip("onnxruntime")

RECIPES = sorted(Path(__file__).resolve().parents[1].joinpath("recipes").glob("compress_*.yaml"))


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return SmallCNN(in_channels=1, num_classes=10, channels=(8, 16)).eval()


X = torch.rand(4, 1, 8, 8)


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_parse_and_build(path):
    from distill.data.bundle import build_data
    from distill.models.build import build_model

    cfg = load_compress_recipe(path)
    assert isinstance(cfg, CompressRecipe)
    if cfg.data.name == "cifar100":  # the real data is not here: its generated stand-in
        data = build_data("cifar100_standin", None, {"n_train": 8, "n_test": 4})
    elif cfg.data.class_path:  # stand-ins: build them tiny
        args = {k: v for k, v in cfg.data.init_args.items() if k not in ("train", "val", "test")}
        data = build_data(None, cfg.data.class_path, {**args, "train": 8, "val": 4, "test": 4})
    else:
        data = build_data(cfg.data.name, None, cfg.data.init_args)
    model = build_model(cfg.teacher.spec(), data)
    assert sum(p.numel() for p in model.parameters()) > 0


def test_config_errors_are_one_line():
    with pytest.raises(ConfigError, match=r"compress.prune.importance: 'l3' is not one of"):
        parse_compress_recipe({"compress": {"prune": {"importance": "l3"}}})
    with pytest.raises(
        ConfigError, match=r"unknown key 'compress.prune.ratoi' \(did you mean 'compress.prune.ratio'"
    ):
        parse_compress_recipe({"compress": {"prune": {"ratoi": 0.5}}})


# --------------------------------------------------------------------------- pruning


@pytest.mark.parametrize("importance", ["l1", "l2", "random"])
def test_prune_gives_smaller_dense_model_that_reloads(tmp_path, importance):
    model = _cnn()
    before = sum(p.numel() for p in model.parameters())
    info = prune_model(model, X[:1], PruneConfig(ratio=0.5, importance=importance))
    assert info["classifier"] == "classifier"
    assert model.features[0][0].out_channels == 4 and model.features[2][0].out_channels == 8
    assert model.classifier.out_features == 10  # the classifier keeps its classes
    assert info["params_after"] == sum(p.numel() for p in model.parameters()) < before / 2
    save_pruned(tmp_path, model, info)
    assert not list(tmp_path.glob("*.pt")) and (tmp_path / "model.safetensors").exists()
    again = load_pruned(_cnn(), tmp_path).eval()
    torch.testing.assert_close(again(X), model(X))


def test_prune_taylor_uses_gradients():
    model = _cnn()
    y = torch.randint(0, 10, (4,))
    prune_model(model, X[:1], PruneConfig(ratio=0.25, importance="taylor"), [(X, y)])
    assert model.features[0][0].out_channels == 6
    with pytest.raises(DistillError, match="taylor"):
        prune_model(_cnn(), X[:1], PruneConfig(ratio=0.25, importance="taylor"), None)


def test_prune_global_and_patterns():
    model = _cnn()
    prune_model(model, X[:1], PruneConfig(ratio=0.5, global_pruning=True, max_layer_ratio=0.9))
    widths = [model.features[0][0].out_channels, model.features[2][0].out_channels]
    assert all(w >= 1 for w in widths) and sum(widths) == 12  # half of the 24 channels, ranked together
    model = _cnn()
    prune_model(model, X[:1], PruneConfig(ratio=0.5, only=["features.2.*"]))
    assert model.features[0][0].out_channels == 8 and model.features[2][0].out_channels == 8
    assert classifier_path(_cnn(), X[:1]) == "classifier"


def test_prune_ratio_that_removes_a_whole_layer_is_refused():
    model = _cnn()
    with pytest.raises(
        DistillError, match=r"would remove all 8 output channels of 'features.0.0' \(a whole layer\)"
    ):
        prune_model(model, X[:1], PruneConfig(ratio=1.0))
    assert model.features[0][0].out_channels == 8  # untouched
    with pytest.raises(DistillError, match="layer_ratios 0.95 would remove all 8"):
        prune_model(_cnn(), X[:1], PruneConfig(ratio=0.5, layer_ratios={"features.0.0": 0.95}))
    with pytest.raises(DistillError, match="matches no prunable layer"):
        prune_model(_cnn(), X[:1], PruneConfig(layer_ratios={"nope.*": 0.5}))


def test_reload_into_wrong_architecture_is_a_clear_error(tmp_path):
    from distill.errors import CheckpointError

    model = _cnn()
    save_pruned(tmp_path, model, prune_model(model, X[:1], PruneConfig(ratio=0.5)))
    other = SmallCNN(in_channels=1, num_classes=10, channels=(8, 16, 32))
    with pytest.raises(CheckpointError):
        load_pruned(other, tmp_path)


# --------------------------------------------------------------------------- export and INT8


def test_export_names_the_unsupported_operator(tmp_path):
    from distill.compress.export import export_onnx

    class Spectral(nn.Module):
        def forward(self, x):
            return torch.fft.rfft2(x).abs().flatten(1)

    with pytest.raises(DistillError, match=r"operator aten::fft_rfft2 is not supported at opset 17"):
        export_onnx(Spectral(), X[:1], tmp_path / "m.onnx")
    assert not list(tmp_path.iterdir())  # nothing half-written


def _reader(n, batches=None):
    from distill.compress.quantize import calibration_reader

    return calibration_reader(batches if batches is not None else [(X, None)], ["input"], n)


def test_empty_calibration_set_is_refused():
    with pytest.raises(DistillError, match="calibration set is empty"):
        _reader(0)
    with pytest.raises(DistillError, match="calibration set is empty"):
        _reader(16, batches=[])
    assert _reader(3).samples == 3


def test_static_int8_is_smaller_and_close(tmp_path):
    import onnx

    from distill.compress.export import export_onnx
    from distill.compress.quantize import quantize_static, session

    torch.manual_seed(0)
    model = SmallCNN(in_channels=1, num_classes=10, channels=(32, 64)).eval()
    src = export_onnx(model, X[:1], tmp_path / "m.onnx")
    calib = torch.rand(64, 1, 8, 8)
    dst = quantize_static(src, tmp_path / "q.onnx", _reader(64, [(calib, None)]), True, "minmax")
    ops = {n.op_type for n in onnx.load(str(dst)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert dst.stat().st_size < src.stat().st_size / 2
    x = torch.rand(16, 1, 8, 8)
    ref = model(x).detach().numpy()
    out = session(dst).run(["logits"], {"input": x.numpy()})[0]
    assert out.shape == (16, 10)
    assert np.corrcoef(ref.ravel(), out.ravel())[0, 1] > 0.95


def test_dynamic_int8_transformer(tmp_path):
    pytest.importorskip("transformers")
    import onnx

    from distill.compress.export import export_onnx, to_numpy_inputs
    from distill.compress.quantize import quantize_dynamic, session
    from distill.compress.standins import tiny_bert, token_standin

    data = token_standin(train=8, val=4, test=4, seq_len=16)
    torch.manual_seed(0)
    model = tiny_bert(num_classes=4, hidden_size=32, layers=1, heads=2, intermediate_size=64).eval()
    batch = torch.utils.data.default_collate([data.train[i] for i in range(4)])
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    src = export_onnx(model, {k: v[:1] for k, v in inputs.items()}, tmp_path / "m.onnx")
    dst = quantize_dynamic(src, tmp_path / "q.onnx", per_channel=False)
    assert "DynamicQuantizeLinear" in {n.op_type for n in onnx.load(str(dst)).graph.node}
    feed = to_numpy_inputs(inputs, ["input_ids", "attention_mask"])
    out = session(dst).run(["logits"], feed)[0]
    np.testing.assert_allclose(out, model(**inputs).logits.detach().numpy(), atol=0.2)


def test_pareto_front():
    from distill.compress.report import pareto_front

    pts = [(1.0, 0.90), (2.0, 0.95), (3.0, 0.93), (0.5, 0.80), (2.0, 0.94)]
    assert pareto_front(pts) == [3, 0, 1]


# --------------------------------------------------------------------------- the pipeline


def _tiny(tmp_path: Path, **compress) -> dict:
    c = {
        "prune": {"ratio": 0.5},
        "quantize": {"calibration_samples": 64, "rows": ["baseline", "pruned_kd"]},
        "bench": {"batch_sizes": [1, 4], "repeats": 3, "warmup": 1},
    }
    for k, v in compress.items():
        c[k] = {**c.get(k, {}), **v}
    return {
        "name": "tiny",
        "data": {"name": "digits", "init_args": {"train_limit": 100}, "batch_size": 50},
        "teacher": {
            "name": "cnn",
            "init_args": {"channels": [8, 16]},
            "train": {"epochs": 1, "max_steps": 2, "progress": "off", "tensorboard": False},
        },
        "trainer": {"epochs": 1, "max_steps": 2, "progress": "off", "tensorboard": False},
        "baselines": [],
        "compress": c,
    }


def _cli(argv: list[str]) -> int:
    from distill.cli.compress import add_parser, main

    parser = argparse.ArgumentParser(prog="distill")
    add_parser(parser.add_subparsers(dest="command"))
    return main(parser.parse_args(argv))


def _write(tmp_path, data) -> str:
    import yaml

    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(data))
    return str(p)


@pytest.mark.slow
def test_pipeline_rows_resume_and_failures(tmp_path, capsys):
    out = tmp_path / "run"
    recipe = _write(tmp_path, _tiny(tmp_path))
    assert _cli(["compress", recipe, "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    names = [r["name"] for r in summary["rows"]]
    assert names == [
        "baseline",
        "pruned",
        "pruned_kd",
        "pruned_finetune",
        "kd_student",
        "baseline_int8",
        "pruned_kd_int8",
    ]
    rows = {r["name"]: r for r in summary["rows"]}
    assert rows["pruned"]["params"] < rows["baseline"]["params"] / 2
    assert rows["baseline"]["agreement"] == 1.0
    for r in summary["rows"]:
        assert {"latency_ms_b1", "latency_ms_b1_p95", "latency_ms_b4", "accuracy", "size_mb"} <= set(r)
    assert rows["baseline_int8"]["quantization"] == "static"  # (a model this tiny grows with QDQ nodes)
    for f in ("model.onnx", "model.int8.onnx", "model.safetensors", "shapes.json"):
        assert (out / "export" / f).exists()
    assert (out / "tradeoff.png").exists() and "tradeoff.png" in (out / "report.md").read_text()

    # resuming redoes nothing: the training log does not grow
    log = (out / "metrics.jsonl").read_text()
    assert _cli(["compress", recipe, "--out", str(out), "--resume"]) == 0
    assert (out / "metrics.jsonl").read_text() == log

    # a later stage's bad input: one line, earlier stages kept and reported
    bad = _write(tmp_path, _tiny(tmp_path, quantize={"calibration_samples": 0}))
    capsys.readouterr()
    assert _cli(["compress", bad, "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "calibration set is empty" in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["failed_stage"] == "quantize"
    assert [r["name"] for r in summary["rows"]][:5] == names[:5]
    assert (out / "pruned" / "shapes.json").exists() and (out / "metrics.jsonl").read_text() == log
    assert "Stopped at stage `quantize`" in (out / "report.md").read_text()


@pytest.mark.slow
def test_pipeline_bad_ratio_keeps_the_baseline(tmp_path, capsys):
    out = tmp_path / "run"
    recipe = _write(tmp_path, _tiny(tmp_path, prune={"ratio": 1.0}))
    assert _cli(["compress", recipe, "--out", str(out)]) == 2
    assert "a whole layer" in capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["failed_stage"] == "prune" and [r["name"] for r in summary["rows"]] == ["baseline"]
    assert (out / "checkpoints" / "baseline" / "final.safetensors").exists()


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["compress_cifar.yaml", "compress_text.yaml"])
def test_shipped_recipe_end_to_end_on_tiny_stand_in(tmp_path, recipe):
    pytest.importorskip("torchvision")
    pytest.importorskip("transformers")
    path = Path(__file__).resolve().parents[1] / "recipes" / recipe
    small = ["teacher.train.max_steps=2", "trainer.max_steps=2", "compress.bench.repeats=2"]
    small.append("compress.quantize.calibration_samples=32")
    if recipe == "compress_cifar.yaml":  # the generated stand-in in CIFAR-100's shapes, a small ResNet
        small += [
            "data.name=cifar100_standin",
            "data.init_args={n_train: 64, n_test: 32}",
            "teacher.name=resnet8",
        ]
    else:
        small += ["data.init_args.train=64", "data.init_args.val=32", "data.init_args.test=32"]
    out = tmp_path / "run"
    assert _cli(["compress", str(path), *small, "--out", str(out)]) == 0
    rows = {r["name"]: r for r in json.loads((out / "summary.json").read_text())["rows"]}
    assert rows["pruned_kd"]["params"] < rows["baseline"]["params"]
    assert rows["pruned_kd_int8"]["size_mb"] < rows["pruned_kd"]["size_mb"]
    assert "quantization" in rows["baseline_int8"]


def test_compress_imports_no_extra():
    import subprocess
    import sys

    code = (
        "import sys, distill.compress.pipeline, distill.cli.compress; "
        "bad = [m for m in ('onnxruntime', 'torch_pruning', 'onnx', 'transformers', 'torchvision', 'matplotlib') "
        "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
