"""The public varlen attention op."""

from __future__ import annotations

import torch

from crossmae.ops.backends import BACKENDS, AttentionBackend, resolve_backend, resolved_name
from crossmae.ops.reference import math_attention
from crossmae.ops.validation import check_varlen_inputs


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    softmax_scale: float | None = None,
    backend: str | AttentionBackend = "auto",
) -> torch.Tensor:
    """Non-causal attention over B ragged samples packed into one tensor, in one kernel call.

    Query row i of sample b attends to the key rows of sample b only:
    ``out_i = softmax(q_i · K_b^T * softmax_scale) V_b``.

    Args:
        q: ``[total_q, H, D]`` queries of all samples, packed; float16, bfloat16, float32 (or
            float64 for the reference backends).
        k: ``[total_k, H, D]`` keys, same dtype and device as q.
        v: ``[total_k, H, D]`` values, same dtype and device as q.
        cu_seqlens_q: int32 ``[B + 1]``: sample b's queries are rows
            ``cu_seqlens_q[b] : cu_seqlens_q[b + 1]`` of q; starts at 0, non-decreasing, ends at
            total_q.
        cu_seqlens_k: int32 ``[B + 1]``: the same for k and v.
        max_seqlen_q: host int, at least the longest query segment.
        max_seqlen_k: host int, at least the longest key segment.
        softmax_scale: multiplies the scores before the softmax; default ``D ** -0.5``.
        backend: a registered backend name (``crossmae.ops.BACKENDS``) or ``"auto"``: the
            environment variable ``CROSSMAE_ATTN_BACKEND`` if set, else the fastest that can run
            on these inputs. The choice is cached per (name, device, dtype, head dim, backward),
            so a call costs one dict lookup; a backend resolved ahead with
            :func:`crossmae.ops.resolve_backend` may be passed instead of a name.

    Returns:
        ``[total_q, H, D]`` in q's dtype, differentiable in q, k and v. Zero-length segments are
        legal on either side; a query segment whose key segment is empty gets zeros (and zero
        gradients).

    Raises:
        ValueError: naming the argument, when the inputs break the contract or the chosen
            backend can't run on them (with its reasons). The contents of cu_seqlens are
            checked once per tensor (a host read for device tensors that
            :class:`crossmae.packed.Packed` did not build); under ``torch.compile`` only shapes,
            dtypes and devices are checked.
    """
    check_varlen_inputs(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
        check_values=not torch.compiler.is_compiling(),
    )
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** -0.5
    needs_backward = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    chosen = _backend_for(backend, q, needs_backward)
    if q.shape[0] == 0 or max_seqlen_k == 0:
        # nothing to attend with or to: every backend's answer is the reference's (zeros)
        return math_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale)
    return chosen.fn(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale)


def _backend_for(backend: str | AttentionBackend, q: torch.Tensor, needs_backward: bool) -> AttentionBackend:
    """The backend for this call: a cached resolution, a constant under ``torch.compile``."""
    if isinstance(backend, AttentionBackend):
        backend = backend.name  # checked again for these inputs: a cached lookup
    head_dim = int(q.shape[-1])
    if torch.compiler.is_compiling():
        index = -1 if q.device.index is None else q.device.index
        return BACKENDS[resolved_name(backend, q.device.type, index, q.dtype, head_dim, needs_backward)]
    return resolve_backend(backend, device=q.device, dtype=q.dtype, head_dim=head_dim, needs_backward=needs_backward)
