import math

import pytest
import torch
import torch.nn.functional as F

from distill import (
    KD,
    Batch,
    CrossEntropy,
    DistillError,
    LogitMSE,
    Outputs,
    kd_loss,
    logit_mse,
    soft_cross_entropy,
)


def _naive_kd(s, t, T):
    """KL(p_t || p_s) per sample, written out with explicit sums, times T^2."""
    total = 0.0
    for i in range(s.shape[0]):
        ps = [math.exp(v / T) for v in s[i].tolist()]
        pt = [math.exp(v / T) for v in t[i].tolist()]
        zs, zt = sum(ps), sum(pt)
        total += sum((b / zt) * math.log((b / zt) / (a / zs)) for a, b in zip(ps, pt))
    return total / s.shape[0] * T * T


@pytest.mark.parametrize("T", [1.0, 2.0, 4.0, 10.0])
def test_kd_matches_plain_formula(T):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    assert kd_loss(s, t, T).item() == pytest.approx(_naive_kd(s, t, T), rel=1e-5)


def test_kd_zero_for_identical_and_positive_otherwise():
    s = torch.randn(4, 10)
    assert kd_loss(s, s.clone(), 3.0).abs().item() < 1e-6
    assert kd_loss(s, torch.randn(4, 10), 3.0).item() > 0


def test_kd_gradient_scale_is_temperature_independent():
    """With the T^2 factor, the gradient for large T approaches (s - t)/C (Hinton et al. 2015, sec. 2.1),
    independent of T; without it, it would shrink as 1/T^2."""
    g = torch.Generator().manual_seed(1)
    s0, t = torch.randn(3, 6, generator=g) * 0.1, torch.randn(3, 6, generator=g) * 0.1
    grads = []
    for T in (100.0, 200.0):
        s = s0.clone().requires_grad_(True)
        kd_loss(s, t, T).backward()
        grads.append(s.grad)
    assert torch.allclose(grads[0], grads[1], rtol=1e-2, atol=1e-6)
    s = s0.clone().requires_grad_(True)
    kd_loss(s, t, 200.0).backward()
    expected = (
        ((s0 - s0.mean(-1, keepdim=True)) - (t - t.mean(-1, keepdim=True))) / s0.shape[-1] / s0.shape[0]
    )
    assert torch.allclose(s.grad, expected, rtol=1e-2, atol=1e-6)


def test_soft_ce_is_kd_plus_teacher_entropy():
    s, t, T = torch.randn(4, 5), torch.randn(4, 5), 2.0
    p_t = F.softmax(t / T, -1)
    entropy = -(p_t * p_t.log()).sum(-1).mean() * T * T
    assert soft_cross_entropy(s, t, T).item() == pytest.approx((kd_loss(s, t, T) + entropy).item(), rel=1e-5)


def test_kd_token_level_and_weights():
    s, t = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    flat = kd_loss(s.reshape(6, 5), t.reshape(6, 5), 2.0)
    assert kd_loss(s, t, 2.0).item() == pytest.approx(flat.item(), rel=1e-6)
    w = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    only = kd_loss(s.reshape(6, 5)[[0, 2]], t.reshape(6, 5)[[0, 2]], 2.0)
    assert kd_loss(s, t, 2.0, weights=w).item() == pytest.approx(only.item(), rel=1e-5)


def test_logit_mse():
    s, t = torch.randn(3, 4), torch.randn(3, 4)
    assert logit_mse(s, t).item() == pytest.approx(((s - t) ** 2).mean().item(), rel=1e-6)


def test_class_count_mismatch_is_one_line_error():
    with pytest.raises(DistillError, match="teacher has 10 classes but student has 5"):
        kd_loss(torch.randn(2, 5), torch.randn(2, 10))


def test_terms_validate_arguments():
    with pytest.raises(DistillError, match="temperature must be > 0"):
        KD(temperature=0)
    with pytest.raises(DistillError, match="form"):
        KD(form="js")
    with pytest.raises(DistillError, match="label_smoothing"):
        CrossEntropy(label_smoothing=1.5)


def test_ce_term_label_smoothing_and_range_check():
    logits, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 1])
    out = CrossEntropy(label_smoothing=0.1)(Outputs(logits), None, Batch(inputs=None, targets=y))
    assert out.item() == pytest.approx(F.cross_entropy(logits, y, label_smoothing=0.1).item())
    with pytest.raises(DistillError, match="label 7 is out of range for 3 classes"):
        CrossEntropy()(Outputs(logits), None, Batch(inputs=None, targets=torch.tensor([0, 7, 1, 1])))
    with pytest.raises(DistillError, match="needs labels"):
        CrossEntropy()(Outputs(logits), None, Batch(inputs=None))


