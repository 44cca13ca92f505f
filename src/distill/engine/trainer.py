"""One training loop for every regime: a student, an optional frozen teacher, an Objective.

The loop owns precision (fp32 / bf16 / fp16 with a scaler), gradient accumulation, clipping,
per-epoch evaluation, best/last checkpoints, exact resume, a NaN/Inf guard and metric logging.
Methods never bring their own loop: they are loss terms.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import math
import random
import re
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler, SequentialSampler

from distill.adapters import Adapter, auto_adapter
from distill.checkpoint import atomic_write_text, load_state, save_state, save_weights
from distill.engine import distributed as dist
from distill.engine.config import TrainerConfig
from distill.engine.evaluate import ClassificationEvaluator, Evaluator, evaluate
from distill.engine.mix import Mixer, check_mixable
from distill.errors import CheckpointError, ConfigError, DistillError, TrainingDiverged
from distill.objective import Objective
from distill.outputs import Batch, Outputs, as_batch
from distill.schedules import Progress
from distill.taps import FeatureTap
from distill.teachers import Teacher

# --------------------------------------------------------------------------- the task


class DistillTask(nn.Module):
    """Student + objective (with any adapters its terms created) as one module, plus a frozen
    teacher held outside the module tree: only this module is optimised, checkpointed and, under
    DDP, wrapped."""

    def __init__(
        self,
        student: nn.Module,
        objective: Objective,
        teacher: Teacher | None = None,
        student_adapter: Adapter = auto_adapter,
    ):
        super().__init__()
        self.student = student
        self.objective = objective
        self.student_adapter = student_adapter
        self.tap = FeatureTap(student, objective.student_taps)
        if teacher is None and objective.needs_teacher:
            raise DistillError(
                "the objective has terms that need a teacher ("
                + ", ".join(n for n, t in objective.terms.items() if t.needs_teacher)
                + ") but no teacher was given"
            )
        self.teacher = teacher
        if teacher is not None:
            teacher.add_taps(objective.teacher_taps)

    def student_outputs(self, batch: Batch) -> Outputs:
        out = self.student_adapter(self.student, batch)
        out.features.update(self.tap.collect())
        return out

    def teacher_outputs(self, batch: Batch) -> Outputs | None:
        return self.teacher(batch) if self.teacher is not None and self.objective.needs_teacher else None

    def forward(self, batch: Batch) -> tuple[dict[str, Tensor], Outputs, Outputs | None]:
        t_out = self.teacher_outputs(batch)
        s_out = self.student_outputs(batch)
        return self.objective(s_out, t_out, batch), s_out, t_out


def preflight_batch(
    task: DistillTask, batch: Batch, device: torch.device | str = "cpu"
) -> tuple[dict[str, Tensor], Outputs, Outputs | None]:
    """One batch through teacher, student and objective without gradients: creates the objective's
    adapters from the real shapes and turns shape and class-count mistakes into errors before any
    training step. Returns (losses, student outputs, teacher outputs)."""
    with torch.no_grad():
        t_out = task.teacher_outputs(batch)
        s_out = task.student_outputs(batch)
        task.objective.setup(s_out, t_out, batch)
        task.objective.to(device)
        losses = task.objective(s_out, t_out, batch)
    return losses, s_out, t_out


def class_count(student: Outputs) -> int | None:
    """The number of classes of the student's logits ((B, C) or (B, ..., C)); None without logits."""
    logits = student.logits
    return logits.shape[-1] if isinstance(logits, Tensor) and logits.dim() >= 2 else None


def label_terms(objective) -> list[Any]:
    """The label terms (those with `check_labels`, such as `ce`): they say which target they skip."""
    return [t for t in objective.terms.values() if hasattr(t, "check_labels")]


