"""Token-level divergences for language models, computed in chunks over tokens.

A causal LM's logits are (B, T, V) with V often 32k-250k. Written naively, a divergence keeps
several fp32 copies of that tensor alive for backward (two log-softmaxes, probabilities, the
products), which at B=8, T=1024, V=50k is ~1.6 GB each. Here the loss is computed chunk by
chunk over the valid (unmasked) tokens only, and each chunk's gradient with respect to the
student's logits is taken right away and written into one buffer of the logits' own shape and
dtype (fp32 for fp16 logits, whose range cannot hold a loss-scaled gradient: 2x the logits'
bytes). Peak memory is then: the logits, that gradient buffer, and one chunk's fp32
temporaries, whatever the sequence length (the same trick fused cross-entropy kernels use).

The teacher is a constant: no gradient flows into teacher logits.

Which tokens count: prompt and padding are masked. The plain functions take a (B, T) `mask`
aligned with the logits; the loss terms build it from the batch (`labels == -100` convention
and the attention mask), shifted by one for causal LMs (the logits at position t predict
token t+1, so position t counts when token t+1 is a trained, non-padding token).

Divergences (p = teacher, q = student, both softmax(logits / temperature)):

- `fkl`   KL(p || q)                       (forward KL, the classic KD objective)
- `rkl`   KL(q || p)                       (reverse KL, mode seeking; MiniLLM)
- `jsd`   β·KL(p || m) + (1-β)·KL(q || m), m = β·p + (1-β)·q  (generalised JSD; GKD,
          Agarwal et al. 2024, "On-Policy Distillation of Language Models")
- `skl`   KL(p || α·p + (1-α)·q)           (skew KL; DistiLLM, Ko et al. 2024)
- `srkl`  KL(q || α·q + (1-α)·p)           (skew reverse KL; DistiLLM)
- `tvd`   ½·Σ|p - q|                        (total variation distance)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.errors import DistillError
from distill.losses.base import LossTerm, check_positive, check_range, kl_rows
from distill.outputs import Batch, Outputs
from distill.registry import LOSSES

KINDS = ("fkl", "rkl", "jsd", "skl", "srkl", "tvd")
DEFAULT_CHUNK = None  # auto: about 4M logits (16 MB in fp32) per chunk, see `auto_chunk_size`


def auto_chunk_size(vocab: int) -> int:
    """Tokens per chunk so one chunk's fp32 temporaries stay ~16 MB each (83 tokens at V=50k).

    Small chunks cost little time (each is still millions of elements) and stay below the
    allocator's mmap threshold on CPU, so they are reused instead of page-faulted in again.
    """
    return max(16, (1 << 22) // max(1, vocab))


# --------------------------------------------------------------------------------------------
# Per-token formulas on one chunk: (c, V) fp32 student logits, (c, V) fp32 teacher logits -> (c,)
# --------------------------------------------------------------------------------------------


def _per_token(kind: str, s: Tensor, t: Tensor, temperature: float, beta: float, alpha: float) -> Tensor:
    if temperature != 1:
        s, t = s / temperature, t / temperature
    log_q = F.log_softmax(s, dim=-1)  # student
    log_p = F.log_softmax(t, dim=-1)  # teacher
    if kind == "fkl":
        return kl_rows(log_p, log_q)
    if kind == "rkl":
        return kl_rows(log_q, log_p)
    if kind == "jsd":
        # GKD eq. (3): the mixture weights the teacher by beta.
        log_m = _log_mix(log_p, log_q, beta)
        return beta * kl_rows(log_p, log_m) + (1 - beta) * kl_rows(log_q, log_m)
    if kind == "skl":
        # DistiLLM eq. (3): KL(p || alpha p + (1 - alpha) q); alpha = 0 is forward KL.
        log_m = _log_mix(log_p, log_q, alpha)
        return kl_rows(log_p, log_m)
    if kind == "srkl":
        # DistiLLM eq. (4): KL(q || alpha q + (1 - alpha) p); alpha = 0 is reverse KL.
        log_m = _log_mix(log_q, log_p, alpha)
        return kl_rows(log_q, log_m)
    if kind == "tvd":
        return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)
    raise DistillError(f"unknown token divergence '{kind}'; use one of {', '.join(KINDS)}")


def _log_mix(log_a: Tensor, log_b: Tensor, alpha: float) -> Tensor:
    """log(alpha·a + (1-alpha)·b) from log a and log b.

    `log_a` is clamped to the lowest finite float first: where both inputs are -inf (a token
    neither side can produce) logaddexp's backward is NaN (exp(-inf - (-inf))); with one side
    finite it is not, the result there is ~-3.4e38 (probability 0), and the clamp passes no
    gradient. One clamp is enough, and costs one pass over the chunk.
    """
    if alpha == 0:
        return log_b
    low = torch.finfo(log_a.dtype).min
    return torch.logaddexp(log_a.clamp_min(low) + math.log(alpha), log_b + math.log1p(-alpha))


def _topk_fkl(
    s: Tensor, values: Tensor, indices: Tensor, temperature: float, lse: Tensor | None = None
) -> Tensor:
    """Forward KL against a teacher known only on its top-k tokens.

    s: (c, V) student logits; values: (c, k) teacher logits; indices: (c, k) token ids.
    Without `lse` the teacher is renormalised over its k tokens (the mass outside them dropped).
    With `lse` (c,), the log-sum-exp of the teacher's full logits, the teacher's k probabilities
    are exact and the mass they leave is one bucket, compared with the student's mass outside the
    same k tokens: KL over k + 1 outcomes, which asks nothing of how either side spreads its tail.
    """
    log_q = F.log_softmax(s / temperature, dim=-1).gather(-1, indices)  # (c, k)
    if lse is None:
        log_p = F.log_softmax(values / temperature, dim=-1)  # (c, k), mass outside top-k dropped
        return kl_rows(log_p, log_q)
    log_p = (values - lse[:, None]).clamp_max(0.0)  # T = 1: the caller refuses any other
    kept = kl_rows(log_p, log_q)
    # log(1 - sum exp(x)) for both sides; the teacher's tail may round to 0 (then it adds nothing)
    p_tail = -torch.expm1(torch.logsumexp(log_p, -1).clamp_max(0.0))
    log_q_tail = torch.log(-torch.expm1(torch.logsumexp(log_q, -1).clamp_max(-1e-7)))
    tail = torch.where(p_tail > 0, p_tail * (torch.log(p_tail.clamp_min(1e-30)) - log_q_tail), 0.0)
    return kept + tail


# --------------------------------------------------------------------------------------------
# The chunked reduction with its gradient computed on the fly.
# --------------------------------------------------------------------------------------------


class _ChunkedLoss(torch.autograd.Function):
    """sum_i w_i · f(s_i) / denom over spans of rows, with d/ds written span by span into one buffer.

    The spans are contiguous row ranges of valid tokens, so each chunk is a view of the logits
    (gathering rows with an index would copy them, and is slow on CPU).
    """

    @staticmethod
    def forward(ctx, s2d, spans, w, denom, per_token):
        needs_grad = ctx.needs_input_grad[0]
        s_const = s2d.detach()
        # fp16 keeps the buffer in fp32: its range (max 65,504, smallest normal 6e-5) can hold
        # neither the loss scale a GradScaler multiplies in afterwards (65,536 at the start)
        # nor, unscaled, the small per-entry gradients of a large batch. bf16 has fp32's range.
        buf_dtype = torch.float32 if s_const.dtype == torch.float16 else s_const.dtype
        grad = torch.zeros_like(s_const, dtype=buf_dtype) if needs_grad else None
        total = torch.zeros((), dtype=torch.float32, device=s2d.device)
        for a, b in spans:
            s_c = s_const[a:b].float().detach()  # a view when the logits are fp32
            w_c = w[a:b]
            if needs_grad:
                with torch.enable_grad():
                    s_c.requires_grad_(True)
                    part = (per_token(s_c, a, b) * w_c).sum() / denom
                    (g,) = torch.autograd.grad(part, s_c)
                grad[a:b].copy_(g)
            else:
                part = (per_token(s_c, a, b) * w_c).sum() / denom
            total += part.detach()
        ctx.save_for_backward(grad if needs_grad else None)
        ctx.logits_dtype = s2d.dtype
        ctx.used = False
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        if ctx.used:
            raise DistillError(
                "a chunked token loss was back-propagated twice (retain_graph=True); "
                "recompute the loss for each backward pass"
            )
        ctx.used = True
        (grad,) = ctx.saved_tensors
        # In place: the buffer is the size of the logits and is used once. The incoming gradient
        # (the loss scale) is applied in the buffer's precision, before any cast to fp16.
        grad = grad.mul_(grad_out.to(grad.dtype)).to(ctx.logits_dtype)
        return grad, None, None, None, None


def _token_weights(logits: Tensor, mask: Tensor | None, weights: Tensor | None) -> tuple[Tensor, Tensor]:
    """(N,) float weight per token row (0 where masked) and the (N,) bool mask, for (B, T, V) or (N, V)."""
    lead = logits.shape[:-1]
    n = math.prod(lead)
    device = logits.device
    if mask is None:
        m = torch.ones(n, dtype=torch.bool, device=device)
    else:
        if tuple(mask.shape) != tuple(lead):
            raise DistillError(
                f"mask shape {tuple(mask.shape)} does not match the logits' leading dims {tuple(lead)}; "
                "give one entry per token position"
            )
        m = mask.reshape(-1).to(device).bool()
    w = m.float()
    if weights is not None:
        weights = weights.to(device).float()
        if weights.dim() == 1 and len(lead) == 2 and weights.shape[0] == lead[0]:
            w = w * weights[:, None].expand(*lead).reshape(-1)  # per-sample -> per-token
        elif weights.numel() == n:
            w = w * weights.reshape(-1)
        else:
            raise DistillError(
                f"weights of shape {tuple(weights.shape)} fit neither the batch ({lead[0]},) nor the tokens {tuple(lead)}"
            )
    return w, m


def _spans(m: Tensor, chunk_size: int) -> list[tuple[int, int]]:
    """Contiguous runs of True in the (N,) mask, cut into pieces of at most chunk_size rows."""
    if m.numel() == 0:
        return []
    x = m.to(torch.int8).cpu()
    edges = torch.diff(x, prepend=torch.zeros(1, dtype=torch.int8), append=torch.zeros(1, dtype=torch.int8))
    starts = (edges == 1).nonzero().squeeze(-1).tolist()
    ends = (edges == -1).nonzero().squeeze(-1).tolist()
    out = []
    for a, b in zip(starts, ends):
        out.extend((i, min(i + chunk_size, b)) for i in range(a, b, chunk_size))
    return out


def _reduce_chunked(
    s2d: Tensor,
    w: Tensor,
    m: Tensor,
    per_token: Callable[[Tensor, int, int], Tensor],
    chunk_size: int | None,
    reduction: str,
) -> Tensor:
    if reduction not in ("mean", "sum", "none"):
        raise DistillError(f"reduction '{reduction}' is not one of mean, sum, none")
    if chunk_size is None:
        chunk_size = auto_chunk_size(s2d.shape[-1])
    if chunk_size < 1:
        raise DistillError(f"chunk_size must be >= 1, got {chunk_size}")
    spans = _spans(m, chunk_size)
    if reduction == "none":
        # Per-token values (masked positions 0); plain autograd, so memory is not bounded here.
        parts, pos = [], 0
        for a, b in spans:
            parts += [s2d.new_zeros(a - pos, dtype=torch.float32), per_token(s2d[a:b].float(), a, b) * w[a:b]]
            pos = b
        parts.append(s2d.new_zeros(s2d.shape[0] - pos, dtype=torch.float32))
        return torch.cat(parts)
    if not spans:
        # Nothing to distil in this batch (all prompt/padding): a zero that still has a graph.
        return s2d.sum() * 0.0
    denom = float(w.sum().clamp_min(1e-12)) if reduction == "mean" else 1.0
    return _ChunkedLoss.apply(s2d, spans, w, denom, per_token)


def _check_pair(student_logits: Tensor, teacher_logits: Tensor) -> None:
    if student_logits.shape != teacher_logits.shape:
        if student_logits.shape[:-1] == teacher_logits.shape[:-1]:
            raise DistillError(
                f"teacher vocabulary has {teacher_logits.shape[-1]} entries but the student's has "
                f"{student_logits.shape[-1]}: token-level KD needs one shared tokenizer "
                "(check with distill.nlp.check_same_vocab); when both share one and a model pads its "
                "embedding matrix past it (Qwen, Phi, Pythia), set the term's vocab_size: len(tokenizer); "
                "for two tokenizers use the aligned_kd or uld term"
            )
        raise DistillError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ in shape; give both the same batch and length"
        )


def token_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    kind: str = "fkl",
    mask: Tensor | None = None,
    *,
    beta: float = 0.5,
    alpha: float = 0.1,
    temperature: float = 1.0,
    weights: Tensor | None = None,
    chunk_size: int | None = DEFAULT_CHUNK,
    reduction: str = "mean",
) -> Tensor:
    """A token-level divergence between student and teacher, over unmasked tokens, in chunks.

    Args:
        student_logits: (B, T, V) or (N, V), any float dtype; gradients flow into it.
        teacher_logits: same shape; treated as a constant.
        kind: one of fkl, rkl, jsd, skl, srkl, tvd (see the module docstring).
        mask: (B, T) or (N,) bool, True where the token counts; None: all tokens.
        beta: the JSD mixture weight in (0, 1).
        alpha: the skew in [0, 1) for skl / srkl.
        temperature: both distributions are softmax(logits / temperature); no T² factor.
        weights: per-sample (B,) or per-token weights.
        chunk_size: tokens per chunk (None: `auto_chunk_size(V)`); the extra memory beyond the
            logits and their gradient is about 10 · chunk_size · V floats.
        reduction: "mean" (weighted mean over valid tokens), "sum", or "none" ((N,) per token,
            0 where masked; memory not bounded in that mode).

    Returns:
        A scalar float32 tensor (or (N,) for reduction="none").
    """
    _check_pair(student_logits, teacher_logits)
    _check_params(kind, beta, alpha, temperature)
    s2d = student_logits.reshape(-1, student_logits.shape[-1])
    t2d = teacher_logits.detach().reshape(-1, teacher_logits.shape[-1])
    w, m = _token_weights(student_logits, mask, weights)

    def per_token(s_c: Tensor, a: int, b: int) -> Tensor:
        return _per_token(kind, s_c, t2d[a:b].float(), temperature, beta, alpha)

    return _reduce_chunked(s2d, w, m, per_token, chunk_size, reduction)


def topk_forward_kl(
    student_logits: Tensor,
    topk_values: Tensor,
    topk_indices: Tensor,
    mask: Tensor | None = None,
    *,
    temperature: float = 1.0,
    weights: Tensor | None = None,
    chunk_size: int | None = DEFAULT_CHUNK,
    reduction: str = "mean",
    lse: Tensor | None = None,
) -> Tensor:
    """Forward KL against sparse teacher logits (top-k values + token ids, as a teacher store keeps).

    Without `lse` the teacher's distribution is renormalised over its k kept tokens (the mass
    outside them is dropped), so the value equals the dense forward KL only when the dropped mass
    is ~0; with k = V and all ids it is exact. With `lse` ((B, T) or (N,): the log-sum-exp of the
    teacher's full logits, which a store keeps) the mass outside the k tokens is a tail bucket
    matched by the student's own mass outside them (`cache_fill: bucket`); temperature 1 only,
    since the log-sum-exp at another temperature is not known.

    Args:
        student_logits: (B, T, V) or (N, V).
        topk_values: (B, T, k) or (N, k) teacher logits of the kept tokens (float16 is fine).
        topk_indices: same shape, integer token ids in [0, V).
        mask, temperature, weights, chunk_size, reduction: as in `token_divergence`.
    """
    check_positive("temperature", temperature)
    if topk_values.shape != topk_indices.shape or topk_values.shape[:-1] != student_logits.shape[:-1]:
        raise DistillError(
            f"top-k teacher values {tuple(topk_values.shape)} and indices {tuple(topk_indices.shape)} must "
            f"share the student logits' leading dims {tuple(student_logits.shape[:-1])} plus k"
        )
    v = student_logits.shape[-1]
    if topk_indices.numel() and (int(topk_indices.max()) >= v or int(topk_indices.min()) < 0):
        raise DistillError(
            f"top-k teacher token ids reach {int(topk_indices.max())} but the student vocabulary has {v} "
            "entries: the store was written by a teacher with another tokenizer"
        )
    if lse is not None:
        if temperature != 1:
            raise DistillError(
                f"the teacher's tail bucket needs temperature 1 (the store kept the log-sum-exp at "
                f"T = 1), got {temperature}; set the term's temperature to 1 or use cache_fill: tail"
            )
        if tuple(lse.shape) != tuple(topk_values.shape[:-1]):
            raise DistillError(
                f"teacher log-sum-exp {tuple(lse.shape)} must have the top-k values' leading dims "
                f"{tuple(topk_values.shape[:-1])}"
            )
        lse = lse.detach().reshape(-1)
    s2d = student_logits.reshape(-1, v)
    vals = topk_values.detach().reshape(-1, topk_values.shape[-1])
    idx = topk_indices.reshape(-1, topk_indices.shape[-1]).long()  # gather needs int64
    w, m = _token_weights(student_logits, mask, weights)

    def per_token(s_c: Tensor, a: int, b: int) -> Tensor:
        return _topk_fkl(
            s_c, vals[a:b].float(), idx[a:b], temperature, None if lse is None else lse[a:b].float()
        )

    return _reduce_chunked(s2d, w, m, per_token, chunk_size, reduction)


def token_cross_entropy(
    logits: Tensor,
    labels: Tensor,
    *,
    shift: bool = True,
    ignore_index: int = -100,
    attention_mask: Tensor | None = None,
    weights: Tensor | None = None,
    chunk_size: int | None = DEFAULT_CHUNK,
) -> Tensor:
    """Next-token cross-entropy on the labels, chunked like the divergences (bounded memory).

    Args:
        logits: (B, T, V).
        labels: (B, T) token ids, `ignore_index` where no loss is taken (prompt, padding).
        shift: True for causal LMs (logits at t predict labels at t+1, as Hugging Face does).
        attention_mask: optional (B, T); zeros are excluded as well.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise DistillError(
            f"token cross-entropy needs (B, T, V) logits and (B, T) labels, got {tuple(logits.shape)} and "
            f"{tuple(labels.shape)}"
        )
    batch = Batch(inputs={} if attention_mask is None else {"attention_mask": attention_mask}, targets=labels)
    mask = token_mask(batch, logits, shift, ignore_index)
    target = token_targets(labels.to(logits.device), shift, ignore_index)
    v = logits.shape[-1]
    bad = mask & ((target < 0) | (target >= v))
    if bad.any():
        raise DistillError(f"label {int(target[bad][0])} is out of range for a vocabulary of {v} tokens")
    s2d = logits.reshape(-1, v)
    tgt = target.reshape(-1).clamp(0, v - 1)
    w, m = _token_weights(logits, mask, weights)

    def per_token(s_c: Tensor, a: int, b: int) -> Tensor:
        return -F.log_softmax(s_c, dim=-1).gather(-1, tgt[a:b, None]).squeeze(-1)

    return _reduce_chunked(s2d, w, m, per_token, chunk_size, "mean")


def _check_params(kind: str, beta: float, alpha: float, temperature: float) -> None:
    if kind not in KINDS:
        raise DistillError(f"unknown token divergence '{kind}'; use one of {', '.join(KINDS)}")
    check_positive("temperature", temperature)
    if kind == "jsd" and not 0 < beta < 1:
        raise DistillError(
            f"jsd.beta must be in (0, 1), got {beta}; for beta -> 0 or 1 use the fkl or rkl term"
        )
    if kind in ("skl", "srkl") and not 0 <= alpha < 1:
        raise DistillError(f"{kind}.alpha must be in [0, 1), got {alpha} (alpha = 1 makes the loss 0)")


def forward_kl(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None, **kw) -> Tensor:
    """KL(teacher || student) per token, averaged over unmasked tokens; see `token_divergence`."""
    return token_divergence(student_logits, teacher_logits, "fkl", mask, **kw)


def reverse_kl(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None, **kw) -> Tensor:
    """KL(student || teacher) per token; see `token_divergence`."""
    return token_divergence(student_logits, teacher_logits, "rkl", mask, **kw)


def generalized_jsd(
    student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None, beta: float = 0.5, **kw
) -> Tensor:
    """GKD's generalised Jensen-Shannon divergence with mixture weight beta; see `token_divergence`."""
    return token_divergence(student_logits, teacher_logits, "jsd", mask, beta=beta, **kw)


def skew_kl(
    student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None, alpha: float = 0.1, **kw
) -> Tensor:
    """DistiLLM's skew KL, KL(p || αp + (1-α)q); see `token_divergence`."""
    return token_divergence(student_logits, teacher_logits, "skl", mask, alpha=alpha, **kw)


def skew_reverse_kl(
    student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None, alpha: float = 0.1, **kw
) -> Tensor:
    """DistiLLM's skew reverse KL, KL(q || αq + (1-α)p); see `token_divergence`."""
    return token_divergence(student_logits, teacher_logits, "srkl", mask, alpha=alpha, **kw)


def total_variation(
    student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None, **kw
) -> Tensor:
    """½·Σ|p - q| per token; see `token_divergence`."""
    return token_divergence(student_logits, teacher_logits, "tvd", mask, **kw)


# --------------------------------------------------------------------------------------------
# Masks from a batch, and the registered loss terms.
# --------------------------------------------------------------------------------------------


def token_mask(batch: Batch, logits: Tensor, shift: bool = True, ignore_index: int = -100) -> Tensor | None:
    """Which logit positions a token loss counts, from the batch: (B, T) bool, or None (all).

    Labels equal to `ignore_index` (prompt, padding) and attention-mask zeros are excluded.
    With `shift` (causal LMs), position t counts when token t+1 counts, and the last position
    never does (it predicts nothing inside the sequence).
    """
    if logits.dim() != 3:
        return None
    b, t = logits.shape[:2]
    keep = None
    labels = batch.targets
    if isinstance(labels, Tensor) and labels.shape == (b, t):
        keep = labels != ignore_index
    attn = batch.inputs.get("attention_mask") if isinstance(batch.inputs, Mapping) else None
    if isinstance(attn, Tensor) and attn.shape == (b, t):
        keep = attn.bool() if keep is None else keep & attn.bool()
    if keep is None:
        keep = torch.ones(b, t, dtype=torch.bool, device=logits.device)
    keep = keep.to(logits.device)
    if shift:
        keep = torch.cat([keep[:, 1:], torch.zeros_like(keep[:, :1])], dim=1)
    return keep


def token_targets(labels: Tensor, shift: bool = True, ignore_index: int = -100) -> Tensor:
    """(B, T) labels aligned with the logit positions: with `shift` (causal LMs) position t holds
    token t+1 and the last position `ignore_index`; read it where `token_mask` is True."""
    target = labels.long()
    if shift:
        target = torch.cat([target[:, 1:], torch.full_like(target[:, :1], ignore_index)], dim=1)
    return target


class TokenDivergence(LossTerm):
    """Base of the token-level terms: reads the mask from the batch and calls the chunked math.

    Args:
        temperature: > 0; schedulable as `<term>.temperature`.
        chunk_size: tokens per chunk, None for automatic (bounds peak memory; see `token_divergence`).
        shift_labels: True for causal LMs (logits at t predict token t+1), False when the
            logits are aligned with the labels (token classification, masked LMs).
        ignore_index: the label value marking tokens that do not count.
        vocab_size: the shared tokenizer's length, when a model's logits are wider (its embedding
            matrix padded past the tokenizer, as Qwen, Phi and Pythia do): the columns past it carry
            no token and are dropped on both sides before the softmax. None: the widths must match.
    """

    kind = "fkl"

    def __init__(
        self,
        temperature: float = 1.0,
        chunk_size: int | None = DEFAULT_CHUNK,
        shift_labels: bool = True,
        ignore_index: int = -100,
        vocab_size: int | None = None,
    ):
        super().__init__()
        check_positive(f"{self.kind}.temperature", temperature)
        if chunk_size is not None and int(chunk_size) < 1:
            raise DistillError(f"{self.kind}.chunk_size must be >= 1 (or null for auto), got {chunk_size}")
        self.temperature = temperature
        self.chunk_size = None if chunk_size is None else int(chunk_size)
        self.shift_labels = shift_labels
        self.ignore_index = ignore_index
        if vocab_size is not None and int(vocab_size) < 1:
            raise DistillError(f"{self.kind}.vocab_size must be >= 1 (or null), got {vocab_size}")
        self.vocab_size = None if vocab_size is None else int(vocab_size)

    def _params(self) -> dict:
        return {}

    def forward(self, student: Outputs, teacher: Outputs | None, batch: Batch) -> Tensor:
        s = student.require_logits("student")
        mask = token_mask(batch, s, self.shift_labels, self.ignore_index)
        weights = batch.weights
        if teacher is not None and teacher.logits is None and self._sparse_ok(teacher):
            if self.vocab_size is not None:
                s = s[..., : self.vocab_size]  # padding columns: no token, no share of the student's tail
            return topk_forward_kl(
                s,
                teacher.extras["topk_values"],
                teacher.extras["topk_indices"],
                mask,
                temperature=self.temperature,
                weights=weights,
                chunk_size=self.chunk_size,
                lse=teacher.extras.get("lse"),
            )
        t = teacher.require_logits("teacher")
        if self.vocab_size is not None:
            for who, x in (("student", s), ("teacher", t)):
                if x.shape[-1] < self.vocab_size:
                    raise DistillError(
                        f"{self.kind}.vocab_size is {self.vocab_size} but the {who}'s logits have only "
                        f"{x.shape[-1]} columns; set it to the tokenizer's length"
                    )
            s, t = s[..., : self.vocab_size], t[..., : self.vocab_size]  # padding columns: no token
        return token_divergence(
            s,
            t,
            self.kind,
            mask,
            temperature=self.temperature,
            weights=weights,
            chunk_size=self.chunk_size,
            **self._params(),
        )

    def _sparse_ok(self, teacher: Outputs) -> bool:
        has = "topk_values" in teacher.extras and "topk_indices" in teacher.extras
        if has and self.kind != "fkl":
            raise DistillError(
                f"the {self.kind} term needs the teacher's full logits, but the teacher store holds "
                "only top-k logits; use the fkl term with a top-k store, or cache full logits"
            )
        return has


@LOSSES.register("fkl")
class ForwardKL(TokenDivergence):
    """Forward KL, KL(p_teacher || q_student) per token (Hinton et al. 2015 applied per token).

    With a teacher that provides only `extras["topk_values"]` / `["topk_indices"]` (a cached
    store), the teacher's top-k distribution is used (see `topk_forward_kl`).
    """

    kind = "fkl"


@LOSSES.register("rkl")
class ReverseKL(TokenDivergence):
    """Reverse KL, KL(q_student || p_teacher) per token (Gu et al. 2024, MiniLLM)."""

    kind = "rkl"


@LOSSES.register("jsd")
class GeneralizedJSD(TokenDivergence):
    """Generalised JSD with mixture weight `beta` (Agarwal et al. 2024, GKD).

    Args:
        beta: in (0, 1); schedulable as `<term>.beta`. Small beta behaves like forward KL,
            beta near 1 like reverse KL.
    """

    kind = "jsd"

    def __init__(self, beta: float = 0.5, **kw):
        super().__init__(**kw)
        check_range("jsd.beta", beta, 1e-6, 1 - 1e-6)
        self.beta = beta

    def _params(self) -> dict:
        return {"beta": self.beta}


@LOSSES.register("skl")
class SkewKL(TokenDivergence):
    """Skew KL, KL(p || αp + (1-α)q) (Ko et al. 2024, DistiLLM).

    Args:
        alpha: the skew in [0, 1); DistiLLM uses 0.1.
    """

    kind = "skl"

    def __init__(self, alpha: float = 0.1, **kw):
        super().__init__(**kw)
        if not 0 <= alpha < 1:
            raise DistillError(f"{self.kind}.alpha must be in [0, 1), got {alpha}")
        self.alpha = alpha

    def _params(self) -> dict:
        return {"alpha": self.alpha}


@LOSSES.register("srkl")
class SkewReverseKL(SkewKL):
    """Skew reverse KL, KL(q || αq + (1-α)p) (Ko et al. 2024, DistiLLM).

    Args:
        alpha: the skew in [0, 1); DistiLLM uses 0.1.
    """

    kind = "srkl"


@LOSSES.register("tvd")
class TotalVariation(TokenDivergence):
    """Total variation distance ½·Σ|p - q| per token (bounded in [0, 1])."""

    kind = "tvd"


@LOSSES.register("lm_ce")
class LMCrossEntropy(LossTerm):
    """Next-token cross-entropy on the batch's labels (`labels == -100` not counted), chunked.

    The `ce` term compares logits and labels position by position; causal LMs need the shift
    (the logits at t predict token t+1), which this term does, as Hugging Face models do
    internally.

    Args:
        shift_labels: False for models whose logits are already aligned with the labels.
        chunk_size: tokens per chunk (None: automatic).
    """

    needs_teacher = False

    def __init__(
        self, shift_labels: bool = True, ignore_index: int = -100, chunk_size: int | None = DEFAULT_CHUNK
    ):
        super().__init__()
        self.shift_labels = shift_labels
        self.ignore_index = ignore_index
        self.chunk_size = chunk_size

    def forward(self, student: Outputs, teacher: Outputs | None, batch: Batch) -> Tensor:
        labels = batch.targets
        if labels is None:
            raise DistillError(
                "the lm_ce term needs labels in the batch (input_ids with -100 on prompt/padding)"
            )
        attn = batch.inputs.get("attention_mask") if isinstance(batch.inputs, Mapping) else None
        return token_cross_entropy(
            student.require_logits("student"),
            labels,
            shift=self.shift_labels,
            ignore_index=self.ignore_index,
            attention_mask=attn,
            weights=batch.weights,
            chunk_size=self.chunk_size,
        )
