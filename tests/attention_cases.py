"""Random ragged attention batches and the low-precision tolerance rule, for tests and GPU checks."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from crossmae.ops import math_attention, varlen_attention
from crossmae.packed import Packed, key_padding_mask, pad_packed


@dataclass
class AttentionCase:
    q: torch.Tensor  # [total_q, H, D]
    k: torch.Tensor  # [total_k, H, D]
    v: torch.Tensor  # [total_k, H, D]
    packed_q: Packed
    packed_k: Packed
    softmax_scale: float | None = None

    @property
    def args(self):
        return (self.q, self.k, self.v, self.packed_q.cu_seqlens, self.packed_k.cu_seqlens,
                self.packed_q.max_seqlen, self.packed_k.max_seqlen)


def ragged_lengths(batch: int, max_len: int, gen: torch.Generator, *, force_edges: bool = True) -> list[int]:
    """Random lengths in [0, max_len]; with ``force_edges`` the batch holds a 0 and a 1 where B allows."""
    lengths = torch.randint(0, max_len + 1, (batch,), generator=gen).tolist()
    if force_edges:
        for i, edge in enumerate((0, 1)):
            if batch > i:
                lengths[i] = edge
    return lengths


def make_case(lengths_q, lengths_k, heads: int, head_dim: int, dtype=torch.float32, device="cpu", seed: int = 0,
              requires_grad: bool = True) -> AttentionCase:
    gen = torch.Generator().manual_seed(seed)
    packed_q = Packed.from_lengths(lengths_q, device=device)
    packed_k = Packed.from_lengths(lengths_k, device=device)

    def rand(rows):
        t = torch.randn(rows, heads, head_dim, generator=gen).to(device=device, dtype=dtype)
        return t.requires_grad_(requires_grad)

    return AttentionCase(rand(packed_q.total), rand(packed_k.total), rand(packed_k.total), packed_q, packed_k)


def random_case(batch: int, max_q: int, max_k: int, heads: int, head_dim: int, seed: int, **kw) -> AttentionCase:
    """A ragged cross-attention batch whose lengths include 0 and 1 on both sides (where B allows)."""
    gen = torch.Generator().manual_seed(1000 + seed)
    lengths_q = ragged_lengths(batch, max_q, gen)
    lengths_k = ragged_lengths(batch, max_k, gen)
    # put the key-side edges on other samples than the query-side ones where B allows,
    # so a non-empty query segment meets an empty key segment
    if batch >= 4:
        lengths_k = lengths_k[2:] + lengths_k[:2]
        lengths_q[2] = max(lengths_q[2], 3)
    return make_case(lengths_q, lengths_k, heads, head_dim, seed=seed, **kw)


def forward_backward(fn, case: AttentionCase, grad_out: torch.Tensor, dtype=None):
    """out, dq, dk, dv of ``fn(q, k, v, ...)`` on copies of the case's inputs (optionally cast)."""
    leaves = [t.detach().clone() for t in (case.q, case.k, case.v)]
    if dtype is not None:
        leaves = [t.to(dtype) for t in leaves]
    for t in leaves:
        t.requires_grad_(True)
    out = fn(*leaves, *case.args[3:])
    grads = torch.autograd.grad(out, leaves, grad_out.to(out.dtype), allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads)]
    return (out.detach(), *grads)


def reference_fn(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=None):
    """The float64 oracle."""
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    return math_attention(q, k, v, cu_q, cu_k, max_q, max_k, scale, upcast=True)


def worst(actual: torch.Tensor, expected: torch.Tensor) -> str:
    err = (actual.double() - expected.double()).abs()
    if err.numel() == 0:
        return "empty"
    err = err.nan_to_num(nan=float("inf"))  # the first non-finite entry is the worst
    idx = tuple(int(i) for i in torch.unravel_index(err.argmax(), err.shape))
    return f"max abs error {err.max().item():.3e} at index {idx}: got {actual[idx].item():.6g}, " \
           f"expected {expected[idx].item():.6g}"


def assert_close(actual, expected, *, atol: float, rtol: float, name: str = "tensor"):
    ok = torch.allclose(actual.double(), expected.double(), atol=atol, rtol=rtol)
    assert ok, f"{name}: {worst(actual, expected)} (atol={atol}, rtol={rtol})"


def assert_within_rule(actual, reference, baseline, *, factor: float, floor: float, name: str = "tensor"):
    """FlashAttention's rule: error vs float64 ≤ factor × (same-precision PyTorch's error) + floor."""
    err = (actual.double() - reference).abs().max().item() if actual.numel() else 0.0
    base = (baseline.double() - reference).abs().max().item() if baseline.numel() else 0.0
    assert err <= factor * base + floor, (
        f"{name}: error {err:.3e} exceeds {factor} x baseline {base:.3e} + {floor:g}; {worst(actual, reference)}"
    )