def build_mixer(mix, task: DistillTask, batch: Batch, num_classes: int | None, seed: int = 0) -> Mixer | None:
    """The batch mixer of a `trainer.mix` setting, checked on one mixed `batch` before training:
    outputs that are not class logits, inputs that cannot be interpolated (tokens) or a term that
    cannot learn from mixed labels stop here with a one-line error. The Trainer builds its mixer
    with it, and the preflight of `distill check` / `distill run` checks each stage with it."""
    if mix.name == "none" or mix.prob == 0:
        return None
    if num_classes is None:
        raise ConfigError(
            f"trainer.mix: {mix.name} mixes class labels, but the student's outputs are not class "
            "logits; set trainer.mix.name: none"
        )
    ignore = [t.ignore_index for t in label_terms(task.objective)] or (-100,)
    mixer = Mixer(mix.name, mix.alpha, 1.0, num_classes, seed, ignore)
    check_mixable(batch.inputs, mix.name)
    batch = mixer(batch, 0, 0)
    try:
        with torch.no_grad():
            s_out = task.student_outputs(batch)
            task.objective(s_out, task.teacher_outputs(batch), batch)
    except DistillError as e:
        raise ConfigError(
            f"trainer.mix: a mixed batch carries mixed labels (soft_targets), and the objective "
            f"refused it: {str(e).splitlines()[0]}; set trainer.mix.name: none"
        ) from None
    mixer.prob = mix.prob
    return mixer


# --------------------------------------------------------------------------- data order


class ResumableSampler(Sampler[int]):
    """A seeded permutation per epoch (the same on every resume), shardable across DDP ranks,
    that can start part-way through an epoch."""

    def __init__(self, n: int, shuffle: bool, seed: int, rank: int = 0, world_size: int = 1):
        self.n, self.shuffle, self.seed = n, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def _order(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        per_rank = math.ceil(self.n / self.world_size)
        order += order[: per_rank * self.world_size - self.n]  # pad so every rank gets as many
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self._order()[self.start :])

    def __len__(self) -> int:
        return max(math.ceil(self.n / self.world_size) - self.start, 0)


def make_loader(
    data: Dataset | DataLoader,
    batch_size: int,
    shuffle: bool,
    seed: int,
    num_workers: int = 0,
    pin_memory: bool = False,
    collate_fn: Callable | None = None,
    drop_last: bool = False,
) -> tuple[DataLoader, ResumableSampler | None]:
    """A DataLoader whose order is reproducible and resumable.

    A Dataset, or a DataLoader with a plain random/sequential sampler, is (re)built around a
    `ResumableSampler`; a DataLoader with a custom sampler is used as given (resume then replays
    it from the epoch start and skips the consumed batches).
    """
    if isinstance(data, DataLoader):
        if isinstance(data.sampler, RandomSampler | SequentialSampler) and data.batch_size is not None:
            shuffle = isinstance(data.sampler, RandomSampler)
            batch_size, num_workers = data.batch_size, data.num_workers
            pin_memory, collate_fn, drop_last = data.pin_memory, data.collate_fn, data.drop_last
            data = data.dataset
        else:
            return data, None
    n = len(data)
    if n == 0:
        raise DistillError("the dataset is empty: nothing to train or evaluate on")
    sampler = ResumableSampler(n, shuffle, seed, dist.rank(), dist.world_size())
    g = torch.Generator().manual_seed(seed)
    loader = DataLoader(
        GuardedDataset(data),
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        collate_fn=collate_fn,
        drop_last=drop_last,
        generator=g,
        persistent_workers=False,
    )
    return loader, sampler


class SampleError(DistillError):
    """Reading one sample failed; the message names its index."""


