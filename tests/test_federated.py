"""Federated distillation on Flower: splits, update checks, and 3-client / 2-round simulations."""

import json
import subprocess
import sys

import numpy as np
import pytest

from distill.errors import ConfigError
from distill.federated.config import FederatedRecipe, parse_federated
from distill.federated.data import dirichlet_split, iid_split

pytest.importorskip("flwr")

TINY = {
    "clients": 3,
    "rounds": 2,
    "data": {"name": "digits"},
    "model": {"name": "mlp", "init_args": {"hidden": [32]}},
    "client_models": [
        {"name": "mlp", "init_args": {"hidden": [16]}},
        {"name": "cnn", "init_args": {"channels": [4, 8]}},
    ],
    "local": {"epochs": 1},
    "server_distill": {"epochs": 1},
    "digest": {"epochs": 1},
    "partition": {"scheme": "dirichlet", "alpha": 0.5},
}


def tiny(**kw) -> FederatedRecipe:
    return parse_federated({**TINY, **kw})


def test_import_distill_does_not_import_flwr():
    code = "import sys, distill, distill.federated, distill.cli.federated; print('flwr' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_iid_and_dirichlet_splits_cover_every_sample_once():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 50)
    for parts in (iid_split(500, 4, rng), [p for p in dirichlet_split(labels, 4, 0.3, rng, min_size=5)]):
        joined = np.sort(np.concatenate(parts))
        assert np.array_equal(joined, np.arange(500))
        assert min(len(p) for p in parts) >= 5


def test_small_alpha_gives_more_skewed_clients():
    labels = np.repeat(np.arange(10), 60)

    def skew(alpha):  # mean share of a client's most common class
        parts = dirichlet_split(labels, 5, alpha, np.random.default_rng(1), min_size=5)
        return np.mean([np.bincount(labels[p], minlength=10).max() / len(p) for p in parts])

    assert skew(0.1) > skew(100.0) + 0.2


def test_recipe_errors_name_the_key():
    with pytest.raises(ConfigError, match="did you mean 'clients'"):
        parse_federated({"clientz": 3})
    with pytest.raises(ConfigError, match="strategies.0"):
        parse_federated({"strategies": ["fedprox"]})
    with pytest.raises(ConfigError, match="clients"):
        parse_federated({"clients": 1})


def test_check_update_rejects_wrong_shape_with_clear_message():
    from distill.federated.task import check_update

    ref = {"w": np.zeros((4, 3)), "b": np.zeros(4)}
    assert check_update(ref, {"w": np.ones((4, 3)), "b": np.ones(4)}) is None
    msg = check_update(ref, {"w": np.ones((5, 3)), "b": np.ones(4)}, who="node 7")
    assert "node 7" in msg and "'w'" in msg and "(5, 3)" in msg and "(4, 3)" in msg
    assert "missing ['b']" in check_update(ref, {"w": np.ones((4, 3))})
    assert "NaN" in check_update(ref, {"w": np.full((4, 3), np.nan), "b": np.ones(4)})


def test_three_clients_two_rounds_all_strategies(tmp_path):
    from distill.checkpoint import load_weights
    from distill.federated.simulation import run_federated
    from distill.federated.task import FederatedTask

    recipe = tiny()
    summary = run_federated(recipe, tmp_path / "run")
    rows = {r["name"]: r for r in summary["rows"]}
    assert set(rows) == {"fedavg", "feddf", "fedmd", "local"}
    for row in rows.values():
        assert row["rounds"] == 2 and row["failures"] == 0 and row["rejected"] == 0
        assert 0.0 <= row["accuracy"] <= 1.0
    assert rows["fedavg"]["accuracy"] > 0.2  # 10 classes: chance is 0.1
    hist = summary["history"]
    task = FederatedTask(recipe)
    n_params = sum(p.numel() for p in task.build_model("fedavg").parameters())
    for h in hist["fedavg"][1:]:  # the whole model down to and up from each of the 3 clients
        assert h["bytes_down"] == h["bytes_up"] >= 3 * 4 * n_params
        assert h["clients_used"] == 3
    logits_bytes = len(task.split.public) * 10 * 4
    fedmd = hist["fedmd"]
    assert fedmd[0]["bytes_down"] == 0  # no consensus exists before round 1
    assert 3 * logits_bytes <= fedmd[0]["bytes_up"] < 3 * logits_bytes + 3000
    assert 3 * logits_bytes <= fedmd[1]["bytes_down"] < 3 * logits_bytes + 3000
    assert set(fedmd[-1]["client_accuracy"]) == {0, 1, 2} or set(fedmd[-1]["client_accuracy"]) == {
        "0",
        "1",
        "2",
    }
    assert all(h["bytes"] == 0 for h in hist["local"])  # local-only clients share nothing
    out = tmp_path / "run"
    for name in ("fedavg", "feddf"):
        load_weights(task.build_model(name), out / "checkpoints" / name / "global.safetensors")
    for i in range(3):
        for name in ("fedmd", "local"):
            load_weights(task.build_model(name, i), out / "checkpoints" / name / f"client{i}.safetensors")
    saved = json.loads((out / "summary.json").read_text())
    assert [r["name"] for r in saved["rows"]] == ["fedavg", "feddf", "fedmd", "local"]
    assert (out / "report.md").read_text().count("| round |") == 4
    assert (out / "accuracy_per_round.png").stat().st_size > 0


