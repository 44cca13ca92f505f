"""Measures each loss convention where distill and the authors' reference code differ (issue 15),
on seeded inputs, and prints the numbers of the Conventions table in docs/methods.md.

    python benchmarks/loss_conventions.py            # everything (~1 min, ~6 GB for the fp16 row)
    python benchmarks/loss_conventions.py --small    # the fp16 row at 2,048 tokens instead of 8,192

Each row compares the two choices on the same inputs; the reference's choice is written out
here with plain torch (no import of the reference repositories).
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F

import distill.models  # noqa: F401  (registers the CIFAR networks)
from distill.losses import CRD, AttentionTransfer, FitNets, at_loss, kd_loss, lskd_loss
from distill.losses.sequence import forward_kl
from distill.losses.transformer import HiddenMSE
from distill.outputs import Batch, Outputs
from distill.registry import MODELS


def rel(a: float, b: float) -> float:
    """|a − b| / |b|, in percent."""
    return 100.0 * abs(a - b) / abs(b)


def lskd_std() -> None:
    g = torch.Generator().manual_seed(0)
    for c in (10, 100):
        s, t = torch.randn(256, c, generator=g) * 2, torch.randn(256, c, generator=g) * 4
        unb = float(lskd_loss(s, t, 2.0, std="unbiased"))
        pop = float(lskd_loss(s, t, 2.0, std="population"))
        print(f"lskd C={c}: unbiased {unb:.4f}, population {pop:.4f}, difference {rel(pop, unb):.1f}%")


def _taps(model: torch.nn.Module, names, x):
    feats = {}
    hooks = [
        model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: feats.__setitem__(n, o))
        for n in names
    ]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return feats


def _cifar_feats(seed: int = 0):
    """Random-init resnet32x4 (teacher) and ShuffleNetV2 (student) of the CIFAR recipes on seeded
    N(0, 1) 32x32 images; the recipe's AT pairs (layer1-3) differ 2x in spatial size."""
    torch.manual_seed(seed)
    teacher, student = MODELS.build(name="resnet32x4").eval(), MODELS.build(name="ShuffleNetV2").eval()
    x = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    layers = ("layer1", "layer2", "layer3")
    return _taps(student, layers, x), _taps(teacher, layers, x), layers


def at_pool() -> None:
    fs, ft, layers = _cifar_feats()
    for n in layers:
        a = float(at_loss(fs[n], ft[n], pool="features"))
        b = float(at_loss(fs[n], ft[n], pool="maps"))
        print(
            f"at {n} student {tuple(fs[n].shape[-2:])} teacher {tuple(ft[n].shape[-2:])}: pool features "
            f"{a:.3e}, maps {b:.3e}, difference {rel(b, a):.1f}%"
        )
    so, to = Outputs(features=fs), Outputs(features=ft)
    pairs = [[n, n] for n in layers]
    a = float(AttentionTransfer(pairs=pairs)(so, to, Batch(inputs=None)))
    b = float(AttentionTransfer(pairs=pairs, pool="maps")(so, to, Batch(inputs=None)))
    print(f"at recipe sum (layer1-3): features {a:.3e}, maps {b:.3e}, difference {rel(b, a):.1f}%")


def fitnets_relu() -> None:
    torch.manual_seed(0)
    teacher, student = MODELS.build(name="resnet32x4").eval(), MODELS.build(name="resnet8x4").eval()
    x = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    fs, ft = _taps(student, ["layer2"], x), _taps(teacher, ["layer2"], x)  # the recipe's hint pair
    so, to, b = Outputs(features=fs), Outputs(features=ft), Batch(inputs=None)
    plain, relu = FitNets("layer2", "layer2"), FitNets("layer2", "layer2", relu=True)
    plain.setup(so, to, b)
    relu.setup(so, to, b)
    relu.regressor[:2].load_state_dict(plain.regressor.state_dict())  # same conv + BN weights
    with torch.no_grad():
        a, r = float(plain(so, to, b)), float(relu(so, to, b))
    print(
        f"fitnets resnet32x4->resnet8x4 layer2 at init (teacher hint >= 0: {bool((ft['layer2'] >= 0).all())}): "
        f"no relu {a:.4f}, relu {r:.4f}, difference {rel(r, a):.1f}%"
    )


def crd_negatives() -> None:
    n, k, c = 50_000, 16_384, 100
    p_self = 1 - (1 - 1 / n) ** k
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, n, (2048,), generator=g)
    old = torch.randint(0, n, (2048, k), generator=g)  # the previous draw: uniform over all N
    emp = float((old == idx[:, None]).any(1).float().mean())
    del old
    torch.manual_seed(0)
    term = CRD("s", "t", n_data=n, feat_dim=8, nce_k=k)
    new = term.draw_contrast(idx)[:, 1:]
    print(
        f"crd N={n} K={k}: anchor among its own negatives, before {100 * p_self:.1f}% of anchors "
        f"(exact; {100 * emp:.1f}% of 2,048 drawn), now {100 * float((new == idx[:, None]).any(1).float().mean()):.1f}%"
    )
    labels = torch.arange(n) % c
    same_uniform = float((labels[new] == labels[idx][:, None]).float().mean())
    oc = CRD("s", "t", n_data=n, feat_dim=8, nce_k=k, negatives="other_class", labels=labels)
    neg = oc.draw_contrast(idx, labels[idx])[:, 1:]
    same_oc = float((labels[neg] == labels[idx][:, None]).float().mean())
    print(
        f"crd C={c}: same-class negatives, uniform {100 * same_uniform:.2f}% "
        f"(~{same_uniform * k:.0f} of {k} per anchor), other_class {100 * same_oc:.2f}%"
    )


