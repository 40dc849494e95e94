"""Checks of the varlen attention contract; every error names the argument at fault."""

from __future__ import annotations

import torch

from crossmae.packed import summarize_cu_seqlens


def _is_host_int(x) -> bool:
    return isinstance(x, (int, torch.SymInt)) and not isinstance(x, bool)


def check_varlen_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: float | None,
    *,
    check_values: bool = True,
) -> None:
    """Raise ``ValueError`` naming the argument when the inputs break the contract.

    Shapes, dtypes and devices are always checked. With ``check_values`` the contents of
    ``cu_seqlens_*`` are checked too (first entry 0, non-decreasing, last entry equal to the
    row count, no segment longer than ``max_seqlen_*``); that reads each cu_seqlens tensor back
    to the host once (cached per tensor; free for tensors built by :class:`crossmae.packed.Packed`).
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"{name} must have shape [total, H, D], got {tuple(t.shape)}")
    if not q.dtype.is_floating_point:
        raise ValueError(f"q must be a floating-point tensor, got {q.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise ValueError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")
    if v.shape[0] != k.shape[0]:
        raise ValueError(f"v must have as many rows as k ({k.shape[0]}), got {v.shape[0]}")
    for name, t in (("k", k), ("v", v)):
        if t.shape[1] != q.shape[1]:
            raise ValueError(f"{name} must have q's number of heads H={q.shape[1]}, got {t.shape[1]}")
        if t.shape[2] != q.shape[2]:
            raise ValueError(f"{name} must have q's head dim D={q.shape[2]}, got {t.shape[2]}")

    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not isinstance(cu, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(cu).__name__}")
        if cu.dtype != torch.int32:
            raise ValueError(f"{name} must be int32, got {cu.dtype}")
        if cu.dim() != 1 or cu.numel() < 1:
            raise ValueError(f"{name} must have shape [B + 1], got {tuple(cu.shape)}")
        if cu.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {cu.device}")
    if cu_seqlens_k.numel() != cu_seqlens_q.numel():
        raise ValueError(
            f"cu_seqlens_k must have the length of cu_seqlens_q (B + 1 = {cu_seqlens_q.numel()}), "
            f"got {cu_seqlens_k.numel()}"
        )
    for name, m in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if not _is_host_int(m):
            raise ValueError(f"{name} must be a Python int computed on the host, got {type(m).__name__}")
        if m < 0:
            raise ValueError(f"{name} must be non-negative, got {m}")
    if softmax_scale is not None and not isinstance(softmax_scale, (int, float)):
        raise ValueError(f"softmax_scale must be a float or None, got {type(softmax_scale).__name__}")

    if not check_values:
        return
    for name, cu, rows, rows_name, max_name, max_len in (
        ("cu_seqlens_q", cu_seqlens_q, q.shape[0], "q.shape[0] (total_q)", "max_seqlen_q", max_seqlen_q),
        ("cu_seqlens_k", cu_seqlens_k, k.shape[0], "k.shape[0] (total_k)", "max_seqlen_k", max_seqlen_k),
    ):
        summary = summarize_cu_seqlens(cu)
        if summary.first != 0:
            raise ValueError(f"{name}[0] must be 0, got {summary.first}")
        if summary.min_len < 0:
            raise ValueError(f"{name} must be non-decreasing, but a segment has length {summary.min_len}")
        if summary.last != rows:
            raise ValueError(f"{name}[-1] must equal {rows_name} = {rows}, got {summary.last}")
        if summary.max_len > max_len:
            raise ValueError(f"{max_name}={max_len} is smaller than the longest segment ({summary.max_len})")
