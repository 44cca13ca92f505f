"""Parity and invariance tests for the method library (issue 3, "Correctness").

Every loss is checked against an independent, deliberately plain formula written here (loops
or numpy in float64), plus its known invariances.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distill.data.indexed import IndexedDataset
from distill.errors import DistillError
from distill.losses import (
    CRD,
    CTKD,
    DIST,
    DKD,
    KD,
    LSKD,
    PKT,
    RKD,
    AttentionTransfer,
    FitNets,
    SimilarityPreserving,
    Weighted,
    at_loss,
    dist_loss,
    dkd_loss,
    kd_loss,
    lskd_loss,
    nce_loss,
    pkt_loss,
    rkd_loss,
    sp_loss,
    standardize_logits,
    teacher_sample_weights,
)
from distill.objective import Objective
from distill.outputs import Batch, Outputs, as_batch
from distill.registry import LOSSES
from distill.schedules import Adaptive, Anneal, Progress, as_schedule


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _np(x):
    return x.detach().double().numpy()


def _softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def _kl_ref(s, t, T):
    """Plain Hinton KD: mean_i Σ_c p_t log(p_t / p_s) · T²."""
    ps, pt = _softmax(s / T), _softmax(t / T)
    return float(np.mean(np.sum(pt * np.log(pt / ps), -1)) * T * T)


# ---------------------------------------------------------------------------------------------
# KD: the T² gradient scaling


def test_kd_matches_formula_and_zero_for_identical():
    s, t = torch.randn(6, 10), torch.randn(6, 10)
    assert kd_loss(s, t, 3.0).item() == pytest.approx(_kl_ref(_np(s), _np(t), 3.0), rel=1e-5)
    assert kd_loss(t, t, 3.0).item() == pytest.approx(0.0, abs=1e-6)


def test_kd_t_squared_keeps_gradient_scale():
    # d(T²·KL)/ds = T·(softmax(s/T) − softmax(t/T)) / B exactly; for large T and zero-mean
    # logits it tends to (s − t) / (C·B) (Hinton et al.), independent of T. Without the T² the
    # gradient would shrink as 1/T².
    b, c = 4, 10
    s, t = torch.randn(b, c), torch.randn(b, c)
    s, t = s - s.mean(1, keepdim=True), t - t.mean(1, keepdim=True)
    limit = (s - t) / (c * b)
    for T in (1.0, 4.0, 16.0, 64.0):
        x = s.clone().requires_grad_(True)
        kd_loss(x, t, T).backward()
        exact = T * (_softmax(_np(s) / T) - _softmax(_np(t) / T)) / b
        np.testing.assert_allclose(_np(x.grad), exact, rtol=1e-3, atol=1e-7)
        if T >= 16:
            assert (x.grad - limit).norm() / limit.norm() < 0.1
            assert x.grad.norm() / limit.norm() == pytest.approx(1.0, abs=0.1)


# ---------------------------------------------------------------------------------------------
# LSKD


def test_lskd_matches_formula_unbiased_by_default_population_as_option():
    s, t = torch.randn(5, 7) * 3, torch.randn(5, 7)

    def z(x, ddof):
        x = _np(x)
        return (x - x.mean(1, keepdims=True)) / x.std(1, ddof=ddof, keepdims=True)

    # Default: torch.std (1/(C-1)), as the authors' logit-standardization-KD code.
    assert lskd_loss(s, t, 2.0).item() == pytest.approx(_kl_ref(z(s, 1), z(t, 1), 2.0), rel=1e-4)
    assert LSKD(2.0)(Outputs(s), Outputs(t), Batch(inputs=None)).item() == pytest.approx(
        _kl_ref(z(s, 1), z(t, 1), 2.0), rel=1e-4
    )
    # Option: the population std (1/C) of the paper's Eq. 8.
    pop = _kl_ref(z(s, 0), z(t, 0), 2.0)
    assert lskd_loss(s, t, 2.0, std="population").item() == pytest.approx(pop, rel=1e-4)
    assert LSKD(2.0, std="population")(Outputs(s), Outputs(t), Batch(inputs=None)).item() == pytest.approx(
        pop, rel=1e-4
    )
    with pytest.raises(DistillError, match="lskd.std: 'sample' is not one of unbiased, population"):
        LSKD(std="sample")


def test_lskd_invariant_to_shift_and_positive_scale():
    s, t = torch.randn(8, 12), torch.randn(8, 12)
    base = lskd_loss(s, t, 2.0)
    shifted = lskd_loss(s * 3.7 + 5.0, t * 0.2 - 11.0, 2.0)
    torch.testing.assert_close(shifted, base, rtol=1e-4, atol=1e-6)
    # Per-sample shifts and scales too.
    a, b = torch.rand(8, 1) * 5 + 0.1, torch.randn(8, 1) * 10
    torch.testing.assert_close(lskd_loss(a * s + b, t, 2.0), base, rtol=1e-4, atol=1e-6)
    # A student that is a positive affine map of the teacher has nothing left to learn.
    assert lskd_loss(2.5 * t + 1.0, t, 2.0).item() == pytest.approx(0.0, abs=1e-5)


# ---------------------------------------------------------------------------------------------
# DKD


def _dkd_ref(s, t, y, alpha, beta, T):
    """TCKD and NCKD written out sample by sample, following Zhao et al. 2022 Eq. 1-4."""
    out = []
    for i in range(s.shape[0]):
        ps, pt = _softmax(s[i] / T), _softmax(t[i] / T)
        bs = np.array([ps[y[i]], 1 - ps[y[i]]])
        bt = np.array([pt[y[i]], 1 - pt[y[i]]])
        tckd = np.sum(bt * np.log(bt / bs))
        keep = [c for c in range(s.shape[1]) if c != y[i]]
        qs, qt = ps[keep] / ps[keep].sum(), pt[keep] / pt[keep].sum()
        nckd = np.sum(qt * np.log(qt / qs))
        b = beta[i] if np.ndim(beta) else beta
        out.append(alpha * tckd + b * nckd)
    return float(np.mean(out) * T * T)


def test_dkd_matches_formula():
    s, t = torch.randn(6, 9), torch.randn(6, 9) * 2
    y = torch.randint(0, 9, (6,))
    got = dkd_loss(s, t, y, alpha=1.5, beta=8.0, temperature=4.0).item()
    assert got == pytest.approx(_dkd_ref(_np(s), _np(t), y.numpy(), 1.5, 8.0, 4.0), rel=1e-4)


def test_dkd_equals_kd_with_beta_one_minus_p_target():
    s, t = torch.randn(16, 10), torch.randn(16, 10) * 3
    y = torch.randint(0, 10, (16,))
    T = 4.0
    p_target = F.softmax(t / T, -1).gather(1, y[:, None]).squeeze(1)  # (B,) teacher's p_t at T
    dkd = dkd_loss(s, t, y, alpha=1.0, beta=1.0 - p_target, temperature=T)
    torch.testing.assert_close(dkd, kd_loss(s, t, T), rtol=1e-5, atol=1e-6)
    # The gradients agree too.
    a, b = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    dkd_loss(a, t, y, 1.0, 1.0 - p_target, T).backward()
    kd_loss(b, t, T).backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-7)


def test_dkd_zero_for_identical_and_warmup_via_progress():
    t = torch.randn(4, 5)
    y = torch.randint(0, 5, (4,))
    assert dkd_loss(t, t, y).item() == pytest.approx(0.0, abs=1e-6)
    term = DKD(beta=8.0, warmup=0.5)
    obj = Objective({"dkd": term})
    obj.update(Progress(step=25, total_steps=100))
    assert term.ramp == pytest.approx(0.5)
    s = torch.randn(4, 5)
    full = dkd_loss(s, t, y, 1.0, 8.0, 4.0)
    out = obj(Outputs(logits=s), Outputs(logits=t), Batch(inputs=s, targets=y))
    torch.testing.assert_close(out["dkd"], 0.5 * full)
    obj.update(Progress(step=90, total_steps=100))
    assert term.ramp == 1.0


def test_dkd_needs_labels():
    with pytest.raises(DistillError, match="labels"):
        DKD()(Outputs(logits=torch.randn(2, 3)), Outputs(logits=torch.randn(2, 3)), Batch(inputs=None))
    with pytest.raises(DistillError, match="out of range"):
        dkd_loss(torch.randn(2, 3), torch.randn(2, 3), torch.tensor([0, 3]))


# ---------------------------------------------------------------------------------------------
# DIST


def test_dist_matches_formula_and_zero_for_identical():
    s, t = torch.randn(8, 6), torch.randn(8, 6)
    T, beta, gamma = 4.0, 2.0, 3.0
    ys, yt = _softmax(_np(s) / T), _softmax(_np(t) / T)
    inter = np.mean([1 - np.corrcoef(ys[i], yt[i])[0, 1] for i in range(8)])
    intra = np.mean([1 - np.corrcoef(ys[:, c], yt[:, c])[0, 1] for c in range(6)])
    ref = T * T * (beta * inter + gamma * intra)
    assert dist_loss(s, t, beta, gamma, T).item() == pytest.approx(ref, rel=1e-4)
    assert dist_loss(t, t, beta, gamma, T).item() == pytest.approx(0.0, abs=1e-5)


# ---------------------------------------------------------------------------------------------
# Feature terms


def _feats(**kw):
    return Outputs(features=kw)


def test_fitnets_regressor_from_shapes_and_loss():
    term = FitNets(student_layer="s", teacher_layer="t")
    assert term.student_taps == ("s",) and term.teacher_taps == ("t",)
    fs, ft = torch.randn(2, 4, 8, 8), torch.randn(2, 6, 4, 4)
    so, to, batch = _feats(s=fs), _feats(t=ft), Batch(inputs=None)
    with pytest.raises(DistillError, match="setup"):
        term(so, to, batch)
    term.setup(so, to, batch)
    conv, bn = term.regressor[0], term.regressor[1]
    assert isinstance(conv, torch.nn.Conv2d) and conv.in_channels == 4 and conv.out_channels == 6
    assert conv.kernel_size == (1, 1) and isinstance(bn, torch.nn.BatchNorm2d)
    term.eval()  # BN uses running stats: the regressor is then a fixed per-channel affine map
    got = term(so, to, batch)
    r = F.adaptive_avg_pool2d(term.regressor(fs), (4, 4))
    assert got.item() == pytest.approx(float(((r - ft) ** 2).mean().detach()), rel=1e-5)
    # The regressor's parameters belong to the term (so the trainer trains and saves them).
    names = {n for n, _ in term.named_parameters()}
    assert {"regressor.0.weight", "regressor.1.weight"} <= names


def test_fitnets_linear_for_vectors_and_rank_mismatch():
    term = FitNets(student_layer="s", teacher_layer="t")
    so, to = _feats(s=torch.randn(3, 5)), _feats(t=torch.randn(3, 7))
    term.setup(so, to, Batch(inputs=None))
    assert isinstance(term.regressor, torch.nn.Linear) and term.regressor.out_features == 7
    loss = term(so, to, Batch(inputs=None))
    loss.backward()
    assert term.regressor.weight.grad is not None
    bad = FitNets(student_layer="s", teacher_layer="t")
    with pytest.raises(DistillError, match="ranks"):
        bad.setup(_feats(s=torch.randn(3, 5)), _feats(t=torch.randn(3, 7, 2, 2)), Batch(inputs=None))


def test_fitnets_relu_option_ends_the_regressor_with_a_relu():
    fs, ft = torch.randn(2, 4, 8, 8), torch.relu(torch.randn(2, 6, 8, 8))
    so, to, batch = _feats(s=fs), _feats(t=ft), Batch(inputs=None)
    plain, with_relu = FitNets("s", "t"), FitNets("s", "t", relu=True)
    plain.setup(so, to, batch)
    with_relu.setup(so, to, batch)
    assert not any(isinstance(m, torch.nn.ReLU) for m in plain.regressor.modules())
    assert isinstance(with_relu.regressor[-1], torch.nn.ReLU)
    with_relu.regressor[:2].load_state_dict(plain.regressor.state_dict())
    r = torch.relu(plain.regressor(fs))
    assert float(with_relu(so, to, batch).detach()) == pytest.approx(
        float(((r - ft) ** 2).mean().detach()), rel=1e-5
    )
    vec = FitNets("s", "t", relu=True)
    vec.setup(_feats(s=torch.randn(3, 5)), _feats(t=torch.randn(3, 7)), batch)
    assert isinstance(vec.regressor[0], torch.nn.Linear) and isinstance(vec.regressor[1], torch.nn.ReLU)


def _at_ref(fs, ft):
    a = (fs**2).mean(1).reshape(fs.shape[0], -1)
    b = (ft**2).mean(1).reshape(ft.shape[0], -1)
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float(np.mean((a - b) ** 2))


def test_at_matches_formula_scale_invariance_and_sizes():
    fs, ft = torch.randn(3, 4, 6, 6), torch.randn(3, 16, 6, 6)
    assert at_loss(fs, ft).item() == pytest.approx(_at_ref(_np(fs), _np(ft)), rel=1e-5)
    torch.testing.assert_close(at_loss(fs * 7.0, ft * 0.01), at_loss(fs, ft), rtol=1e-5, atol=1e-8)
    assert at_loss(ft, ft).item() == pytest.approx(0.0, abs=1e-8)
    # Different spatial sizes, default: the larger *feature* is area-averaged to the smaller
    # before its attention is taken, as RepDistiller's Attention.at_loss.
    big = torch.randn(3, 4, 12, 12)

    def at(f):  # RepDistiller: F.normalize(f.pow(p).mean(1).view(B, -1))
        return F.normalize(f.pow(2).mean(1).view(f.shape[0], -1))

    ref = (at(F.adaptive_avg_pool2d(big, (6, 6))) - at(ft)).pow(2).mean()
    assert at_loss(big, ft).item() == pytest.approx(float(ref), rel=1e-5)
    assert at_loss(ft, big).item() == pytest.approx(float(ref), rel=1e-5)
    # pool="maps": the larger *attention map* is area-averaged instead.
    pooled = F.avg_pool2d((big**2).mean(1, keepdim=True), 2)[:, 0]
    a = F.normalize(pooled.flatten(1), dim=1)
    b = F.normalize((ft**2).mean(1).flatten(1), dim=1)
    assert at_loss(big, ft, pool="maps").item() == pytest.approx(float(((a - b) ** 2).mean()), rel=1e-5)
    so, to = _feats(s=big), _feats(t=ft)
    assert AttentionTransfer("s", "t", pool="maps")(so, to, Batch(inputs=None)).item() == pytest.approx(
        float(((a - b) ** 2).mean()), rel=1e-5
    )
    with pytest.raises(DistillError, match="at.pool: 'map' is not one of features, maps"):
        AttentionTransfer("s", "t", pool="map")


def test_at_term_sums_over_pairs_and_missing_tap():
    term = AttentionTransfer(pairs=[["s1", "t1"], ["s2", "t2"]])
    assert term.student_taps == ("s1", "s2") and term.teacher_taps == ("t1", "t2")
    f = {k: torch.randn(2, 3, 4, 4) for k in ("s1", "s2", "t1", "t2")}
    so = _feats(s1=f["s1"], s2=f["s2"])
    to = _feats(t1=f["t1"], t2=f["t2"])
    want = at_loss(f["s1"], f["t1"]) + at_loss(f["s2"], f["t2"])
    torch.testing.assert_close(term(so, to, Batch(inputs=None)), want)
    with pytest.raises(DistillError, match="no tapped feature 't2'"):
        term(so, _feats(t1=f["t1"]), Batch(inputs=None))
    with pytest.raises(DistillError, match="needs"):
        at_loss(torch.randn(2, 3), torch.randn(2, 3))
    with pytest.raises(DistillError, match="batch"):
        at_loss(torch.randn(2, 3, 4, 4), torch.randn(3, 3, 4, 4))


def test_sp_matches_formula_scale_invariance_zero():
    fs, ft = torch.randn(5, 3, 2, 2), torch.randn(5, 7)
    a, b = _np(fs).reshape(5, -1), _np(ft)
    gs, gt = a @ a.T, b @ b.T
    gs /= np.linalg.norm(gs, axis=1, keepdims=True)
    gt /= np.linalg.norm(gt, axis=1, keepdims=True)
    assert sp_loss(fs, ft).item() == pytest.approx(float(((gs - gt) ** 2).sum() / 25), rel=1e-5)
    torch.testing.assert_close(sp_loss(fs * 20.0, ft * 0.05), sp_loss(fs, ft), rtol=1e-5, atol=1e-8)
    assert sp_loss(ft, ft).item() == pytest.approx(0.0, abs=1e-8)
    term = SimilarityPreserving(student_layer="s", teacher_layer="t")
    torch.testing.assert_close(term(_feats(s=fs), _feats(t=ft), Batch(inputs=None)), sp_loss(fs, ft))


def test_pkt_matches_formula_and_zero():
    fs, ft = torch.randn(6, 5), torch.randn(6, 9)

    def cond(x):
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        k = (x @ x.T + 1) / 2
        return k / k.sum(1, keepdims=True)

    ps, pt = cond(_np(fs)), cond(_np(ft))
    ref = float(np.mean(pt * np.log(pt / ps)))
    assert pkt_loss(fs, ft).item() == pytest.approx(ref, rel=1e-3)
    assert pkt_loss(ft, ft).item() == pytest.approx(0.0, abs=1e-7)
    term = PKT(student_layer="s", teacher_layer="t")
    assert term(_feats(s=fs), _feats(t=ft), Batch(inputs=None)).item() == pytest.approx(ref, rel=1e-3)


# ---------------------------------------------------------------------------------------------
# Relation terms


def _huber(a, b):
    d = np.abs(a - b)
    return float(np.mean(np.where(d < 1, 0.5 * d * d, d - 0.5)))


def _rkd_ref(s, t, wd, wa):
    b = s.shape[0]

    def dist(e):
        d = np.array([[np.linalg.norm(e[i] - e[j]) for j in range(b)] for i in range(b)])
        return d / d[~np.eye(b, dtype=bool)].mean()

    def ang(e):
        out = np.zeros((b, b, b))
        for j in range(b):
            for i in range(b):
                for k in range(b):
                    u, v = e[i] - e[j], e[k] - e[j]
                    nu, nv = np.linalg.norm(u), np.linalg.norm(v)
                    out[j, i, k] = 0.0 if nu == 0 or nv == 0 else u @ v / (nu * nv)
        return out

    return wd * _huber(dist(s), dist(t)) + wa * _huber(ang(s), ang(t))


def test_rkd_matches_formula_scale_invariance_zero():
    s, t = torch.randn(5, 4), torch.randn(5, 6) * 3
    assert rkd_loss(s, t, 25.0, 50.0).item() == pytest.approx(_rkd_ref(_np(s), _np(t), 25.0, 50.0), rel=1e-4)
    torch.testing.assert_close(rkd_loss(s * 9.0, t * 0.1), rkd_loss(s, t), rtol=1e-4, atol=1e-6)
    assert rkd_loss(t, t).item() == pytest.approx(0.0, abs=1e-6)
    term = RKD(student_layer="s", teacher_layer="t")
    x = s.clone().requires_grad_(True)
    term(_feats(s=x), _feats(t=t), Batch(inputs=None)).backward()
    assert torch.isfinite(x.grad).all()


def test_nce_loss_matches_formula():
    x = torch.rand(3, 5) * 0.01
    n = 100
    m_pn = 4 / n
    ref = [-(np.log(r[0] / (r[0] + m_pn)) + sum(np.log(m_pn / (v + m_pn)) for v in r[1:])) for r in _np(x)]
    torch.testing.assert_close(nce_loss(x, n, eps=0.0).double(), torch.tensor(ref), rtol=1e-5, atol=1e-7)


def test_crd_needs_index_trains_heads_and_updates_memory():
    n = 50
    term = CRD(student_layer="s", teacher_layer="t", n_data=n, feat_dim=8, nce_k=16)
    fs = torch.randn(4, 3, 2, 2, requires_grad=True)
    so, to = _feats(s=fs), _feats(t=torch.randn(4, 10))
    with pytest.raises(DistillError, match="IndexedDataset"):
        term.setup(so, to, Batch(inputs=None))
        term(so, to, Batch(inputs=None))
    idx = torch.tensor([0, 7, 8, 49])
    before = term.memory_s.clone()
    loss = term(so, to, Batch(inputs=None, index=idx))
    assert torch.isfinite(loss) and loss.item() > 0
    assert term.z_s.item() > 0 and term.z_t.item() > 0
    loss.backward()
    assert fs.grad is not None and term.embed_s.linear.weight.grad is not None
    changed = (term.memory_s != before).any(1)
    assert changed[idx].all() and changed.sum() == len(idx)
    torch.testing.assert_close(term.memory_s[idx].norm(dim=1), torch.ones(4))
    with pytest.raises(DistillError, match="n_data"):
        term(so, to, Batch(inputs=None, index=torch.tensor([0, 1, 2, 50])))
    with pytest.raises(DistillError, match="n_data"):
        CRD(student_layer="s", teacher_layer="t")


def test_crd_uniform_negatives_never_draw_the_anchor():
    """The anchor's own index used to be drawn as a negative (27.9% of anchors at CIFAR sizes,
    N = 50,000, K = 16,384); now negatives are uniform over the other N − 1 samples."""
    torch.manual_seed(0)
    n = 5
    term = CRD(student_layer="s", teacher_layer="t", n_data=n, feat_dim=4, nce_k=4000)
    idx = torch.arange(n)
    contrast = term.draw_contrast(idx)
    assert contrast.shape == (n, 4001) and torch.equal(contrast[:, 0], idx)
    neg = contrast[:, 1:]
    assert not (neg == idx[:, None]).any()
    for i in range(n):  # every other sample, about equally often (1000 expected each)
        counts = torch.bincount(neg[i], minlength=n)
        assert counts[i] == 0 and ((counts - 1000).abs()[torch.arange(n) != i] < 150).all()


def test_crd_other_class_negatives_come_from_other_classes_only():
    torch.manual_seed(0)
    n, c = 30, 3
    y_all = torch.arange(n) % c
    kw = {"student_layer": "s", "teacher_layer": "t", "n_data": n, "feat_dim": 4, "nce_k": 3000}
    # Labels given up front: negatives uniform over the 20 samples of the other two classes.
    term = CRD(negatives="other_class", labels=y_all.tolist(), **kw)
    idx = torch.tensor([0, 4, 29])
    neg = term.draw_contrast(idx, y_all[idx])[:, 1:]
    assert (y_all[neg] != y_all[idx][:, None]).all()
    for i in range(3):
        counts = torch.bincount(neg[i], minlength=n)[y_all != y_all[idx[i]]]
        assert (counts > 0).all() and ((counts - 150).abs() < 60).all()
    # Labels learned from the batches: only seen samples of other classes are drawn.
    term = CRD(negatives="other_class", **kw)
    seen = torch.tensor([0, 1, 2, 3])  # classes 0, 1, 2, 0
    neg = term.draw_contrast(seen, y_all[seen])[:, 1:]
    assert set(neg[0].tolist()) == {1, 2} and set(neg[1].tolist()) == {0, 2, 3}
    # No other-class sample seen yet: falls back to uniform over the other samples.
    term = CRD(negatives="other_class", **kw)
    neg = term.draw_contrast(torch.tensor([0, 3]), torch.tensor([0, 0]))[:, 1:]
    assert not (neg[0] == 0).any() and not (neg[1] == 3).any() and len(set(neg[0].tolist())) > 20
    # The learned bank is checkpointed; a loaded one replaces the cached pool.
    state = term.state_dict()
    assert state["labels"].tolist()[:4] == [0, -1, -1, 0]
    fresh = CRD(negatives="other_class", **kw)
    fresh.load_state_dict(CRD(negatives="other_class", labels=y_all.tolist(), **kw).state_dict())
    neg = fresh.draw_contrast(torch.tensor([0]), torch.tensor([0]))[:, 1:]
    assert (y_all[neg] != 0).all()
    assert "labels" not in CRD(**kw).state_dict()  # uniform mode keeps its old checkpoint keys
    # In the term: labels come from the batch; evaluation batches do not write the bank.
    term = CRD(negatives="other_class", **kw)
    so, to = _feats(s=torch.randn(4, 6)), _feats(t=torch.randn(4, 5))
    batch = Batch(inputs=None, targets=y_all[:4], index=torch.arange(4))
    term.setup(so, to, batch)
    assert torch.isfinite(term(so, to, batch)) and term.labels[:5].tolist() == [0, 1, 2, 0, -1]
    term.eval()
    term(so, to, Batch(inputs=None, targets=torch.tensor([2, 2, 2, 2]), index=torch.arange(4, 8)))
    assert term.labels[4:8].tolist() == [-1, -1, -1, -1]
    with pytest.raises(DistillError, match="needs the class labels"):
        CRD(negatives="other_class", **kw).draw_contrast(torch.tensor([0]))
    with pytest.raises(DistillError, match="crd.negatives: 'classes' is not one of uniform, other_class"):
        CRD(negatives="classes", **kw)
    with pytest.raises(DistillError, match="only with negatives: other_class"):
        CRD(labels=y_all.tolist(), **kw)
    with pytest.raises(DistillError, match="one class id"):
        CRD(negatives="other_class", labels=[0, 1], **kw)


def test_indexed_dataset_feeds_crd_indices():
    data = [(torch.randn(3), i % 2) for i in range(6)]
    ds = IndexedDataset(data)
    assert len(ds) == 6 and ds[4][2] == 4
    loader = torch.utils.data.DataLoader(ds, batch_size=3)
    batch = as_batch(next(iter(loader)))
    assert batch.index.tolist() == [0, 1, 2]
    assert IndexedDataset([{"x": 1}])[0] == {"x": 1, "index": 0}
    assert IndexedDataset([torch.zeros(2)])[0]["index"] == 0
    with pytest.raises(DistillError, match="map-style"):
        IndexedDataset(iter([1, 2]))


# ---------------------------------------------------------------------------------------------
# Adaptive: learnable temperature, per-sample weighting, schedules


def test_ctkd_temperature_trained_through_gradient_reversal():
    term = CTKD(init_temperature=4.0, ramp=0.5)
    assert term.temperature == pytest.approx(4.0, rel=1e-5)
    obj = Objective({"ctkd": term})
    assert term.lam == 0.0
    obj.update(Progress(step=25, total_steps=100))  # half of the ramp: λ = 0.5 (half cosine)
    assert term.lam == pytest.approx(0.5)
    obj.update(Progress(step=60, total_steps=100))
    assert term.lam == pytest.approx(1.0)
    s, t = torch.randn(4, 6), torch.randn(4, 6)
    term(Outputs(logits=s), Outputs(logits=t), Batch(inputs=s)).backward()
    # Reference: the plain KD loss as a function of θ; reversal flips the sign of its gradient.
    theta = term.theta.detach().clone().requires_grad_(True)
    kd_loss(s, t, 1.0 + 20.0 * torch.sigmoid(theta)).backward()
    torch.testing.assert_close(term.theta.grad, -1.0 * theta.grad)
    assert "theta" in dict(term.named_parameters())
    with pytest.raises(DistillError, match="strictly between"):
        CTKD(init_temperature=30.0)


def test_teacher_sample_weights_rules():
    t = torch.tensor([[4.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 3.0, 0.0]])
    y = torch.tensor([0, 1, 0])
    p = F.softmax(t, -1)
    torch.testing.assert_close(teacher_sample_weights(t, rule="confidence"), p.max(1).values)
    torch.testing.assert_close(teacher_sample_weights(t, y, "target_prob"), p[torch.arange(3), y])
    # Ties at argmax: sample 1's top class is 0 (first), so it counts as wrong.
    torch.testing.assert_close(
        teacher_sample_weights(t, y, "correct", floor=0.2), torch.tensor([1.0, 0.2, 0.2])
    )
    with pytest.raises(DistillError, match="labels"):
        teacher_sample_weights(t, None, "correct")


def test_weighted_term_is_weighted_mean_of_inner_term():
    s, t = torch.randn(5, 4), torch.randn(5, 4) * 2
    y = torch.randint(0, 4, (5,))
    term = LOSSES.build(name="weighted", term={"name": "kd", "temperature": 2.0}, rule="target_prob")
    w = teacher_sample_weights(t, y, "target_prob")
    per = kd_loss(s, t, 2.0, reduction="none")  # (B,) already · T²
    want = (w * per).sum() / w.sum()
    got = term(Outputs(logits=s), Outputs(logits=t), Batch(inputs=s, targets=y))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    with pytest.raises(DistillError, match="per-sample weights"):
        Weighted(term={"name": "sp", "student_layer": "a", "teacher_layer": "b"})


def test_anneal_and_adaptive_schedules():
    a = Anneal(8.0, 2.0, stages=4)
    vals = [a(Progress(step=s, total_steps=100)) for s in (0, 24, 25, 50, 75, 100)]
    assert vals == [8.0, 8.0, 6.0, 4.0, 2.0, 2.0]
    ad = as_schedule({"name": "adaptive", "metric": "agreement", "start": 1.0, "end": 0.25})
    assert isinstance(ad, Adaptive)
    assert ad(Progress()) == 1.0
    assert ad(Progress(metrics={"agreement": 0.5})) == pytest.approx(0.625)
    assert ad(Progress(metrics={"agreement": 1.2})) == pytest.approx(0.25)
    ranged = Adaptive(start=8.0, end=2.0, metric="accuracy", low=0.5, high=0.9, initial=6.0)
    assert ranged(Progress()) == 6.0
    assert ranged(Progress(metrics={"accuracy": 0.7})) == pytest.approx(5.0)


# ---------------------------------------------------------------------------------------------
# Shapes, construction, registry


@pytest.mark.parametrize(
    "fn",
    [
        lambda s, t: kd_loss(s, t),
        lambda s, t: lskd_loss(s, t),
        lambda s, t: dkd_loss(s, t, torch.zeros(3, dtype=torch.long)),
        lambda s, t: dist_loss(s, t),
    ],
)
def test_logit_losses_reject_class_mismatch(fn):
    with pytest.raises(DistillError, match="classes"):
        fn(torch.randn(3, 5), torch.randn(3, 6))


@pytest.mark.parametrize("fn", [sp_loss, pkt_loss, rkd_loss, at_loss])
def test_feature_losses_reject_batch_mismatch(fn):
    with pytest.raises(DistillError, match="batch"):
        fn(torch.randn(2, 3, 4, 4), torch.randn(3, 3, 4, 4))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (("lskd", {"temperature": 0}), "temperature"),
        (("dkd", {"beta": -1}), "beta"),
        (("dist", {"temperature": -1}), "temperature"),
        (("at", {"student_layer": ["a", "b"], "teacher_layer": ["c"]}), "pair"),
        (("fitnets", {"student_layer": "a"}), "teacher_layer"),
        (("weighted", {"rule": "nope"}), "rule"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, match):
    name, args = kwargs
    with pytest.raises(DistillError, match=match):
        LOSSES.build(name=name, **args)


def test_every_term_builds_by_name_and_runs_in_an_objective():
    b, c = 4, 5
    s_feat, t_feat = torch.randn(b, 3, 4, 4), torch.randn(b, 6, 4, 4)
    student = Outputs(
        logits=torch.randn(b, c, requires_grad=True), features={"f": s_feat.requires_grad_(True)}
    )
    teacher = Outputs(logits=torch.randn(b, c), features={"g": t_feat})
    batch = Batch(inputs=None, targets=torch.randint(0, c, (b,)), index=torch.arange(b))
    layers = {"student_layer": "f", "teacher_layer": "g"}
    terms = {
        "lskd": LSKD(),
        "dkd": DKD(),
        "dist": DIST(),
        "ctkd": CTKD(),
        "weighted": LOSSES.build(name="weighted"),
        "kd": KD(),
        "fitnets": LOSSES.build(name="fitnets", **layers),
        "at": LOSSES.build(name="at", **layers),
        "sp": LOSSES.build(name="sp", **layers),
        "pkt": LOSSES.build(name="pkt", **layers),
        "rkd": LOSSES.build(name="rkd", **layers),
        "crd": LOSSES.build(name="crd", n_data=10, feat_dim=4, nce_k=8, **layers),
    }
    obj = Objective(terms)
    assert obj.student_taps == ["f"] and obj.teacher_taps == ["g"]
    obj.setup(student, teacher, batch)
    out = obj(student, teacher, batch)
    assert set(out) == set(terms) | {"loss"}
    for name in terms:
        assert math.isfinite(out[name].item()), name
    out["loss"].backward()
    assert student.logits.grad is not None and s_feat.grad is not None


def test_lskd_masked_classes_are_finite_and_equal_the_unmasked_problem():
    """−inf logits (a masked vocabulary) used to make the mean and std NaN, so the loss was NaN."""
    torch.manual_seed(0)
    s, t = torch.randn(4, 7, requires_grad=True), torch.randn(4, 7)
    keep = torch.tensor([True, True, False, True, True, False, True])
    ninf = torch.tensor(float("-inf"))
    sm, tm = torch.where(keep, s, ninf), torch.where(keep, t, ninf)
    for std in ("unbiased", "population"):
        loss = lskd_loss(sm, tm, 2.0, std=std)
        assert torch.isfinite(loss)
        torch.testing.assert_close(loss, lskd_loss(s[:, keep], t[:, keep], 2.0, std=std))
    lskd_loss(sm, tm, 2.0).backward()
    assert torch.isfinite(s.grad).all() and (s.grad[:, ~keep] == 0).all()
    z = standardize_logits(sm)
    assert (z[:, ~keep] == float("-inf")).all() and torch.isfinite(z[:, keep]).all()


@pytest.mark.parametrize("negatives", ["uniform", "other_class"])
def test_crd_step_never_reads_a_device_tensor_on_the_host(negatives):
    """On a GPU a host read (`.item()`, `if tensor:`, `int(tensor)`) waits for every queued kernel.
    Meta tensors stand in for device tensors without CUDA: their values cannot be read at all, so
    any such read in the step raises. The loader's host copies (`Batch.raw`) stay on the CPU."""
    torch.manual_seed(0)
    n, b = 40, 6
    term = CRD(student_layer="s", teacher_layer="t", n_data=n, feat_dim=4, nce_k=8, negatives=negatives)
    idx, y = torch.arange(b), torch.arange(b) % 3
    so, to = _feats(s=torch.randn(b, 5)), _feats(t=torch.randn(b, 3))
    term.setup(so, to, Batch(inputs=None, targets=y, index=idx))
    term.to("meta")
    meta = lambda o: o.map(lambda x: x.to("meta"))  # noqa: E731
    for step in range(3):  # the first step estimates Z; then the usual steps
        host_idx = idx + step * b
        raw = (torch.zeros(b, 1), y, host_idx)  # what the loader yielded, on the host
        batch = Batch(inputs=None, targets=y.to("meta"), index=host_idx.to("meta"), raw=raw)
        loss = term(meta(so), meta(to), batch)
        assert loss.device.type == "meta" and loss.shape == ()
    if negatives == "other_class":  # the classes were learnt from the host copies
        assert term._host_bank()[: 3 * b].tolist() == (torch.arange(3 * b) % b % 3).tolist()
    # without a host copy an index out of range is still caught on the CPU
    bad = Batch(inputs=None, targets=y, index=torch.tensor([0, 1, 2, 3, 4, n]))
    with pytest.raises(DistillError, match="n_data"):
        CRD(student_layer="s", teacher_layer="t", n_data=n, feat_dim=4, nce_k=8)._index(bad, b)


def test_crd_z_estimated_once_and_restored_from_a_checkpoint():
    torch.manual_seed(0)
    kw = {"student_layer": "s", "teacher_layer": "t", "n_data": 20, "feat_dim": 4, "nce_k": 8}
    term = CRD(**kw)
    so, to = _feats(s=torch.randn(4, 5)), _feats(t=torch.randn(4, 3))
    batch = Batch(inputs=None, index=torch.arange(4))
    term.setup(so, to, batch)
    term(so, to, batch)
    z = term.z_s.clone()
    term(so, to, Batch(inputs=None, index=torch.arange(4, 8)))
    assert torch.equal(term.z_s, z) and z > 0
    fresh = CRD(**kw)
    fresh.setup(so, to, batch)
    fresh.load_state_dict(term.state_dict())
    fresh(so, to, Batch(inputs=None, index=torch.arange(8, 12)))
    assert torch.equal(fresh.z_s, z)  # a loaded Z is kept, not estimated again