# -- adversarial numerics --------------------------------------------------------------------
# One head per pattern, so one case checks every pattern; each pattern puts the logits (q . k *
# softmax_scale) of every query row near a chosen place.
HEAD_PATTERNS = (
    "far_below",       # keys share a large component the queries oppose: every logit near -logit
    "far_below_spread",  # the same with noisy q and k: centred near -logit, spread over hundreds (one-hot rows)
    "dominant_key",    # the first key of each segment near +logit, the others near 0: one-hot rows
    "large_positive",  # queries and keys share the large component: every logit near +logit
    "normal",          # standard normal q, k
)


def _head_inputs(pattern: str, rows_q: int, rows_k: int, head_dim: int, scale: float, logit: float,
                 gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 q ``[rows_q, D]`` and k ``[rows_k, D]`` of one head (the dominant key is placed later)."""
    def noise(rows, std):
        return std * torch.randn(rows, head_dim, generator=gen, dtype=torch.float64)

    shared = torch.randn(head_dim, generator=gen, dtype=torch.float64)
    shared = shared / shared.norm() * math.sqrt(logit / scale)  # shared . shared * scale = logit
    if pattern == "far_below":
        return noise(rows_q, 0.05) - shared, noise(rows_k, 0.2) + shared
    if pattern == "far_below_spread":
        return noise(rows_q, 1.0) - shared, noise(rows_k, 1.5) + shared
    if pattern == "large_positive":
        return noise(rows_q, 0.05) + shared, noise(rows_k, 0.2) + shared
    if pattern == "dominant_key":
        return noise(rows_q, 0.05) + shared, noise(rows_k, 0.3)
    if pattern == "normal":
        return noise(rows_q, 1.0), noise(rows_k, 1.0)
    raise ValueError(f"pattern must be one of {HEAD_PATTERNS}, got {pattern!r}")


def numerics_case(lengths_q, lengths_k, head_dim: int, *, patterns=HEAD_PATTERNS, logit: float = 120.0,
                  softmax_scale: float = 5.0, seed: int = 0, dtype=torch.float32, device="cpu") -> AttentionCase:
    """A ragged batch whose head h follows ``patterns[h]`` (H = len(patterns)), logits near ±``logit``."""
    gen = torch.Generator().manual_seed(seed)
    packed_q = Packed.from_lengths(lengths_q, device=device)
    packed_k = Packed.from_lengths(lengths_k, device=device)
    heads = [_head_inputs(p, packed_q.total, packed_k.total, head_dim, softmax_scale, logit, gen) for p in patterns]
    q = torch.stack([h[0] for h in heads], dim=1)  # [total_q, H, D]
    k = torch.stack([h[1] for h in heads], dim=1)  # [total_k, H, D]
    if "dominant_key" in patterns:
        h = patterns.index("dominant_key")
        starts = (packed_k.cu_seqlens.cpu()[:-1].long())[packed_k.lengths > 0]  # first key of each segment
        direction = q[:, h].mean(dim=0) if q.shape[0] else torch.ones(head_dim, dtype=torch.float64)
        k[starts, h] = direction / direction.norm() * math.sqrt(logit / softmax_scale)
    v = torch.randn(packed_k.total, len(patterns), head_dim, generator=gen, dtype=torch.float64)

    def leaf(t):
        return t.to(device=device, dtype=dtype).requires_grad_(True)

    return AttentionCase(leaf(q), leaf(k), leaf(v), packed_q, packed_k, softmax_scale=softmax_scale)


def rounding_magnitudes(case: AttentionCase, grad_out: torch.Tensor) -> list[torch.Tensor]:
    """Per head, float64 ``[H]`` for out, dq, dk, dv: the size of what a fp32 kernel rounds.

    Rounding a score ``s`` moves its probability by a relative ``u * |s|`` (u the unit roundoff),
    and a FlashAttention-style kernel recomputes ``P = exp(s - lse)`` in its backward from an fp32
    ``lse``: each probability carries a relative error of order ``u * (1 + |lse|)``. Such a kernel
    also forms ``dS = P * (dP - delta)`` from two separately rounded sums, ``dP_ij = dO_i . v_j``
    and ``delta_i = dO_i . o_i``. These magnitudes are those terms (float64, ``|x|`` elementwise):

        w_ij   = P_ij * (1 + |lse_i|)
        r_ij   = w_ij |dP_ij - delta_i| + P_ij (|dO_i| . |v_j| + |dO_i| . |o_i|)
        out    : sum_j w_ij |v_j|
        dq     : scale * sum_j r_ij |k_j|
        dk     : scale * sum_i r_ij |q_i|
        dv     : sum_i w_ij |dO_i|

    each maximised over rows and lanes per head.
    """
    pq, pk = case.packed_q, case.packed_k
    scale = case.q.shape[-1] ** -0.5 if case.softmax_scale is None else case.softmax_scale
    q = pad_packed(case.q.detach().cpu().double(), pq.cu_seqlens.cpu(), pq.max_seqlen)  # [B, Lq, H, D]
    k = pad_packed(case.k.detach().cpu().double(), pk.cu_seqlens.cpu(), pk.max_seqlen)  # [B, Lk, H, D]
    v = pad_packed(case.v.detach().cpu().double(), pk.cu_seqlens.cpu(), pk.max_seqlen)  # [B, Lk, H, D]
    do = pad_packed(grad_out.cpu().double(), pq.cu_seqlens.cpu(), pq.max_seqlen)  # [B, Lq, H, D]
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale  # [B, H, Lq, Lk]
    key_ok = key_padding_mask(pk.cu_seqlens.cpu(), pk.max_seqlen)[:, None, None, :]  # [B, 1, 1, Lk]
    scores = scores.masked_fill(~key_ok, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)  # [B, H, Lq, 1]
    p = torch.exp(scores - lse).nan_to_num(0.0)  # [B, H, Lq, Lk]
    w = p * (1 + lse.nan_to_num(0.0, neginf=0.0).abs())
    o_abs = torch.einsum("bhqk,bkhd->bqhd", p, v.abs())  # [B, Lq, H, D]
    out_mag = torch.einsum("bhqk,bkhd->bqhd", w, v.abs())  # [B, Lq, H, D]
    o = torch.einsum("bhqk,bkhd->bqhd", p, v)  # [B, Lq, H, D]
    dp = torch.einsum("bqhd,bkhd->bhqk", do, v)  # [B, H, Lq, Lk]
    delta = (do * o).sum(-1).transpose(1, 2)[..., None]  # [B, H, Lq, 1]
    dp_abs = torch.einsum("bqhd,bkhd->bhqk", do.abs(), v.abs())  # [B, H, Lq, Lk]
    delta_abs = (do.abs() * o_abs).sum(-1).transpose(1, 2)[..., None]  # [B, H, Lq, 1]
    ds_abs = w * (dp - delta).abs() + p * (dp_abs + delta_abs)  # [B, H, Lq, Lk]
    mags = (
        out_mag,
        scale * torch.einsum("bhqk,bkhd->bqhd", ds_abs, k.abs()),
        scale * torch.einsum("bhqk,bqhd->bkhd", ds_abs, q.abs()),
        torch.einsum("bhqk,bqhd->bkhd", w, do.abs()),
    )
    heads = case.q.shape[1]
    return [m.amax(dim=(0, 1, 3)) if m.numel() else torch.zeros(heads, dtype=torch.float64) for m in mags]


def unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def assert_rounding_rule(actual, reference, baseline, magnitude, *, factor: float, floor_ulps: float,
                         unit: float, name: str):
    """Per head h: ``|actual - ref|_max ≤ factor · |baseline - ref|_max + floor_ulps · unit · magnitude[h]``.

    ``actual``/``baseline``/``reference`` are ``[rows, H, D]``; ``baseline`` is plain PyTorch in the same
    dtype (FlashAttention's rule), the floor is :func:`rounding_magnitudes` in units of ``unit``.
    """
    assert torch.isfinite(reference).all(), f"{name}: the float64 reference is not finite"
    assert torch.isfinite(actual).all(), f"{name}: not finite where float64 is; {worst(actual, reference)}"
    if actual.numel() == 0:
        return
    err = (actual.double() - reference).abs().amax(dim=(0, 2))  # [H]
    base = (baseline.double() - reference).abs().amax(dim=(0, 2))  # [H]
    allowed = factor * base + floor_ulps * unit * magnitude
    for h in range(err.numel()):
        assert err[h] <= allowed[h], (
            f"{name} head {h}: error {err[h]:.3e} exceeds {factor} x plain-PyTorch error {base[h]:.3e} "
            f"+ {floor_ulps} ulps of {magnitude[h]:.3e}; {worst(actual[:, h], reference[:, h])}"
        )


class TinyCrossAttention(torch.nn.Module):
    """x [total_q, d] attends to memory [total_k, d] through one backend: a module for torch.compile tests."""

    def __init__(self, backend: str, dim: int = 32, heads: int = 2):
        super().__init__()
        self.backend, self.heads = backend, heads
        self.to_q = torch.nn.Linear(dim, dim)
        self.to_kv = torch.nn.Linear(dim, 2 * dim)

    def forward(self, x, memory, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int):
        q = self.to_q(x).view(x.shape[0], self.heads, -1)  # [total_q, H, D]
        k, v = self.to_kv(memory).view(memory.shape[0], 2, self.heads, -1).unbind(1)  # [total_k, H, D] each
        out = varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, backend=self.backend)
        return out.reshape(x.shape[0], -1)  # [total_q, d]
