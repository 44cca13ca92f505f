"""Running a federated recipe in this process: every strategy on the same split, then the report.

Two backends:
- `inprocess` (default): `InProcessGrid`, a Flower `Grid` that hands each message to the
  ClientApp in this thread, one client after another, each with its own persistent `Context`.
  No Ray, no threads, deterministic; a raising client becomes an error reply, as in Flower's
  own runtimes, so the round proceeds with the others.
- `ray`: Flower's `flwr.simulation.run_simulation` (Ray actors; ~15 s start-up here).
The same ServerApp and ClientApp run unchanged under `flwr run` on a SuperLink + SuperNodes.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
import traceback
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from distill.checkpoint import atomic_write_text, save_weights
from distill.federated.apps import make_client_app, make_server_app
from distill.federated.config import FederatedRecipe
from distill.federated.task import FederatedTask, task_from_yaml
from distill.run.measure import count_params, size_mb
from distill.run.rundir import RunDir

_FIRST_NODE = 1001


class InProcessGrid(Grid):
    """Flower's Grid interface over ClientApps called directly, in order (no Ray, no network).

    Args:
        client_app: the ClientApp every virtual SuperNode runs.
        num_nodes: how many SuperNodes; node `i` gets node_config `partition-id=i`.
        node_config: extra node config for all nodes (e.g. `save-dir`).
    """

    def __init__(
        self, client_app: ClientApp, num_nodes: int, node_config: dict | None = None, run_id: int = 1
    ):
        self.client_app = client_app
        self._run = Run.create_empty(run_id=run_id)
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, SUPERLINK_NODE_ID
        self.contexts = {
            _FIRST_NODE + i: Context(
                run_id=run_id,
                node_id=_FIRST_NODE + i,
                node_config={"partition-id": i, "num-partitions": num_nodes, **(node_config or {})},
                state=RecordDict(),
                run_config={},
            )
            for i in range(num_nodes)
        }
        self._replies: dict[str, Message] = {}
        self.errors: list[str] = []

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(
            content=content, dst_node_id=dst_node_id, message_type=message_type, ttl=ttl, group_id=group_id
        )

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            mid = str(uuid4())
            msg.metadata.__dict__["_message_id"] = mid  # as Flower's InMemoryGrid does
            context = self.contexts[msg.metadata.dst_node_id]
            try:
                reply = self.client_app(msg, context)
            except Exception as e:  # noqa: BLE001 - a failing client is an error reply, like Flower's runtime
                reason = f"{type(e).__name__}: {e}"
                self.errors.append(reason)
                logging.getLogger("distill.federated").debug(traceback.format_exc())
                reply = Message(
                    Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg
                )
            self._replies[mid] = reply
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


def simulate(
    server_app: ServerApp,
    client_app: ClientApp,
    num_nodes: int,
    backend: str = "inprocess",
    node_config: dict | None = None,
) -> None:
    """Runs a ServerApp against `num_nodes` virtual SuperNodes running `client_app`."""
    if backend == "inprocess":
        grid = InProcessGrid(client_app, num_nodes, node_config)
        server_app(
            grid,
            Context(run_id=grid.run.run_id, node_id=0, node_config={}, state=RecordDict(), run_config={}),
        )
        return
    from flwr.simulation import run_simulation

    run_simulation(
        server_app,
        client_app,
        num_supernodes=num_nodes,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )


def _quiet_flower(verbose: bool) -> None:
    logging.getLogger("flwr").setLevel(logging.INFO if verbose else logging.WARNING)


def run_one_seed(
    recipe: FederatedRecipe, out: Path, client_app_factory=None, verbose: bool = False
) -> dict[str, Any]:
    """Every strategy of the recipe on the same split; writes checkpoints, metrics.jsonl,
    summary.json and report.md under `out` (an existing RunDir)."""
    _quiet_flower(verbose)
    text = recipe.to_yaml()
    task: FederatedTask = task_from_yaml(text)
    t0 = time.perf_counter()
    rows, history = [], {}
    (out / "metrics.jsonl").write_text("")  # a rerun (--resume) starts the log afresh
    for name in recipe.strategies:
        t_s = time.perf_counter()
        sink: dict[str, Any] = {}
        save_dir = out / "checkpoints" / name
        factory = client_app_factory or make_client_app
        simulate(
            make_server_app(text, name, sink),
            factory(text, save_dir),
            recipe.clients,
            recipe.backend,
        )
        res = sink[name]
        history[name] = res["history"]
        rows.append(_row(name, task, res, time.perf_counter() - t_s, save_dir))
        with open(out / "metrics.jsonl", "a") as f:
            for h in res["history"]:
                f.write(json.dumps({"stage": name, "split": "test", **h}) + "\n")
    summary = {
        "command": "federated",
        "recipe": recipe.name,
        "seed": recipe.seed,
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "backend": recipe.backend,
        "split": task.split.describe(),
        "rows": rows,
        "history": history,
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1))
    write_federated_report(out)
    return summary


def _row(name: str, task: FederatedTask, res: dict, seconds: float, save_dir: Path) -> dict[str, Any]:
    hist = [h for h in res["history"] if h.get("round", 0) > 0]
    accs = [h["accuracy"] for h in hist if h["accuracy"] is not None]
    row: dict[str, Any] = {
        "name": name,
        "accuracy": accs[-1] if accs else None,
        "best_accuracy": max(accs) if accs else None,
        "rounds": len(hist),
        "bytes_per_round": statistics.mean(h["bytes"] for h in hist) if hist else 0,
        "bytes_total": sum(h["bytes"] for h in hist),
        "failures": sum(len(h.get("failures", [])) for h in hist),
        "rejected": sum(len(h.get("rejected", [])) for h in hist),
        "train_seconds": round(seconds, 1),
    }
    if res["arrays"] is not None:
        model = task.build_model(name)
        from distill.federated.task import load_numpy_state

        load_numpy_state(model, res["arrays"])
        save_weights(save_dir / "global.safetensors", model.state_dict(), {"strategy": name})
        row.update(params=count_params(model), size_mb=size_mb(model))
    else:  # FedMD / local: no global model; the clients' own models (saved by each client)
        models = [task.build_model(name, i) for i in range(task.recipe.clients)]
        row["params"] = statistics.mean(count_params(m) for m in models)
        row["client_models"] = sorted(
            {task.model_spec(name, i).name or "custom" for i in range(task.recipe.clients)}
        )
    return row


REPORT_COLUMNS = [
    ("accuracy", "accuracy", "{:.4f}"),
    ("best_accuracy", "best accuracy", "{:.4f}"),
    ("bytes_per_round", "bytes/round", "{:,.0f}"),
    ("bytes_total", "bytes total", "{:,.0f}"),
    ("params", "params", "{:,.0f}"),
    ("failures", "failed replies", "{:.0f}"),
    ("rejected", "rejected updates", "{:.0f}"),
    ("train_seconds", "seconds", "{:.1f}"),
]


def write_federated_report(run_dir: str | Path) -> Path:
    """report.md (table + accuracy-per-round and bytes plots) from summary.json alone."""
    from distill.run.report import table

    run_dir = Path(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    lines = [f"# {summary['recipe']}: federated", ""]
    seeds = summary.get("seeds")
    lines.append(
        f"Seeds: {', '.join(map(str, seeds))} (mean ± std)." if seeds else f"Seed: {summary.get('seed', 0)}."
    )
    lines += [
        f"Wall time: {summary.get('wall_seconds')} s; backend: {summary.get('backend')}. Accuracy on the test "
        "split after the last round: the global model (fedavg, feddf) or the mean over clients' own "
        "models (fedmd, local). Bytes: serialized arrays sent down + up per round (npy headers included).",
        "",
        table(summary["rows"], columns=REPORT_COLUMNS),
        "",
    ]
    history = summary.get("history") or {}
    if history and _plot_rounds(history, run_dir / "accuracy_per_round.png"):
        lines += ["![accuracy per round](accuracy_per_round.png)", ""]
    for name, hist in history.items():
        lines.append(f"## {name}: per round")
        lines.append("")
        lines.append("| round | accuracy | bytes down | bytes up | clients used | failed | rejected |")
        lines.append("|---:|---:|---:|---:|---:|---:|---:|")
        for h in hist:
            acc = "" if h.get("accuracy") is None else f"{h['accuracy']:.4f}"
            lines.append(
                f"| {h['round']} | {acc} | {h.get('bytes_down', 0):,} | {h.get('bytes_up', 0):,} | "
                f"{h.get('clients_used', '')} | {len(h.get('failures', []))} | {len(h.get('rejected', []))} |"
            )
        lines.append("")
    atomic_write_text(run_dir / "report.md", "\n".join(lines))
    return run_dir / "report.md"


def _plot_rounds(history: dict[str, list[dict]], path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from distill.checkpoint import atomic_write

    fig, ax = plt.subplots(figsize=(6, 3.6))
    drawn = False
    for name, hist in history.items():
        pts = [(h["round"], h["accuracy"]) for h in hist if h.get("accuracy") is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", ms=3, label=name)
            drawn = True
    ax.set(xlabel="round", ylabel="test accuracy", title="accuracy per round")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    if drawn:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return drawn


def run_federated(
    recipe: FederatedRecipe,
    out: str | Path,
    seeds: int = 1,
    resume: bool = False,
    overwrite: bool = False,
    client_app_factory=None,
    verbose: bool = False,
) -> dict[str, Any]:
    """Runs the recipe for `seeds` seeds (seed, seed+1, ...); with several, each goes to
    `out/seed<k>/` and the top-level summary holds mean ± std per strategy."""
    out = Path(out)
    t0 = time.perf_counter()
    with RunDir(out, recipe.to_yaml(), resume=resume, overwrite=overwrite):
        if seeds == 1:
            return run_one_seed(recipe, out, client_app_factory, verbose)
        per_seed = []
        for k in range(seeds):
            r = recipe.model_copy(update={"seed": recipe.seed + k})
            d = out / f"seed{r.seed}"
            d.mkdir(parents=True, exist_ok=True)
            atomic_write_text(d / "config.yaml", r.to_yaml())
            per_seed.append(run_one_seed(r, d, client_app_factory, verbose))
        rows = []
        for i, row in enumerate(per_seed[0]["rows"]):
            agg: dict[str, Any] = {"name": row["name"]}
            for key, v in row.items():
                if isinstance(v, int | float) and not isinstance(v, bool):
                    vals = [s["rows"][i][key] for s in per_seed if s["rows"][i].get(key) is not None]
                    if vals:
                        agg[key] = statistics.mean(vals)
                        if key in ("accuracy", "best_accuracy") and len(vals) > 1:
                            agg[f"{key}_std"] = statistics.stdev(vals)
            agg["per_seed_accuracy"] = [s["rows"][i]["accuracy"] for s in per_seed]
            rows.append(agg)
        history = {}
        for name in per_seed[0]["history"]:  # mean accuracy per round over seeds
            hs = [s["history"][name] for s in per_seed]
            history[name] = [
                {
                    **{
                        k: v for k, v in hs[0][j].items() if k in ("round", "bytes_down", "bytes_up", "bytes")
                    },
                    "accuracy": statistics.mean(h[j]["accuracy"] for h in hs)
                    if all(h[j].get("accuracy") is not None for h in hs)
                    else None,
                }
                for j in range(len(hs[0]))
            ]
        summary = {
            "command": "federated",
            "recipe": recipe.name,
            "seeds": [recipe.seed + k for k in range(seeds)],
            "wall_seconds": round(time.perf_counter() - t0, 1),
            "backend": recipe.backend,
            "rows": rows,
            "history": history,
        }
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=1))
        write_federated_report(out)
        return summary