def hidden_reduction() -> None:
    g = torch.Generator().manual_seed(0)
    hs = tuple(torch.randn(4, 16, 32, generator=g) for _ in range(5))  # embeddings + 4 blocks
    ht = tuple(torch.randn(4, 16, 32, generator=g) for _ in range(13))  # embeddings + 12 blocks
    so, to = Outputs(extras={"hidden_states": hs}), Outputs(extras={"hidden_states": ht})
    b = Batch(inputs=None)
    mean = float(HiddenMSE()(so, to, b))
    total = float(HiddenMSE(layer_reduction="sum")(so, to, b))
    print(
        f"hidden_mse 4-layer student, uniform map (5 pairs): mean {mean:.4f}, sum {total:.4f}, {total / mean:.2f}x"
    )


def ctkd_init() -> None:
    t_ref = 1 + 20 * (1 / (1 + math.exp(-1)))  # the reference: 1 + 20·sigmoid(θ), θ = 1 at start
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(256, 100, generator=g) * 2, torch.randn(256, 100, generator=g) * 4
    vals, grads = [], []
    for temp in (4.0, t_ref):
        x = s.clone().requires_grad_(True)
        loss = kd_loss(x, t, temp)
        loss.backward()
        vals.append(float(loss.detach()))
        grads.append(float(x.grad.norm()))
    print(
        f"ctkd start T: distill 4, reference {t_ref:.4f}; KD (C=100, T² included) {vals[0]:.4f} vs "
        f"{vals[1]:.4f} ({rel(vals[1], vals[0]):.0f}%), student-gradient norm {grads[1] / grads[0]:.2f}x"
    )


def _member_weights():
    for path in ("distill.teachers.ensemble", "distill.ensemble", "distill.teachers"):
        try:
            module = __import__(path, fromlist=["member_weights"])
            return module.member_weights
        except (ImportError, AttributeError):
            continue
    raise ImportError("member_weights not found")


def multi_teacher_confidence() -> None:
    member_weights = _member_weights()
    g = torch.Generator().manual_seed(0)
    for k in (2, 3, 5):
        logits = torch.randn(k, 256, 100, generator=g) * 3
        y = torch.randint(0, 100, (256,), generator=g)
        ours = member_weights(logits, "confidence", y)  # softmax_k(−CE_k)
        ce = torch.stack([F.cross_entropy(logits[i], y, reduction="none") for i in range(k)], 1)
        camkd = (1 - torch.softmax(ce, 1)) / (k - 1)  # CA-MKD: (1 − softmax_k(CE_k)) / (K − 1)
        d = (ours - camkd).abs()
        print(f"confidence rule K={k}: |w − w_CA-MKD| max {float(d.max()):.2e}, mean {float(d.mean()):.2e}")


def fp16_chunked(tokens: int, vocab: int = 32_000) -> None:
    """The chunked fkl's logit gradient at loss scale 65,536 against fp32 autograd."""
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(tokens, vocab, generator=g) * 2).half()
    t = (torch.randn(tokens, vocab, generator=g) * 2).half()
    scale = 65536.0
    ref = s.float().requires_grad_(True)
    forward_kl(ref, t).backward()
    want = ref.grad
    del ref

    def err(a: torch.Tensor) -> float:
        return float((a.float() - want).norm() / want.norm())

    # The previous buffer: the unscaled gradient stored in fp16, multiplied by the scale after.
    old = want.half()
    old_zeros, old_err = float((old == 0).float().mean()), err(old)
    old_bad = float((~(old * torch.tensor(scale).half()).isfinite()).float().mean())
    del old
    # Plain autograd on the fp16 logits (the loss in fp32, the gradient cast back to fp16).
    y = s.clone().requires_grad_(True)
    loss = F.kl_div(
        F.log_softmax(y.float(), -1), F.log_softmax(t.float(), -1), reduction="sum", log_target=True
    )
    (loss / tokens * scale).backward()
    plain_err = err(y.grad.float() / scale)
    del y, loss
    x = s.clone().requires_grad_(True)
    (forward_kl(x, t) * scale).backward()
    print(
        f"fp16 fkl V={vocab} tokens={tokens}, loss scale {scale:.0f}: before: non-finite {100 * old_bad:.0f}%, "
        f"unscaled zeros {100 * old_zeros:.0f}% (rel. error {old_err:.2g}); now: non-finite "
        f"{100 * float((~x.grad.isfinite()).float().mean()):.0f}%, zeros {100 * float((x.grad == 0).float().mean()):.2f}%, "
        f"rel. error {err(x.grad.float() / scale):.2g} (plain autograd {plain_err:.2g})"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="fp16 row at 2,048 tokens (less memory)")
    args = ap.parse_args()
    lskd_std()
    at_pool()
    fitnets_relu()
    crd_negatives()
    hidden_reduction()
    ctkd_init()
    multi_teacher_confidence()
    fp16_chunked(2048 if args.small else 8192)


if __name__ == "__main__":
    main()
