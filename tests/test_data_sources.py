"""The registered builders for data a user has (image folder, table, torchvision dataset) and for
models by name (torchvision, timm): generated data, local weights, nothing downloaded."""

from __future__ import annotations

import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from distill.checkpoint import save_weights
from distill.data.bundle import build_data
from distill.data.sources import stratified_split
from distill.errors import ConfigError, DistillError
from distill.models.build import build_model

pytest.importorskip("torchvision")


def write_image_folder(root: Path, classes=("cat", "dog", "fox"), per_class=10, size=20, seed=0) -> Path:
    """Class-coloured noise images in torchvision's ImageFolder layout."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
            arr[..., c % 3] += 150
            Image.fromarray(arr).save(root / name / f"{i}.png")
    return root


def test_stratified_split_is_seeded_disjoint_and_keeps_every_class():
    labels = [0] * 20 + [1] * 10 + [2] * 3
    a = stratified_split(labels, [0.2, 0.2], seed=0)
    assert a == stratified_split(labels, [0.2, 0.2], seed=0)
    assert a != stratified_split(labels, [0.2, 0.2], seed=1)
    flat = sorted(i for p in a for i in p)
    assert flat == list(range(len(labels)))
    for part in a:
        assert {labels[i] for i in part} == {0, 1, 2}
    assert [len(p) for p in a] == [19, 7, 7]  # 20 -> 12+4+4, 10 -> 6+2+2, 3 -> 1+1+1
    with pytest.raises(DistillError, match="sum below 1"):
        stratified_split(labels, [0.6, 0.5], seed=0)


def test_image_folder_without_split_folders_holds_out_seeded_val_and_test(tmp_path):
    root = write_image_folder(tmp_path / "pets")
    data = build_data("image_folder", init_args={"root": str(root), "image_size": 16})
    assert data.num_classes == 3 and data.input_shape == (3, 16, 16)
    assert (len(data.train), len(data.val), len(data.test)) == (24, 3, 3)
    x, y = data.test[0]
    assert x.shape == (3, 16, 16) and 0 <= y < 3
    assert data.meta["classes"] == ["cat", "dog", "fox"]
    again = build_data("image_folder", init_args={"root": str(root), "image_size": 16}, seed=5)
    assert again.test.indices == data.test.indices  # the run's seed does not move the split
    other = build_data("image_folder", init_args={"root": str(root), "image_size": 16, "split_seed": 1})
    assert other.test.indices != data.test.indices


def test_image_folder_uses_split_folders_when_present(tmp_path):
    write_image_folder(tmp_path / "d" / "train", per_class=6)
    write_image_folder(tmp_path / "d" / "val", per_class=2, seed=1)
    data = build_data("image_folder", init_args={"root": str(tmp_path / "d"), "image_size": 16})
    assert len(data.val) == 6 and len(data.train) + len(data.test) == 18  # test taken from train/
    assert data.meta["split_from"] == "split_seed=0"


def test_image_folder_errors_are_one_line(tmp_path):
    with pytest.raises(DistillError, match="is not a folder"):
        build_data("image_folder", init_args={"root": str(tmp_path / "nope")})
    (tmp_path / "empty").mkdir()
    with pytest.raises(DistillError, match="ImageFolder layout") as e:
        build_data("image_folder", init_args={"root": str(tmp_path / "empty")})
    assert "\n" not in str(e.value)


def write_csv(path: Path, n=60, label="species", seed=0) -> Path:
    rng = np.random.default_rng(seed)
    names = ["setosa", "versicolor", "virginica"]
    lines = [f"a,b,c,{label}"]
    for i in range(n):
        k = i % 3
        a, b, c = rng.normal(k, 0.3, 3)
        lines.append(f"{a:.4f},{b:.4f},{c:.4f},{names[k]}")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_table_csv_with_named_labels(tmp_path):
    p = write_csv(tmp_path / "t.csv")
    data = build_data("table", init_args={"path": str(p), "label": "species"})
    assert data.num_classes == 3 and data.input_shape == (3,)
    assert data.meta["classes"] == ["setosa", "versicolor", "virginica"]
    assert (len(data.train), len(data.val), len(data.test)) == (42, 9, 9)
    x, y = data.train[0]
    assert x.dtype == torch.float32 and x.shape == (3,)
    xs = torch.stack([data.train[i][0] for i in range(len(data.train))])
    assert torch.allclose(xs.mean(0), torch.zeros(3), atol=1e-5)  # standardised on train


def test_table_errors_name_the_columns(tmp_path):
    p = write_csv(tmp_path / "t.csv")
    with pytest.raises(DistillError, match="no label column 'label'; its columns are a, b, c, species"):
        build_data("table", init_args={"path": str(p)})
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b,label\n1,2,0\n3,oops,1\n")
    with pytest.raises(DistillError, match="column 'b' row 2 holds 'oops'"):
        build_data("table", init_args={"path": str(bad)})
    with pytest.raises(DistillError, match="does not exist"):
        build_data("table", init_args={"path": str(tmp_path / "none.csv")})


def test_table_separate_test_file_and_parquet(tmp_path):
    train = write_csv(tmp_path / "train.csv", label="label")
    test = write_csv(tmp_path / "test.csv", n=12, label="label", seed=3)
    data = build_data("table", init_args={"path": str(train), "test_path": str(test)})
    assert len(data.test) == 12 and len(data.val) == 9 and len(data.train) == 51
    pq = pytest.importorskip("pyarrow.parquet", reason="pip install pyarrow")
    import pyarrow as pa

    cols = {"x1": [0.0, 1.0, 2.0, 3.0] * 5, "x2": [1.0, 0.0, 1.0, 0.0] * 5, "label": [0, 1, 2, 3] * 5}
    pq.write_table(pa.table(cols), tmp_path / "t.parquet")
    data = build_data("table", init_args={"path": str(tmp_path / "t.parquet"), "val_fraction": 0.2})
    assert data.num_classes == 4 and data.input_shape == (2,)


def write_mnist(root: Path, n_train=40, n_test=10) -> Path:
    """torchvision's MNIST raw files (idx format), generated."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 255, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
            struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes()
        )
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + labels.tobytes())
    return root


