"""Multi-task students: a shared trunk, a head per task, each head distilled from its task's teacher.

Each batch holds one task (heads may have different label spaces). Tasks are drawn in
proportion to `n_task ** tau` (tau = 1: proportional to dataset size; tau = 0: uniform over
tasks, so small tasks are revisited more; the "temperature sampling" of multilingual and
multi-task training, e.g. Arivazhagan et al. 2019). Nothing here is a new loop: the student is a
module, the batch carries its task, the teacher is a callable that picks the task's teacher, and
the usual `ce` + `kd` terms apply.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler

from distill.errors import DistillError
from distill.outputs import Batch, Outputs
from distill.teachers import Teacher


class MultiTaskStudent(nn.Module):
    """`heads[task](trunk(x))`. Call as `model(x, task="name")`.

    Args:
        trunk: shared layers, (B, ...) -> (B, D).
        heads: task name -> head module, (B, D) -> (B, C_task).
    """

    def __init__(self, trunk: nn.Module, heads: Mapping[str, nn.Module]):
        super().__init__()
        if not heads:
            raise DistillError("a MultiTaskStudent needs at least one head")
        self.trunk = trunk
        self.heads = nn.ModuleDict(dict(heads))

    def forward(self, x: Tensor, task: str) -> Tensor:
        if task not in self.heads:
            raise DistillError(f"no head for task '{task}'; heads: {', '.join(self.heads)}")
        return self.heads[task](self.trunk(x))


class MultiTaskDataset(Dataset):
    """Several labelled datasets as one; item i is `{"inputs", "labels", "task", "index"}`.

    `task` is the task's position in `names`; `index` is the position in the combined dataset.
    """

    def __init__(self, datasets: Mapping[str, Dataset]):
        if not datasets:
            raise DistillError("a MultiTaskDataset needs at least one task")
        self.names = list(datasets)
        self.datasets = [datasets[n] for n in self.names]
        self.sizes = [len(d) for d in self.datasets]
        for n, s in zip(self.names, self.sizes):
            if s == 0:
                raise DistillError(f"task '{n}' has an empty dataset")
        self.offsets = [0]
        for s in self.sizes:
            self.offsets.append(self.offsets[-1] + s)

    def __len__(self) -> int:
        return self.offsets[-1]

    def locate(self, i: int) -> tuple[int, int]:
        for t in range(len(self.sizes)):
            if i < self.offsets[t + 1]:
                return t, i - self.offsets[t]
        raise IndexError(i)

    def __getitem__(self, i: int) -> dict[str, Any]:
        t, j = self.locate(i)
        x, y = self.datasets[t][j][:2]
        return {"inputs": x, "labels": y, "task": t, "index": i}


def task_probabilities(sizes: Iterable[int], tau: float) -> list[float]:
    """p_t = n_t^tau / Σ_s n_s^tau."""
    w = [float(n) ** tau for n in sizes]
    total = sum(w)
    return [v / total for v in w]


class TaskBatchSampler(Sampler[list[int]]):
    """Yields single-task batches of indices into a `MultiTaskDataset`.

    An epoch has as many batches as the tasks' data fill (Σ ceil(n_t / batch_size)); each batch's
    task is drawn with probability `task_probabilities(sizes, tau)`, and within a task the
    samples come from a reshuffled permutation, cycled when exhausted. Seeded per epoch
    (`set_epoch`), so an epoch's order is reproducible.
    """

    def __init__(
        self, data: MultiTaskDataset, batch_size: int, tau: float = 1.0, seed: int = 0, shuffle=True
    ):
        if batch_size <= 0:
            raise DistillError(f"batch_size must be > 0, got {batch_size}")
        if tau < 0:
            raise DistillError(f"tau must be >= 0 (1: proportional to size, 0: uniform), got {tau}")
        self.data, self.batch_size, self.tau, self.seed, self.shuffle = data, batch_size, tau, seed, shuffle
        self.probs = task_probabilities(data.sizes, tau)
        self.epoch = 0
        self._explicit_epoch = False

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self._explicit_epoch = epoch, True

    def __len__(self) -> int:
        return sum(math.ceil(n / self.batch_size) for n in self.data.sizes)

    def __iter__(self) -> Iterator[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        if not self._explicit_epoch:
            self.epoch += 1  # a fresh order next epoch when nobody calls set_epoch
        if not self.shuffle:  # evaluation: every sample once, task by task
            for t, n in enumerate(self.data.sizes):
                off = self.data.offsets[t]
                for s in range(0, n, self.batch_size):
                    yield list(range(off + s, off + min(s + self.batch_size, n)))
            return
        perms = [torch.randperm(n, generator=g).tolist() for n in self.data.sizes]
        pos = [0] * len(perms)
        tasks = torch.multinomial(torch.tensor(self.probs), len(self), replacement=True, generator=g).tolist()
        for t in tasks:
            n, off = self.data.sizes[t], self.data.offsets[t]
            batch = []
            while len(batch) < min(self.batch_size, n):
                if pos[t] == n:
                    perms[t], pos[t] = torch.randperm(n, generator=g).tolist(), 0
                batch.append(off + perms[t][pos[t]])
                pos[t] += 1
            yield batch


def task_loader(
    data: MultiTaskDataset, batch_size: int, tau: float = 1.0, seed: int = 0, shuffle: bool = True
) -> DataLoader:
    """A DataLoader of single-task batches (see `TaskBatchSampler`)."""
    return DataLoader(data, batch_sampler=TaskBatchSampler(data, batch_size, tau, seed, shuffle))


def _task_of(batch: Batch, names: list[str]) -> str:
    raw = batch.raw
    t = raw.get("task") if isinstance(raw, Mapping) else None
    if t is None:
        raise DistillError("a multi-task batch must carry its task (use MultiTaskDataset + task_loader)")
    t = t.reshape(-1) if isinstance(t, Tensor) else torch.as_tensor(t).reshape(-1)
    if not bool((t == t[0]).all()):
        raise DistillError("a multi-task batch mixes tasks: draw batches with TaskBatchSampler")
    return names[int(t[0])]


def task_adapter(names: list[str]):
    """The student adapter: calls `model(inputs, task=<the batch's task>)`."""

    def adapter(model: nn.Module, batch: Batch) -> Outputs:
        return Outputs(logits=model(batch.inputs, task=_task_of(batch, names)))

    return adapter


def fixed_task_adapter(model: nn.Module, batch: Batch, task: str) -> Outputs:
    return Outputs(logits=model(batch.inputs, task=task))


class TaskTeachers:
    """One teacher per task, called like a `Teacher`: each batch goes to its task's teacher.

    Args:
        teachers: task name -> `Teacher` or `nn.Module`.
        names: the task order of the `MultiTaskDataset` (defaults to the mapping's order).
    """

    def __init__(self, teachers: Mapping[str, Teacher | nn.Module], names: list[str] | None = None):
        self.names = list(names or teachers)
        missing = [n for n in self.names if n not in teachers]
        if missing:
            raise DistillError(f"no teacher for task(s) {', '.join(missing)}")
        self.teachers = {n: t if isinstance(t, Teacher) else Teacher(t) for n, t in teachers.items()}

    def to(self, device) -> TaskTeachers:
        for t in self.teachers.values():
            t.to(device)
        return self

    def add_taps(self, paths: Iterable[str]) -> None:
        for t in self.teachers.values():
            t.add_taps(paths)

    def __call__(self, batch: Batch) -> Outputs:
        return self.teachers[_task_of(batch, self.names)](batch)


@torch.no_grad()
def evaluate_tasks(
    student: MultiTaskStudent,
    val_sets: Mapping[str, Dataset],
    teachers: TaskTeachers | None = None,
    batch_size: int = 256,
) -> dict[str, dict[str, float]]:
    """Per-task metrics (accuracy, nll, agreement with that task's teacher) on each task's data."""
    from distill.engine.evaluate import evaluate

    device = next(student.parameters()).device
    out = {}
    for name, ds in val_sets.items():
        loader = DataLoader(ds, batch_size=batch_size)
        teacher = teachers.teachers[name] if teachers is not None else None
        out[name] = evaluate(student, loader, None, partial(fixed_task_adapter, task=name), teacher, device)
    return out


__all__ = [
    "MultiTaskDataset",
    "MultiTaskStudent",
    "TaskBatchSampler",
    "TaskTeachers",
    "evaluate_tasks",
    "task_adapter",
    "task_loader",
    "task_probabilities",
]