def test_ce_normalize_batch_counts_unlabelled_samples_as_zero():
    """With a transfer set most samples carry no label: "labelled" averages over the labelled
    ones, "batch" over every sample (Hinton's per-sample a·CE + b·KD, an unlabelled sample's CE 0),
    for class indices and for soft label rows (trainer.mix) alike."""
    logits, y = torch.randn(4, 3), torch.tensor([0, -100, -100, 2])
    labelled = F.cross_entropy(logits[[0, 3]], y[[0, 3]])
    batch = Batch(inputs=None, targets=y)
    assert CrossEntropy()(Outputs(logits), None, batch).item() == pytest.approx(labelled.item())
    assert CrossEntropy(normalize="batch")(Outputs(logits), None, batch).item() == pytest.approx(
        labelled.item() / 2
    )
    soft = torch.zeros(4, 3)
    soft[0, 0] = soft[3, 2] = 1.0
    mixed = Batch(inputs=None, targets=y, soft_targets=soft)
    assert CrossEntropy(normalize="batch")(Outputs(logits), None, mixed).item() == pytest.approx(
        labelled.item() / 2
    )
    with pytest.raises(DistillError, match="ce.normalize 'mean' is not one of labelled, batch"):
        CrossEntropy(normalize="mean")


def test_kd_and_mse_terms_use_outputs():
    s, t = torch.randn(2, 3), torch.randn(2, 3)
    b = Batch(inputs=None)
    assert KD(temperature=2)(Outputs(s), Outputs(t), b).item() == pytest.approx(kd_loss(s, t, 2).item())
    assert LogitMSE()(Outputs(s), Outputs(t), b).item() == pytest.approx(logit_mse(s, t).item())
    with pytest.raises(DistillError, match="teacher produced no logits"):
        KD()(Outputs(s), Outputs(), b)


# ---------------------------------------------------------------------------------------------
# Regressions (issue 15)


def test_kd_with_minus_inf_teacher_logits_matches_kl_div_and_has_finite_gradients():
    """A masked vocabulary (teacher logits -inf) is probability 0, not NaN: 0·(-inf) used to
    make kd_loss NaN while F.kl_div gave a finite value."""
    from distill.losses import dkd_loss

    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 10, generator=g), torch.randn(4, 10, generator=g)
    t[..., -5:] = float("-inf")
    x = s.clone().requires_grad_(True)
    got = kd_loss(x, t, 1.0)
    want = F.kl_div(F.log_softmax(s, -1), F.softmax(t, -1), reduction="batchmean")
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    got.backward()
    assert torch.isfinite(x.grad).all()
    # Both sides masked on the same entries: the value and gradient of the reduced vocabulary.
    s[..., -5:] = float("-inf")
    for fn in (
        lambda a, b: kd_loss(a, b, 2.0),
        lambda a, b: soft_cross_entropy(a, b, 2.0),
        lambda a, b: dkd_loss(a, b, torch.tensor([0, 1, 2, 3]), temperature=2.0),
    ):
        x = s.clone().requires_grad_(True)
        y = s[..., :5].clone().requires_grad_(True)
        got, want = fn(x, t), fn(y, t[..., :5])
        got.backward()
        want.backward()
        assert got.item() == pytest.approx(want.item(), rel=1e-5)
        assert torch.isfinite(x.grad).all() and (x.grad[..., 5:] == 0).all()
        torch.testing.assert_close(x.grad[..., :5], y.grad)


def test_kd_terms_refuse_token_logits_and_plain_kd_takes_per_sample_weights():
    """kd on (B, T, V) used to average over prompt and padding tokens too (2.30 vs 1.89 for fkl on
    the same batch), and (B,) weights crashed. The terms now refuse token logits with a pointer
    to fkl; the plain function spreads (B,) weights over each sample's tokens."""
    from distill.losses import CTKD, DIST, DKD, LSKD

    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 5, generator=g)
    labels = torch.tensor([[-100, 1, 2], [-100, 3, -100]])
    batch = Batch(inputs={"attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]])}, targets=labels)
    for term in (KD(), LSKD(), DKD(), DIST(), CTKD(), LogitMSE()):
        with pytest.raises(DistillError, match="use the fkl term"):
            term(Outputs(s), Outputs(t), batch)
    w = torch.tensor([2.0, 0.5])
    got = kd_loss(s, t, 2.0, weights=w)
    per = kd_loss(s, t, 2.0, reduction="none") / 4.0  # (6,), T² taken back out
    want = (per * w.repeat_interleave(3)).sum() / (3 * w.sum()) * 4.0
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
