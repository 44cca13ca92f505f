"""The `compress:` section of a compression recipe, and `CompressRecipe`, the recipe that holds it.

A compression recipe is an ordinary recipe (data, teacher = the model to compress, objective,
trainer = the recovery budget) plus a `compress:` section. Parse it with `load_compress_recipe`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator

from distill.errors import ConfigError
from distill.run.config import (
    RecipeConfig,
    Strict,
    apply_overrides,
    format_validation_error,
    load_yaml,
)


class PruneConfig(Strict):
    """Structured (channel) pruning with Torch-Pruning's dependency graph.

    `ratio` is the fraction of output channels removed from every prunable layer (per-layer) or
    from the whole network ranked together (`global_pruning`). `only`: module-path patterns
    (fnmatch) of the layers whose outputs may be pruned; every other conv/linear is left whole.
    `ignored`: patterns never pruned (default: the classifier, found as the layer producing the
    logits). `layer_ratios`: per-layer overrides, by pattern.
    """

    enabled: bool = True
    ratio: float = Field(0.5, ge=0, le=1)
    importance: Literal["l1", "l2", "taylor", "random"] = "l2"
    global_pruning: bool = False
    max_layer_ratio: float = Field(0.9, gt=0, le=1, description="cap per layer under global pruning")
    iterative_steps: int = Field(1, gt=0)
    round_to: int | None = Field(None, gt=0)
    only: list[str] = Field(default_factory=list)
    ignored: list[str] | None = None
    layer_ratios: dict[str, float] = Field(default_factory=dict)
    taylor_batches: int = Field(4, gt=0, description="batches of gradients for the taylor criterion")

    @field_validator("layer_ratios")
    @classmethod
    def _ratios(cls, v: dict[str, float]) -> dict[str, float]:
        for k, r in v.items():
            if not 0 <= r <= 1:
                raise ValueError(f"ratio {r} for '{k}' must be in [0, 1]")
        return v


class RecoveryConfig(Strict):
    """Which recoveries to train after pruning, each with the recipe's `trainer:` budget.

    `kd`: distillation from the unpruned baseline with the recipe's objective; `finetune`: labels
    alone (the recipe's ce term); `kd_student`: distillation alone, i.e. the pruned architecture
    freshly initialised and distilled from the baseline (same size, no pruning).
    """

    methods: list[Literal["kd", "finetune", "kd_student"]] = Field(
        default_factory=lambda: ["kd", "finetune", "kd_student"]
    )


class QuantizeConfig(Strict):
    """INT8 with ONNX Runtime. `static` (QDQ, calibrated on training data) suits CNNs; `dynamic`
    (weights INT8, activations quantized at run time) suits transformers; `auto` picks static
    unless the inputs are token ids."""

    enabled: bool = True
    mode: Literal["auto", "static", "dynamic"] = "auto"
    per_channel: bool = True
    calibration_samples: int = Field(512, ge=0)
    calibration_method: Literal["minmax", "entropy", "percentile"] = "minmax"
    rows: list[str] = Field(
        default_factory=lambda: ["baseline", "pruned_kd"],
        description="which rows get an INT8 twin (quantization alone = baseline)",
    )
    qat: bool = Field(False, description="torchao PT2E QAT: not implemented; true is refused")


class BenchConfig(Strict):
    """ONNX Runtime CPU latency: p50 and p95 at each batch size, with fixed thread counts."""

    batch_sizes: list[int] = Field(default_factory=lambda: [1, 32])
    intra_op_threads: int = Field(1, gt=0)
    repeats: int = Field(50, gt=0)
    warmup: int = Field(5, ge=0)


class ExportConfig(Strict):
    """What the export stage ships: the final row as ONNX (fp32 and INT8) and safetensors."""

    row: str = Field("pruned_kd", description="the row exported as the final model")
    opset: int = Field(17, ge=13)


class CompressConfig(Strict):
    prune: PruneConfig = Field(default_factory=PruneConfig)
    recovery: RecoveryConfig = Field(default_factory=RecoveryConfig)
    quantize: QuantizeConfig = Field(default_factory=QuantizeConfig)
    bench: BenchConfig = Field(default_factory=BenchConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)


class CompressRecipe(RecipeConfig):
    """A recipe for `distill compress`: the teacher is the model to compress; `trainer:` is the
    budget of each recovery; `compress:` configures the stages."""

    compress: CompressConfig = Field(default_factory=CompressConfig)


def parse_compress_recipe(data: dict[str, Any], source: str = "recipe") -> CompressRecipe:
    try:
        return CompressRecipe.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{source}: {format_validation_error(e, CompressRecipe)}") from None


def load_compress_recipe(path: str | Path, overrides: list[str] | None = None) -> CompressRecipe:
    data = apply_overrides(load_yaml(path), overrides or [])
    return parse_compress_recipe(data, source=str(path))
