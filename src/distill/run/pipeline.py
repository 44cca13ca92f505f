"""Runs a recipe end to end: teacher, baseline student, distilled student, measurements, report."""

from __future__ import annotations

import copy
import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import ConcatDataset, Dataset

from distill.adapters import auto_adapter, teaching_adapter
from distill.checkpoint import atomic_write_text, load_weights, save_weights
from distill.data.bundle import DataBundle, build_data
from distill.engine import distributed as dist
from distill.engine.config import MixConfig
from distill.engine.evaluate import build_evaluator, evaluate
from distill.engine.mix import MixedViews, Mixer
from distill.engine.trainer import Trainer, make_loader, resolve_device, seed_everything
from distill.errors import ConfigError
from distill.losses import CrossEntropy
from distill.models.build import build_model, takes_teacher
from distill.objective import Objective
from distill.outputs import Batch, as_batch
from distill.registry import ADAPTERS, LOSSES
from distill.run.chat import side_by_side
from distill.run.config import RecipeConfig, TeacherConfig, TrainerConfig
from distill.run.cross import cross_teacher, is_cross, offset_data, teacher_data
from distill.run.hf import export_student_hf, resolve_recipe, text_speed
from distill.run.measure import count_params, interleaved_latency, latency_ms, noise_groups, size_mb
from distill.run.preflight import MIX_STORE, build_transfer, check_init_args, check_teacher_config
from distill.run.report import read_metrics, write_report
from distill.run.rundir import RunDir
from distill.run.verdict import verdict
from distill.teachers import Teacher


def build_objective(cfg: RecipeConfig) -> Objective:
    terms = {
        n: LOSSES.build(name=t.name, class_path=t.class_path, init_args=t.init_args)
        for n, t in cfg.objective.terms.items()
    }
    weights = {n: t.weight for n, t in cfg.objective.terms.items()}
    return Objective(terms, weights, cfg.objective.schedules)


def scratch_objective(cfg: RecipeConfig) -> Objective:
    """Labels alone: the recipe's terms that need no teacher (`ce` with its label smoothing, a
    detector's own losses, ...), each at weight 1; plain cross-entropy if it has none."""
    label = {
        n: t
        for n, t in cfg.objective.terms.items()
        if not LOSSES.build(name=t.name, class_path=t.class_path, init_args=t.init_args).needs_teacher
    }
    if not label:
        return Objective({"ce": CrossEntropy()})
    return Objective(
        {
            n: LOSSES.build(name=t.name, class_path=t.class_path, init_args=t.init_args)
            for n, t in label.items()
        }
    )


def build_adapter(spec) -> Any:
    """The recipe's adapter for a model (`None`: the automatic one)."""
    if spec is None:
        return auto_adapter
    return ADAPTERS.build(name=spec.name, class_path=spec.class_path, init_args=spec.init_args)


def _spec(component) -> dict | None:
    return component.spec() if component is not None else None


def example_input(data: DataBundle) -> torch.Tensor | None:
    x = data.train[0][0] if isinstance(data.train[0], tuple | list) else None
    return x.unsqueeze(0) if isinstance(x, torch.Tensor) else None


def train_stage(
    stage: str,
    model: nn.Module,
    objective: Objective,
    data: DataBundle,
    cfg: RecipeConfig,
    trainer_cfg: TrainerConfig,
    out: Path,
    teacher: Any = None,
    adapter: Any = None,
    batch_hook: Any = None,
) -> nn.Module:
    final = out / "checkpoints" / stage / "final.safetensors"
    if final.exists():  # finished in an earlier, interrupted invocation
        return load_weights(model, final)
    if trainer_cfg.threads is None and cfg.trainer.threads is not None:
        # a stage with its own settings (teacher.train, a candidate's train) that leaves `threads`
        # unset takes the recipe's: one CPU-thread setting for the whole run
        trainer_cfg = trainer_cfg.model_copy(update={"threads": cfg.trainer.threads})
    sharded = trainer_cfg.parallel == "fsdp2" and dist.world_size() > 1
    blank = copy.deepcopy(model) if sharded else None  # the Trainer shards `model` in place
    trainer = Trainer(
        model,
        objective,
        data.train,
        teacher=teacher,
        val_data=data.val,
        config=trainer_cfg,
        out_dir=out,
        stage=stage,
        seed=cfg.seed,
        batch_size=cfg.data.batch_size,
        eval_batch_size=cfg.data.eval_batch_size,
        num_workers=cfg.data.num_workers,
        pin_memory=cfg.data.pin_memory,
        collate_fn=data.collate_fn,
        resume=True,
        student_adapter=adapter or auto_adapter,
        evaluator=build_evaluator(_spec(cfg.evaluator)),
        batch_hook=batch_hook,
    )
    trainer.fit()
    weights = trainer.student_state_dict()  # gathered in full on rank 0 under FSDP2
    if dist.is_main():
        save_weights(final, weights, {"stage": stage})
    dist.barrier()  # every rank sees the same finished stages on a later --resume
    if blank is not None:
        if dist.is_main():
            blank.load_state_dict(weights)
        return blank  # a plain module, for measurement on rank 0
    return model


def on_policy_hook(cfg: RecipeConfig, student: nn.Module, data: DataBundle):
    """The GKD batch hook of `on_policy` (None when `lam` is 0): the student generates a share of
    the distilled student's batches; the teacher scores them through the token terms."""
    op = cfg.on_policy
    if op.lam == 0:
        return None
    tok = data.tokenizer
    if tok is None or not hasattr(student, "generate"):
        raise ConfigError(
            "on_policy: the student must be a causal language model (hf, task causal_lm) on token data "
            "with a tokenizer (chat or chat_prompts); set on_policy.lam: 0"
        )
    from distill.nlp.generation import OnPolicyHook

    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    eos = tok.convert_tokens_to_ids(tok.eos_token) if tok.eos_token else None
    gen = op.model_dump(exclude={"lam"})
    return OnPolicyHook(student, op.lam, pad, eos, seed=cfg.seed, **gen)


