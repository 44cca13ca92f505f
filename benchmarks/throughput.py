"""Distillation throughput, images/s, on synthetic data (same run, same machine, same batches).

Rows per teacher -> student pair:
  student alone        the student's own training step (CE), fastest settings of this run
  teacher inference    the frozen teacher's forward pass, fastest settings of this run
  limit                1 / (1/student + 1/teacher): an online distillation step cannot beat it
  plain fp32 KD loop   a hand-written loop: fp32, teacher under no_grad, KL + CE, SGD
  distill online       distill.engine.trainer.Trainer with a live Teacher (ce + kd terms)
  distill cached       the same Trainer reading the teacher's outputs from a distill.teachers.store store
  torchdistill         only if installed (it is skipped otherwise)
and the ratios online/limit and cached/student-alone.

Batches are made once and kept on the device, so the numbers measure the training step, not a
data pipeline. CPU defaults are tiny so that it finishes in minutes on two cores; use
`--device cuda` (or benchmarks/gpu_check.sh) for GPU-sized runs.

    python benchmarks/throughput.py                       # CPU, small
    python benchmarks/throughput.py --device cuda --compile
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, SequentialSampler

# --------------------------------------------------------------------------- models


def cifar_pair(classes: int = 100):
    from distill.models.cifar import resnet8x4, resnet32x4

    return (lambda: resnet32x4(num_classes=classes)), (lambda: resnet8x4(num_classes=classes)), 32, classes


def imagenet_pair(classes: int = 1000):
    from torchvision.models import resnet18, resnet34

    return (lambda: resnet34(num_classes=classes)), (lambda: resnet18(num_classes=classes)), 224, classes


PAIRS = {"resnet32x4-resnet8x4": cifar_pair, "resnet34-resnet18": imagenet_pair}


# --------------------------------------------------------------------------- data


class Batches(Dataset):
    """`n` items, item i = pre-made batch i % k (already on the device) + its host-side index."""

    def __init__(self, xs, ys, n):
        self.xs, self.ys, self.n = xs, ys, n
        b = xs[0].shape[0]
        self.idx = [torch.arange(k * b, (k + 1) * b) for k in range(len(xs))]

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        k = i % len(self.xs)
        return self.xs[k], self.ys[k], self.idx[k]


def loader(batches: Batches) -> DataLoader:
    # batch_size=None: items are whole batches; a custom sampler: the Trainer uses it as given.
    class Seq(SequentialSampler):
        pass

    return DataLoader(batches, batch_size=None, sampler=Seq(batches))


# --------------------------------------------------------------------------- timing


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def warmed(step, n_warmup):
    """Runs `step` n_warmup times; returns a runner `run(n)` doing n more steps."""
    for _ in range(n_warmup):
        step()

    def run(n):
        for _ in range(n):
            step()

    return run


def measure(runners, a, device, batch):
    """images/s per runner: `a.rounds` rounds of `a.steps` steps each, the runners interleaved
    (in a rotating order) so that machine noise hits every row alike; the median round counts."""
    rates = {name: [] for name in runners}
    names = list(runners)
    for r in range(a.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            sync(device)
            t0 = time.perf_counter()
            runners[name](a.steps)
            sync(device)
            rates[name].append(a.steps * batch / (time.perf_counter() - t0))
    return {name: statistics.median(v) for name, v in rates.items()}


def autocast(device, precision):
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def prep(model, device, channels_last):
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def student_alone(make, xs, ys, a, device):
    torch.manual_seed(0)
    model = prep(make(), device, a.channels_last).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    fwd = torch.compile(model) if a.compile else model
    it = [0]

    def step():
        x, y = xs[it[0] % len(xs)], ys[it[0] % len(ys)]
        it[0] += 1
        if a.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, a.precision):
            loss = F.cross_entropy(fwd(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return warmed(step, a.warmup)


def teacher_inference(make, xs, a, device):
    torch.manual_seed(1)
    model = prep(make(), device, a.channels_last).eval().requires_grad_(False)
    if a.precision != "fp32":
        model = model.to(torch.bfloat16 if a.precision == "bf16" else torch.float16)
    fwd = torch.compile(model) if a.compile else model
    it = [0]

    def step():
        x = xs[it[0] % len(xs)]
        it[0] += 1
        if a.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            fwd(x.to(next(model.parameters()).dtype))

    return warmed(step, a.warmup)


def plain_kd_loop(make_t, make_s, xs, ys, a, device, temperature=4.0):
    torch.manual_seed(1)
    teacher = make_t().to(device).eval()
    torch.manual_seed(0)
    student = make_s().to(device).train()
    opt = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)
    it = [0]

    def step():
        x, y = xs[it[0] % len(xs)], ys[it[0] % len(ys)]
        it[0] += 1
        with torch.no_grad():
            t = teacher(x)
        s = student(x)
        kl = F.kl_div(F.log_softmax(s / temperature, 1), F.softmax(t / temperature, 1), reduction="batchmean")
        loss = 0.5 * F.cross_entropy(s, y) + 0.5 * kl * temperature**2
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return warmed(step, a.warmup)


def distill_run(make_t, make_s, xs, ys, a, device, store=None):
    from distill.engine.trainer import Trainer
    from distill.losses.logits import KD, CrossEntropy
    from distill.objective import Objective
    from distill.teachers import Teacher
    from distill.teachers.store import CachedTeacher

    torch.manual_seed(1)
    t_model = make_t()
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[a.precision]
    teacher = Teacher(t_model.to(device), dtype=dtype, compile=a.compile)
    if store is not None:
        teacher = CachedTeacher(store)
    torch.manual_seed(0)
    student = make_s()
    obj = Objective({"ce": CrossEntropy(), "kd": KD(4.0)}, {"ce": 0.5, "kd": 0.5})
    tr = Trainer(
        student,
        obj,
        loader(Batches(xs, ys, a.warmup + a.rounds * a.steps)),
        teacher=teacher,
        device=str(device),
        precision=a.precision,
        channels_last=a.channels_last,
        compile=a.compile,
        epochs=1,
        max_steps=a.warmup,
        log_every=10**9,
        progress="off",
        tensorboard=False,
        optimizer={"name": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 0.0},
        lr_schedule={"name": "constant"},
    )
    tr.fit()  # warm-up steps (and compilation)

    def run(n):
        tr.total_steps = tr.progress.total_steps = tr.progress.step + n
        tr.fit()

    return run


def write_cache(make_t, xs, ys, a, device, folder):
    from torch.utils.data import TensorDataset

    from distill.teachers import Teacher
    from distill.teachers.store import write_store

    torch.manual_seed(1)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[a.precision]
    teacher = Teacher(make_t().to(device), dtype=dtype)
    ds = TensorDataset(torch.cat([x.cpu() for x in xs]), torch.cat([y.cpu() for y in ys]))
    t0 = time.perf_counter()
    info = write_store(teacher, ds, folder, batch_size=xs[0].shape[0], device=device, log=None)
    return info, len(ds) / (time.perf_counter() - t0)


def torchdistill_row():
    try:
        import torchdistill  # noqa: F401
    except ImportError:
        return None
    return "installed, but no runner wired in this benchmark"


# --------------------------------------------------------------------------- main


def run_pair(name, a, device):
    make_t, make_s, size, classes = PAIRS[name]()
    batch = a.batch_size or (
        32 if device.type == "cpu" and size == 32 else 8 if device.type == "cpu" else 256
    )
    g = torch.Generator().manual_seed(0)
    k = a.distinct_batches
    xs = [torch.randn(batch, 3, size, size, generator=g).to(device) for _ in range(k)]
    ys = [torch.randint(0, classes, (batch,), generator=g).to(device) for _ in range(k)]
    r = {
        "pair": name,
        "batch": batch,
        "image": size,
        "device": str(device),
        "precision": a.precision,
        "channels_last": a.channels_last,
        "compile": a.compile,
        "steps": a.steps,
        "rounds": a.rounds,
    }
    print(
        f"\n== {name}: batch {batch}, {size}x{size}, {a.precision}, channels_last={a.channels_last}, "
        f"compile={a.compile}; median of {a.rounds} interleaved rounds of {a.steps} steps, "
        f"after {a.warmup} warm-up steps",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        info, write_rate = write_cache(make_t, xs, ys, a, device, Path(tmp) / "store")
        runners = {
            "student_alone": student_alone(make_s, xs, ys, a, device),
            "teacher_inference": teacher_inference(make_t, xs, a, device),
            "plain_fp32_kd": plain_kd_loop(make_t, make_s, xs, ys, a, device),
            "distill_online": distill_run(make_t, make_s, xs, ys, a, device),
            "distill_cached": distill_run(make_t, make_s, xs, ys, a, device, store=Path(tmp) / "store"),
        }
        r.update(measure(runners, a, device, batch))
    r["limit"] = 1 / (1 / r["student_alone"] + 1 / r["teacher_inference"])
    r["cache_write"] = write_rate
    r["cache_bytes_per_sample"] = info.bytes_per_sample
    for key, label in [
        ("student_alone", "student alone"),
        ("teacher_inference", "teacher inference"),
        ("limit", "limit"),
        ("plain_fp32_kd", "plain fp32 KD loop"),
        ("distill_online", "distill online"),
        ("distill_cached", "distill cached"),
    ]:
        print(f"  {label:20s}{r[key]:10.1f} img/s", flush=True)
    print(f"  (store {info.bytes_per_sample:.0f} B/sample, written at {write_rate:.0f} img/s)")
    td = torchdistill_row()
    print(f"  torchdistill        {'not installed (skipped)' if td is None else td}")
    r["online_over_limit"] = r["distill_online"] / r["limit"]
    r["cached_over_student"] = r["distill_cached"] / r["student_alone"]
    r["online_over_plain"] = r["distill_online"] / r["plain_fp32_kd"]
    print(
        f"  online / limit = {r['online_over_limit']:.3f}   cached / student alone = "
        f"{r['cached_over_student']:.3f}   online / plain = {r['online_over_plain']:.2f}",
        flush=True,
    )
    return r


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--pairs", default=",".join(PAIRS), help=f"comma list of {', '.join(PAIRS)}")
    p.add_argument("--batch-size", type=int, default=None, help="default: 32 / 8 on CPU, 256 on GPU")
    p.add_argument("--steps", type=int, default=None, help="timed steps per round (default 3 CPU, 50 GPU)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3 CPU, 5 GPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2 / 15)")
    p.add_argument("--distinct-batches", type=int, default=2)
    p.add_argument(
        "--precision", choices=["fp32", "bf16", "fp16"], default=None, help="default fp32 CPU, bf16 GPU"
    )
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--compile", action="store_true", help="torch.compile student and teacher (all rows)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", default=None, help="also write the results here")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    gpu = device.type == "cuda"
    a.steps = a.steps or (50 if gpu else 3)
    a.rounds = a.rounds or (5 if gpu else 3)
    a.warmup = a.warmup or (15 if gpu else 2)
    a.precision = a.precision or ("bf16" if gpu else "fp32")
    a.channels_last = gpu if a.channels_last is None else a.channels_last
    if a.threads:
        torch.set_num_threads(a.threads)
    if gpu:
        torch.backends.cudnn.benchmark = True
        print(f"device: {torch.cuda.get_device_name(device)}; torch {torch.__version__}")
    else:
        print(f"device: cpu, {torch.get_num_threads()} threads; torch {torch.__version__}")
    results = [run_pair(name.strip(), a, device) for name in a.pairs.split(",") if name.strip()]
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))
    return 0 if all(math.isfinite(r["distill_online"]) for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
