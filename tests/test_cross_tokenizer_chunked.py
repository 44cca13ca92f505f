"""The mapped cross-tokenizer KL in chunks of rows (`mapped_kl_sum`): the fast path against the
plain one (`mapped_kl` on all rows at once), value and gradient."""

import pytest
import torch

from distill.losses import cross_tokenizer as xt
from distill.losses.cross_tokenizer import mapped_kl, mapped_kl_sum, sparse_teacher


def _case(seed=0, b=3, t=7, vs=13, vt=17, k=5):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(b, t, vs, generator=g)
    probs, ids, tail = sparse_teacher(torch.randn(b, t, vt, generator=g), k)
    vmap = torch.randint(-1, vs, (vt,), generator=g)  # partial, and some student ids hit twice
    rows = torch.rand(b, t, generator=g) < 0.6
    return s, rows, probs, ids, tail, vmap


@pytest.mark.parametrize("chunk_size", [1, 4, None])
@pytest.mark.parametrize("temperature,uld_weight", [(1.0, 1.0), (2.0, 0.3)])
def test_chunked_equals_plain_value_and_gradient(chunk_size, temperature, uld_weight):
    s, rows, probs, ids, tail, vmap = _case()
    fast_s, slow_s = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    fast = mapped_kl_sum(
        fast_s,
        rows,
        probs,
        ids,
        tail,
        vmap,
        temperature=temperature,
        uld_weight=uld_weight,
        chunk_size=chunk_size,
    )
    kl, uld = mapped_kl(slow_s[rows], probs[rows], ids[rows], tail[rows], vmap, temperature=temperature)
    slow = (kl + uld_weight * uld).sum()
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-6)
    fast.backward()
    slow.backward()
    torch.testing.assert_close(fast_s.grad, slow_s.grad, rtol=1e-5, atol=1e-7)
    assert (fast_s.grad[~rows] == 0).all()


def test_each_chunk_holds_at_most_chunk_size_rows(monkeypatch):
    s, rows, probs, ids, tail, vmap = _case(b=4, t=20)
    seen = []

    def spy(student_logits, *a, **k):
        seen.append(student_logits.shape[0])
        return mapped_kl(student_logits, *a, **k)

    monkeypatch.setattr(xt, "mapped_kl", spy)
    mapped_kl_sum(s.requires_grad_(True), rows, probs, ids, tail, vmap, chunk_size=3).backward()
    assert max(seen) <= 3 and sum(seen) == int(rows.sum())


def test_aligned_kd_chunk_size_is_checked():
    from distill.errors import DistillError
    from distill.losses.cross_tokenizer import AlignedKD

    with pytest.raises(DistillError, match="aligned_kd.chunk_size must be >= 1"):
        AlignedKD(chunk_size=0)