def measure(
    name: str,
    model: nn.Module,
    data: DataBundle,
    cfg: RecipeConfig,
    teacher: Teacher | None,
    split: str = "test",
    adapter: Any = None,
    latency: bool = True,
) -> dict[str, Any]:
    """One summary row: the recipe's evaluator on `split`, parameters, size and CPU latency
    (`latency=False`: none for tensor inputs, which `add_latency` measures for all rows in turns)."""
    ds = getattr(data, split) or data.val
    loader, _ = make_loader(ds, cfg.data.eval_batch_size, False, cfg.seed, collate_fn=data.collate_fn)
    evaluator = build_evaluator(_spec(cfg.evaluator))
    metrics = evaluate(model, loader, evaluator, adapter or auto_adapter, teacher=teacher)
    row: dict[str, Any] = {"name": name, **metrics, "params": count_params(model), "size_mb": size_mb(model)}
    if teacher is None:
        row["agreement"] = 1.0
    if hasattr(evaluator, "measure_model"):  # generation-based measures (the chat evaluator)
        judge = model if teacher is None else getattr(teacher, "model", None)  # a teacher judges itself
        row.update(evaluator.measure_model(model, data, judge, threads=cfg.report.latency_threads))
    example = example_input(data)
    if example is not None and not latency:
        pass
    elif example is not None:
        model_cpu = copy.deepcopy(model).to("cpu")
        for b in cfg.report.latency_batch_sizes:
            lat = latency_ms(
                model_cpu, example, b, repeats=cfg.report.latency_repeats, threads=cfg.report.latency_threads
            )
            row[f"latency_ms_b{b}"] = lat["p50"]
    elif data.collate_fn is not None:  # token batches (text): latency and tokens/s or sentences/s
        row.update(
            text_speed(
                model,
                data,
                adapter,
                cfg.report.latency_batch_sizes,
                cfg.report.latency_repeats,
                cfg.report.latency_threads,
            )
        )
    return row


@dataclasses.dataclass
class Built:
    """The components `preflight_recipe` built and checked, handed to the run so that each is built
    once per run (a 26 s GGUF teacher is loaded once, and held once at the peak). Each is in the
    state the run would have built it in: the teacher with its checkpoint loaded (to be trained,
    at its seeded initial weights), the student at its seeded initial weights (only when the
    teacher's weights are final, as a student may be built from them), the distillation objective
    before its first batch. Buffers the one-batch check moved (BatchNorm statistics, CRD's memory)
    are put back. `take` hands each over once."""

    teacher_model: nn.Module | None = None
    student: nn.Module | None = None
    kd_objective: Objective | None = None

    def take(self, name: str) -> Any:
        value = getattr(self, name)
        setattr(self, name, None)
        return value


def _snapshot(module: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, bool], bool]:
    """What a one-batch check may change in a model: its buffers (BatchNorm statistics move even
    without gradients), its `requires_grad` flags (a `Teacher` freezes its model) and its mode.
    Parameters do not change (no optimizer step), so they are not copied."""
    buffers = {n: b.detach().clone() for n, b in module.named_buffers()}
    return buffers, {n: p.requires_grad for n, p in module.named_parameters()}, module.training


@torch.no_grad()
def _restore(module: nn.Module, snapshot: tuple[dict[str, torch.Tensor], dict[str, bool], bool]) -> None:
    buffers, grad, training = snapshot
    for n, b in module.named_buffers():
        if n in buffers and buffers[n].shape == b.shape:
            b.copy_(buffers[n])
    for n, p in module.named_parameters():
        p.requires_grad_(grad.get(n, p.requires_grad))
    module.train(training)


def add_latency(
    rows: list[dict[str, Any]], models: dict[str, nn.Module], data: DataBundle, cfg: RecipeConfig
) -> None:
    """CPU latency of every row's model, measured in turns (`interleaved_latency`): the median
    (`latency_ms_b<N>`), the spread (`latency_ms_b<N>_iqr`, the middle half of the runs) and, for
    rows whose spreads overlap, the same letter (`latency_b<N>_within_noise`): their difference is noise."""
    example = example_input(data)
    if example is None:
        return  # token inputs: measured per row by text_speed
    on_cpu = {name: copy.deepcopy(m).to("cpu") for name, m in models.items()}
    by_name = {r["name"]: r for r in rows}
    for b in cfg.report.latency_batch_sizes:
        lat = interleaved_latency(
            on_cpu, example, b, repeats=cfg.report.latency_repeats, threads=cfg.report.latency_threads
        )
        for name, q in lat.items():
            by_name[name][f"latency_ms_b{b}"] = q["p50"]
            by_name[name][f"latency_ms_b{b}_iqr"] = q["p75"] - q["p25"]
        for name, letters in noise_groups({n: (q["p25"], q["p75"]) for n, q in lat.items()}).items():
            by_name[name][f"latency_b{b}_within_noise"] = letters


def load_teacher(
    tc: TeacherConfig,
    stage: str,
    data: DataBundle,
    cfg: RecipeConfig,
    out: Path,
    model: nn.Module | None = None,
):
    """One teacher: loaded from its checkpoint, or trained (stage `stage`) and then its last, best
    or epoch-N weights taken (`teacher.use`); temperature-calibrated on the validation split with
    `teacher.calibrate`. `model`: the teacher preflight built (`Built`), its checkpoint loaded
    already; None: built here. Returns (model, adapter, facts for its summary row)."""
    check_teacher_config(tc, "teacher", data)  # `distill run` made these refusals before training
    seed_everything(cfg.seed)
    built = model is not None
    if model is None:
        model = build_model(tc.spec(), teacher_data(cfg, data))  # (its own tokenizer across tokenizers)
    adapter = build_adapter(tc.adapter)
    info: dict[str, Any] = {}
    if tc.checkpoint:
        if not built:
            load_weights(model, tc.checkpoint)
    elif tc.train is not None:
        train_cfg = tc.train
        if isinstance(tc.use, int):
            train_cfg = train_cfg.model_copy(update={"keep_epochs": sorted({*train_cfg.keep_epochs, tc.use})})
        train_stage(stage, model, scratch_objective(cfg), data, cfg, train_cfg, out, adapter=adapter)
        if tc.use != "last":
            name = "best" if tc.use == "best" else f"epoch{tc.use}"
            path = out / "checkpoints" / stage / f"{name}.safetensors"
            if not path.exists():
                saved = sorted(p.stem for p in path.parent.glob("*.safetensors") if p.stem != "last")
                raise ConfigError(
                    f"teacher.use: {tc.use} was not saved in {path.parent} (saved: {', '.join(saved) or 'none'}); "
                    "train the teacher again (a new run folder) or pick a saved one"
                )
            load_weights(model, path)
            info["use"] = tc.use if isinstance(tc.use, int) else name
    elif not getattr(model, "distill_pretrained", False):  # (an hf folder loads its own weights)
        raise ConfigError("teacher: give a checkpoint to load or a train: section to train it first")
    if tc.calibrate:
        from distill.teachers.calibration import (
            TemperatureScaled,
            collect_logits,
            fit_temperature,
            token_shift,
        )

        loader, _ = make_loader(
            data.val, cfg.data.eval_batch_size, False, cfg.seed, collate_fn=data.collate_fn
        )
        # a causal LM is fitted on next-token predictions, as its loss and perplexity count them
        shift = token_shift(build_evaluator(_spec(cfg.evaluator)))
        z, y = collect_logits(model, loader, adapter, shift=shift)
        keep = y != -100
        info["temperature"] = fit_temperature(z[keep], y[keep])
        adapter = TemperatureScaled(adapter, info["temperature"])
    return model, adapter, info


