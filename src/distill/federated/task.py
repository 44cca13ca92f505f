"""What clients and server compute, free of Flower: local training, logits on the public set,
distillation from a table of logits, accuracy, and the checks on a model update.

Training goes through distill's one `Trainer` (cross-entropy locally, `kd` on public data).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from distill.data.bundle import build_data
from distill.engine.config import LRScheduleConfig, OptimizerConfig, TrainerConfig
from distill.engine.evaluate import evaluate
from distill.errors import DistillError
from distill.federated.config import FederatedRecipe, parse_federated
from distill.federated.data import FederatedSplit, split_for_clients
from distill.losses.logits import KD, CrossEntropy
from distill.models.build import build_model
from distill.objective import Objective
from distill.outputs import Batch, Outputs
from distill.run.config import ModelConfig


class FederatedTask:
    """A recipe made concrete: the data split and the model of each client.

    Every process (server, each client, a Ray actor, a real SuperNode) builds the same task from
    the same recipe, so the split is identical everywhere without sending any data.
    """

    def __init__(self, recipe: FederatedRecipe):
        self.recipe = recipe
        self.bundle = build_data(
            recipe.data.name, recipe.data.class_path, recipe.data.init_args, seed=recipe.seed
        )
        p = recipe.partition
        self.split: FederatedSplit = split_for_clients(
            self.bundle,
            recipe.clients,
            scheme=p.scheme,
            alpha=p.alpha,
            public_fraction=p.public_fraction,
            min_size=p.min_size,
            seed=recipe.seed if p.split_seed is None else p.split_seed,
        )
        self.device = torch.device(recipe.device)

    def model_spec(self, strategy: str, client: int | None) -> ModelConfig:
        """FedMD (and local-only) clients take `client_models` in turn; the rest the shared `model`."""
        models = self.recipe.client_models
        if strategy in ("fedmd", "local") and client is not None and models:
            return models[client % len(models)]
        return self.recipe.model

    def build_model(self, strategy: str, client: int | None = None, seed: int | None = None) -> nn.Module:
        torch.manual_seed(self.recipe.seed if seed is None else seed)
        return build_model(self.model_spec(strategy, client).spec(), self.bundle).to(self.device)


@functools.lru_cache(maxsize=4)
def _task_from_yaml(text: str) -> FederatedTask:
    import yaml

    return FederatedTask(parse_federated(yaml.safe_load(text), source="federated recipe"))


def task_from_yaml(text: str) -> FederatedTask:
    """One task per recipe text and process (clients of an in-process run share it)."""
    return _task_from_yaml(text)


def recipe_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


# --------------------------------------------------------------------------- training


def _trainer_config(epochs: int, optimizer: OptimizerConfig, device: torch.device) -> TrainerConfig:
    return TrainerConfig(
        epochs=epochs,
        optimizer=optimizer,
        lr_schedule=LRScheduleConfig(name="constant"),
        device=str(device),
        progress="off",
        tensorboard=False,
        log_every=10**9,
    )


def local_train(model: nn.Module, data: Dataset, task: FederatedTask, seed: int) -> float:
    """Cross-entropy on a client's private data for `local.epochs`; returns the last train loss."""
    from distill.engine.trainer import Trainer

    cfg = task.recipe.local
    trainer = Trainer(
        model,
        Objective({"ce": CrossEntropy()}),
        data,
        config=_trainer_config(cfg.epochs, cfg.optimizer, task.device),
        stage="local",
        batch_size=cfg.batch_size,
        seed=seed,
    )
    trainer.fit()
    model.eval()
    return float(trainer.history[-1].get("loss", float("nan"))) if trainer.history else float("nan")


class LogitTable:
    """A teacher that is only a table of logits on the public set, read by sample index:
    FedDF's ensemble (the mean of client logits) or FedMD's consensus."""

    def __init__(self, logits: Tensor):
        self.logits = logits.float()

    def add_taps(self, paths) -> None:
        if paths:
            raise DistillError("a table of shared logits has no features to tap; use logit terms only")

    def to(self, device) -> LogitTable:
        self.logits = self.logits.to(device)
        return self

    def __call__(self, batch: Batch) -> Outputs:
        if batch.index is None:
            raise DistillError("distilling from shared logits needs the sample index in each batch")
        return Outputs(logits=self.logits[batch.index.to(self.logits.device).long()])


