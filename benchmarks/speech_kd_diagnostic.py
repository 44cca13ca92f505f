"""Why speech distillation loses (issue 31; docs/speech.md, "Why it loses"): plain loops over the
library's speech models and `kd_loss`, on the validation split only (never the test split).

Stages, each a separate call (results and caches in $SPEECH_DIAG_DIR, default runs/speech_kd_diag;
$SPEECH_DIAG_STRIDE: every n-th transfer clip, default 4, 1 for all; the transfer clips are
3,744 by the labelled set's training voices, or with $SPEECH_DIAG_NEW_VOICES=1 the recipe's
3,888 by voices the labelled set does not have):
  data      the labelled set and the transfer clips (every $SPEECH_DIAG_STRIDE-th), as tensors
  teacher   the recipe's teacher (SpeechCNN width 32, cosine over 16 epochs), best val kept;
            `--stop-after N` stops after epoch N (the docs' table: 6, the CPU was taken)
  logits    the teacher's logits on the training and transfer clips, and its confidence there
  student   one student per JSON spec, e.g. '{"name": "kd_T1", "transfer": true, "T": 1.0}'

    OMP_NUM_THREADS=1 python benchmarks/speech_kd_diagnostic.py data
    OMP_NUM_THREADS=1 python benchmarks/speech_kd_diagnostic.py teacher --stop-after 6
    OMP_NUM_THREADS=1 python benchmarks/speech_kd_diagnostic.py logits
    OMP_NUM_THREADS=1 python benchmarks/speech_kd_diagnostic.py student '{"name": "scratch", "ce": 1.0, "kd": 0}' \
        '{"name": "kd_transfer_T2", "transfer": true}' '{"name": "kd_transfer_T1", "transfer": true, "T": 1.0}'
"""

import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from distill.data.speech import speech_data
from distill.engine.trainer import seed_everything
from distill.losses.logits import kd_loss
from distill.models.speech import DSCNN, SpeechCNN
from distill.run.config import load_yaml

torch.set_num_threads(1)
W = Path(os.environ.get("SPEECH_DIAG_DIR", "runs/speech_kd_diag"))
# SPEECH_DIAG_NEW_VOICES: the transfer set of recipes/speech_digits_transfer.yaml (espeak-ng variants
# outside distill.data.speech.VOICES: no labelled, val or test voice), built from the recipe's own arguments
RECIPE_TRANSFER = load_yaml(Path(__file__).resolve().parents[1] / "recipes" / "speech_digits_transfer.yaml")[
    "data"
]["transfer"]["init_args"]
SHIFTS = [0]  # teacher at the unshifted clip only (CPU-starved run); students still shift ±8


def tensors(ds, limit=None):
    xs, ys = [], []
    shift, ds.time_shift = getattr(ds, "time_shift", 0), 0
    for i in range(len(ds)):
        x, y = ds[i]
        xs.append(x)
        ys.append(int(y))
    ds.time_shift = shift
    return torch.stack(xs), torch.tensor(ys)


def load():
    path = W / "data.safetensors"
    if path.exists():
        return load_file(path)
    d = speech_data(clips_per_voice=2, n_mels=40, time_shift=10)
    if os.environ.get("SPEECH_DIAG_NEW_VOICES"):  # transfer clips by voices the labelled set never has
        tr = speech_data(**RECIPE_TRANSFER)
    else:
        tr = speech_data(clips_per_voice=8, synth_seed=1, split_seed=0, splits=["train"], time_shift=10)
    out = {}
    out["xtr"], out["ytr"] = tensors(d.train)
    out["xva"], out["yva"] = tensors(d.val)
    out["xtf"], out["ytf"] = tensors(tr.train)  # ytf: the true words, for diagnosis only
    W.mkdir(parents=True, exist_ok=True)
    save_file(out, path)
    return out


def lr_at(step, total, warmup=0.05):
    t = step / total
    if t < warmup:
        return (step + 1) / max(warmup * total, 1)
    a = (t - warmup) / (1 - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(a, 1.0)))


def evaluate(model, x, y):
    model.eval()
    with torch.no_grad():
        z = torch.cat([model(x[i : i + 256]) for i in range(0, len(x), 256)])
    model.train()
    return (z.argmax(-1) == y).float().mean().item(), z