class EnsembleModel(nn.Module):
    """The ensemble as one module for measurement: its params, size and latency are all members';
    its logits are the label-free combination (the `confidence` rule reads labels, so it is
    measured as `mean_logits`, never with the test labels)."""

    def __init__(self, ensemble):
        super().__init__()
        from distill.teachers.ensemble import Ensemble

        rule = "mean_logits" if ensemble.rule in ("confidence", "learned") else ensemble.rule
        self.members = nn.ModuleList(ensemble.models)
        self.ensemble = Ensemble(
            ensemble.members, rule=rule, tau=ensemble.tau, space=ensemble.space, weights=ensemble.weights
        )

    def forward(self, x):
        return self.ensemble(Batch(inputs=x)).logits


def build_teachers(cfg: RecipeConfig, data: DataBundle, out: Path, built: Built | None = None):
    """The teacher that teaches: one `Teacher`, or the `Ensemble` of `teachers:`. Returns it, a
    model for students built from the teacher (the first member), and the summary rows' models
    as (name, model, adapter, facts): `teacher` first (for an ensemble, the combination), then
    `teacher0`, `teacher1`, ... for its members. `built`: what preflight built (its teacher is the
    first member's model)."""
    dtype_of = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    first = built.take("teacher_model") if built is not None else None
    if cfg.teacher.served is not None and not cfg.teachers:
        return None, None, []  # a served teacher: no model, no row (`summary["served_teacher"]`)
    if not cfg.teachers:
        model, adapter, info = load_teacher(cfg.teacher, "teacher", data, cfg, out, model=first)
        t = Teacher(
            model,
            adapter=teaching_adapter(adapter),
            dtype=dtype_of[cfg.teacher.dtype],
            compile=cfg.teacher.compile,
        )
        return t, model, [("teacher", model, adapter, info)]
    from distill.teachers.ensemble import Ensemble

    members, rows = [], []
    for i, tc in enumerate(cfg.teachers):
        model, adapter, info = load_teacher(
            tc, f"teacher{i}", data, cfg, out, model=first if i == 0 else None
        )
        members.append(
            Teacher(model, adapter=teaching_adapter(adapter), dtype=dtype_of[tc.dtype], compile=tc.compile)
        )
        rows.append((f"teacher{i}", model, adapter, info))
    e = cfg.ensemble
    ensemble = Ensemble(members, rule=e.rule, tau=e.tau, space=e.space, weights=e.weights)
    combined = EnsembleModel(ensemble)
    return ensemble, members[0].model, [("teacher", combined, auto_adapter, {"rule": e.rule}), *rows]


class Unlabelled(Dataset):
    """A dataset's inputs with the label replaced by `ignore` (what label terms skip): a transfer set.

    `like`: a labelled sample the transfer samples are batched with; the label comes as a plain int
    when that sample's label is one (a 0-d tensor otherwise), so default collation of a batch that
    mixes the two sets sees one type."""

    def __init__(self, dataset: Dataset, ignore: int = -100, like: Any = None):
        self.dataset, self.ignore = dataset, ignore
        y = like[1] if isinstance(like, tuple | list) and len(like) > 1 else None
        self.as_int = isinstance(y, int) and not isinstance(y, bool)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        sample = self.dataset[i]
        x = sample[0] if isinstance(sample, tuple | list) else sample
        return x, (self.ignore if self.as_int else torch.tensor(self.ignore))


def add_transfer(
    cfg: RecipeConfig,
    data: DataBundle,
    objective: Objective,
    pseudo: Callable[[Dataset], Dataset] | None = None,
) -> DataBundle:
    """`data.transfer`: the distilled student trains on the labelled set plus the transfer set's
    inputs, whose labels are replaced by the label terms' `ignore_index`, so only the teacher terms
    learn from them (and, under `trainer.mix`, they mix in as zero labels).

    Detection images (targets are dicts of boxes) take the teacher's boxes as targets instead:
    `pseudo(transfer_train)` gives that dataset (`pseudo_labelled`)."""
    spec = cfg.data.transfer
    if spec is None:
        return data
    transfer = build_transfer(cfg)
    like = data.train[0] if len(data.train) else None
    if isinstance(like, tuple | list) and len(like) > 1 and isinstance(like[1], Mapping):
        if pseudo is None:
            raise ConfigError(
                "data.transfer of detection images needs the teacher's boxes as targets; "
                "this command has no trained teacher to label them (use distill run)"
            )
        part = pseudo(transfer.train)
    else:  # (its shape, and one ignore_index across the label terms, were checked by validate_recipe)
        part = Unlabelled(transfer.train, label_ignore(objective, "data.transfer"), like)
    return dataclasses.replace(data, train=ConcatDataset([data.train, part]))