def test_torchvision_dataset_from_a_local_root(tmp_path):
    root = write_mnist(tmp_path / "mnist")
    data = build_data("torchvision", init_args={"dataset": "MNIST", "root": str(root)})
    assert data.num_classes == 10 and data.input_shape == (1, 28, 28)
    assert len(data.test) == 10 and len(data.train) + len(data.val) == 40  # val from train, seeded
    x, y = data.val[0]
    assert x.shape == (1, 28, 28)


def test_torchvision_dataset_missing_root_is_one_line(tmp_path):
    with pytest.raises(DistillError, match="does not exist; nothing is downloaded") as e:
        build_data("torchvision", init_args={"dataset": "CIFAR10", "root": str(tmp_path / "nope")})
    assert "\n" not in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DistillError, match="cannot read it from") as e:
        build_data("torchvision", init_args={"dataset": "CIFAR10", "root": str(tmp_path / "empty")})
    assert "\n" not in str(e.value)
    with pytest.raises(DistillError, match="did you mean MNIST"):
        build_data("torchvision", init_args={"dataset": "mnist", "root": str(tmp_path)})


def test_torchvision_model_by_name_takes_classes_from_the_data_and_local_weights(tmp_path):
    root = write_image_folder(tmp_path / "pets")
    data = build_data("image_folder", init_args={"root": str(root), "image_size": 32})
    net = build_model({"name": "torchvision", "init_args": {"model": "resnet18"}}, data)
    assert net.fc.out_features == 3
    # ImageNet-style weights with 1000 classes: the backbone loads, the classifier starts fresh.
    src = build_model({"name": "torchvision", "init_args": {"model": "resnet18", "num_classes": 1000}})
    save_weights(tmp_path / "r18.safetensors", src.state_dict())
    with pytest.warns(UserWarning, match="classifier starts fresh"):
        net = build_model(
            {
                "name": "torchvision",
                "init_args": {"model": "resnet18", "checkpoint": str(tmp_path / "r18.safetensors")},
            },
            data,
        )
    assert torch.equal(net.conv1.weight, src.conv1.weight) and net.fc.out_features == 3
    assert net.eval()(data.train[0][0].unsqueeze(0)).shape == (1, 3)
    with pytest.raises(ConfigError, match="never downloaded"):
        build_model({"name": "torchvision", "init_args": {"model": "resnet18", "weights": "DEFAULT"}}, data)
    with pytest.raises(ConfigError, match="did you mean resnet18"):
        build_model({"name": "torchvision", "init_args": {"model": "resnet_18"}}, data)
    other = build_model({"name": "torchvision", "init_args": {"model": "resnet34"}}, data)
    save_weights(tmp_path / "r34.safetensors", other.state_dict())
    with pytest.raises(DistillError, match="does not fit"):
        build_model(
            {
                "name": "torchvision",
                "init_args": {"model": "resnet18", "checkpoint": str(tmp_path / "r34.safetensors")},
            },
            data,
        )


def test_timm_model_by_name(tmp_path):
    pytest.importorskip("timm", reason="pip install timm (in the vision extra)")
    data = build_data("digits")  # 1 x 8 x 8, 10 classes: in_chans and num_classes from the data
    net = build_model({"name": "timm", "init_args": {"model": "resnet10t"}}, data)
    assert net.eval()(data.train[0][0].unsqueeze(0)).shape == (1, 10)
    save_weights(tmp_path / "t.safetensors", net.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # same class count: no warning, a strict load
        again = build_model(
            {
                "name": "timm",
                "init_args": {"model": "resnet10t", "checkpoint": str(tmp_path / "t.safetensors")},
            },
            data,
        )
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), net.state_dict().values()))
    with pytest.raises(ConfigError, match="never downloaded"):
        build_model({"name": "timm", "init_args": {"model": "resnet10t", "pretrained": True}}, data)
