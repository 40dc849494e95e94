"""Plain-PyTorch varlen attention: the oracle, the CPU fallback and the baselines.

All three take the packed contract of :func:`crossmae.ops.varlen_attention` and run anywhere:

- :func:`math_attention`   explicit ``softmax(q k^T * scale) v`` on a padded batch; with
  ``upcast=True`` it computes and returns float64 (the test oracle).
- :func:`loop_attention`   one SDPA call per sample in a Python loop (the seed's way).
- :func:`sdpa_padded_attention`  pad to ``max_seqlen``, one SDPA call with a key-padding mask,
  unpad (the naive batched way).

The SDPA-based two pass ``q * softmax_scale`` and ``scale=1``: given a ``scale``, PyTorch's fused
CPU kernel does not round the scaled scores the same way in its forward and in its backward's
recomputation, so the recomputed probabilities carry a relative error of about
``|logit| * 2**-24``, and at logits near ±120 the gradients came out 10-100 times further from
float64 than plain fp32 math (``tests/test_attention_numerics.py``). With the scale folded into q
both passes compute the same ``q' . k``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from crossmae.packed import key_padding_mask, pad_packed, unpad


def math_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: float,
    *,
    upcast: bool = False,
) -> torch.Tensor:
    """Reference attention; returns ``[total_q, H, D]`` in q's dtype, or float64 when ``upcast``.

    Memory is ``B * H * max_seqlen_q * max_seqlen_k`` scores: a reference, not a fast path.
    """
    if upcast:
        q, k, v = q.double(), k.double(), v.double()
    qp = pad_packed(q, cu_seqlens_q, max_seqlen_q)  # [B, Lq, H, D]
    kp = pad_packed(k, cu_seqlens_k, max_seqlen_k)  # [B, Lk, H, D]
    vp = pad_packed(v, cu_seqlens_k, max_seqlen_k)  # [B, Lk, H, D]
    scores = torch.einsum("bqhd,bkhd->bhqk", qp, kp) * softmax_scale  # [B, H, Lq, Lk]
    key_ok = key_padding_mask(cu_seqlens_k, max_seqlen_k)[:, None, None, :]  # [B, 1, 1, Lk]
    scores = scores.masked_fill(~key_ok, float("-inf"))
    # a sample without keys has an all -inf row: give it zeros rather than NaN
    has_keys = key_ok.any(dim=-1, keepdim=True)  # [B, 1, 1, 1]
    probs = torch.softmax(scores.masked_fill(~has_keys, 0.0), dim=-1) * has_keys  # [B, H, Lq, Lk]
    out = torch.einsum("bhqk,bkhd->bqhd", probs, vp)  # [B, Lq, H, D]
    return unpad(out, cu_seqlens_q, q.shape[0])  # [total_q, H, D]


def loop_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: float,
) -> torch.Tensor:
    """One ``scaled_dot_product_attention`` call per sample (reads cu_seqlens on the host); q pre-scaled."""
    bounds_q = cu_seqlens_q.tolist()
    bounds_k = cu_seqlens_k.tolist()
    outs = []
    for b in range(len(bounds_q) - 1):
        qb = q[bounds_q[b] : bounds_q[b + 1]]  # [Lq_b, H, D]
        kb = k[bounds_k[b] : bounds_k[b + 1]]  # [Lk_b, H, D]
        vb = v[bounds_k[b] : bounds_k[b + 1]]  # [Lk_b, H, D]
        if qb.shape[0] == 0:
            continue
        if kb.shape[0] == 0:
            outs.append(qb * 0.0)
            continue
        # 4-D inputs: SDPA's fused CPU/GPU kernels refuse 3-D ones and fall back to the math path
        ob = F.scaled_dot_product_attention(
            (qb * softmax_scale).transpose(0, 1)[None], kb.transpose(0, 1)[None], vb.transpose(0, 1)[None], scale=1.0
        )  # [1, H, Lq_b, D]
        outs.append(ob[0].transpose(0, 1))  # [Lq_b, H, D]
    if not outs:
        return q.new_zeros(q.shape)
    return torch.cat(outs, dim=0)  # [total_q, H, D]


def sdpa_padded_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: float,
) -> torch.Tensor:
    """Pad to the longest sample, one SDPA call with a key-padding mask, unpad; q pre-scaled."""
    qp = pad_packed(q * softmax_scale, cu_seqlens_q, max_seqlen_q).transpose(1, 2)  # [B, H, Lq, D]
    kp = pad_packed(k, cu_seqlens_k, max_seqlen_k).transpose(1, 2)  # [B, H, Lk, D]
    vp = pad_packed(v, cu_seqlens_k, max_seqlen_k).transpose(1, 2)  # [B, H, Lk, D]
    key_ok = key_padding_mask(cu_seqlens_k, max_seqlen_k)  # [B, Lk]
    has_keys = key_ok.any(dim=1)  # [B]
    # a sample without keys would softmax over nothing (NaN): let it see its padding, then zero it
    mask = (key_ok | ~has_keys[:, None])[:, None, None, :]  # [B, 1, 1, Lk]
    out = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, scale=1.0)  # [B, H, Lq, D]
    out = out * has_keys[:, None, None, None].to(out.dtype)
    return unpad(out.transpose(1, 2), cu_seqlens_q, q.shape[0])  # [total_q, H, D]
