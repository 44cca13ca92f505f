"""Flower `ClientApp` and `ServerApp` for distill's federated strategies.

`make_client_app` / `make_server_app` build apps for a recipe given as YAML text (simulation).
The module-level `client_app` and `server_app` read everything from the run config instead, so
a real deployment points Flower at them (`distill.federated.apps:server_app`, see
docs/federated.md): run config keys `recipe` (path of the YAML on each machine), `strategy`,
`out` (server) and node config keys `partition-id` (which share a SuperNode holds), `save-dir`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from distill.errors import DistillError
from distill.federated.strategies import build_strategy, from_arrays, global_accuracy_fn, to_arrays
from distill.federated.task import (
    FederatedTask,
    accuracy,
    distill_from_logits,
    load_numpy_state,
    local_train,
    numpy_state,
    predict_logits,
    task_from_yaml,
)


def _recipe_text(recipe_yaml: str | None, context: Context) -> str:
    if recipe_yaml is not None:
        return recipe_yaml
    path = context.run_config.get("recipe")
    if not path:
        raise DistillError(
            "run config has no 'recipe': set recipe = \"path/to/recipe.yaml\" in [tool.flwr.app.config]"
        )
    p = Path(str(path))
    if not p.is_file():
        raise DistillError(f"recipe {p} named in the run config does not exist on this machine")
    return p.read_text()


def _partition(context: Context, task: FederatedTask) -> int:
    if "partition-id" not in context.node_config:
        raise DistillError("this SuperNode has no partition-id: start it with --node-config 'partition-id=0'")
    pid = int(context.node_config["partition-id"])
    if not 0 <= pid < task.recipe.clients:
        raise DistillError(f"partition-id {pid} is outside the recipe's {task.recipe.clients} clients")
    return pid


def _client_model(task: FederatedTask, pid: int, context: Context, strategy: str):
    """FedMD (and local-only) clients keep their own model between rounds in Context.state."""
    model = task.build_model(strategy, pid, seed=task.recipe.seed * 1000 + pid)
    if f"{strategy}-model" in context.state:
        load_numpy_state(model, from_arrays(context.state[f"{strategy}-model"]), source="client state")
    return model


def make_client_app(recipe_yaml: str | None = None, save_dir: str | Path | None = None) -> ClientApp:
    """A ClientApp for every strategy: the message's config says which one is running."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        task = task_from_yaml(_recipe_text(recipe_yaml, context))
        pid = _partition(context, task)
        config = msg.content["config"]
        strategy, rnd = str(config["strategy"]), int(config["server-round"])
        seed = task.recipe.seed * 100_000 + rnd * 100 + pid
        private = task.split.clients[pid]
        if strategy in ("fedavg", "feddf"):
            model = task.build_model(strategy)
            load_numpy_state(model, from_arrays(msg.content["arrays"]), source="the server's global model")
            loss = local_train(model, private, task, seed)
            arrays = to_arrays(numpy_state(model))
        elif strategy in ("fedmd", "local"):
            model = _client_model(task, pid, context, strategy)
            shared = from_arrays(msg.content["arrays"])
            if "consensus" in shared:  # digest: distill the consensus on the public set
                import torch

                consensus = torch.as_tensor(shared["consensus"])
                distill_from_logits(model, task.split.public, consensus, task, task.recipe.digest, seed)
            loss = local_train(model, private, task, seed)  # revisit: private labelled data
            context.state[f"{strategy}-model"] = to_arrays(numpy_state(model))
            if strategy == "fedmd":
                arrays = to_arrays({"logits": predict_logits(model, task.split.public).numpy()})
            else:
                arrays = ArrayRecord()  # local-only: nothing leaves the client
        else:
            raise DistillError(f"unknown strategy '{strategy}' in the server's message")
        metrics = MetricRecord({"num-examples": len(private), "train_loss": loss})
        return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        task = task_from_yaml(_recipe_text(recipe_yaml, context))
        pid = _partition(context, task)
        config = msg.content["config"]
        strategy = str(config["strategy"])
        model = _client_model(task, pid, context, strategy)
        acc = accuracy(model, task.split.test)
        target = save_dir or context.node_config.get("save-dir")
        if target and int(config["server-round"]) == int(config.get("num-rounds", -1)):
            from distill.checkpoint import save_weights

            spec = task.model_spec(strategy, pid)
            save_weights(
                Path(str(target)) / f"client{pid}.safetensors",
                model.state_dict(),
                {"strategy": strategy, "client": str(pid), "model": str(spec.name or spec.class_path)},
            )
        metrics = MetricRecord({"accuracy": acc, "num-examples": len(task.split.test), "partition-id": pid})
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    return app