class _Indexed(Dataset):
    def __init__(self, ds: Dataset):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        return {"inputs": self.ds[i], "index": i}


def distill_from_logits(
    model: nn.Module, public: Dataset, logits: Tensor, task: FederatedTask, cfg, seed: int
):
    """Trains `model` to match `logits` (N, C) on the public inputs with Hinton KD at cfg.temperature."""
    from distill.engine.trainer import Trainer

    if logits.shape[0] != len(public):
        raise DistillError(f"{logits.shape[0]} shared logits for a public set of {len(public)} samples")
    trainer = Trainer(
        model,
        Objective({"kd": KD(temperature=cfg.temperature)}),
        _Indexed(public),
        teacher=LogitTable(logits),
        config=_trainer_config(cfg.epochs, cfg.optimizer, task.device),
        stage="distill",
        batch_size=cfg.batch_size,
        seed=seed,
    )
    trainer.fit()
    model.eval()


def distill_from_ensemble(
    model: nn.Module, public: Dataset, members: list[nn.Module], task: FederatedTask, cfg, seed: int
):
    """FedDF's fusion on mixed public inputs: the mean of the client models' logits, computed live on
    each batch the loop mixed (`cfg.mix`), taught to `model` with Hinton KD at cfg.temperature."""
    from distill.engine.trainer import Trainer
    from distill.teachers.ensemble import Ensemble

    trainer = Trainer(
        model,
        Objective({"kd": KD(temperature=cfg.temperature)}),
        _Indexed(public),
        teacher=Ensemble(members, rule="mean_logits"),
        config=_trainer_config(cfg.epochs, cfg.optimizer, task.device).model_copy(update={"mix": cfg.mix}),
        stage="distill",
        batch_size=cfg.batch_size,
        seed=seed,
    )
    trainer.fit()
    model.eval()


@torch.no_grad()
def predict_logits(model: nn.Module, data: Dataset, batch_size: int = 256) -> Tensor:
    """Logits (N, C) on `data` in order (inputs only), in fp32 on the CPU."""
    device = next(model.parameters()).device
    model.eval()
    out = []
    for x in DataLoader(data, batch_size=batch_size, shuffle=False):
        x = x[0] if isinstance(x, tuple | list) else x
        out.append(model(x.to(device)).float().cpu())
    return torch.cat(out)


def accuracy(model: nn.Module, data: Dataset, batch_size: int = 256) -> float:
    return float(evaluate(model, DataLoader(data, batch_size=batch_size, shuffle=False))["accuracy"])


# --------------------------------------------------------------------------- updates


def numpy_state(model: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def load_numpy_state(model: nn.Module, state: Mapping[str, np.ndarray], source: str = "server") -> None:
    """Loads arrays into `model`; a key or shape mismatch is a one-line CheckpointError."""
    from distill.checkpoint import load_into

    own = model.state_dict()
    tensors = {}
    for k, v in state.items():
        t = torch.as_tensor(np.asarray(v))
        if k in own:
            t = t.to(own[k].dtype)
            if own[k].dim() == 0 and t.numel() == 1:  # Flower ships 0-d arrays as shape (1,)
                t = t.reshape(())
        tensors[k] = t
    load_into(model, tensors, source=source)


def check_update(reference: Mapping[str, Any], update: Mapping[str, Any], who: str = "client") -> str | None:
    """Why `update` cannot be averaged into `reference` (name -> array), or None if it fits.

    Both map parameter names to arrays (anything with `.shape`). The message names the first
    offending key and both shapes, so the client's owner knows which layer disagrees.
    """
    missing = [k for k in reference if k not in update]
    extra = [k for k in update if k not in reference]
    if missing or extra:
        return (
            f"update from {who} rejected: its arrays do not match the global model "
            f"(missing {missing[:3]}, unexpected {extra[:3]}); is the client running another architecture?"
        )
    for k, ref in reference.items():
        got = tuple(update[k].shape)
        if got != tuple(ref.shape):
            return (
                f"update from {who} rejected: '{k}' has shape {got}, the global model has "
                f"{tuple(ref.shape)}; every FedAvg/FedDF client must use the recipe's `model`"
            )
    for k in reference:
        arr = update[k]
        if np.issubdtype(np.dtype(str(arr.dtype)), np.floating) and not np.all(np.isfinite(np.asarray(arr))):
            return f"update from {who} rejected: '{k}' holds NaN or Inf values"
    return None