def _wrapping_app(inner_factory, on_train):
    """A ClientApp that runs `on_train(msg, context, inner)` in place of the inner app's train."""
    from flwr.clientapp import ClientApp

    def factory(text, save_dir):
        inner = inner_factory(text, save_dir)
        app = ClientApp()

        @app.train()
        def train(msg, context):
            return on_train(msg, context, inner)

        @app.evaluate()
        def evaluate(msg, context):
            return inner(msg, context)

        return app

    return factory


def test_failing_client_is_tolerated(tmp_path):
    from distill.federated.apps import make_client_app
    from distill.federated.simulation import run_federated

    def on_train(msg, context, inner):
        if context.node_config["partition-id"] == 1 and msg.content["config"]["server-round"] == 1:
            raise RuntimeError("client 1 lost power")
        return inner(msg, context)

    summary = run_federated(
        tiny(strategies=["fedavg", "fedmd"]),
        tmp_path / "run",
        client_app_factory=_wrapping_app(make_client_app, on_train),
    )
    for name in ("fedavg", "fedmd"):
        hist = [h for h in summary["history"][name] if h["round"] > 0]
        assert hist[0]["clients_used"] == 2 and "client 1 lost power" in hist[0]["failures"][0]
        assert hist[1]["clients_used"] == 3 and hist[1]["failures"] == []
        assert hist[1]["accuracy"] is not None


def test_update_of_wrong_shape_is_rejected(tmp_path):
    from flwr.app import Message, RecordDict

    from distill.federated.apps import make_client_app
    from distill.federated.simulation import run_federated
    from distill.federated.strategies import from_arrays, to_arrays

    def on_train(msg, context, inner):
        reply = inner(msg, context)
        if context.node_config["partition-id"] != 2:
            return reply
        arrays = from_arrays(reply.content["arrays"])
        key = next(iter(arrays))
        arrays[key] = arrays[key][:-1]  # one row short: another architecture
        return Message(
            RecordDict({"arrays": to_arrays(arrays), "metrics": reply.content["metrics"]}), reply_to=msg
        )

    summary = run_federated(
        tiny(strategies=["feddf"]),
        tmp_path / "run",
        client_app_factory=_wrapping_app(make_client_app, on_train),
    )
    hist = [h for h in summary["history"]["feddf"] if h["round"] > 0]
    for h in hist:
        assert h["clients_used"] == 2
        (reason,) = h["rejected"]
        assert "rejected" in reason and "has shape" in reason and "global model has" in reason
    assert summary["rows"][0]["rejected"] == 2 and summary["rows"][0]["accuracy"] is not None


def test_cli_bad_recipe_is_one_line(tmp_path, capsys):
    import argparse

    from distill.cli import federated as cli_federated

    bad = tmp_path / "bad.yaml"
    bad.write_text("clients: 3\nrounds: 0\n")
    parser = argparse.ArgumentParser()
    cli_federated.add_parser(parser.add_subparsers(dest="command"))
    code = cli_federated.main(parser.parse_args(["federated", str(bad)]))
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "rounds" in err


def test_shipped_recipe_parses():
    from pathlib import Path

    from distill.federated.config import load_federated

    recipe = load_federated(Path(__file__).parent.parent / "recipes" / "federated_digits.yaml")
    assert recipe.partition.scheme == "dirichlet" and len(recipe.client_models) == 3


@pytest.mark.slow
def test_ray_backend_runs_the_same_apps(tmp_path):
    """Flower's own run_simulation (Ray actors) with the same ServerApp/ClientApp."""
    pytest.importorskip("ray")
    from distill.federated.simulation import run_federated

    summary = run_federated(tiny(backend="ray", strategies=["fedavg", "fedmd"]), tmp_path / "run")
    for row in summary["rows"]:
        assert row["rounds"] == 2 and row["failures"] == 0 and row["accuracy"] is not None
    assert len(list((tmp_path / "run" / "checkpoints" / "fedmd").glob("client*.safetensors"))) == 3


def test_feddf_on_mixed_public_inputs(tmp_path, monkeypatch):
    """server_distill.mix: the client ensemble runs live on each mixed public batch."""
    from distill.federated import strategies
    from distill.federated.simulation import run_federated

    calls = []
    real = strategies.distill_from_ensemble

    def spy(model, public, members, task, cfg, seed):
        calls.append((len(members), cfg.mix.name))
        return real(model, public, members, task, cfg, seed)

    monkeypatch.setattr(strategies, "distill_from_ensemble", spy)
    recipe = tiny(strategies=["feddf"], server_distill={"epochs": 1, "mix": {"name": "mixup", "alpha": 0.4}})
    summary = run_federated(recipe, tmp_path / "run")
    assert calls == [(3, "mixup"), (3, "mixup")]  # one fusion per round, from every client model
    assert 0.0 <= summary["rows"][0]["accuracy"] <= 1.0
    with pytest.raises(ConfigError, match="digest.mix: FedMD shares logits on the fixed public inputs"):
        tiny(digest={"mix": {"name": "cutmix"}})
