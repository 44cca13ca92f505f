"""The engine's own settings: what one training loop needs, as a small typed model.

The recipe schema (`distill.run.config`) embeds `TrainerConfig` as its `trainer:` section; the
engine never imports the recipe schema.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class OptimizerConfig(Strict):
    name: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)


class LRScheduleConfig(Strict):
    """Learning-rate schedule over optimizer steps. `warmup` and `milestones` are fractions of
    training; `step` multiplies the LR by `gamma` at each milestone."""

    name: Literal["constant", "cosine", "linear", "step"] = "cosine"
    warmup: float = Field(0.0, ge=0, le=1)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    milestones: list[float] = Field(default_factory=list)
    gamma: float = Field(0.1, gt=0)


class MixConfig(Strict):
    """Batch mixing before teacher and student see the batch (consistent teaching; see
    `distill.engine.mix`). `alpha` shapes lam ~ Beta(alpha, alpha); `prob` is the share of batches
    mixed. Images and spectrograms only: token inputs are refused."""

    name: Literal["none", "mixup", "cutmix"] = "none"
    alpha: float = Field(1.0, gt=0)
    prob: float = Field(1.0, ge=0, le=1)


class TrainerConfig(Strict):
    epochs: int = Field(30, gt=0)
    max_steps: int | None = Field(None, gt=0, description="stop after this many optimizer steps")
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    lr_schedule: LRScheduleConfig = Field(default_factory=LRScheduleConfig)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    mix: MixConfig = Field(
        default_factory=MixConfig, description="mixup / cutmix seen by teacher and student alike"
    )
    grad_accum: int = Field(1, gt=0)
    clip_grad_norm: float | None = Field(None, gt=0)
    device: str = "auto"
    channels_last: bool = False
    compile: bool = False
    parallel: Literal["ddp", "fsdp2"] = Field(
        "ddp", description="under torchrun: replicate the student (ddp) or shard it (fsdp2, big students)"
    )
    eval_every: int = Field(1, gt=0, description="evaluate every N epochs")
    log_every: int = Field(20, gt=0, description="log training metrics every N optimizer steps")
    checkpoint_every: int = Field(
        0, ge=0, description="also checkpoint every N optimizer steps (0: epochs only)"
    )
    keep_epochs: list[int] = Field(
        default_factory=list, description="also keep the weights after these epochs (epoch<N>.safetensors)"
    )
    monitor: str = "accuracy"
    monitor_mode: Literal["max", "min"] = "max"
    progress: Literal["auto", "on", "off"] = "auto"

    @field_validator("progress", mode="before")
    @classmethod
    def _yaml_booleans(cls, v):  # YAML reads a bare on/off as a boolean
        return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v

    tensorboard: bool = True
    deterministic: bool = False
    threads: int | None = Field(
        None,
        gt=0,
        description="CPU threads for torch (None: torch's default, one per core); tiny models "
        "train fastest on 1, and more threads than free cores slow them down by an order of magnitude",
    )