class GuardedDataset(Dataset):
    """Passes reads through to `dataset`; a failure becomes a `SampleError` naming the index, also
    from inside a data-loader worker process."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        try:
            return self.dataset[i]
        except Exception as e:
            raise SampleError(f"reading sample {i} failed: {type(e).__name__}: {e}") from e


def guarded_batches(batches, where: Callable[[], str]):
    """Yields from a loader; sample errors and dead workers become one-line errors with the position."""
    try:
        yield from batches
    except SampleError as e:
        found = re.search(r"reading sample \d+ failed: .*", str(e))
        line = found.group(0) if found else str(e).splitlines()[0]
        raise DistillError(f"{line} (in {where()}); fix or remove that sample") from None
    except RuntimeError as e:
        if "DataLoader worker" not in str(e):
            raise
        raise DistillError(
            f"a data-loader worker died in {where()}: {str(e).splitlines()[0]}; rerun with "
            "data.num_workers=0 to see the failing sample"
        ) from None


# --------------------------------------------------------------------------- helpers


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", dist.local_rank())
        return torch.device("cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np.asarray(np_state[1], dtype=np.uint32), *np_state[2:]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


def build_optimizer(params, cfg) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if not params:
        raise DistillError("the student has no trainable parameters")
    o = cfg.optimizer
    if o.name == "sgd":
        return torch.optim.SGD(
            params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, nesterov=o.nesterov
        )
    cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
    return cls(params, lr=o.lr, weight_decay=o.weight_decay, betas=tuple(o.betas))


def lr_factor(cfg, step: int, total: int) -> float:
    """Multiplier of the base LR at optimizer step `step` of `total`."""
    s = cfg.lr_schedule
    t = step / max(total, 1)
    if s.warmup > 0 and t < s.warmup:
        return (step + 1) / max(s.warmup * total, 1)
    if s.name == "constant":
        return 1.0
    if s.name == "step":
        return s.gamma ** sum(t >= m for m in s.milestones)
    a = (t - s.warmup) / max(1 - s.warmup, 1e-12)
    a = min(max(a, 0.0), 1.0)
    shape = 0.5 * (1 + math.cos(math.pi * a)) if s.name == "cosine" else 1 - a
    return s.min_lr_ratio + (1 - s.min_lr_ratio) * shape


class MetricsLog:
    """Appends one JSON object per line; on resume, drops lines past the restored step."""

    def __init__(self, path: Path | None, stage: str):
        self.path, self.stage = path, stage

    def has_lines(self) -> bool:
        """Whether the file holds any line of this stage."""
        if self.path is None or not self.path.exists():
            return False
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("stage") == self.stage:
                    return True
            except json.JSONDecodeError:
                continue
        return False

    def truncate_after(self, step: int) -> None:
        if self.path is None or not self.path.exists() or not dist.is_main():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
            if rec.get("stage") == self.stage and rec.get("step", 0) > step:  # step -1: every line
                continue
            keep.append(line)
        atomic_write_text(self.path, "".join(k + "\n" for k in keep))

    def write(self, record: dict[str, Any]) -> None:
        if self.path is None or not dist.is_main():
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps({"stage": self.stage, **record}) + "\n")


# --------------------------------------------------------------------------- callbacks

# Callbacks added to every Trainer built inside `use_callbacks(...)`: lets a caller (e.g. `distill tune`)
# observe trainers that other code (the pipeline) constructs, without threading an argument through.
_AMBIENT_CALLBACKS: contextvars.ContextVar[tuple[Any, ...]] = contextvars.ContextVar(
    "distill_trainer_callbacks", default=()
)


@contextlib.contextmanager
def use_callbacks(*callbacks: Any) -> Iterator[None]:
    """Adds `callbacks` to every Trainer constructed inside the `with` block."""
    token = _AMBIENT_CALLBACKS.set(_AMBIENT_CALLBACKS.get() + callbacks)
    try:
        yield
    finally:
        _AMBIENT_CALLBACKS.reset(token)


# --------------------------------------------------------------------------- the trainer


class Trainer:
    """Trains `student` against `objective`, optionally distilling from `teacher`.

    Args:
        student: the model to train.
        objective: an `Objective` (e.g. `Objective({"ce": CrossEntropy(), "kd": KD(4)}, {"ce": .1, "kd": .9})`).
        train_data: a Dataset or DataLoader yielding batches `as_batch` understands.
        teacher: a `Teacher` (or anything callable as `batch -> Outputs`), or an nn.Module, which is
            wrapped in `Teacher`. None for label-only training.
        val_data: evaluated every `eval_every` epochs; drives the best checkpoint.
        config: a `TrainerConfig`; keyword arguments override its fields (`epochs=5`, `precision="bf16"`).
        out_dir: where checkpoints and metrics go (None: nothing is written).
        stage: the name of this training in metrics and checkpoints (`student_kd`, `teacher`...).
        student_adapter: how to call the student on a batch.
        evaluator: defaults to classification accuracy (+ agreement with the teacher).
        batch_size, num_workers, pin_memory, collate_fn: used when `train_data` is a Dataset.
        seed: for initialisation order, data order and dropout.
        resume: continue from `out_dir/checkpoints/<stage>/last.safetensors` if it exists.
        overwrite: replace this stage's checkpoints and metrics lines already in `out_dir`. Without
            `resume` or `overwrite`, an `out_dir` that already holds this stage is refused, so two runs
            never mix their checkpoints and `metrics.jsonl`.
        callbacks: objects with an optional `on_evaluate(trainer, metrics)` method, called after each
            evaluation (and its checkpoints) with the logged record; an exception raised there (e.g.
            `optuna.TrialPruned`) stops training and propagates out of `fit()`.
        batch_hook: `(batch, epoch, i) -> batch`, applied to each training batch on the device
            before teacher and student see it: a data source that depends on the model being
            trained (on-policy distillation generates with the current student,
            `distill.nlp.generation.OnPolicyHook`). It must depend on (epoch, i) only, not on
            call order, so a resumed run makes the same batches.
    """

    def __init__(
        self,
        student: nn.Module,
        objective: Objective,
        train_data: Dataset | DataLoader,
        teacher: Teacher | nn.Module | None = None,
        val_data: Dataset | DataLoader | None = None,
        config: TrainerConfig | None = None,
        out_dir: str | Path | None = None,
        stage: str = "student",
        student_adapter: Adapter = auto_adapter,
        evaluator: Evaluator | None = None,
        batch_size: int = 64,
        eval_batch_size: int = 256,
        num_workers: int = 0,
        pin_memory: bool = False,
        collate_fn: Callable | None = None,
        seed: int = 0,
        resume: bool = False,
        callbacks: Sequence[Any] = (),
        overwrite: bool = False,
        batch_hook: Callable[[Batch, int, int], Batch] | None = None,
        **overrides: Any,
    ):
        self.callbacks = list(callbacks) + list(_AMBIENT_CALLBACKS.get())
        self.batch_hook = batch_hook
        cfg = config or TrainerConfig()
        if overrides:
            cfg = TrainerConfig.model_validate({**cfg.model_dump(), **overrides})
        self.cfg = cfg
        self.seed = seed
        self.stage = stage
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.ckpt_dir = self.out_dir / "checkpoints" / stage if self.out_dir else None
        self._claim_out_dir(resume, overwrite)
        self.device = resolve_device(cfg.device)
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        seed_everything(seed)
        if isinstance(teacher, nn.Module):
            teacher = Teacher(teacher)
        if cfg.channels_last:
            student = student.to(memory_format=torch.channels_last)
            if isinstance(teacher, Teacher):
                teacher.model.to(memory_format=torch.channels_last)
        # Page-locked host batches make the non_blocking copies below truly asynchronous.
        pin_memory = pin_memory or self.device.type == "cuda"
        self.task = DistillTask(student.to(self.device), objective.to(self.device), teacher, student_adapter)
        if teacher is not None and hasattr(teacher, "to"):
            teacher.to(self.device)
        self.teacher = teacher
        self.train_loader, self.sampler = make_loader(
            train_data, batch_size, True, seed, num_workers, pin_memory, collate_fn
        )
        self.val_loader = None
        if val_data is not None:
            self.val_loader, _ = make_loader(
                val_data, eval_batch_size, False, seed, num_workers, pin_memory, collate_fn
            )
        self.evaluator = evaluator or ClassificationEvaluator()
        self.steps_per_epoch = math.ceil(len(self.train_loader) / cfg.grad_accum)
        self.total_steps = cfg.max_steps or self.steps_per_epoch * cfg.epochs
        self.progress = Progress(step=0, total_steps=self.total_steps)
        self.metrics = MetricsLog(self.out_dir / "metrics.jsonl" if self.out_dir else None, stage)
        self._preflight()
        self.mixer = self._build_mixer()
        self._compile_pending = cfg.compile and self._compile_student()
        # FSDP2 shards the parameters in place, so it must come before the optimizer is built.
        self.sharded = getattr(cfg, "parallel", "ddp") == "fsdp2" and dist.world_size() > 1
        if self.sharded:
            dist.wrap_fsdp2(self.task, self.device, units=("student",))
        self.optimizer = build_optimizer(self.task.parameters(), cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(cfg, s, self.total_steps)
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.precision == "fp16")
        self.model = self.task if self.sharded else dist.wrap_ddp(self.task, self.device)
        self.epoch, self.batch_in_epoch = 0, 0
        self.best: float | None = None
        self.history: list[dict[str, Any]] = []
        self._tb = None
        self._val_teacher: list[Outputs] = []
        # CUDA NaN guard: (pinned flag, event, loss, batch, where) checked without a host sync.
        self._pending: list[tuple[Tensor, Any, Tensor, Batch, str]] = []
        self._flags = (
            [torch.empty((), dtype=torch.bool, pin_memory=True) for _ in range(4)]
            if self.device.type == "cuda"
            else []
        )
        self._n_flag = 0
        if resume:
            self.resume()

    # ---------------------------------------------------------------- setup

    def _claim_out_dir(self, resume: bool, overwrite: bool) -> None:
        """Refuses an `out_dir` that already holds this stage unless told to continue or replace it."""
        if resume and overwrite:
            raise DistillError("give resume=True or overwrite=True, not both")
        if self.out_dir is None or resume:
            return
        metrics = MetricsLog(self.out_dir / "metrics.jsonl", self.stage)
        used = (self.ckpt_dir.is_dir() and any(self.ckpt_dir.iterdir())) or metrics.has_lines()
        if not used:
            return
        if not overwrite:
            raise DistillError(
                f"{self.out_dir} already holds training stage '{self.stage}' (checkpoints or metrics.jsonl "
                "lines); pass resume=True to continue it, overwrite=True to replace it, or another out_dir"
            )
        if dist.is_main():
            import shutil

            shutil.rmtree(self.ckpt_dir, ignore_errors=True)
            shutil.rmtree(self.out_dir / "tensorboard" / self.stage, ignore_errors=True)
            metrics.truncate_after(-1)
        dist.barrier()

    def _preflight(self) -> None:
        """Runs one batch through teacher and student before training: creates adapters from the
        real shapes, and turns shape and class-count mistakes into errors before any step."""
        try:
            raw = next(iter(self.train_loader))
        except StopIteration:
            raise DistillError("the training data yields no batch: is the dataset empty?") from None
        batch = as_batch(raw).to(self.device)
        _, s_out, _ = preflight_batch(self.task, batch, self.device)
        self._num_classes = class_count(s_out)
        self._ce_ignore = [t.ignore_index for t in label_terms(self.task.objective)]
        if self.device.type == "cuda" and self._num_classes is not None:
            for t in label_terms(self.task.objective):
                t.check_labels = False  # the trainer checks each batch's labels on the host

    def _build_mixer(self) -> Mixer | None:
        batch = as_batch(next(iter(self.train_loader))).to(self.device)
        return build_mixer(self.cfg.mix, self.task, batch, self._num_classes, self.seed)

    def _compile_student(self) -> bool:
        """`torch.compile` on the student in place (state-dict keys unchanged). Compilation
        happens at the first step; if it fails there, training continues eagerly (a warning says
        why). Returns whether the student is now compiled."""
        try:
            self.task.student.compile()
        except Exception as e:  # noqa: BLE001 - compile is an optimisation, never a requirement
            _warn(f"torch.compile is unavailable ({type(e).__name__}: {e}); training eagerly")
            return False
        return True

    def _uncompile(self, e: Exception) -> None:
        self.task.student._compiled_call_impl = None
        self._compile_pending = False
        self.optimizer.zero_grad(set_to_none=True)
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        _warn(f"torch.compile failed on the student ({type(e).__name__}: {first}); training eagerly")

    def _host_label_check(self, batch: Batch) -> None:
        """On CUDA, checks class labels on the host copy of the batch (free) instead of on the
        device (a sync per step); the ce term then skips its own check."""
        n = self._num_classes
        t = batch.targets
        if n is None or not isinstance(t, Tensor) or t.device.type != "cpu" or t.is_floating_point():
            return
        for ignore in self._ce_ignore:
            bad = (t != ignore) & ((t < 0) | (t >= n))
            if bad.any():
                i = int(bad.reshape(-1).nonzero()[0, 0])
                raise DistillError(
                    f"label {int(t.reshape(-1)[i])} is out of range for {n} classes "
                    f"(at position {i} of the batch)"
                )

    def _guard(self, loss: Tensor, batch: Batch, i: int) -> None:
        """NaN/Inf guard. On CPU the check is immediate. On CUDA `if not isfinite(loss)` would stall
        the host every step, so the flag is copied to pinned memory asynchronously and read a few
        steps later (or before any checkpoint or log line): training stops at most 4 steps after
        the bad one, and no checkpoint is ever written from unchecked steps."""
        where = f"epoch {self.epoch}, batch {i} (step {self.progress.step})"
        if not self._flags:
            if not torch.isfinite(loss):
                self._diverged(loss.detach(), batch, where)
            return
        if len(self._pending) == len(self._flags):
            self._check_pending(block=True, keep=len(self._flags) - 1)
        flag = self._flags[self._n_flag % len(self._flags)]
        self._n_flag += 1
        flag.copy_(torch.isfinite(loss.detach()), non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._pending.append((flag, event, loss.detach(), batch, where))
        self._check_pending(block=False)

    def _check_pending(self, block: bool = True, keep: int = 0) -> None:
        while len(self._pending) > keep:
            flag, event, loss, batch, where = self._pending[0]
            if not block and not event.query():
                return
            event.synchronize()
            self._pending.pop(0)
            if not bool(flag):
                self._pending.clear()
                self._diverged(loss, batch, where)

    def _autocast(self):
        if self.cfg.precision == "fp32":
            return nullcontext()
        dtype = torch.bfloat16 if self.cfg.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    # ---------------------------------------------------------------- checkpoints

    def _states(self, optimizer: bool = True) -> tuple[dict, dict, dict | None]:
        """(student, objective, optimizer) state dicts; under FSDP2 gathered in full onto rank 0
        (a collective: every rank must call it)."""
        if not self.sharded:
            return (
                self.task.student.state_dict(),
                self.task.objective.state_dict(),
                self.optimizer.state_dict() if optimizer else None,
            )
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_sd, optim_sd = get_state_dict(self.task, self.optimizer if optimizer else [], options=opts)
        student = {k[len("student.") :]: v for k, v in model_sd.items() if k.startswith("student.")}
        objective = {k[len("objective.") :]: v for k, v in model_sd.items() if k.startswith("objective.")}
        return student, objective, optim_sd if optimizer else None

    def student_state_dict(self) -> dict[str, Tensor]:
        """The student's full weights (under FSDP2 a collective; complete on rank 0)."""
        return self._states(optimizer=False)[0]

    def state(self) -> dict[str, Any]:
        student, objective, optim = self._states()
        return {
            "model": student,
            "objective": objective,
            "optimizer": optim,
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(),
            "position": {"epoch": self.epoch, "batch": self.batch_in_epoch, "step": self.progress.step},
            "progress_metrics": dict(self.progress.metrics),
            "schedules": self.task.objective.schedule_state(),
            "best": self.best,
            "history": self.history,
        }

    def save_checkpoint(self, which: str = "last") -> None:
        self._check_pending()  # never save weights from steps whose loss is unchecked
        if self.ckpt_dir is None or (not dist.is_main() and not self.sharded):
            return
        state = self.state() if which == "last" else self.student_state_dict()  # collective under FSDP2
        if not dist.is_main():
            return
        if which == "last":
            save_state(self.ckpt_dir / "last.safetensors", state)
        else:
            save_weights(
                self.ckpt_dir / f"{which}.safetensors",
                state,
                {"stage": self.stage, "step": str(self.progress.step)},
            )

    def resume(self) -> bool:
        path = self.ckpt_dir / "last.safetensors" if self.ckpt_dir else None
        if path is None or not path.exists():
            self.metrics.truncate_after(-1)  # lines of a start that never checkpointed
            return False
        state = load_state(path)
        try:
            if self.sharded:
                from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

                full = {f"student.{k}": v for k, v in state["model"].items()}
                full.update({f"objective.{k}": v for k, v in state["objective"].items()})
                set_state_dict(
                    self.task,
                    self.optimizer,
                    model_state_dict=full,
                    optim_state_dict=state["optimizer"],
                    options=StateDictOptions(full_state_dict=True),
                )
            else:
                self.task.student.load_state_dict(state["model"])
                self.task.objective.load_state_dict(state["objective"])
        except RuntimeError as e:
            raise CheckpointError(
                f"{path} does not fit this student/objective: {str(e).splitlines()[0]}"
            ) from e
        if not self.sharded:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        pos = state["position"]
        self.epoch, self.batch_in_epoch = int(pos["epoch"]), int(pos["batch"])
        self.progress.step = int(pos["step"])
        self.progress.metrics = dict(state.get("progress_metrics") or {})
        self.task.objective.load_schedule_state(state.get("schedules") or {})
        self.best = state.get("best")
        self.history = list(state.get("history") or [])
        set_rng_state(state["rng"])
        self.metrics.truncate_after(self.progress.step)
        return True

    # ---------------------------------------------------------------- training

    def fit(self) -> dict[str, Any]:
        """Trains to the end (or `max_steps`); returns the last evaluation's metrics."""
        cfg = self.cfg
        from distill.engine.progress import ProgressBar

        bar = ProgressBar(self.stage, total=self.total_steps, enabled=cfg.progress, done=self.progress.step)
        last_eval: dict[str, Any] = self.history[-1] if self.history else {}
        try:
            with bar:
                while self.epoch < cfg.epochs and self.progress.step < self.total_steps:
                    self._train_epoch(bar)
                    if self.epoch in cfg.keep_epochs and self.batch_in_epoch == 0:
                        self.save_checkpoint(f"epoch{self.epoch}")  # a teacher to distil from later
                    if (
                        self.epoch % cfg.eval_every == 0
                        or self.epoch >= cfg.epochs
                        or self.progress.step >= self.total_steps
                    ):
                        last_eval = self._evaluate_and_checkpoint()
                    else:
                        self.save_checkpoint("last")
                    bar.note(last_eval, epoch=self.epoch, epochs=cfg.epochs)
        finally:
            if self._tb is not None:
                self._tb.close()
        return last_eval

    def _train_epoch(self, bar) -> None:
        cfg = self.cfg
        model = self.model
        model.train()
        start = self.batch_in_epoch
        data = self.train_loader.dataset
        data = data.dataset if isinstance(data, GuardedDataset) else data
        if hasattr(data, "set_epoch"):  # a dataset whose items depend on the epoch (MixedViews)
            data.set_epoch(self.epoch)
        if self.sampler is not None:
            self.sampler.set_epoch(self.epoch, start * self.train_loader.batch_size)
            self.train_loader.generator.manual_seed(self.seed * 7_919 + self.epoch)
            batches = enumerate(self.train_loader, start=start)
        else:
            batch_sampler = getattr(self.train_loader, "batch_sampler", None)
            if hasattr(batch_sampler, "set_epoch"):  # a custom batch sampler that orders by epoch
                batch_sampler.set_epoch(self.epoch)
            batches = ((i, b) for i, b in enumerate(self.train_loader) if i >= start)
        n_batches = start + (
            len(self.train_loader) if self.sampler is not None else len(self.train_loader) - start
        )
        running: dict[str, float] = {}
        count = 0
        t0 = time.perf_counter()
        position = {"i": start}
        batches = guarded_batches(batches, lambda: f"epoch {self.epoch}, batch {position['i']}")
        for i, raw in batches:
            position["i"] = i + 1
            batch = as_batch(raw)
            if self._flags:
                self._host_label_check(batch)
            batch = batch.to(self.device, non_blocking=True)
            if self.batch_hook is not None:
                batch = self.batch_hook(batch, self.epoch, i)
            if self.mixer is not None:  # before both models: the teacher sees the mixed batch too
                batch = self.mixer(batch, self.epoch, i)
            if cfg.channels_last and isinstance(batch.inputs, Tensor) and batch.inputs.dim() == 4:
                batch.inputs = batch.inputs.contiguous(memory_format=torch.channels_last)
            try:
                with self._autocast():
                    losses, _, _ = model(batch)
                loss = losses["loss"]
                self._guard(loss, batch, i)
                self.scaler.scale(loss / cfg.grad_accum).backward()
            except (DistillError, KeyboardInterrupt):
                raise
            except Exception as e:
                if not self._compile_pending:
                    raise
                self._uncompile(e)  # compilation failed at its first use: redo this step eagerly
                with self._autocast():
                    losses, _, _ = model(batch)
                loss = losses["loss"]
                self._guard(loss, batch, i)
                self.scaler.scale(loss / cfg.grad_accum).backward()
            self._compile_pending = False
            for k, v in losses.items():
                running[k] = running.get(k, 0.0) + v.detach()
            count += 1
            boundary = (i + 1) % cfg.grad_accum == 0 or i + 1 == n_batches
            if not boundary:
                continue
            if cfg.clip_grad_norm:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.task.parameters(), cfg.clip_grad_norm)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            self.progress.step += 1
            self.batch_in_epoch = i + 1
            values = self.task.objective.update(self.progress)
            logged = None
            if self.progress.step % cfg.log_every == 0 or self.batch_in_epoch == n_batches:
                self._check_pending()
                rec = {k: float(v) / count for k, v in running.items()}
                rec.update(values)
                # every rank logs the same steps, so this collective lines up across ranks
                rec = dist.all_reduce_mean(rec, self.device)
                rec.update(
                    step=self.progress.step,
                    epoch=self.epoch,
                    split="train",
                    lr=self.optimizer.param_groups[0]["lr"],
                    samples_per_s=count
                    * _batch_size(batch)
                    * dist.world_size()
                    / max(time.perf_counter() - t0, 1e-9),
                )
                self._log(rec)
                logged = rec.get("loss")
                running, count, t0 = {}, 0, time.perf_counter()
            bar.advance(logged)
            if cfg.checkpoint_every and self.progress.step % cfg.checkpoint_every == 0:
                self.save_checkpoint("last")
            if self.progress.step >= self.total_steps and self.batch_in_epoch < n_batches:
                self._check_pending()
                return  # max_steps reached mid-epoch
        self._check_pending()
        self.epoch += 1
        self.batch_in_epoch = 0

    def _diverged(self, loss: Tensor, batch: Batch, where: str) -> None:
        cause = ""
        x = batch.inputs
        if isinstance(x, Tensor) and x.is_floating_point() and not torch.isfinite(x).all():
            bad = (~torch.isfinite(x.reshape(x.shape[0], -1))).any(1).nonzero()[:, 0]
            idx = batch.index[bad].tolist() if batch.index is not None else bad.tolist()
            cause = f"; the inputs hold NaN/Inf (samples {idx[:5]})"
        kept = " the last good checkpoint is kept;" if self.ckpt_dir is not None else ""
        raise TrainingDiverged(
            f"loss became {float(loss.detach())} at {where}{cause};{kept} lower the learning rate, "
            "enable clip_grad_norm or check the data"
        )

    def _evaluate_and_checkpoint(self) -> dict[str, Any]:
        metrics = {}
        if self.val_loader is not None:
            metrics = evaluate(
                self.task.student,
                self.val_loader,
                self.evaluator,
                self.task.student_adapter,
                self.teacher,
                self.device,
                teacher_cache=self._val_teacher,
            )
            metrics = dist.all_reduce_mean(metrics, self.device)
        rec = {"step": self.progress.step, "epoch": self.epoch, "split": "val", **metrics}
        self._log(rec)
        self.history.append(rec)
        self.progress.metrics = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}
        self.task.objective.update(self.progress)
        value = metrics.get(self.cfg.monitor)
        improved = value is not None and (
            self.best is None or (value > self.best if self.cfg.monitor_mode == "max" else value < self.best)
        )
        if improved:
            self.best = float(value)
            self.save_checkpoint("best")
        self.save_checkpoint("last")
        for cb in self.callbacks:
            hook = getattr(cb, "on_evaluate", None)
            if hook is not None:
                hook(self, rec)
        return rec

    def _log(self, rec: dict[str, Any]) -> None:
        self.metrics.write(rec)
        if not self.cfg.tensorboard or self.out_dir is None or not dist.is_main():
            return
        if self._tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self.cfg.tensorboard = False
                return
            self._tb = SummaryWriter(str(self.out_dir / "tensorboard" / self.stage))
        for k, v in rec.items():
            if isinstance(v, int | float) and k not in ("step", "epoch"):
                self._tb.add_scalar(f"{rec.get('split', 'train')}/{k}", v, rec["step"])

    def evaluate(self, data: Dataset | DataLoader) -> dict[str, Any]:
        loader, _ = make_loader(
            data, self.val_loader.batch_size if self.val_loader else 256, False, self.seed
        )
        return evaluate(
            self.task.student, loader, self.evaluator, self.task.student_adapter, self.teacher, self.device
        )


def _warn(msg: str) -> None:
    import warnings

    warnings.warn(msg, RuntimeWarning, stacklevel=3)


def _batch_size(batch: Batch) -> int:
    try:
        return batch.size
    except DistillError:
        return 1
