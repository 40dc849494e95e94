"""One helper that makes a forward/backward kernel pair a ``torch.library`` op with fake and autograd.

A backend with its own kernels provides two ops with these schemas (defined in C++ with
``TORCH_LIBRARY``, or here from Python functions by :func:`define_varlen_attention_ops`)::

    <name>_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale)
        -> (out [total_q, H, D], lse [H, total_q] fp32)
    <name>_bwd(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
               softmax_scale) -> (dq, dk, dv)

:func:`register_fake_and_autograd` registers both ops' fake (meta) implementations, so
``torch.compile`` traces through them, and the forward's autograd formula, which calls the
backward op; :func:`op_attention_fn` turns the forward op into a
:class:`~crossmae.ops.signature.VarlenAttentionFn`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from crossmae.ops.signature import VarlenAttentionFn

FWD_SCHEMA = (
    "(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, SymInt max_seqlen_q, "
    "SymInt max_seqlen_k, float softmax_scale) -> (Tensor, Tensor)"
)
BWD_SCHEMA = (
    "(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor cu_seqlens_q, "
    "Tensor cu_seqlens_k, SymInt max_seqlen_q, SymInt max_seqlen_k, float softmax_scale) -> (Tensor, Tensor, Tensor)"
)


def _op(qualname: str):
    namespace, name = qualname.split("::")
    return getattr(getattr(torch.ops, namespace), name).default


def _fake_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale):
    out = q.new_empty(q.shape)  # [total_q, H, D]
    lse = q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)  # [H, total_q]
    return out, lse


def _fake_bwd(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k)
    ctx.max_seqlen_q, ctx.max_seqlen_k, ctx.softmax_scale = max_seqlen_q, max_seqlen_k, softmax_scale
    ctx.mark_non_differentiable(lse)


def register_fake_and_autograd(fwd: str, bwd: str) -> None:
    """Fake implementations of ops ``fwd``/``bwd`` (qualified names) and ``fwd``'s autograd through ``bwd``.

    The fakes are registered in the name of the calling module, which is the module a C++
    ``m.set_python_module(...)`` names.
    """
    torch.library.register_fake(fwd, _fake_fwd, _stacklevel=2)
    torch.library.register_fake(bwd, _fake_bwd, _stacklevel=2)
    bwd_op = _op(bwd)

    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
        dq, dk, dv = bwd_op(
            dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, ctx.max_seqlen_q, ctx.max_seqlen_k,
            ctx.softmax_scale,
        )
        return dq, dk, dv, None, None, None, None, None

    torch.library.register_autograd(fwd, backward, setup_context=_setup_context)


def define_varlen_attention_ops(
    fwd: str, bwd: str, fwd_impl: Callable[..., tuple[Tensor, Tensor]], bwd_impl: Callable[..., tuple[Tensor, ...]]
) -> tuple[torch.library.CustomOpDef, torch.library.CustomOpDef]:
    """Define ops ``fwd``/``bwd`` from Python kernels (schemas above), then fake and autograd for them."""
    fwd_op = torch.library.custom_op(fwd, fwd_impl, mutates_args=(), schema=FWD_SCHEMA)
    bwd_op = torch.library.custom_op(bwd, bwd_impl, mutates_args=(), schema=BWD_SCHEMA)
    register_fake_and_autograd(fwd, bwd)
    return fwd_op, bwd_op


def op_attention_fn(fwd: str) -> VarlenAttentionFn:
    """The backend function of forward op ``fwd``: its output, differentiable through its backward op.

    The op is looked up at call time, so the function exists before a lazily loaded library does.
    """

    def attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale):
        out, _ = _op(fwd)(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, float(softmax_scale))
        return out

    return attention
