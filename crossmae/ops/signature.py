"""The varlen attention signature, written once."""

from __future__ import annotations

from typing import Protocol

from torch import Tensor


class VarlenAttentionFn(Protocol):
    """``fn(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale) -> out``.

    q ``[total_q, H, D]``, k/v ``[total_k, H, D]`` (same dtype and device), cu_seqlens int32
    ``[B + 1]``, max_seqlen host ints, softmax_scale a float; returns out ``[total_q, H, D]`` in
    q's dtype. Every backend's function and every reference has this signature; the contract is
    :func:`crossmae.ops.varlen_attention`'s.
    """

    def __call__(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        cu_seqlens_q: Tensor,
        cu_seqlens_k: Tensor,
        max_seqlen_q: int,
        max_seqlen_k: int,
        softmax_scale: float,
    ) -> Tensor: ...
