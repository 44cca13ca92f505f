"""The `distill federated` recipe: clients, rounds, the split, the strategies and their models.

YAML is only its saved form; every key is validated here and errors name the key in one line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from distill.engine.config import MixConfig
from distill.errors import ConfigError
from distill.run.config import (
    DataConfig,
    ModelConfig,
    OptimizerConfig,
    Strict,
    apply_overrides,
    format_validation_error,
    load_yaml,
    run_name,
)

STRATEGIES = ("fedavg", "feddf", "fedmd", "local")


class PartitionConfig(Strict):
    """How the training split is dealt to clients.

    `public_fraction` of it is held out first as the unlabeled public set (labels never used);
    the rest goes to clients, IID (equal random shares) or non-IID: per class, shares drawn from
    Dirichlet(alpha) (Hsu et al. 2019), small alpha giving each client few classes.
    """

    scheme: Literal["iid", "dirichlet"] = "dirichlet"
    alpha: float = Field(0.5, gt=0)
    public_fraction: float = Field(0.2, gt=0, lt=1)
    min_size: int = Field(10, ge=1, description="redraw the Dirichlet split until every client has this many")
    split_seed: int | None = Field(None, description="seed of the split (default: the run's seed)")


class LocalConfig(Strict):
    """Local training on each client's private data, every round."""

    epochs: int = Field(2, gt=0)
    batch_size: int = Field(32, gt=0)
    optimizer: OptimizerConfig = Field(default_factory=lambda: OptimizerConfig(name="adam", lr=3e-3))


class DistillStepConfig(Strict):
    """Distillation on the public set: FedDF's server fusion or FedMD's client digest."""

    epochs: int = Field(2, gt=0)
    batch_size: int = Field(64, gt=0)
    temperature: float = Field(1.0, gt=0)
    optimizer: OptimizerConfig = Field(default_factory=lambda: OptimizerConfig(name="adam", lr=1e-3))
    mix: MixConfig = Field(
        default_factory=MixConfig,
        description="FedDF only: mix the public inputs (mixup / cutmix) before the client ensemble and "
        "the fused model see them; the ensemble then runs live on each mixed batch",
    )


class FederatedRecipe(Strict):
    """A federated comparison: every strategy runs on the same split with the same seed."""

    name: str = "federated_digits"
    seed: int = 0
    data: DataConfig = Field(default_factory=DataConfig)
    clients: int = Field(5, ge=2)
    rounds: int = Field(10, ge=1)
    fraction_train: float = Field(1.0, gt=0, le=1)
    partition: PartitionConfig = Field(default_factory=PartitionConfig)
    strategies: list[Literal["fedavg", "feddf", "fedmd", "local"]] = Field(
        default_factory=lambda: list(STRATEGIES),
        description="local: the FedMD clients trained on their own data only, sharing nothing (baseline)",
    )
    model: ModelConfig = Field(
        default_factory=lambda: ModelConfig(name="mlp", init_args={"hidden": [128]}),
        description="the shared architecture of FedAvg and FedDF",
    )
    client_models: list[ModelConfig] = Field(
        default_factory=list,
        description="FedMD and local: architectures dealt to clients in turn (client i gets i mod len); "
        "empty: every client uses `model`",
    )
    local: LocalConfig = Field(default_factory=LocalConfig)
    server_distill: DistillStepConfig = Field(default_factory=DistillStepConfig, description="FedDF fusion")
    digest: DistillStepConfig = Field(default_factory=DistillStepConfig, description="FedMD digest")
    device: str = "cpu"
    backend: Literal["inprocess", "ray"] = Field(
        "inprocess",
        description="inprocess: clients run one after another in this process (no Ray); "
        "ray: Flower's run_simulation",
    )

    @field_validator("name")
    @classmethod
    def _a_name(cls, v: str) -> str:
        return run_name(v)

    @model_validator(mode="after")
    def _digest_unmixed(self):
        if self.digest.mix.name != "none":
            raise ValueError(
                "digest.mix: FedMD shares logits on the fixed public inputs, so they cannot be mixed; "
                "use server_distill.mix (FedDF)"
            )
        return self

    @model_validator(mode="after")
    def _unique(self):
        if len(set(self.strategies)) != len(self.strategies) or not self.strategies:
            raise ValueError("list each strategy once (allowed: fedavg, feddf, fedmd, local)")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def parse_federated(data: dict[str, Any], source: str = "recipe") -> FederatedRecipe:
    try:
        return FederatedRecipe.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{source}: {format_validation_error(e, FederatedRecipe)}") from None


def load_federated(path: str | Path, overrides: list[str] | None = None) -> FederatedRecipe:
    return parse_federated(apply_overrides(load_yaml(path), overrides or []), source=str(path))
