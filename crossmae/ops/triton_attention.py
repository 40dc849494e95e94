"""Our Triton kernels as a ``torch.library`` custom op with registered autograd.

Layering: ``crossmae_kernels.varlen_attention`` holds the kernels and launchers; this module
registers ``crossmae::varlen_attn_triton_fwd`` / ``crossmae::varlen_attn_triton_bwd`` with fake
(meta) implementations, so ``torch.compile`` traces through them, and ties them together with
``register_autograd``. :func:`crossmae.ops.varlen_attention` is the public entry point.
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    from crossmae_kernels import varlen_attention as _kernels

    _IMPORT_ERROR = None
except ImportError as exc:  # triton missing or broken on this machine
    _kernels = None
    _IMPORT_ERROR = f"triton kernels can't be imported: {exc}"


def unavailable_reason() -> str | None:
    return _IMPORT_ERROR


def head_dim_supported(d: int) -> bool:
    return _kernels is not None and _kernels.head_dim_supported(d)


def device_reasons(q: Tensor) -> list[str]:
    if q.device.type == "cpu" and not _kernels.is_interpreting():
        return ["runs on CPU tensors only under TRITON_INTERPRET=1 (a slow interpreter, for tests)"]
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        # the interpreter keeps bfloat16 as raw uint16 and multiplies the bit patterns in tl.dot
        return ["Triton's CPU interpreter has no bfloat16 tl.dot (it multiplies the raw bits)"]
    if q.is_cuda and q.dtype == torch.bfloat16 and torch.cuda.get_device_capability(q.device) < (8, 0):
        return ["bfloat16 needs a GPU of compute capability 8.0 or newer"]
    return []


@torch.library.custom_op("crossmae::varlen_attn_triton_fwd", mutates_args=())
def varlen_attn_triton_fwd(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
    max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float,
) -> tuple[Tensor, Tensor]:
    """Returns out ``[total_q, H, D]`` and the base-2 log-sum-exp ``[H, total_q]`` (fp32)."""
    return _kernels.varlen_attn_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale)


@varlen_attn_triton_fwd.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale):
    out = q.new_empty(q.shape)
    lse = q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)
    return out, lse


@torch.library.custom_op("crossmae::varlen_attn_triton_bwd", mutates_args=())
def varlen_attn_triton_bwd(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns dq, dk, dv (contiguous, the inputs' dtype)."""
    return _kernels.varlen_attn_bwd(
        dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale
    )


@varlen_attn_triton_bwd.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k)
    ctx.max_seqlen_q, ctx.max_seqlen_k, ctx.softmax_scale = max_seqlen_q, max_seqlen_k, softmax_scale
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
    dq, dk, dv = varlen_attn_triton_bwd(
        dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, ctx.max_seqlen_q, ctx.max_seqlen_k, ctx.softmax_scale
    )
    return dq, dk, dv, None, None, None, None, None


varlen_attn_triton_fwd.register_autograd(_backward, setup_context=_setup_context)


def triton_varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale):
    out, _ = varlen_attn_triton_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                    float(softmax_scale))
    return out
