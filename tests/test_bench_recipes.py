"""The benchmark scripts read their shipped YAML settings; bad settings are one-line errors."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml

from distill.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["cross_tokenizer", "served_teacher"]  # benchmarks whose settings live in recipes/<name>.yaml


def _script(name, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    from bench_recipe import parse_args

    return mod, parse_args


@pytest.mark.parametrize("name", NAMES)
def test_shipped_yaml_sets_every_value_the_script_uses(name, monkeypatch):
    mod, parse_args = _script(name, monkeypatch)
    raw = yaml.safe_load((ROOT / "recipes" / f"{name}.yaml").read_text())
    assert raw["benchmark"] == name
    args = vars(parse_args(mod.build_parser(), name, []))
    assert args["config"] == str(ROOT / "recipes" / f"{name}.yaml")
    for key, value in raw["args"].items():
        assert args[key.replace("-", "_")] == value
    # every flag of the script is documented in its YAML
    assert set(args) - {"config"} == {k.replace("-", "_") for k in raw["args"]}


def test_command_line_flags_override_the_yaml(monkeypatch):
    mod, parse_args = _script("cross_tokenizer", monkeypatch)
    args = parse_args(mod.build_parser(), "cross_tokenizer", ["--student-vocab", "7", "--val", "5"])
    assert args.student_vocab == 7 and args.val == 5


@pytest.mark.parametrize(
    "text,message",
    [
        (
            "benchmark: cross_tokenizer\nargs: {student_vocabs: 3}\n",
            "unknown setting args.student_vocabs (did you mean",
        ),
        (
            "benchmark: minilm_embeddings\nargs: {}\n",
            "is for benchmark 'minilm_embeddings', not 'cross_tokenizer'",
        ),
        ("benchmark: cross_tokenizer\nsteps: 3\n", "unknown top-level key(s) ['steps']"),
        ("benchmark: cross_tokenizer\nargs: [1, 2]\n", "'args:' must be a mapping"),
    ],
)
def test_bad_yaml_is_a_one_line_config_error(text, message, tmp_path, monkeypatch):
    mod, parse_args = _script("cross_tokenizer", monkeypatch)
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        parse_args(mod.build_parser(), "cross_tokenizer", ["--config", str(path)])
    assert message in str(err.value) and "\n" not in str(err.value)