def pseudo_labelled(cfg: RecipeConfig, teacher_model: nn.Module, adapter: Any, out: Path):
    """For `add_transfer`: a detection transfer set with the teacher's boxes (score-thresholded,
    NMS once per image) as targets, read from `data.pseudo_labels.store` (default: the run folder's
    pseudo_labels.safetensors) when they were stored for this teacher and these images, else
    computed once and stored there. `adapter`: the recipe's teacher adapter (with post-processing)."""
    from distill.teachers.pseudo_labels import PseudoLabelled, pseudo_label

    pc = cfg.data.pseudo_labels
    path = Path(pc.store) if pc.store else out / "pseudo_labels.safetensors"

    def label(dataset: Dataset) -> Dataset:
        boxes = pseudo_label(
            teacher_model, dataset, adapter, pc.score_threshold, pc.iou, cfg.data.eval_batch_size, store=path
        )
        return PseudoLabelled(dataset, boxes)

    return label


def label_ignore(objective: Objective, key: str) -> int:
    """The label value the objective's label terms skip (`ignore_index`, -100 without one)."""
    ignores = {t.ignore_index for t in objective.terms.values() if hasattr(t, "ignore_index")}
    if len(ignores) > 1:
        raise ConfigError(f"{key}: the label terms skip different values ({sorted(ignores)}); use one")
    return ignores.pop() if ignores else -100


def store_rows(
    cfg: RecipeConfig, data: DataBundle, objective: Objective, views: int | None
) -> tuple[Dataset, MixedViews | None]:
    """What a teacher store of this recipe holds one row of teacher outputs for, and, under
    `trainer.mix`, the dataset the distilled student then trains on.

    `data` is the distilled student's data (`add_transfer`: the labelled set and any transfer set,
    so the store covers both). Without mixing the rows are its samples. With mixing they are
    `views` fixed mixed views of each sample (`MixedViews`): outputs at the unmixed inputs cannot
    give the teacher's view of a mixed one, so mixing with a plain store is refused (`MIX_STORE`).
    """
    from distill.data.indexed import IndexedDataset

    train = data.train.dataset if isinstance(data.train, IndexedDataset) else data.train
    mix = cfg.trainer.mix
    if mix.name == "none" or mix.prob == 0:
        if views:
            raise ConfigError(
                "--mix-views: the recipe does not mix (trainer.mix.name: none); drop --mix-views"
            )
        return train, None
    if not views:
        raise ConfigError(f"trainer.mix with teacher.cache: {MIX_STORE}")
    if data.num_classes is None:
        raise ConfigError("trainer.mix mixes class labels, but the data names no number of classes")
    mixer = Mixer(
        mix.name, mix.alpha, mix.prob, data.num_classes, cfg.seed, (label_ignore(objective, "trainer.mix"),)
    )
    mixed = MixedViews(train, views, mixer)
    return mixed.rows(), mixed