def run_strategy(grid: Grid, task: FederatedTask, name: str) -> dict[str, Any]:
    """Runs one strategy for the recipe's rounds on `grid`; returns its history and final arrays."""
    strategy = build_strategy(name, task)
    rounds = task.recipe.rounds
    if name in ("fedmd", "local"):
        initial, evaluate_fn = ArrayRecord(), None
    else:
        initial = to_arrays(numpy_state(task.build_model(name)))
        evaluate_fn = global_accuracy_fn(task, name)
    result = strategy.start(
        grid=grid,
        initial_arrays=initial,
        num_rounds=rounds,
        train_config=ConfigRecord({"strategy": name}),
        evaluate_config=ConfigRecord({"strategy": name, "num-rounds": rounds}),
        evaluate_fn=evaluate_fn,
    )
    history = []
    for r in range(0 if evaluate_fn else 1, rounds + 1):
        source = result.evaluate_metrics_serverapp if evaluate_fn else result.evaluate_metrics_clientapp
        rec = source.get(r)
        row: dict[str, Any] = {"round": r, "accuracy": float(rec["accuracy"]) if rec else None}
        t = strategy.traffic.get(r, {"down": 0, "up": 0})
        row.update(bytes_down=t["down"], bytes_up=t["up"], bytes=t["down"] + t["up"])
        if r > 0:
            row["clients_used"] = strategy.clients_used.get(r, 0)
            row["failures"] = strategy.failures.get(r, [])
            row["rejected"] = strategy.rejected.get(r, [])
        if name == "feddf" and r in strategy.ensemble_accuracy:
            row["ensemble_accuracy"] = strategy.ensemble_accuracy[r]
        if r in getattr(strategy, "client_accuracy", {}):
            row["client_accuracy"] = strategy.client_accuracy[r]
        history.append(row)
    return {"history": history, "arrays": None if evaluate_fn is None else from_arrays(result.arrays)}


def make_server_app(
    recipe_yaml: str | None = None, strategy: str | None = None, sink: dict | None = None
) -> ServerApp:
    """A ServerApp running `strategy` (or run config `strategy`); its results go into `sink`
    (simulation) or, in a deployment, to run config `out` as JSON + the global model."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        task = task_from_yaml(_recipe_text(recipe_yaml, context))
        name = strategy or str(context.run_config.get("strategy", "feddf"))
        out = run_strategy(grid, task, name)
        if sink is not None:
            sink[name] = out
            return
        target = Path(str(context.run_config.get("out", "runs/federated")))
        import json

        from distill.checkpoint import atomic_write_text, save_weights

        atomic_write_text(target / f"{name}_history.json", json.dumps(out["history"], indent=1))
        if out["arrays"] is not None:
            import torch

            save_weights(
                target / "checkpoints" / name / "global.safetensors",
                {k: torch.as_tensor(v) for k, v in out["arrays"].items()},
                {"strategy": name},
            )

    return app


# For `flwr run` / SuperLink + SuperNodes: everything comes from the run and node config.
client_app = make_client_app()
server_app = make_server_app()
