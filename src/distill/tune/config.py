"""What a tune recipe holds: the search space and the study's objectives, validated."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from distill.errors import ConfigError
from distill.run.config import RecipeConfig, Strict, apply_overrides, format_validation_error, load_yaml
from distill.tune.space import SearchParam, validate_search

# --------------------------------------------------------------------------- configuration


class TuneObjective(Strict):
    """What the study optimises; without `objectives`, accuracy (maximize), or perplexity
    (minimize) for a language model recipe."""

    metric: str = "accuracy"
    direction: Literal["maximize", "minimize"] = "maximize"


class TuneConfig(Strict):
    """The study: its name and storage, what it optimises and how it samples and prunes."""

    study_name: str | None = Field(None, description="default: the recipe's name")
    storage: str | None = Field(None, description="an Optuna storage URL; default sqlite:///<out>/study.db")
    trials: int = Field(20, gt=0, description="finished (complete + pruned) trials to reach")
    objectives: list[TuneObjective] = Field(
        default_factory=lambda: [TuneObjective()],
        min_length=1,
        description="default: the metric the recipe's trainer monitors (accuracy, maximised; a language "
        "model's perplexity, minimised)",
    )
    sampler: Literal["auto", "tpe", "nsga2", "random"] = Field(
        "auto", description="auto: tpe for one objective, nsga2 for several"
    )
    pruner: Literal["median", "hyperband", "none"] = "median"
    pruner_startup_trials: int = Field(5, ge=0, description="median: trials finished before pruning")
    pruner_warmup_epochs: int = Field(1, ge=0, description="median: epochs before a trial may be pruned")
    seed: int | None = Field(0, description="the sampler's seed")
    baselines: list[Literal["scratch"]] = Field(
        default_factory=list, description="per-trial baselines (none by default: trials stay short)"
    )


class TuneRecipe(RecipeConfig):
    """A recipe plus the `search:` space and the `tune:` study settings."""

    search: dict[str, SearchParam] = Field(default_factory=dict)
    tune: TuneConfig = Field(default_factory=TuneConfig)

    def base_data(self) -> dict[str, Any]:
        """The recipe without `search`/`tune`, as plain data (every key, defaults filled). With
        `teachers:` the default `teacher:` is left out (the recipe gives one or the other), and
        searched `ensemble.weights.<i>` start from equal weights when the recipe gives none."""
        data = self.model_dump(
            mode="json", exclude={"search", "tune", *(("teacher",) if self.teachers else ())}
        )
        if (
            self.teachers
            and data["ensemble"]["weights"] is None
            and any(k.startswith("ensemble.weights.") for k in self.search)
        ):
            data["ensemble"]["weights"] = [1.0] * len(self.teachers)
        return data

    @model_validator(mode="after")
    def _default_objective(self):
        """Without `tune.objectives`, the study optimises what the trainer monitors, after the
        defaults an `hf` teacher implies (a causal LM: perplexity, minimised)."""
        if "objectives" not in self.tune.model_fields_set:
            from distill.run.hf import resolve_recipe

            trainer = resolve_recipe(self).trainer
            direction = "minimize" if trainer.monitor_mode == "min" else "maximize"
            self.tune.objectives = [TuneObjective(metric=trainer.monitor, direction=direction)]
        return self


def parse_tune_recipe(data: dict[str, Any], source: str = "recipe") -> TuneRecipe:
    try:
        cfg = TuneRecipe.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = [str(p) for p in err["loc"]]
        if err["type"] == "extra_forbidden" and len(loc) == 3 and loc[0] == "search":
            near = difflib.get_close_matches(loc[2], list(SearchParam.model_fields), n=1, cutoff=0.5)
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            allowed = ", ".join(SearchParam.model_fields)
            raise ConfigError(
                f"{source}: search.{loc[1]}: unknown field '{loc[2]}'{hint}; one of {allowed}"
            ) from None
        raise ConfigError(f"{source}: {format_validation_error(e, TuneRecipe)}") from None
    validate_search(cfg, source)
    if "objectives" not in cfg.tune.model_fields_set and _language_model(cfg):
        # a language model is judged on held-out perplexity, not on its token accuracy
        cfg.tune.objectives = [TuneObjective(metric="perplexity", direction="minimize")]
    return cfg


def _language_model(cfg: RecipeConfig) -> bool:
    """A causal or masked LM recipe: an `hf` teacher of that task, or the perplexity evaluator."""
    from distill.run.hf import teacher_task

    evaluator = cfg.evaluator.name if cfg.evaluator is not None else None
    return teacher_task(cfg) in ("causal_lm", "masked_lm") or evaluator == "perplexity"


def load_tune_recipe(path: str | Path, overrides: list[str] | None = None) -> TuneRecipe:
    return parse_tune_recipe(apply_overrides(load_yaml(path), overrides or []), source=str(path))