def train_teacher(D, stop_after: int = 16):
    seed_everything(0)
    m = SpeechCNN(width=32)
    opt = torch.optim.AdamW(m.parameters(), lr=0.003, weight_decay=0.001)
    n = len(D["xtr"])
    per_epoch = math.ceil(n / 64)
    total = 16 * per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, total))
    best, g = -1, torch.Generator().manual_seed(0)
    for ep in range(stop_after):
        perm = torch.randperm(n, generator=g)
        for b in range(per_epoch):
            idx = perm[b * 64 : (b + 1) * 64]
            x = shift_batch(D["xtr"][idx], g)
            loss = F.cross_entropy(m(x), D["ytr"][idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        acc, _ = evaluate(m, D["xva"], D["yva"])
        print(f"teacher epoch {ep + 1} val {acc:.4f}", flush=True)
        if acc > best:
            best = acc
            save_file(m.state_dict(), W / "teacher.safetensors")


def shift_batch(x, g):
    s = torch.randint(-10, 11, (len(x),), generator=g)
    return torch.stack([torch.roll(xi, int(si), dims=-1) for xi, si in zip(x, s, strict=True)])


def teacher_logits(D):
    m = SpeechCNN(width=32)
    m.load_state_dict(load_file(W / "teacher.safetensors"))
    m.eval()
    out = {}
    with torch.no_grad():
        for key in ("xtr", "xtf"):
            out[key] = torch.stack(
                [
                    torch.cat(
                        [m(torch.roll(D[key][i : i + 256], s, dims=-1)) for i in range(0, len(D[key]), 256)]
                    )
                    for s in SHIFTS
                ]
            )  # (S, N, C)
            print(key, "done", flush=True)
        acc_va, zva = evaluate(m, D["xva"], D["yva"])
    z0 = out["xtf"][SHIFTS.index(0)]
    p = z0.softmax(-1)
    facts = {
        "teacher_val": acc_va,
        "teacher_acc_on_transfer_true_words": (z0.argmax(-1) == D["ytf"]).float().mean().item(),
        "teacher_acc_on_train": (out["xtr"][SHIFTS.index(0)].argmax(-1) == D["ytr"]).float().mean().item(),
        "teacher_top1_prob_transfer": p.max(-1).values.mean().item(),
        "teacher_top1_prob_T2_transfer": (z0 / 2).softmax(-1).max(-1).values.mean().item(),
        "teacher_logit_gap_mean": (z0.topk(2).values[:, 0] - z0.topk(2).values[:, 1]).mean().item(),
    }
    print(json.dumps(facts), flush=True)
    save_file(out, W / "tlogits.safetensors")


def train_student(
    D,
    TL,
    name,
    steps=240,
    width=32,
    blocks=3,
    ce=0.5,
    kd=0.5,
    T=2.0,
    transfer=False,
    seed=0,
    lr=0.005,
    transfer_labels=False,
):
    seed_everything(seed)
    m = DSCNN(width=width, blocks=blocks)
    opt = torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.001)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, steps))
    x_all, y_all, z_all = D["xtr"], D["ytr"], TL["xtr"]
    if transfer:
        x_all = torch.cat([x_all, D["xtf"]])
        # (transfer_labels: the true words of the transfer clips, for diagnosis only: how much
        # the clips themselves teach when perfectly labelled)
        y_all = torch.cat([y_all, D["ytf"] if transfer_labels else torch.full((len(D["xtf"]),), -100)])
        z_all = torch.cat([z_all, TL["xtf"]], dim=1)
    n, g = len(x_all), torch.Generator().manual_seed(seed)
    step, t0, log = 0, time.perf_counter(), []
    while step < steps:
        perm = torch.randperm(n, generator=g)
        for b in range(0, n, 64):
            if step >= steps:
                break
            idx = perm[b : b + 64]
            si = torch.randint(0, len(SHIFTS), (len(idx),), generator=g)
            x = shift_batch(x_all[idx], g)
            y, zt = y_all[idx], z_all[si, idx]
            zs = m(x)
            lab = y != -100
            loss = torch.zeros(())
            if ce:
                loss = loss + ce * (
                    F.cross_entropy(zs, y, ignore_index=-100, reduction="sum") / lab.sum().clamp_min(1)
                )
            if kd:
                loss = loss + kd * kd_loss(zs, zt, T)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step % 60 == 0 or step == steps:
                acc, _ = evaluate(m, D["xva"], D["yva"])
                log.append((step, round(acc, 4), round(loss.item(), 3)))
    acc, z = evaluate(m, D["xva"], D["yva"])
    _, ztr = evaluate(m, D["xtr"], D["ytr"])
    agree = (ztr.argmax(-1) == TL["xtr"][SHIFTS.index(0)].argmax(-1)).float().mean().item()
    rec = {
        "name": name,
        "val": acc,
        "train_agree": agree,
        "steps": steps,
        "width": width,
        "ce": ce,
        "kd": kd,
        "T": T,
        "transfer": transfer,
        "transfer_labels": transfer_labels,
        "seed": seed,
        "lr": lr,
        "curve": log,
        "s": round(time.perf_counter() - t0),
    }
    print(json.dumps(rec), flush=True)
    with open(W / "results.jsonl", "a") as f:
        f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    D = load()
    stride = int(os.environ.get("SPEECH_DIAG_STRIDE", "4"))  # 4: 936 of the 3,744 transfer clips; 1: all
    D["xtf"], D["ytf"] = D["xtf"][::stride], D["ytf"][::stride]
    what = sys.argv[1]
    if what == "data":
        print({k: tuple(v.shape) for k, v in D.items()})
    elif what == "teacher":
        train_teacher(D, int(sys.argv[3]) if sys.argv[2:3] == ["--stop-after"] else 16)
    elif what == "logits":
        teacher_logits(D)
    else:
        TL = load_file(W / "tlogits.safetensors")
        for spec in sys.argv[2:]:
            kw = json.loads(spec)
            train_student(D, TL, **kw)
