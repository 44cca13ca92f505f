"""Peak memory of a token-level loss (forward + backward), chunked vs unchunked.

    python benchmarks/chunked_memory.py                       # B=8, T=1024, V=50257, fkl, CPU
    python benchmarks/chunked_memory.py --kinds fkl,jsd,srkl  # more divergences
    python benchmarks/chunked_memory.py --device cuda         # on a GPU

What is measured, and how:
- CUDA: `torch.cuda.max_memory_allocated()` minus the memory held after the inputs (student and
  teacher logits, mask) were created, i.e. the extra memory the loss and its backward needed.
- CPU: every variant runs in its own fresh subprocess; the number is the process's resident-set
  high-water mark (`resource.getrusage(...).ru_maxrss`) at the end of backward minus its resident
  set just after the inputs were created (filled in place, and checked that the high-water mark
  was not above the current use then, so that no setup temporary hides the peak). Large tensors are mmap'ed by the allocator and returned to
  the OS when freed, so the RSS peak is the real peak of live tensors (plus small allocator
  noise, ~10 MB). Untouched pages of a zero-filled buffer are not resident and not counted (the
  chunked gradient buffer's rows for masked tokens stay untouched). Python's tracemalloc does not see torch's allocations, so it is not used.

"Unchunked" is the straightforward formula on the whole (B, T, V) tensor in fp32 with autograd;
"chunked" is `distill.losses.sequence.token_divergence`. Both are checked to agree: the loss
within 1e-5 and the gradient (compared at 20k fixed positions and by its norm) within 1e-5.
The student logits are the ones a model would produce (float32 here); a quarter of the tokens are
masked as prompt/padding.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch


def make_inputs(b, t, v, device, dtype, seed=0):
    # Filled in place: no full-size temporary may raise the memory high-water mark before the
    # measurement starts (it would hide the loss's own peak below it).
    torch.manual_seed(seed)
    s = torch.empty(b, t, v, device=device, dtype=dtype).normal_(0, 2)
    te = torch.empty(b, t, v, device=device, dtype=dtype).normal_(0, 2)
    g = torch.Generator(device="cpu").manual_seed(seed)
    lens = torch.randint(t // 8, t // 2, (b,), generator=g)
    pos = torch.arange(t)[None, :]
    mask = (pos >= lens[:, None]).to(device)  # prompt masked
    return s, te, mask


def unchunked(kind, s, t, mask, beta=0.5, alpha=0.1):
    log_q = torch.log_softmax(s.float(), -1)
    log_p = torch.log_softmax(t.float(), -1)
    p, q = log_p.exp(), log_q.exp()
    if kind == "fkl":
        per = (p * (log_p - log_q)).sum(-1)
    elif kind == "rkl":
        per = (q * (log_q - log_p)).sum(-1)
    elif kind == "jsd":
        log_m = torch.log(beta * p + (1 - beta) * q)
        per = beta * (p * (log_p - log_m)).sum(-1) + (1 - beta) * (q * (log_q - log_m)).sum(-1)
    elif kind == "skl":
        per = (p * (log_p - torch.log(alpha * p + (1 - alpha) * q))).sum(-1)
    elif kind == "srkl":
        per = (q * (log_q - torch.log(alpha * q + (1 - alpha) * p))).sum(-1)
    elif kind == "tvd":
        per = 0.5 * (p - q).abs().sum(-1)
    else:
        raise SystemExit(f"unknown kind {kind}")
    m = mask.float()
    return (per * m).sum() / m.sum()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def run_one(args) -> dict:
    from distill.losses.sequence import token_divergence

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    s, t, mask = make_inputs(args.batch, args.seq, args.vocab, device, dtype)
    s.requires_grad_(True)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = current_rss_mb()
        # The high-water mark must not already be above the current use, or the peak is hidden.
        slack = peak_rss_mb() - base
        if slack > 64:
            raise SystemExit(f"setup left a high-water mark {slack:.0f} MB above current use")
    t0 = time.perf_counter()
    if args.variant == "chunked":
        chunk = None if args.chunk == "auto" else int(args.chunk)
        loss = token_divergence(s, t, args.kind, mask, chunk_size=chunk)
    else:
        loss = unchunked(args.kind, s, t, mask)
    loss.backward()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else peak_rss_mb() - base
    g = torch.Generator(device="cpu").manual_seed(1)
    flat = s.grad.reshape(-1)
    pick = torch.randint(0, flat.numel(), (20000,), generator=g).to(flat.device)
    return {
        "variant": args.variant,
        "kind": args.kind,
        "loss": float(loss.detach()),
        "grad_norm": float(s.grad.float().norm()),
        "grad_sample": flat[pick].float().cpu().tolist(),
        "extra_peak_mb": round(peak_mb, 1),
        "seconds": round(seconds, 2),
        "inputs_mb": round(2 * s.numel() * s.element_size() / 2**20, 1),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--chunk", default="auto", help="tokens per chunk, or auto")
    ap.add_argument("--kinds", default="fkl")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    ap.add_argument("--kind", help=argparse.SUPPRESS)
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args()
    if args.variant:  # child process: one measurement, printed as JSON
        print(json.dumps(run_one(args)))
        return 0
    rows, ok = [], True
    print(
        f"batch {args.batch}, seq {args.seq}, vocab {args.vocab}, {args.dtype} logits on {args.device}, "
        f"chunk {args.chunk} tokens; memory = extra peak over the inputs during loss + backward"
    )
    print(f"{'kind':5} {'variant':10} {'extra peak MB':>14} {'seconds':>8} {'loss':>12}")
    for kind in args.kinds.split(","):
        res = {}
        for variant in ("unchunked", "chunked"):
            cmd = [sys.executable, __file__, "--variant", variant, "--kind", kind]
            for k in ("batch", "seq", "vocab", "chunk", "device", "dtype", "threads"):
                cmd += [f"--{k}", str(getattr(args, k))]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                print(f"{kind:5} {variant:10} failed: {out.stderr.strip().splitlines()[-1:]}")
                ok = False
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            res[variant] = r
            print(
                f"{kind:5} {variant:10} {r['extra_peak_mb']:>14.1f} {r['seconds']:>8.2f} {r['loss']:>12.7f}"
            )
        if len(res) == 2:
            a, b = res["unchunked"], res["chunked"]
            dloss = abs(a["loss"] - b["loss"])
            dgrad = max(abs(x - y) for x, y in zip(a["grad_sample"], b["grad_sample"]))
            dnorm = abs(a["grad_norm"] - b["grad_norm"])
            equal = dloss <= 1e-5 and dgrad <= 1e-5 and dnorm <= 1e-5
            ok &= equal
            ratio = a["extra_peak_mb"] / max(b["extra_peak_mb"], 1e-9)
            print(
                f"      |loss diff| {dloss:.2e}, max |grad diff| {dgrad:.2e}, |grad norm diff| {dnorm:.2e}: "
                f"{'equal within 1e-5' if equal else 'NOT equal within 1e-5'}; memory ratio {ratio:.1f}x"
            )
            for r in (a, b):
                r.pop("grad_sample")
            rows += [a, b]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
