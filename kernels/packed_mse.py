"""Weighted sum of squared errors over packed reconstruction targets, in Triton.

Algorithm
    Forward: each program reduces BLOCK_R rows of ``w * (pred - target)²`` (all columns, in
    BLOCK_C slices; BLOCK_R · BLOCK_C = TILE elements) to one fp32 partial sum; the host sums
    the partials in a fixed order, so the result is deterministic (no atomics). Backward: one elementwise pass,
    ``d pred = 2 · g · w · (pred - target)``. Neither pass materialises the difference or the
    squared error, which the unfused loss writes to memory twice.

Layouts
    pred    [N, K]  fp16 / bf16 / fp32 (the head's output), any row stride, unit column stride
    target  [N, K]  fp32, same layout rules
    weight  [N, K]  fp32 (0 = not counted)
    partial [cdiv(N, BLOCK_R)] fp32;  grad [N, K] in pred's dtype, contiguous

Numerics
    Differences and sums in fp32 regardless of pred's dtype.
"""

import torch
import triton
import triton.language as tl

TILE = 1024  # elements per program and column slice: 8 per thread at 4 warps (no spills on sm_90)


@triton.jit
def _masked_sse_fwd_kernel(
    Pred, Target, Weight, Partial,
    n_rows, n_cols,
    stride_p, stride_t, stride_w,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = (pid * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    row_mask = rows < n_rows
    acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    for c0 in range(0, n_cols, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        mask = row_mask[:, None] & (cols < n_cols)[None, :]
        p = tl.load(Pred + rows[:, None] * stride_p + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        t = tl.load(Target + rows[:, None] * stride_t + cols[None, :], mask=mask, other=0.0)
        w = tl.load(Weight + rows[:, None] * stride_w + cols[None, :], mask=mask, other=0.0)
        d = p - t
        acc += w * d * d
    tl.store(Partial + pid, tl.sum(tl.sum(acc, axis=1), axis=0))


@triton.jit
def _masked_sse_bwd_kernel(
    Pred, Target, Weight, Grad, GradOut,
    n_rows, n_cols,
    stride_p, stride_t, stride_w, stride_g,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = (pid * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    row_mask = rows < n_rows
    g = tl.load(GradOut).to(tl.float32) * 2.0
    for c0 in range(0, n_cols, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        mask = row_mask[:, None] & (cols < n_cols)[None, :]
        p = tl.load(Pred + rows[:, None] * stride_p + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        t = tl.load(Target + rows[:, None] * stride_t + cols[None, :], mask=mask, other=0.0)
        w = tl.load(Weight + rows[:, None] * stride_w + cols[None, :], mask=mask, other=0.0)
        grad = g * w * (p - t)
        tl.store(Grad + rows[:, None] * stride_g + cols[None, :], grad.to(Grad.dtype.element_ty), mask=mask)


def _check(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> None:
    if pred.dim() != 2 or target.shape != pred.shape or weight.shape != pred.shape:
        raise ValueError(
            f"pred, target and weight must share a [N, K] shape, got {tuple(pred.shape)}, "
            f"{tuple(target.shape)}, {tuple(weight.shape)}"
        )
    if target.dtype != torch.float32 or weight.dtype != torch.float32:
        raise ValueError(f"target and weight must be float32, got {target.dtype} and {weight.dtype}")
    for name, t in (("pred", pred), ("target", target), ("weight", weight)):
        if t.shape[0] > 0 and t.stride(1) != 1:
            raise ValueError(f"{name} must have unit stride along its last dim, got strides {t.stride()}")


def _block_c(n_cols: int) -> int:
    return min(128, triton.next_power_of_2(max(n_cols, 16)))


def block_rows(block_c: int) -> int:
    """Rows per program for a column slice of ``block_c``: a ``TILE``-element tile. Larger tiles spill
    registers on sm_90 (``bench/kernel_report.py`` checks every launch configuration)."""
    return TILE // block_c


def masked_sse_fwd(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``sum(weight * (pred - target)²)`` as an fp32 scalar tensor."""
    _check(pred, target, weight)
    n_rows, n_cols = pred.shape
    if n_rows == 0 or n_cols == 0:
        return torch.zeros((), dtype=torch.float32, device=pred.device)
    block_c = _block_c(n_cols)
    block_r = block_rows(block_c)
    partial = torch.empty(triton.cdiv(n_rows, block_r), dtype=torch.float32, device=pred.device)
    _masked_sse_fwd_kernel[(partial.numel(),)](
        pred, target, weight, partial, n_rows, n_cols, pred.stride(0), target.stride(0), weight.stride(0),
        BLOCK_R=block_r, BLOCK_C=block_c,
    )
    return partial.sum()


def masked_sse_bwd(grad_out: torch.Tensor, pred: torch.Tensor, target: torch.Tensor,
                   weight: torch.Tensor) -> torch.Tensor:
    """``d sse / d pred`` times ``grad_out`` (a scalar tensor): ``2 · grad_out · weight · (pred - target)``."""
    n_rows, n_cols = pred.shape
    grad = torch.empty((n_rows, n_cols), dtype=pred.dtype, device=pred.device)
    if n_rows == 0 or n_cols == 0:
        return grad
    block_c = _block_c(n_cols)
    block_r = block_rows(block_c)
    _masked_sse_bwd_kernel[(triton.cdiv(n_rows, block_r),)](
        pred, target, weight, grad, grad_out.reshape(1), n_rows, n_cols,
        pred.stride(0), target.stride(0), weight.stride(0), grad.stride(0),
        BLOCK_R=block_r, BLOCK_C=block_c,
    )
    return grad
