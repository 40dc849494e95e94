"""Random ragged attention batches and the low-precision tolerance rule, for tests and GPU checks."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from crossmae.ops import math_attention, varlen_attention
from crossmae.packed import Packed


@dataclass
class AttentionCase:
    q: torch.Tensor  # [total_q, H, D]
    k: torch.Tensor  # [total_k, H, D]
    v: torch.Tensor  # [total_k, H, D]
    packed_q: Packed
    packed_k: Packed

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
