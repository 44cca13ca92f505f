"""Chains of teachers and cohorts of students, built from the one Trainer.

- Teacher assistants (TAKD, Mirzadeh et al. 2020): teacher -> assistant(s) -> student, each stage a
  normal Trainer run in its own stage folder, distilled from the stage before it.
- Born-again networks (Furlanello et al. 2018): generations of the student's architecture, each
  taught by the last (`generations: N`, with the teacher built like the student).
- Deep mutual learning (Zhang et al. 2018): `Cohort` wraps N students as one module and the
  `mutual` term trains each on the labels and on its peers' predictions. No new loop: the
  cohort is "the student" of an ordinary Trainer run, with one optimizer over all members.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field, ValidationError
from torch import Tensor, nn

from distill.adapters import Adapter, auto_adapter
from distill.checkpoint import atomic_write_text, load_weights
from distill.errors import ConfigError, DistillError
from distill.losses.base import LossTerm, check_positive, flatten_logits
from distill.outputs import Batch, Outputs
from distill.registry import LOSSES
from distill.run.config import (
    ModelConfig,
    RecipeConfig,
    apply_overrides,
    format_validation_error,
    load_yaml,
)
from distill.run.rundir import RunDir

# --------------------------------------------------------------------------- chains


class ChainRecipe(RecipeConfig):
    """A recipe whose student is reached through a chain of stages.

    Adds:
        assistants: models between teacher and student, largest first; each is distilled from
            the stage before it with the recipe's objective and trainer settings.
        generations: how many times the student is trained, each generation taught by the
            previous one (born-again). 1: an ordinary chain ending in one student.
    """

    assistants: list[ModelConfig] = Field(default_factory=list)
    generations: int = Field(1, ge=1)


def load_chain_recipe(path: str | Path, overrides: list[str] | None = None) -> ChainRecipe:
    data = apply_overrides(load_yaml(path), overrides or [])
    try:
        return ChainRecipe.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{path}: {format_validation_error(e, ChainRecipe)}") from None


def chain_stages(cfg: ChainRecipe) -> list[tuple[str, ModelConfig]]:
    """(stage name, model) in training order, the teacher first."""
    stages: list[tuple[str, ModelConfig]] = [("teacher", cfg.teacher)]
    stages += [(f"assistant{i + 1}", a) for i, a in enumerate(cfg.assistants)]
    if cfg.generations == 1:
        stages.append(("student", cfg.student))
    else:
        stages += [(f"student_gen{g + 1}", cfg.student) for g in range(cfg.generations)]
    return stages


def run_chain(
    cfg: ChainRecipe, out: str | Path, resume: bool = False, overwrite: bool = False
) -> dict[str, Any]:
    """Trains the chain's stages in order in `out/stages/<k>_<name>/` and measures each.

    Every stage is a Trainer run with `resume=True`: a stage that finished is loaded from its
    `final.safetensors`; one interrupted part-way continues from its last checkpoint (set
    `trainer.checkpoint_every` for checkpoints within an epoch). Rows of summary.json: every stage
    (agreement measured with the stage that taught it), plus `student_scratch` for comparison.
    """
    from distill.engine.trainer import seed_everything
    from distill.models.build import build_model
    from distill.run.pipeline import build_adapter, build_objective, measure, scratch_objective, train_stage
    from distill.run.report import write_report
    from distill.teachers import Teacher

    out = Path(out)
    t0 = time.perf_counter()
    with RunDir(out, cfg.to_yaml(), resume=resume, overwrite=overwrite):
        from distill.data.bundle import build_data

        data = build_data(cfg.data.name, cfg.data.class_path, cfg.data.init_args, seed=cfg.seed)
        rows: list[dict[str, Any]] = []
        prev: Teacher | None = None
        prev_name = None
        stage_dirs = []
        for k, (name, spec) in enumerate(chain_stages(cfg)):
            stage_dir = out / "stages" / f"{k}_{name}"
            stage_dirs.append(stage_dir)
            seed_everything(cfg.seed + k)
            model = build_model(spec.spec(), data)
            if spec.checkpoint:
                load_weights(model, spec.checkpoint)
            adapter = build_adapter(spec.adapter)
            if name == "teacher":
                if not cfg.teacher.checkpoint:
                    if cfg.teacher.train is None:
                        raise ConfigError(
                            "teacher: give a checkpoint to load or a train: section to train it"
                        )
                    model = train_stage(
                        name,
                        model,
                        scratch_objective(cfg),
                        data,
                        cfg,
                        cfg.teacher.train,
                        stage_dir,
                        None,
                        adapter,
                    )
            else:
                objective = build_objective(cfg)
                model = train_stage(name, model, objective, data, cfg, cfg.trainer, stage_dir, prev, adapter)
            row = measure(name, model, data, cfg, prev, adapter=adapter)
            row["stage"] = k
            row["taught_by"] = prev_name or "labels"
            rows.append(row)
            prev, prev_name = Teacher(model, adapter=adapter), name
        if "scratch" in cfg.baselines:
            seed_everything(cfg.seed + len(stage_dirs) - 1)  # the last student's initial weights
            model = build_model(cfg.student.spec(), data)
            stage_dir = out / "stages" / "scratch"
            stage_dirs.append(stage_dir)
            adapter = build_adapter(cfg.student.adapter)
            model = train_stage(
                "student_scratch",
                model,
                scratch_objective(cfg),
                data,
                cfg,
                cfg.trainer,
                stage_dir,
                None,
                adapter,
            )
            row = measure("student_scratch", model, data, cfg, None, adapter=adapter)
            row["taught_by"] = "labels"
            rows.append(row)
        _merge_metrics(stage_dirs, out / "metrics.jsonl")
        summary = {
            "command": "chain",
            "recipe": cfg.name,
            "seed": cfg.seed,
            "wall_seconds": round(time.perf_counter() - t0, 1),
            "rows": rows,
        }
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
        write_report(out)
        return summary


def _merge_metrics(stage_dirs: list[Path], path: Path) -> None:
    """One metrics.jsonl over all stages (each line names its stage), for the report's curves."""
    lines = []
    for d in stage_dirs:
        f = d / "metrics.jsonl"
        if f.exists():
            lines += [line for line in f.read_text().splitlines() if line.strip()]
    atomic_write_text(path, "".join(line + "\n" for line in lines))


