"""Token-level divergences: chunked values and gradients against plain unchunked formulas."""

import pytest
import torch

from distill.errors import DistillError
from distill.losses import sequence as seq
from distill.outputs import Batch, Outputs
from distill.registry import LOSSES


def _ref_per_token(kind, s, t, temperature=1.0, beta=0.5, alpha=0.1):
    """Plain float64 formulas on probabilities, written independently of the module."""
    q = torch.softmax(s.double() / temperature, -1)
    p = torch.softmax(t.double() / temperature, -1)

    def kl(a, b):
        return (a * (a.log() - b.log())).sum(-1)

    if kind == "fkl":
        return kl(p, q)
    if kind == "rkl":
        return kl(q, p)
    if kind == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * kl(p, m) + (1 - beta) * kl(q, m)
    if kind == "skl":
        return kl(p, alpha * p + (1 - alpha) * q)
    if kind == "srkl":
        return kl(q, alpha * q + (1 - alpha) * p)
    if kind == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    raise AssertionError(kind)


def _ref(kind, s, t, mask, **kw):
    per = _ref_per_token(kind, s, t, **kw)
    m = mask.double()
    return (per * m).sum() / m.sum()


def _data(b=3, t=7, v=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(b, t, v, generator=g) * 2
    te = torch.randn(b, t, v, generator=g) * 2
    mask = torch.rand(b, t, generator=g) > 0.3
    mask[0, 0] = True
    return s, te, mask


@pytest.mark.parametrize("kind", seq.KINDS)
@pytest.mark.parametrize("chunk", [1, 4, 1000])
def test_matches_unchunked_formula_value_and_grad(kind, chunk):
    s, t, mask = _data()
    kw = {"temperature": 1.7}
    if kind == "jsd":
        kw["beta"] = 0.3
    if kind in ("skl", "srkl"):
        kw["alpha"] = 0.2
    s1 = s.clone().requires_grad_(True)
    got = seq.token_divergence(s1, t, kind, mask, chunk_size=chunk, **kw)
    got.backward()
    s2 = s.double().clone().requires_grad_(True)
    want = _ref(kind, s2, t, mask, **kw)
    want.backward()
    assert torch.allclose(got.double(), want, atol=1e-5), (got, want)
    assert torch.allclose(s1.grad.double(), s2.grad, atol=1e-5)
    # Masked positions get no gradient at all.
    assert s1.grad[~mask].abs().max() == 0


@pytest.mark.parametrize("kind", seq.KINDS)
def test_zero_for_identical_and_positive_otherwise(kind):
    s, t, mask = _data(seed=1)
    assert seq.token_divergence(s, s.clone(), kind, mask).abs() < 1e-6
    assert seq.token_divergence(s, t, kind, mask) > 1e-3


def test_masked_tokens_do_not_change_the_value():
    s, t, mask = _data(seed=2)
    base = seq.forward_kl(s, t, mask)
    t2 = t.clone()
    t2[~mask] = torch.randn_like(t2[~mask]) * 10
    s2 = s.clone()
    s2[~mask] = 0
    assert torch.allclose(seq.forward_kl(s2, t2, mask), base)


def test_sum_none_and_weights():
    s, t, mask = _data(seed=3)
    per = seq.token_divergence(s, t, "rkl", mask, reduction="none")
    assert per.shape == (s.shape[0] * s.shape[1],)
    assert (per[~mask.reshape(-1)] == 0).all()
    assert torch.allclose(seq.token_divergence(s, t, "rkl", mask, reduction="sum"), per.sum(), atol=1e-5)
    w = torch.tensor([1.0, 0.0, 2.0])
    got = seq.token_divergence(s, t, "rkl", mask, weights=w)
    ref = _ref_per_token("rkl", s, t)
    tw = mask.double() * w.double()[:, None]
    assert torch.allclose(got.double(), (ref * tw).sum() / tw.sum(), atol=1e-5)


def test_bf16_logits_keep_their_dtype_for_grad_and_compute_in_fp32():
    s, t, mask = _data(seed=4)
    sb = s.bfloat16().requires_grad_(True)
    loss = seq.forward_kl(sb, t.bfloat16(), mask)
    assert loss.dtype == torch.float32
    loss.backward()
    assert sb.grad.dtype == torch.bfloat16


def test_grad_scales_with_upstream_weight():
    s, t, mask = _data(seed=5)
    a = s.clone().requires_grad_(True)
    (3.0 * seq.generalized_jsd(a, t, mask)).backward()
    b = s.clone().requires_grad_(True)
    seq.generalized_jsd(b, t, mask).backward()
    assert torch.allclose(a.grad, 3 * b.grad, atol=1e-6)


def test_all_masked_is_zero_with_a_graph():
    s, t, _ = _data()
    x = s.clone().requires_grad_(True)
    loss = seq.forward_kl(x, t, torch.zeros(s.shape[:2], dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0 and x.grad.abs().sum() == 0


def test_topk_equals_dense_when_k_is_the_vocab_and_renormalises_otherwise():
    s, t, mask = _data(seed=6)
    vals, idx = t.topk(t.shape[-1], dim=-1)
    dense = seq.forward_kl(s, t, mask)
    assert torch.allclose(seq.topk_forward_kl(s, vals, idx, mask), dense, atol=1e-5)
    vals, idx = t.topk(4, dim=-1)
    x = s.clone().requires_grad_(True)
    got = seq.topk_forward_kl(x, vals, idx.int(), mask, chunk_size=5)
    got.backward()
    # Reference: teacher distribution over its top-4, student log-probs at those ids.
    y = s.double().clone().requires_grad_(True)
    p = torch.softmax(vals.double(), -1)
    log_q = torch.log_softmax(y, -1).gather(-1, idx)
    per = (p * (p.log() - log_q)).sum(-1)
    want = (per * mask).sum() / mask.sum()
    want.backward()
    assert torch.allclose(got.double(), want, atol=1e-5)
    assert torch.allclose(x.grad.double(), y.grad, atol=1e-5)


def test_bad_inputs_are_clear_errors():
    s, t, mask = _data()
    with pytest.raises(DistillError, match="vocabulary"):
        seq.forward_kl(s, t[..., :5], mask)
    with pytest.raises(DistillError, match="mask shape"):
        seq.forward_kl(s, t, mask[:, :3])
    with pytest.raises(DistillError, match="beta"):
        seq.generalized_jsd(s, t, mask, beta=1.0)
    with pytest.raises(DistillError, match="alpha"):
        LOSSES.build("srkl", init_args={"alpha": 1.0})
    vals, idx = t.topk(3, -1)
    with pytest.raises(DistillError, match="tokenizer"):
        seq.topk_forward_kl(s, vals, idx + 100, mask)


def test_token_mask_from_labels_and_attention_with_shift():
    logits = torch.zeros(2, 5, 3)
    labels = torch.tensor([[-100, -100, 7, 8, 9], [-100, 4, 5, -100, -100]])
    attn = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    b = Batch(inputs={"input_ids": labels.clamp_min(0), "attention_mask": attn}, targets=labels)
    m = seq.token_mask(b, logits, shift=True)
    assert m.tolist() == [[False, True, True, True, False], [True, True, False, False, False]]
    m = seq.token_mask(b, logits, shift=False)
    assert m.tolist() == [[False, False, True, True, True], [False, True, True, False, False]]


@pytest.mark.parametrize("name", ["fkl", "rkl", "jsd", "skl", "srkl", "tvd"])
def test_registered_terms_use_the_batch_mask(name):
    s, t, _ = _data(b=2, t=5, seed=7)
    labels = torch.tensor([[-100, -100, 1, 2, 3], [-100, 4, 5, -100, -100]])
    batch = Batch(inputs={"input_ids": labels.clamp_min(0)}, targets=labels)
    term = LOSSES.build(name, init_args={"chunk_size": 3})
    got = term(Outputs(logits=s), Outputs(logits=t), batch)
    mask = seq.token_mask(batch, s)
    kw = {"beta": 0.5} if name == "jsd" else {"alpha": 0.1} if name in ("skl", "srkl") else {}
    assert torch.allclose(got.double(), _ref(name, s, t, mask, **kw), atol=1e-5)


def test_fkl_term_reads_topk_extras_and_others_refuse_them():
    s, t, _ = _data(b=2, t=5, seed=8)
    vals, idx = t.topk(t.shape[-1], -1)
    teacher = Outputs(logits=None, extras={"topk_values": vals.half(), "topk_indices": idx.int()})
    batch = Batch(inputs=torch.zeros(2, 5, dtype=torch.long))
    got = LOSSES.build("fkl")(Outputs(logits=s), teacher, batch)
    want = LOSSES.build("fkl")(
        Outputs(logits=s), Outputs(logits=vals.half().float().gather(-1, idx.argsort(-1))), batch
    )
    assert torch.allclose(got, want, atol=1e-5)
    with pytest.raises(DistillError, match="top-k"):
        LOSSES.build("rkl")(Outputs(logits=s), teacher, batch)


def test_token_cross_entropy_matches_shifted_cross_entropy_and_lm_ce_term():
    s, _, _ = _data(b=2, t=6, v=9, seed=9)
    labels = torch.tensor([[-100, -100, 1, 2, 3, 4], [-100, 5, 6, 7, -100, -100]])
    x = s.clone().requires_grad_(True)
    got = seq.token_cross_entropy(x, labels, chunk_size=2)
    got.backward()
    y = s.clone().requires_grad_(True)
    want = torch.nn.functional.cross_entropy(
        y[:, :-1].reshape(-1, 9), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    want.backward()
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(x.grad, y.grad, atol=1e-6)
    term = LOSSES.build("lm_ce")
    assert torch.allclose(term(Outputs(logits=s), None, Batch(inputs={}, targets=labels)), want, atol=1e-5)
    with pytest.raises(DistillError, match="out of range"):
        seq.token_cross_entropy(s, labels.clamp_max(20) * 3)


# ---------------------------------------------------------------------------------------------
# Regressions (issue 15)


def test_fp16_logits_under_grad_scaler_step_with_accurate_gradients():
    """fp16 logits, loss scale 65,536 (the GradScaler's start, as the Trainer uses): the step is
    taken and the unscaled gradient matches plain fp32 autograd. The gradient buffer used to be
    fp16 at loss scale 1, so the incoming 65,536 overflowed it (every entry inf) and small
    entries were flushed to zero before scaling could help."""
    torch.manual_seed(0)
    n, d, v = 512, 16, 256
    head = torch.nn.Linear(d, v)
    x, t = torch.randn(n, d), torch.randn(n, v) * 2
    opt = torch.optim.SGD(head.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=65536.0)
    before = head.weight.detach().clone()

    logits = head(x).half()  # (N, V) fp16, as an fp16 model's output
    logits.retain_grad()
    loss = seq.forward_kl(logits, t.half())
    scaler.scale(loss).backward()
    assert logits.grad.dtype == torch.float16 and logits.grad.isfinite().all()

    ref = logits.detach().float().requires_grad_(True)
    seq.forward_kl(ref, t.half()).backward()
    got = logits.grad.float() / scaler.get_scale()
    rel = (got - ref.grad).norm() / ref.grad.norm()
    assert rel < 1e-2, rel

    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 65536.0  # no inf/NaN found: the step was not skipped
    assert not torch.equal(head.weight, before)


@pytest.mark.parametrize("kind", seq.KINDS)
@pytest.mark.parametrize("side", ["student", "teacher", "both"])
def test_minus_inf_logits_give_finite_gradients(kind, side):
    """-inf logits (a masked vocabulary, constrained decoding) are tokens of probability 0: value
    and gradient must be the limit of logits -> -inf (the reference puts -700 there, in float64),
    with exactly 0 gradient on the -inf entries; never a finite value over NaN gradients. Only
    fkl with the student at -inf and rkl with the teacher at -inf are truly infinite (the other
    side has mass where this one has none): their value must not be finite."""
    s, t, mask = _data(seed=11)
    keep = s.shape[-1] - 4
    if side in ("student", "both"):
        s[..., keep:] = float("-inf")
    if side in ("teacher", "both"):
        t[..., keep:] = float("-inf")
    x = s.clone().requires_grad_(True)
    got = seq.token_divergence(x, t, kind, mask, chunk_size=4)
    if (side, kind) in (("student", "fkl"), ("teacher", "rkl")):
        assert not torch.isfinite(got)
        return
    got.backward()
    assert torch.isfinite(got) and torch.isfinite(x.grad).all(), (got, x.grad.isnan().sum())
    y = s.double().clamp_min(-700).requires_grad_(True)
    want = _ref(kind, y, t.double().clamp_min(-700), mask)
    want.backward()
    assert torch.allclose(got.double(), want, atol=1e-5), (got, want)
    assert torch.allclose(x.grad.double(), y.grad, atol=1e-5)
    if side != "teacher":
        assert (x.grad[..., keep:] == 0).all()


@pytest.mark.parametrize("name", ["fkl", "rkl", "jsd", "skl", "srkl", "tvd"])
def test_a_teacher_padded_past_the_shared_tokenizer_is_cut_to_it(name):
    """Issue 24 (more of the kind): a teacher whose embedding matrix is padded past the shared
    tokenizer (Qwen2.5-7B 152,064 columns vs 0.5B 151,936) was refused by every token term; with
    `vocab_size` the padding columns are dropped on both sides, and the loss is the one on the
    tokenizer's columns, whatever the padding holds."""
    from distill.errors import DistillError
    from distill.outputs import Batch, Outputs
    from distill.registry import LOSSES

    torch.manual_seed(0)
    s = torch.randn(2, 5, 10, requires_grad=True)  # the student: exactly the tokenizer's 10 ids
    t = torch.randn(2, 5, 10)
    padded = torch.cat([t, torch.full((2, 5, 6), 30.0)], dim=-1)  # 6 padding columns, large logits
    batch = Batch(
        inputs={"input_ids": torch.zeros(2, 5, dtype=torch.long)}, targets=torch.ones(2, 5, dtype=torch.long)
    )
    term = LOSSES.get(name)(vocab_size=10)
    got = term(Outputs(logits=s), Outputs(logits=padded), batch)
    want = LOSSES.get(name)()(Outputs(logits=s), Outputs(logits=t), batch)
    torch.testing.assert_close(got, want)
    got.backward()
    assert torch.isfinite(s.grad).all()
    with pytest.raises(DistillError, match="vocab_size: len\\(tokenizer\\)"):
        LOSSES.get(name)()(Outputs(logits=s), Outputs(logits=padded), batch)
    with pytest.raises(DistillError, match="only 10 columns"):
        LOSSES.get(name)(vocab_size=12)(Outputs(logits=s), Outputs(logits=padded), batch)


def test_topk_with_lse_is_the_kl_over_the_top_k_and_one_tail_bucket():
    s, t, mask = _data(seed=10)
    vals, idx = t.topk(4, dim=-1)
    lse = torch.logsumexp(t, -1)
    x = s.clone().requires_grad_(True)
    got = seq.topk_forward_kl(x, vals.half().float(), idx.int(), mask, chunk_size=5, lse=lse)
    got.backward()
    # Reference in float64: both distributions collapsed to (top-4 tokens, everything else).
    y = s.double().clone().requires_grad_(True)
    p = torch.softmax(t.double(), -1).gather(-1, idx)
    q = torch.softmax(y, -1).gather(-1, idx)
    p5 = torch.cat([p, 1 - p.sum(-1, keepdim=True)], -1)
    q5 = torch.cat([q, 1 - q.sum(-1, keepdim=True)], -1)
    per = (p5 * (p5.log() - q5.log())).sum(-1)
    want = (per * mask).sum() / mask.sum()
    want.backward()
    assert torch.allclose(got.double(), want, atol=2e-3)  # the teacher's values pass through fp16
    assert torch.allclose(x.grad.double(), y.grad, atol=1e-4)
    # with k = V the bucket is empty and this is the dense forward KL
    vals, idx = t.topk(t.shape[-1], dim=-1)
    assert torch.allclose(
        seq.topk_forward_kl(s, vals, idx, mask, lse=lse), seq.forward_kl(s, t, mask), atol=1e-5
    )
    with pytest.raises(DistillError, match="temperature 1"):
        seq.topk_forward_kl(s, vals, idx, mask, lse=lse, temperature=2.0)


def test_fkl_term_passes_the_stored_lse_as_the_tail_bucket():
    s, t, _ = _data(b=2, t=5, seed=11)
    vals, idx = t.topk(3, -1)
    lse = torch.logsumexp(t, -1)
    batch = Batch(inputs=torch.zeros(2, 5, dtype=torch.long))
    bucket = Outputs(logits=None, extras={"topk_values": vals, "topk_indices": idx, "lse": lse})
    renorm = Outputs(logits=None, extras={"topk_values": vals, "topk_indices": idx})
    got = LOSSES.build("fkl")(Outputs(logits=s), bucket, batch)
    want = seq.topk_forward_kl(s, vals, idx, seq.token_mask(batch, s), lse=lse)
    assert torch.allclose(got, want)
    assert not torch.allclose(got, LOSSES.build("fkl")(Outputs(logits=s), renorm, batch))
