"""Time per training step: student alone, teacher inference alone, and a distillation step.

The limit for online distillation is student step + teacher inference; distill's step should not
cost more. Prints the ratio distillation / (student + teacher) per model pair (target <= 1.05).
Steps are timed interleaved (student, teacher, distill, student, ...) so machine noise hits all
three alike; the medians are compared.

    python benchmarks/step_overhead.py                 # CPU, demo pair + resnet32x4 -> resnet8x4
    python benchmarks/step_overhead.py --device cuda --batch 256
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from distill import KD, CrossEntropy, Objective, Teacher
from distill.engine.trainer import DistillTask
from distill.models import MLP, SmallCNN
from distill.outputs import Batch


def pairs():
    from distill.models.cifar import resnet8x4, resnet32x4

    yield "digits cnn -> mlp (8x8)", SmallCNN(channels=(32, 64, 128)), MLP(hidden=(128,)), (1, 8, 8), 10
    yield (
        "resnet32x4 -> resnet8x4 (32x32)",
        resnet32x4(num_classes=100),
        resnet8x4(num_classes=100),
        (3, 32, 32),
        100,
    )


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"device={device} batch={args.batch} steps={args.steps} (medians, ms per step)")
    print("| pair | student step | teacher inference | distill step | distill / (student + teacher) |")
    print("|---|---:|---:|---:|---:|")
    for name, teacher_model, student_model, shape, classes in pairs():
        med = measure_pair(teacher_model, student_model, shape, classes, args, device)
        ratio = med["distill"] / (med["student"] + med["teacher"])
        print(
            f"| {name} | {med['student']:.2f} | {med['teacher']:.2f} | {med['distill']:.2f} | {ratio:.3f} |"
        )


def measure_pair(teacher_model, student_model, shape, classes, args, device) -> dict[str, float]:
    """Median ms of a student step, a teacher forward and a distillation step, timed interleaved."""
    torch.manual_seed(0)
    x = torch.randn(args.batch, *shape, device=device)
    y = torch.randint(0, classes, (args.batch,), device=device)
    batch = Batch(inputs=x, targets=y)
    teacher = Teacher(teacher_model.to(device))
    plain = DistillTask(student_model.to(device), Objective({"ce": CrossEntropy()}))
    kd = DistillTask(
        student_model,
        Objective({"ce": CrossEntropy(), "kd": KD(temperature=4)}, {"ce": 0.5, "kd": 0.5}),
        teacher,
    )
    opt = torch.optim.SGD(student_model.parameters(), lr=1e-3, momentum=0.9)

    def step(task):
        losses, _, _ = task(batch)
        losses["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    fns = {"student": lambda: step(plain), "teacher": lambda: teacher(batch), "distill": lambda: step(kd)}
    for _ in range(args.warmup):
        for f in fns.values():
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(args.steps):
        for k, f in fns.items():
            times[k].append(timed(f, device))
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


if __name__ == "__main__":
    main()