# --------------------------------------------------------------------------- cohorts (DML)


class Cohort(nn.Module):
    """N students trained together as one module.

    `forward(x)` returns `Outputs` whose `logits` are member 0's (so the usual evaluator scores
    member 0) and `extras["peers"]` holds every member's logits, (N, B, C). Members may differ
    in architecture but must share the logit shape. Export one member with `cohort.members[i]`.

    Args:
        members: the student modules.
        adapter: how each member is called on the inputs (default: `model(x)`).
    """

    def __init__(self, members: Sequence[nn.Module], adapter: Adapter = auto_adapter):
        super().__init__()
        if len(members) < 2:
            raise DistillError(
                f"a Cohort needs at least 2 members to learn from each other, got {len(members)}"
            )
        self.members = nn.ModuleList(members)
        self.adapter = adapter

    def forward(self, x: Any) -> Outputs:
        batch = Batch(inputs=x)
        outs = [self.adapter(m, batch) for m in self.members]
        shapes = {tuple(o.logits.shape) for o in outs if o.logits is not None}
        if len(shapes) != 1 or any(o.logits is None for o in outs):
            raise DistillError(f"cohort members must all give logits of one shape, got {sorted(shapes)}")
        peers = torch.stack([o.logits for o in outs])
        return Outputs(logits=outs[0].logits, extras={"peers": peers})


class CohortEvaluator:
    """Accuracy / NLL of every cohort member (`accuracy_m<i>`), of member 0 (`accuracy`, so the
    trainer's monitor works unchanged) and of the members' averaged probabilities (`accuracy_ensemble`)."""

    def __init__(self):
        from distill.engine.evaluate import ClassificationEvaluator

        self._make = ClassificationEvaluator
        self.reset()

    def reset(self) -> None:
        self.members: list = []
        self.mean = self._make()
        self.first = self._make()

    def update(self, student: Outputs, teacher: Outputs | None, batch: Batch) -> None:
        peers = student.extras.get("peers")
        if not isinstance(peers, Tensor):
            raise DistillError("CohortEvaluator needs a Cohort student (Outputs.extras['peers'])")
        while len(self.members) < peers.shape[0]:
            self.members.append(self._make())
        for ev, z in zip(self.members, peers):
            ev.update(Outputs(logits=z), None, batch)
        self.first.update(Outputs(logits=peers[0]), teacher, batch)
        mean_logp = torch.log(F.softmax(peers.float(), -1).mean(0).clamp_min(1e-30))
        self.mean.update(Outputs(logits=mean_logp), None, batch)

    def compute(self) -> dict[str, float]:
        out = dict(self.first.compute())
        for i, ev in enumerate(self.members):
            out.update({f"{k}_m{i}": v for k, v in ev.compute().items()})
        out.update({f"{k}_ensemble": v for k, v in self.mean.compute().items()})
        return out


