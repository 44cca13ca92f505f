"""Flower strategies: FedAvg (the baseline), FedDF and FedMD-style logit sharing.

Each is a `flwr.serverapp.strategy.Strategy` (built on Flower's message-based `FedAvg`), so it runs
unchanged in a simulation or against real SuperNodes. All three
- count the bytes of every array they send and receive, per round (`traffic`),
- record clients that failed in a round (`failures`): the round proceeds with the others,
- reject an update whose arrays do not fit (`rejected`, with a one-line reason), instead of
  letting numpy broadcast it into the average.

References: FedAvg, McMahan et al. 2017; FedDF, Lin et al. 2020 ("Ensemble Distillation for
Robust Model Fusion in Federated Learning"); FedMD, Li & Wang 2019.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import WARNING
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from distill.federated.task import (
    FederatedTask,
    accuracy,
    check_update,
    distill_from_ensemble,
    distill_from_logits,
    load_numpy_state,
    numpy_state,
    predict_logits,
)


def to_arrays(d: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in d.items()})


def from_arrays(rec: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in rec.items()}


def payload_bytes(msg: Message) -> int:
    """Bytes of the serialized arrays a message carries (what goes over the wire for them)."""
    if msg.has_error():
        return 0
    return sum(len(a.data) for rec in msg.content.array_records.values() for a in rec.values())


class _Tracked(FedAvg):
    """FedAvg's sampling and messaging plus traffic counting, failure and shape checks."""

    def __init__(self, task: FederatedTask, name: str, **kwargs: Any):
        n = task.recipe.clients
        kwargs.setdefault("fraction_train", task.recipe.fraction_train)
        kwargs.setdefault("min_train_nodes", max(1, int(n * task.recipe.fraction_train)))
        kwargs.setdefault("min_available_nodes", n)
        kwargs.setdefault("fraction_evaluate", 0.0)
        super().__init__(**kwargs)
        self.task = task
        self.name = name
        self.traffic: dict[int, dict[str, int]] = {}
        self.failures: dict[int, list[str]] = {}
        self.rejected: dict[int, list[str]] = {}
        self.clients_used: dict[int, int] = {}
        self._reference: dict[str, np.ndarray] = {}

    def _count(self, rnd: int, key: str, messages: Iterable[Message]) -> None:
        t = self.traffic.setdefault(rnd, {"down": 0, "up": 0})
        t[key] += sum(payload_bytes(m) for m in messages)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        config["strategy"] = self.name
        self._reference = from_arrays(arrays)
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self._count(server_round, "down", messages)
        return messages

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        config["strategy"] = self.name
        messages = list(super().configure_evaluate(server_round, ArrayRecord(), config, grid))
        self._count(server_round, "down", messages)
        return messages

    def _screen(self, server_round: int, replies: Iterable[Message]) -> list[Message]:
        """Counts traffic; keeps the replies that carry a fitting update."""
        replies = list(replies)
        self._count(server_round, "up", replies)
        kept = []
        for msg in replies:
            who = f"node {msg.metadata.src_node_id}"
            if msg.has_error():
                self.failures.setdefault(server_round, []).append(f"{who}: {msg.error.reason}")
                continue
            records = list(msg.content.array_records.values())
            reason = (
                f"update from {who} rejected: expected one ArrayRecord, got {len(records)}"
                if len(records) != 1
                else check_update(self._reference_for_update(), from_arrays(records[0]), who=who)
            )
            if reason:
                log(WARNING, "%s", reason)
                self.rejected.setdefault(server_round, []).append(reason)
                continue
            kept.append(msg)
        self.clients_used[server_round] = len(kept)
        return kept

    def _reference_for_update(self) -> dict[str, np.ndarray]:
        return self._reference

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        kept = self._screen(server_round, replies)
        if not kept:
            log(WARNING, "round %d: no usable update; the global model stays as it was", server_round)
            return None, None
        return super().aggregate_train(server_round, kept)


class FedAvgStrategy(_Tracked):
    """Weighted average of client weights (by number of local examples)."""

    def __init__(self, task: FederatedTask, **kwargs: Any):
        super().__init__(task, "fedavg", **kwargs)


