"""How far KD against a top-k teacher store is from KD against full logits (synthetic logits).

Teacher logits: Gaussian (std 2) over C classes plus +8 on one class per sample (a confident,
trained-looking teacher); student logits: Gaussian (std 2). Prints the relative error of the KD
loss value and the cosine between gradients w.r.t. the student logits, per fill and k.

    python benchmarks/topk_error.py
"""

import torch

from distill.losses.logits import kd_loss
from distill.teachers.store import reconstruct_logits


def main(classes=1000, batch=256):
    g = torch.Generator().manual_seed(0)
    t = torch.randn(batch, classes, generator=g) * 2
    t[torch.arange(batch), torch.randint(0, classes, (batch,), generator=g)] += 8
    s0 = torch.randn(batch, classes, generator=g) * 2
    lse = torch.logsumexp(t, -1)
    print(f"C={classes}  rel. error of KD loss | gradient cosine")
    for temp in (1.0, 4.0):
        s = s0.clone().requires_grad_(True)
        full = kd_loss(s, t, temp)
        (g_full,) = torch.autograd.grad(full, s)
        for k in (10, 50, 100):
            vals, idx = t.topk(k, -1)
            row = []
            for fill in ("tail", "min", "renorm"):
                r = reconstruct_logits(vals.half().float(), idx, classes, lse, fill)
                loss = kd_loss(s, r, temp)
                (gr,) = torch.autograd.grad(loss, s)
                err = abs(float(loss.detach() - full.detach())) / float(full.detach())
                cos = float(torch.nn.functional.cosine_similarity(gr.flatten(), g_full.flatten(), 0))
                row.append(f"{fill:6s} {err:6.3f} | {cos:.3f}")
            print(f"T={temp:g} k={k:3d}: " + "   ".join(row))


if __name__ == "__main__":
    main()