def serve_store(
    cfg: RecipeConfig,
    data: DataBundle,
    objective: Objective,
    teacher: Any,
    teacher_model: nn.Module,
    outputs: dict[str, Any] | None = None,
) -> tuple[Any, DataBundle, TrainerConfig]:
    """`teacher.cache`: the teacher served from its store for the distilled stage. Returns the
    `CachedTeacher` (the live teacher is its fallback for validation), the stage's data (sample
    indices, or the store's mixed views) and its trainer settings (no batch mixing over views that
    are mixed already)."""
    from distill.teachers.store import CachedTeacher

    views = None
    if cfg.trainer.mix.name != "none" and cfg.trainer.mix.prob > 0:
        rows, n = CachedTeacher(cfg.teacher.cache).rows, len(data.train)
        if rows == n:
            raise ConfigError(f"trainer.mix with teacher.cache {cfg.teacher.cache}: {MIX_STORE}")
        views = max(rows // n, 1)  # a store for other data fails the fingerprint check below
    rows_set, mixed = store_rows(cfg, data, objective, views)
    cached = CachedTeacher(
        cfg.teacher.cache,
        dataset=rows_set,
        teacher=teacher_model,
        fallback=teacher,
        fill=cfg.teacher.cache_fill,
        outputs=outputs,
    )
    train = mixed if mixed is not None else cached.training_dataset(rows_set)
    trainer_cfg = cfg.trainer.model_copy(update={"mix": MixConfig()}) if mixed is not None else cfg.trainer
    return cached, dataclasses.replace(data, train=train), trainer_cfg


def add_fit_measures(
    rows: list[dict[str, Any]],
    teacher: Teacher,
    students: dict[str, nn.Module],
    data: DataBundle,
    cfg: RecipeConfig,
    student_adapter: Any = None,
) -> None:
    """For classification: the teacher's mean top-1 probability on its training inputs
    (`train_confidence`: near 1 means its soft labels there say little beyond the label) and each
    student's top-1 agreement with the teacher on them (`train_agreement`: how well it can follow).
    The verdict reads them to explain a run where distillation did not help."""
    if "accuracy" not in rows[0] or data.train is None or cfg.evaluator is not None:
        return
    loader, _ = make_loader(data.train, cfg.data.eval_batch_size, False, cfg.seed, collate_fn=data.collate_fn)
    named = [(row, students[row["name"]]) for row in rows[1:] if row["name"] in students]
    adapter = student_adapter or auto_adapter
    tops, agree = [], {row["name"]: [] for row, _ in named}
    was = {id(m): m.training for _, m in named}
    for _, m in named:
        m.eval()
    with torch.no_grad():
        for raw in loader:  # one pass: teacher and students see the same (possibly augmented) inputs
            batch = as_batch(raw)
            z = teacher(batch.to(teacher.device)).logits
            if not isinstance(z, torch.Tensor) or z.dim() != 2:
                return
            p = torch.softmax(z.float(), -1)
            tops.append(p.max(-1).values.cpu())
            for row, m in named:
                s_z = adapter(m, batch.to(next(m.parameters()).device)).logits
                agree[row["name"]].append((s_z.argmax(-1).cpu() == p.argmax(-1).cpu()).float())
    for _, m in named:
        m.train(was[id(m)])
    rows[0]["train_confidence"] = float(torch.cat(tops).mean())
    for row, _ in named:
        row["train_agreement"] = float(torch.cat(agree[row["name"]]).mean())


def run_recipe(
    cfg: RecipeConfig, out: str | Path, resume: bool = False, overwrite: bool = False, command: str = "run"
) -> dict[str, Any]:
    """Trains and measures everything the recipe asks for; writes the run folder; returns the summary."""
    out = Path(out)
    t0 = time.perf_counter()
    cfg = resolve_recipe(cfg)  # defaults an hf teacher implies (tokenizer, task, evaluator)
    check_init_args(cfg)  # a typo in any init_args, before the run folder or anything is built
    with RunDir(out, cfg.to_yaml(), resume=resume, overwrite=overwrite, reusable=reusable_teacher(cfg)):
        data = build_data(cfg.data.name, cfg.data.class_path, cfg.data.init_args, seed=cfg.seed)

        built = Built()
        preflight_recipe(cfg, data, built)  # every component and one batch, before any training
        student_adapter = build_adapter(cfg.student.adapter)
        teacher, teacher_model, teacher_rows = build_teachers(cfg, data, out, built)

        kd_objective = built.take("kd_objective") or build_objective(cfg)
        pseudo = None  # a transfer set's boxes come from the one trained teacher (none when served)
        if cfg.data.transfer is not None and not cfg.teachers and teacher_rows:
            pseudo = pseudo_labelled(cfg, teacher_model, teacher_rows[0][2], out)
        kd_data = add_transfer(cfg, data, kd_objective, pseudo)
        kd_teacher, kd_trainer = teacher, cfg.trainer
        cross = is_cross(cfg)
        if cross:  # a student of another tokenizer: the teacher reads the texts (live, store or served)
            kd_teacher = cross_teacher(cfg, kd_data, teacher_model)
        elif offset_data(data) and not kd_objective.needs_teacher:
            kd_teacher = None  # labels alone on texts in the student's tokens: the teacher cannot read them
        elif cfg.teacher.cache and not cfg.teachers:  # offline: the teacher's outputs come from a store
            from distill.teachers.store import outputs_fingerprint

            outputs = outputs_fingerprint(_spec(cfg.teacher.adapter), teacher_rows[0][3].get("temperature"))
            kd_teacher, kd_data, kd_trainer = serve_store(
                cfg, kd_data, kd_objective, teacher, teacher_model, outputs
            )

        students: dict[str, nn.Module] = {}
        stages = (
            [("student_scratch", scratch_objective(cfg), None, data)] if "scratch" in cfg.baselines else []
        )
        if (
            "scratch_unmixed" in cfg.baselines
        ):  # the scratch twin without trainer.mix, as it would train alone
            stages.append(("student_scratch_unmixed", scratch_objective(cfg), None, data))
        stages.append(("student_kd", kd_objective, kd_teacher, kd_data))
        for stage, objective, t, stage_data in stages:
            seed_everything(cfg.seed)  # the same initial student for every stage
            student = built.take("student")  # the first stage trains the one preflight checked
            if student is None:
                student = build_model(cfg.student.spec(), data, teacher=teacher_model)
                if cfg.student.checkpoint:
                    load_weights(student, cfg.student.checkpoint)
            trainer_cfg = cfg.trainer
            if stage == "student_scratch_unmixed":
                trainer_cfg = trainer_cfg.model_copy(update={"mix": MixConfig()})
            elif stage == "student_kd":
                trainer_cfg = kd_trainer
            hook = on_policy_hook(cfg, student, data) if stage == "student_kd" else None
            students[stage] = train_stage(
                stage, student, objective, stage_data, cfg, trainer_cfg, out, t, student_adapter, hook
            )

        if not dist.is_main():  # under torchrun only rank 0 measures and writes the summary
            return {"command": command, "recipe": cfg.name, "seed": cfg.seed, "rows": []}
        # agreement on the test split is with the label-free teacher (an ensemble never reads test labels)
        judge = teacher_rows[0][1].ensemble if cfg.teachers else teacher
        t_data = teacher_data(cfg, data)  # across tokenizers: the same texts in the teacher's tokens
        rows = [
            {**measure(n, m, t_data, cfg, None, adapter=a, latency=False), **info}
            for n, m, a, info in teacher_rows
        ]
        texts = cross or offset_data(data)  # the student's tokens may not be the teacher's
        rows += [
            measure(n, m, data, cfg, None if texts else judge, adapter=student_adapter, latency=False)
            for n, m in students.items()
        ]
        if texts:  # no token-level agreement across vocabularies
            for r in rows:
                r.pop("agreement", None)
        add_latency(rows, {n: m for n, m, _, _ in teacher_rows} | students, data, cfg)
        add_fit_measures(rows, teacher, students, data, cfg, student_adapter)
        summary = {
            "command": command,
            "recipe": cfg.name,
            "seed": cfg.seed,
            "wall_seconds": round(time.perf_counter() - t0, 1),
            "mix": cfg.trainer.mix.name,
            "rows": rows,
        }
        answers = side_by_side(rows)  # the chat evaluator's answers, out of the rows
        if answers:
            summary["answers"] = answers
        if cfg.teacher.served is not None:  # a served teacher: responses, tokens, k, mass kept
            summary["served_teacher"] = kd_teacher.summary()
        note_teacher_warnings(summary, data.num_classes, read_metrics(out / "metrics.jsonl"))
        add_student_cut(summary, students)
        if "truncated" in data.meta:  # text longer than max_length, cut (text data builders count them)
            summary["texts_truncated"] = data.meta["truncated"]
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
        if "student_kd" in students:  # Hugging Face students also as a model folder
            export_student_hf(out, students["student_kd"], data, summary, cfg)
        if cfg.teacher.train is not None and not cfg.teacher.checkpoint:  # a teacher trained here, too
            export_student_hf(out, teacher_model, data, summary, cfg, name="teacher_hf")
        write_report(out)
        return summary


def add_student_cut(summary: dict[str, Any], students: dict[str, nn.Module]) -> None:
    """`summary["student_cut"]`: which teacher blocks (heads, channels) a student cut from the
    teacher kept, and their measured scores (every stage builds the same cut)."""
    for model in students.values():
        if (
            hasattr(getattr(model, "config", None), "distill_cut")
            or type(model).__name__ == "SentenceTransformer"
        ):
            from distill.nlp.students import cut_summary

            cut = cut_summary(model)
            if cut is not None:
                summary["student_cut"] = cut
            return


def teacher_warnings(rows: list[dict[str, Any]], num_classes: int | None) -> list[str]:
    """Why distilling from this teacher may be wasted: it is at chance, or not clearly better than
    the student trained from labels alone (accuracy within 0.01, perplexity within 1%)."""
    teacher = next((r for r in rows if r["name"] == "teacher"), None)
    scratch = next((r for r in rows if r["name"] == "student_scratch"), None)
    if teacher is None:
        return []
    out = []
    if "bits_per_char" in teacher and scratch is not None and "bits_per_char" in scratch:
        # across tokenizers per-token perplexities do not compare; bits per character do
        if teacher["bits_per_char"] > 0.99 * scratch["bits_per_char"]:
            out.append(
                f"the teacher's bits per character {teacher['bits_per_char']:.3f} are not clearly fewer than "
                f"the scratch student's {scratch['bits_per_char']:.3f}: there is little to distil"
            )
    elif "perplexity" in teacher:  # a language model: its token accuracy is not the measure
        if scratch is not None and teacher["perplexity"] > 0.99 * scratch.get("perplexity", float("inf")):
            out.append(
                f"the teacher's perplexity {teacher['perplexity']:.2f} is not clearly better than the "
                f"scratch student's {scratch['perplexity']:.2f}: there is little to distil"
            )
    elif "accuracy" in teacher:
        acc = teacher["accuracy"]
        chance = 1 / num_classes if num_classes else None
        if chance is not None and acc < chance + 0.05:
            out.append(
                f"the teacher's accuracy {acc:.4f} is at chance ({chance:.4f} for {num_classes} classes): "
                "distilling from it teaches noise; train it longer (teacher.train.epochs) or check its data"
            )
        elif scratch is not None and "accuracy" in scratch and acc < scratch["accuracy"] + 0.01:
            out.append(
                f"the teacher's accuracy {acc:.4f} is not clearly better than the scratch student's "
                f"{scratch['accuracy']:.4f}: there is little to distil; use a stronger or longer-trained teacher"
            )
    return out


def student_warnings(
    rows: list[dict[str, Any]], num_classes: int | None, metrics: list[dict[str, Any]]
) -> list[str]:
    """Students at chance on the test split, each with the likely cause read from its training
    losses (`metrics`: the run's metrics.jsonl records): a loss that fell points at evaluation
    (BatchNorm statistics, too little data), one that did not at the training budget."""
    if not num_classes:
        return []
    chance = 1 / num_classes
    out = []
    for row in rows:
        name, acc = row["name"], row.get("accuracy")
        if not name.startswith("student") or not isinstance(acc, float) or acc >= chance + 0.05:
            continue
        train = [m for m in metrics if m.get("stage") == name and m.get("split") == "train" and "loss" in m]
        at = f"{name}'s accuracy {acc:.4f} is at chance ({chance:.4f} for {num_classes} classes)"
        if len(train) < 2:
            out.append(
                f"{at}: it learned nothing that shows on the test split; train it longer (trainer.epochs)"
            )
            continue
        first, last, steps = train[0]["loss"], train[-1]["loss"], train[-1].get("step", len(train))
        if last < 0.7 * first:
            out.append(
                f"{at} although its training loss fell from {first:.3g} to {last:.3g} in {steps} steps: "
                "it fits its training batches but not held-out data in eval mode. Likely causes: BatchNorm "
                "running statistics not yet settled after so few steps (torchvision's mobilenet_v3_* use "
                "momentum 0.01), or too few training images; train longer (trainer.epochs) or use a "
                "student without BatchNorm, or more data"
            )
        else:
            out.append(
                f"{at} and its training loss hardly fell ({first:.3g} to {last:.3g} in {steps} steps): "
                "too short a schedule for a network trained from scratch, or a learning rate that does "
                "not suit it; train longer (trainer.epochs) or change trainer.optimizer.lr"
            )
    return out


def note_teacher_warnings(
    summary: dict[str, Any], num_classes: int | None, metrics: list[dict[str, Any]] | None = None
) -> None:
    """Adds the teacher's and the students' warnings to `summary["warnings"]` (report.md shows
    them) and to the log; `metrics` are the run's metrics.jsonl records (the students' losses)."""
    warnings = teacher_warnings(summary["rows"], num_classes)
    warnings += student_warnings(summary["rows"], num_classes, metrics or [])
    if warnings:
        summary["warnings"] = warnings
        for w in warnings:
            print(f"distill: warning: {w}", file=sys.stderr)


def aggregate(summaries: list[dict[str, Any]], command: str) -> dict[str, Any]:
    """One summary over several seeds: each numeric metric's mean, with `<metric>_std` beside it."""
    names = [r["name"] for r in summaries[0]["rows"]]
    rows = []
    for name in names:
        per_seed = [next(r for r in s["rows"] if r["name"] == name) for s in summaries]
        row: dict[str, Any] = {"name": name}
        for k, v in per_seed[0].items():
            if isinstance(v, int | float) and not isinstance(v, bool):
                vals = [float(r[k]) for r in per_seed if k in r]
                ints = [r[k] for r in per_seed if k in r and isinstance(r[k], int)]
                # a count that every seed agrees on (params) stays an int
                row[k] = ints[0] if len(ints) == len(vals) and len(set(ints)) == 1 else statistics.fmean(vals)
                if k not in ("params", "size_mb"):
                    row[f"{k}_std"] = statistics.pstdev(vals) if len(vals) > 1 else 0.0
        rows.append(row)
    out = {
        "command": command,
        "recipe": summaries[0]["recipe"],
        "seeds": [s["seed"] for s in summaries],
        "wall_seconds": round(sum(s["wall_seconds"] for s in summaries), 1),
        "rows": rows,
    }
    if "student_cut" in summaries[0]:  # measured on the same first training examples for every seed
        out["student_cut"] = summaries[0]["student_cut"]
    found = verdict(summaries)  # paired gain of each distilled row over its scratch twin
    if found is not None:
        out["verdict"] = found
    return out


def run_seeds(
    cfg: RecipeConfig,
    out: str | Path,
    seeds: int,
    resume: bool = False,
    overwrite: bool = False,
    command: str = "run",
) -> dict[str, Any]:
    """`seeds` runs of the recipe (seed, seed+1, ...) in `out/seed<k>/`, summarised together in `out/`."""
    out = Path(out)
    if seeds == 1:
        return run_recipe(cfg, out, resume, overwrite, command)
    with RunDir(out, cfg.to_yaml(), resume=resume, overwrite=overwrite, reusable=reusable_teacher(cfg)):
        summaries = []
        for k in range(seeds):
            seed_cfg = cfg.model_copy(update={"seed": cfg.seed + k})
            if k > 0 and cfg.teacher.seeds == "first":
                seed_cfg = teacher_of_first_seed(seed_cfg, out / f"seed{cfg.seed}")
            summaries.append(run_recipe(seed_cfg, out / f"seed{cfg.seed + k}", resume=True, command=command))
        if not dist.is_main():
            return summaries[0]
        summary = aggregate(summaries, command)
        warnings = [w for s in summaries for w in s.get("warnings", [])]
        if warnings:
            summary["warnings"] = list(dict.fromkeys(w for w in warnings))
        if summaries[0].get("answers"):  # answers side by side: the first seed's
            summary["answers"] = summaries[0]["answers"]
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
        write_report(out)
        return summary


def teacher_of_first_seed(cfg: RecipeConfig, first: Path) -> RecipeConfig:
    """`teacher.seeds: first`: the recipe with the teacher that the first seed's run (`first`)
    trained as its checkpoint, so a later seed distils from those weights instead of training its own."""
    tc = cfg.teacher
    if cfg.teachers:
        raise ConfigError("teacher.seeds: first shares one trained teacher; it does not apply to teachers:")
    if tc.checkpoint or tc.train is None:
        return cfg  # a teacher given as a checkpoint (or pretrained) is the same for every seed already
    # the weights load_teacher took: final (last), best, or epoch<N>
    name = {"last": "final", "best": "best"}[tc.use] if isinstance(tc.use, str) else f"epoch{tc.use}"
    path = first / "checkpoints" / "teacher" / f"{name}.safetensors"
    if not path.is_file():
        raise ConfigError(f"teacher.seeds: first, but the first seed left no teacher weights at {path}")
    shared = tc.model_copy(update={"checkpoint": str(path), "train": None, "use": "last"})
    return cfg.model_copy(update={"teacher": shared})


def evaluate_checkpoint(
    cfg: RecipeConfig,
    run_dir: Path | None,
    checkpoint: str | None,
    which: str = "student",
    split: str = "test",
) -> dict[str, Any]:
    """Scores a checkpoint of the recipe's student (or teacher) on a split with the recipe's
    evaluator; with a run folder, also its agreement with the run's teacher. A checkpoint that is
    a folder (a run's `student_hf/`) is loaded as a Hugging Face model of the recipe's task."""
    cfg = resolve_recipe(cfg)
    if checkpoint is None:
        if run_dir is None:
            raise ConfigError("give --checkpoint, or a run folder whose checkpoints to score")
        stage = "student_kd" if which == "student" else "teacher"
        checkpoint = str(run_dir / "checkpoints" / stage / "final.safetensors")
        if not Path(checkpoint).exists():
            raise ConfigError(
                f"{run_dir} has no finished {stage} ({checkpoint} is missing): finish the run with "
                "--resume, or give --checkpoint"
            )
    data = build_data(cfg.data.name, cfg.data.class_path, cfg.data.init_args, seed=cfg.seed)
    model_cfg = cfg.student if which == "student" else cfg.teacher
    teacher_model = build_model(cfg.teacher.spec(), data) if which == "student" else None
    if Path(checkpoint).is_dir():
        task = model_cfg.init_args.get("task") if model_cfg.name == "hf" else None
        spec = {"name": "hf", "init_args": {"path": checkpoint, "task": task or "sequence_classification"}}
        model = build_model(spec, data)
    else:
        model = build_model(model_cfg.spec(), data, teacher=teacher_model)
        load_weights(model, checkpoint)
    adapter = build_adapter(model_cfg.adapter)
    teacher = None
    teacher_ckpt = run_dir / "checkpoints" / "teacher" / "final.safetensors" if run_dir else None
    if cfg.teacher.checkpoint:
        teacher_ckpt = Path(cfg.teacher.checkpoint)
    if which == "student" and teacher_ckpt is not None and teacher_ckpt.exists():
        teacher = Teacher(
            load_weights(teacher_model, teacher_ckpt), adapter=build_adapter(cfg.teacher.adapter)
        )
    elif which == "student" and getattr(teacher_model, "distill_pretrained", False):
        teacher = Teacher(teacher_model, adapter=build_adapter(cfg.teacher.adapter))
    ds = getattr(data, split)
    if ds is None:
        raise ConfigError(f"the dataset has no {split} split")
    loader, _ = make_loader(ds, cfg.data.eval_batch_size, False, cfg.seed, collate_fn=data.collate_fn)
    evaluator = build_evaluator(_spec(cfg.evaluator))
    scores = evaluate(model, loader, evaluator, adapter, teacher=teacher)
    if hasattr(evaluator, "measure_model"):  # the chat evaluator's measures, on the test split
        judge = model if which == "teacher" else getattr(teacher, "model", None)
        scores.update(evaluator.measure_model(model, data, judge, threads=cfg.report.latency_threads))
        scores.pop("examples", None)
    return {"checkpoint": checkpoint, "split": split, **scores, "params": count_params(model)}


def preflight_recipe(
    cfg: RecipeConfig, data: DataBundle | None = None, built: Built | None = None
) -> dict[str, Any]:
    """Builds every component of `cfg` and runs one batch through each stage it will train.

    Args:
        data: the built data (built here when None).
        built: filled with the teacher, student and objective built here, put back in the state
            the run would have built them in, for the run to train (`Built`); None: dropped.

    Returns:
        What was built: data sizes and shapes, models with parameters, objective terms and taps,
        and each stage's losses and evaluator metrics on the batch.
    """
    from distill.run.preflight import (
        describe_data,
        describe_model,
        describe_objective,
        first_batch,
        run_stage,
        validate_recipe,
    )

    cfg = resolve_recipe(cfg)  # what an hf teacher implies (tokenizer, task, evaluator)
    check_init_args(cfg)
    if data is None:
        data = build_data(cfg.data.name, cfg.data.class_path, cfg.data.init_args, seed=cfg.seed)
    device = resolve_device(cfg.trainer.device)
    batch = first_batch(data, cfg.data.batch_size, cfg.seed).to(device)
    validate_recipe(cfg, data, batch, build_objective(cfg))  # every refusal the recipe decides
    if cfg.teachers:  # several teachers: each is built like the first, which is checked here
        cfg = cfg.model_copy(update={"teacher": cfg.teachers[0]})
    report: dict[str, Any] = {"data": describe_data(data, batch, cfg.data.name or cfg.data.class_path)}
    evaluator_spec = cfg.evaluator.spec() if cfg.evaluator is not None else None
    build_evaluator(evaluator_spec)  # a typo in the evaluator fails here, before anything else

    teacher_adapter = build_adapter(cfg.teacher.adapter)
    student_adapter = build_adapter(cfg.student.adapter)
    seed_everything(cfg.seed)  # as `load_teacher` builds it: the same initial weights
    served = cfg.teacher.served is not None  # a teacher you can only query: no model
    teacher_model = None if served else build_model(cfg.teacher.spec(), teacher_data(cfg, data))
    if cfg.teacher.checkpoint:
        load_weights(teacher_model, cfg.teacher.checkpoint)
    teacher_state = None if served else _snapshot(teacher_model)
    # an hf folder loads its own weights; a served teacher has none
    pretrained = served or getattr(teacher_model, "distill_pretrained", False)
    if not cfg.teacher.checkpoint and cfg.teacher.train is None and not pretrained:
        raise ConfigError("teacher: give a checkpoint to load or a train: section to train it first")
    if served:
        from distill.run.cross import served_description

        report["teacher"] = served_description(cfg)
    else:
        teacher_model.to(device)
        report["teacher"] = describe_model(cfg.teacher.spec(), teacher_model)
    report["teacher"]["source"] = report["teacher"].get("source") or (
        f"checkpoint {cfg.teacher.checkpoint}"
        if cfg.teacher.checkpoint
        else f"trained first ({cfg.teacher.train.epochs} epochs)"
        if cfg.teacher.train is not None
        else "its own pretrained weights"
    )
    stages: dict[str, Any] = {}
    if not cfg.teacher.checkpoint and cfg.teacher.train is not None:
        stages["teacher"] = run_stage(
            "teacher",
            teacher_model,
            scratch_objective(cfg),
            None,
            teacher_adapter,
            batch,
            device,
            evaluator_spec,
            cfg.teacher.train.mix,
            cfg.seed,
        )
    teacher = None if served else Teacher(teacher_model, adapter=teaching_adapter(teacher_adapter))
    try:
        seed_everything(cfg.seed)  # as the run builds each stage's student
        student = build_model(cfg.student.spec(), data, teacher=teacher_model)
        if cfg.student.checkpoint:
            load_weights(student, cfg.student.checkpoint)
        student.to(device)
        student_state = _snapshot(student)
        report["student"] = describe_model(cfg.student.spec(), student)
        kd = build_objective(cfg)
        kd_state = copy.deepcopy(kd.state_dict())
        report["objective"] = describe_objective(kd, {n: t.weight for n, t in cfg.objective.terms.items()})
        if "scratch" in cfg.baselines:
            stages["student_scratch"] = run_stage(
                "student_scratch",
                student,
                scratch_objective(cfg),
                None,
                student_adapter,
                batch,
                device,
                evaluator_spec,
                cfg.trainer.mix,
                cfg.seed,
            )
        kd_teacher = teacher
        if is_cross(cfg):  # the teacher reads the batch's texts in its own tokenizer
            from distill.run.cross import fit_report

            kd_teacher = cross_teacher(cfg, data, teacher_model, write=False)
            report["tokenizers"] = fit_report(cfg, data, batch, kd_teacher)
        stages["student_kd"] = run_stage(
            "student_kd",
            student,
            kd,
            kd_teacher,
            student_adapter,
            batch,
            device,
            evaluator_spec,
            cfg.trainer.mix,
            cfg.seed,
        )
    finally:
        if teacher is not None:
            teacher.tap.remove()  # the run's Teacher adds its own taps
    report["stages"] = stages
    if built is not None:
        if teacher_state is not None:
            _restore(teacher_model, teacher_state)
        built.teacher_model = teacher_model
        # a student made from the teacher's layers is built again after the teacher trains
        if cfg.teacher.checkpoint or cfg.teacher.train is None or not takes_teacher(cfg.student.spec()):
            _restore(student, student_state)
            built.student = student
        kd.load_state_dict(kd_state, strict=False)  # its terms' state before the batch (CRD's memory)
        built.kd_objective = kd
    return report


# Teacher settings that change only how the teacher is used for distillation, not its trained weights.
_TEACHER_USE_ONLY = ("cache", "cache_fill", "dtype", "compile", "seeds")


def teacher_stage_inputs(recipe: dict[str, Any]) -> dict[str, Any] | None:
    """What the teacher stage's weights depend on, from a recipe as data: the seed, the data, the
    teacher section and the label-only objective terms the teacher trains with (None if the terms
    do not build)."""
    label = {}
    for n, t in ((recipe.get("objective") or {}).get("terms") or {}).items():
        try:
            term = LOSSES.build(
                name=t.get("name"), class_path=t.get("class_path"), init_args=t.get("init_args") or {}
            )
        except Exception:  # noqa: BLE001 - a saved recipe that no longer builds reuses nothing
            return None
        if not term.needs_teacher:
            label[n] = {k: t.get(k) for k in ("name", "class_path", "init_args")}
    teacher = {k: v for k, v in (recipe.get("teacher") or {}).items() if k not in _TEACHER_USE_ONLY}
    return {"seed": recipe.get("seed"), "data": recipe.get("data"), "teacher": teacher, "label_terms": label}


def reusable_teacher(cfg: RecipeConfig):
    """For `RunDir(reusable=...)`: a finished teacher stage is reused on `--resume` when only later
    sections (student, objective's distillation terms, trainer, evaluator, report) changed."""
    mine = teacher_stage_inputs(cfg.model_dump(mode="json"))

    def reusable(saved: dict[str, Any]) -> list[str]:
        return ["teacher"] if mine is not None and teacher_stage_inputs(saved) == mine else []

    return reusable
