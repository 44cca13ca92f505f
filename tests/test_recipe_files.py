"""Recipes as files: a malformed one points at its line and column, and Python files beside a
recipe are importable by `class_path` for every command (they all load recipes in `load_yaml`)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from distill.errors import ConfigError
from distill.run.config import load_yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("text", "where", "words"),
    [
        ("name: x\nteacher:\n  name: [a\n", "line 4, column 1", "that began at line 3, column 9"),
        ("name: x\n  data: 3\n", "line 2, column 7", "mapping values are not allowed"),
        ('a: 1\nb: "x\n', "line 3, column 1", "quoted scalar that began at line 2, column 4"),
        ("teacher: !!python/object:os.system {}\n", "line 1, column 10", "tags that build Python objects"),
    ],
)
def test_malformed_yaml_names_line_and_column(tmp_path, text, where, words):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_yaml(p)
    msg = str(e.value)
    assert "\n" not in msg and where in msg and words in msg, msg
    if "!!" not in text:
        assert "tag" not in msg  # the note about tags only where a tag is the problem


# Each command's loader, called on a copy of a shipped recipe of its kind placed in a fresh folder
# beside a module `beside_<kind>.py`; in a fresh interpreter, that module must import afterwards
# (and must not before, so the check can fail).
LOADERS = {
    "run": ("distill.run.config", "load_recipe", "digits.yaml"),
    "chain": ("distill.chain", "load_chain_recipe", "chain_digits.yaml"),
    "tune": ("distill.tune.config", "load_tune_recipe", "tune_digits.yaml"),
    "federated": ("distill.federated.config", "load_federated", "federated_digits.yaml"),
    "teachers": ("distill.teacher_choice", "load_teachers_recipe", "teachers_digits.yaml"),
    "compress": ("distill.compress.config", "load_compress_recipe", "compress_digits.yaml"),
}


@pytest.mark.parametrize("kind", sorted(LOADERS))
def test_files_beside_the_recipe_import_for_every_command(tmp_path, kind):
    module, loader, recipe = LOADERS[kind]
    folder = tmp_path / "project"
    folder.mkdir()
    shutil.copy(ROOT / "recipes" / recipe, folder / recipe)
    (folder / f"beside_{kind}.py").write_text("VALUE = 42\n")
    code = (
        "import importlib\n"
        "from distill.registry import import_path\n"
        "from distill.errors import ConfigError\n"
        f"try:\n    import_path('beside_{kind}.VALUE'); print('IMPORTED BEFORE')\n"
        "except ConfigError as e:\n    print('BEFORE:', e)\n"
        f"getattr(importlib.import_module({module!r}), {loader!r})({str(folder / recipe)!r})\n"
        f"print('AFTER:', import_path('beside_{kind}.VALUE'))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, check=True
    ).stdout
    before = out.splitlines()[0]
    assert before.startswith("BEFORE:") and f"no module named 'beside_{kind}'" in before, out
    assert "looked beside the recipe in" in before, out
    assert out.splitlines()[-1] == "AFTER: 42", out


def test_import_error_inside_the_module_is_not_hidden(tmp_path):
    (tmp_path / "broken_beside.py").write_text("import not_a_real_package_xyz\n")
    (tmp_path / "r.yaml").write_text("name: x\n")
    load_yaml(tmp_path / "r.yaml")
    from distill.registry import import_path

    with pytest.raises(ConfigError, match="importing broken_beside failed: No module named 'not_a_real"):
        import_path("broken_beside.thing")


WINE = '''
"""A user's own data, beside the recipe: scikit-learn's wine table (178 rows, 13 features)."""
import torch
from sklearn.datasets import load_wine
from torch.utils.data import TensorDataset

from distill.data import DataBundle


def wine(seed: int = 0) -> DataBundle:
    x, y = load_wine(return_X_y=True)
    x = torch.tensor((x - x.mean(0)) / x.std(0), dtype=torch.float32)
    y = torch.tensor(y)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    parts = [order[:118], order[118:148], order[148:]]
    train, val, test = (TensorDataset(x[i], y[i]) for i in parts)
    return DataBundle(train=train, val=val, test=test, num_classes=3, input_shape=(13,))
'''

WINE_RECIPE = """
name: wine
data: {class_path: wine_beside.wine, batch_size: 32}
teacher:
  name: mlp
  init_args: {hidden: [64]}
  train: {epochs: 2, threads: 1}
student: {name: mlp, init_args: {hidden: [8]}}
trainer: {epochs: 2, threads: 1}
report: {latency_batch_sizes: [1], latency_repeats: 2}
"""


@pytest.mark.slow
def test_run_then_eval_from_another_folder_find_the_module_beside_the_recipe(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "wine_beside.py").write_text(WINE)
    (project / "wine.yaml").write_text(WINE_RECIPE)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}

    def distill(*args, cwd):
        return subprocess.run(
            [sys.executable, "-m", "distill", *args], cwd=cwd, env=env, capture_output=True, text=True
        )

    run = distill("run", str(project / "wine.yaml"), "--out", str(tmp_path / "runs" / "wine"), cwd=elsewhere)
    assert run.returncode == 0, run.stderr[-2000:]
    first = (tmp_path / "runs" / "wine" / "config.yaml").read_text().splitlines()[0]
    assert str(project) in first
    other = tmp_path / "other"
    other.mkdir()
    ev = distill("eval", str(tmp_path / "runs" / "wine"), cwd=other)
    assert ev.returncode == 0, ev.stderr[-2000:]
    assert 0.0 <= json.loads(ev.stdout)["accuracy"] <= 1.0


def test_a_loss_name_resolves_whatever_the_caller_imported_first():
    """The loss registry imports `distill.losses` on its first lookup: a fresh process that imports
    only the registry (or `distill.run.cross`) still finds every term (before, none was known, and a
    cross-tokenizer recipe resolved outside the pipeline got no offsets)."""
    code = (
        "from distill.registry import LOSSES\n"
        "assert 'aligned_kd' in LOSSES and LOSSES.get('kd').__name__ == 'KD', LOSSES.names()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
