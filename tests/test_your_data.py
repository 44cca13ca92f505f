"""Every worked example of docs/your_data.md, run on data generated here: its files are taken from
the page as written, the data is made in a temporary folder, each recipe is loaded and its data,
teacher and student built and run on one batch; one recipe runs end to end (slow)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from distill.data.bundle import build_data
from distill.models.build import build_model
from distill.outputs import as_batch
from distill.run.config import load_recipe

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "your_data.md"


def examples() -> dict[str, dict[str, str]]:
    """{example: {file name: text}} from `<!-- example: NAME file: FILE -->` + a fenced block."""
    found: dict[str, dict[str, str]] = {}
    pattern = re.compile(r"<!-- example: (\w+) file: ([\w.]+) -->\n```\w*\n(.*?)```", re.S)
    for name, file, text in pattern.findall(PAGE.read_text()):
        found.setdefault(name, {})[file] = text
    return found


def make_images(folder: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, name in enumerate(["cat", "dog", "fox"]):
        (folder / "pets" / name).mkdir(parents=True)
        for i in range(10):
            arr = rng.integers(0, 60, (40, 48, 3), dtype=np.uint8)
            arr[..., c] += 150
            Image.fromarray(arr).save(folder / "pets" / name / f"{i}.jpg")


def make_iris(folder: Path) -> None:
    from sklearn.datasets import load_iris

    iris = load_iris()
    lines = ["sepal_length,sepal_width,petal_length,petal_width,species"]
    lines += [
        ",".join(f"{v:.1f}" for v in row) + f",{iris.target_names[t]}"
        for row, t in zip(iris.data, iris.target)
    ]
    (folder / "iris.csv").write_text("\n".join(lines) + "\n")


def make_reviews(folder: Path) -> None:
    datasets = pytest.importorskip("datasets", reason="pip install datasets (in the nlp extra)")
    import pyarrow as pa
    from datasets.table import InMemoryTable

    rng = np.random.default_rng(0)

    def split(n, name):
        y = rng.integers(0, 2, n)
        x = rng.normal(0, 1, (n, 6)) + y[:, None]
        table = InMemoryTable(pa.table({"features": x.tolist(), "label": y.tolist()}))
        # A given fingerprint: datasets' own hashing of the table needs nothing here.
        return datasets.Dataset(table, fingerprint=f"reviews-{name}")

    splits = datasets.DatasetDict({"train": split(50, "train"), "test": split(20, "test")})
    splits.save_to_disk(str(folder / "reviews_disk"))


MAKERS = {"images": make_images, "table": make_iris, "datasets": make_reviews}


def test_the_page_has_the_three_examples():
    assert set(examples()) == set(MAKERS)


def place(name: str, folder: Path) -> Path:
    """Writes the example's files and data into `folder`; returns its recipe."""
    files = examples()[name]
    for file, text in files.items():
        (folder / file).write_text(text)
    MAKERS[name](folder)
    return folder / next(f for f in files if f.endswith(".yaml"))


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_example_builds_and_runs_one_batch(name, tmp_path, monkeypatch):
    if name == "images":
        pytest.importorskip("torchvision", reason="pip install 'distill[vision]'")
    monkeypatch.chdir(tmp_path)  # the recipes' paths are relative to where distill runs
    recipe = place(name, tmp_path)
    cfg = load_recipe(recipe)
    data = build_data(cfg.data.name, cfg.data.class_path, cfg.data.init_args, seed=cfg.seed)
    assert data.num_classes and len(data.train) and len(data.test)
    loader = DataLoader(data.train, batch_size=4, collate_fn=data.collate_fn)
    batch = as_batch(next(iter(loader)))
    for spec in (cfg.teacher.spec(), cfg.student.spec()):
        model = build_model(spec, data).eval()
        with torch.no_grad():
            logits = model(batch.inputs)
        assert logits.shape == (4, data.num_classes)


@pytest.mark.slow
def test_table_example_runs_end_to_end(tmp_path):
    recipe = place("table", tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    fast = ["teacher.train.epochs=3", "trainer.epochs=3", "trainer.threads=1", "report.latency_repeats=2"]
    run = subprocess.run(
        [sys.executable, "-m", "distill", "run", recipe.name, *fast, "--out", "runs/iris"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert (tmp_path / "runs" / "iris" / "summary.json").exists()