def member_view(cohort: Cohort, i: int) -> nn.Module:
    """Member i of a cohort as a plain model (for measuring or exporting it)."""
    return cohort.members[i]


def mutual_loss(
    peers: Tensor,
    targets: Tensor,
    alpha: float = 1.0,
    temperature: float = 1.0,
    target: str = "mean",
    ignore_index: int = -100,
) -> Tensor:
    """Deep mutual learning (Zhang et al. 2018): Σ_i [CE(z_i, y) + α · T² · KL(q_{-i} ‖ p_i)].

    Args:
        peers: (N, B, C) logits of N students (or (N, B, T, V)).
        targets: (B,) labels (or (B, T)).
        alpha: weight of the mimicry term.
        temperature: T > 0 for the mimicry term.
        target: `mean`: q_{-i} is the mean of the other members' probabilities; `each`: the
            paper's form, the mean over j ≠ i of KL(p_j ‖ p_i).

    The peers' side q is detached: member i learns from the others, never the other way in the
    same term. The sum over members (not the mean) keeps each member's gradient the size it
    would have if it were trained alone.

    Returns:
        A scalar.
    """
    n = peers.shape[0]
    z = torch.stack([flatten_logits(p) for p in peers]).float()  # (N, M, C)
    y = targets.reshape(-1).long()
    logp = F.log_softmax(z / temperature, dim=-1)
    p_det = logp.exp().detach()
    total = z.new_zeros(())
    keep = (y != ignore_index).float()
    denom = keep.sum().clamp_min(1.0)
    for i in range(n):
        ce = F.cross_entropy(z[i], y, ignore_index=ignore_index)
        others = [j for j in range(n) if j != i]
        if target == "mean":
            q = p_det[others].mean(0)
            kl = (q * (q.clamp_min(1e-12).log() - logp[i])).sum(-1)
        else:
            kl = torch.stack(
                [(p_det[j] * (p_det[j].clamp_min(1e-12).log() - logp[i])).sum(-1) for j in others]
            ).mean(0)
        total = total + ce + alpha * temperature**2 * (kl * keep).sum() / denom
    return total


@LOSSES.register("mutual")
class Mutual(LossTerm):
    """Deep mutual learning over a `Cohort` student; see `mutual_loss`. Needs no teacher.

    Args:
        alpha: weight of the mimicry term (> 0).
        temperature: T > 0.
        target: `mean` (KL to the others' mean prediction) or `each` (mean of KLs to each peer).
    """

    needs_teacher = False

    def __init__(self, alpha: float = 1.0, temperature: float = 1.0, target: str = "mean"):
        super().__init__()
        check_positive("mutual.alpha", alpha)
        check_positive("mutual.temperature", temperature)
        if target not in ("mean", "each"):
            raise DistillError(f"mutual.target: '{target}' is not one of mean, each")
        self.alpha, self.temperature, self.target = alpha, temperature, target

    def forward(self, student: Outputs, teacher: Outputs | None, batch: Batch) -> Tensor:
        peers = student.extras.get("peers")
        if not isinstance(peers, Tensor):
            raise DistillError(
                "the mutual term needs a Cohort student (Outputs.extras['peers']); wrap the students in "
                "distill.chain.Cohort"
            )
        if batch.targets is None:
            raise DistillError("the mutual term needs labels but the batch has none")
        return mutual_loss(peers, batch.targets, self.alpha, self.temperature, self.target)


__all__ = [
    "ChainRecipe",
    "Cohort",
    "CohortEvaluator",
    "Mutual",
    "chain_stages",
    "load_chain_recipe",
    "member_view",
    "mutual_loss",
    "run_chain",
]