class FedDF(_Tracked):
    """FedDF: average the client models, then distill the ensemble of the client models (the mean of
    their logits) on the unlabeled public set into the averaged model (Lin et al. 2020, Alg. 1).

    Only weights travel, as in FedAvg; the fusion runs on the server, which holds the public set.
    """

    def __init__(self, task: FederatedTask, **kwargs: Any):
        super().__init__(task, "feddf", **kwargs)
        self.ensemble_accuracy: dict[int, float] = {}

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        kept = self._screen(server_round, replies)
        if not kept:
            log(WARNING, "round %d: no usable update; the global model stays as it was", server_round)
            return None, None
        averaged, metrics = FedAvg.aggregate_train(self, server_round, kept)
        task = self.task
        public, test = task.split.public, task.split.test
        logits, test_logits, members = [], [], []
        for msg in kept:  # the ensemble: every client model that sent a fitting update
            member = task.build_model("feddf")
            load_numpy_state(member, from_arrays(next(iter(msg.content.array_records.values()))))
            logits.append(predict_logits(member, public))
            test_logits.append(predict_logits(member, test))
            members.append(member)
        teacher = torch.stack(logits).mean(0)  # (P, C): averaged logits, FedDF's ensemble
        ens_pred = torch.stack(test_logits).mean(0).argmax(-1)
        labels = torch.as_tensor([int(test[i][1]) for i in range(len(test))])
        self.ensemble_accuracy[server_round] = float((ens_pred == labels).float().mean())
        student = task.build_model("feddf")
        load_numpy_state(student, from_arrays(averaged))
        cfg = task.recipe.server_distill
        seed = task.recipe.seed * 1000 + server_round
        if cfg.mix.name != "none":  # mixed public inputs: the ensemble runs live on each mixed batch
            distill_from_ensemble(student, public, members, task, cfg, seed=seed)
        else:
            distill_from_logits(student, public, teacher, task, cfg, seed=seed)
        if metrics is None:
            metrics = MetricRecord()
        metrics["ensemble_accuracy"] = self.ensemble_accuracy[server_round]
        return to_arrays(numpy_state(student)), metrics


class FedMD(_Tracked):
    """FedMD-style logit sharing: clients (of any architecture) send only their logits on the public
    set; the server averages them into a consensus and sends it back; each client digests it (KD
    on the public set) and revisits its private data (Li & Wang 2019, without the labelled
    public pre-training: the public set here is unlabeled).

    The ArrayRecord that flows through `Strategy.start` is the consensus `{"consensus": (P, C)}`.
    """

    def __init__(self, task: FederatedTask, name: str = "fedmd", **kwargs: Any):
        kwargs.setdefault("fraction_evaluate", 1.0)
        kwargs.setdefault("min_evaluate_nodes", task.recipe.clients)
        super().__init__(task, name, **kwargs)
        self.client_accuracy: dict[int, dict[int, float]] = {}

    def _reference_for_update(self) -> dict[str, np.ndarray]:
        shape = (len(self.task.split.public), self.task.bundle.num_classes or 0)
        return {"logits": np.empty(shape, dtype=np.float32)}

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        kept = self._screen(server_round, replies)
        if not kept:
            log(WARNING, "round %d: no usable logits; the consensus stays as it was", server_round)
            return None, None
        logits = [from_arrays(next(iter(m.content.array_records.values())))["logits"] for m in kept]
        consensus = np.mean(np.stack(logits).astype(np.float32), axis=0)  # plain mean, as in FedMD
        metrics = self.train_metrics_aggr_fn([m.content for m in kept], self.weighted_by_key)
        return to_arrays({"consensus": consensus}), metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        self._count(server_round, "up", replies)
        ok = [m for m in replies if not m.has_error()]
        for m in replies:
            if m.has_error():
                self.failures.setdefault(server_round, []).append(
                    f"node {m.metadata.src_node_id} (evaluate): {m.error.reason}"
                )
        accs = {}
        for m in ok:
            rec = next(iter(m.content.metric_records.values()))
            accs[int(rec["partition-id"])] = float(rec["accuracy"])
        self.client_accuracy[server_round] = dict(sorted(accs.items()))
        if not accs:
            return None
        return MetricRecord({"accuracy": float(np.mean(list(accs.values())))})


class LocalOnly(FedMD):
    """The baseline for FedMD: the same clients and models trained on their own data only; nothing
    is shared (the server only asks them to train and to report their test accuracy)."""

    def __init__(self, task: FederatedTask, **kwargs: Any):
        super().__init__(task, "local", **kwargs)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        self._count(server_round, "up", replies)
        ok = [m for m in replies if not m.has_error()]
        for m in replies:
            if m.has_error():
                self.failures.setdefault(server_round, []).append(
                    f"node {m.metadata.src_node_id}: {m.error.reason}"
                )
        self.clients_used[server_round] = len(ok)
        return None, None


def build_strategy(name: str, task: FederatedTask) -> _Tracked:
    return {"fedavg": FedAvgStrategy, "feddf": FedDF, "fedmd": FedMD, "local": LocalOnly}[name](task)


def global_accuracy_fn(task: FederatedTask, name: str):
    """Centralised evaluation of the global model on the test split (FedAvg, FedDF)."""

    def fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model = task.build_model(name)
        load_numpy_state(model, from_arrays(arrays))
        return MetricRecord({"accuracy": accuracy(model, task.split.test)})

    return fn
