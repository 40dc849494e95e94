"""Our compiled C++ kernels (``crossmae._C``) as the ``cpu`` backend: fake implementations and autograd.

Layering: ``kernels/csrc/cpu/`` holds the kernels and their launcher, and
``kernels/csrc/torch_bindings.cpp`` defines ``crossmae::varlen_attn_cpu_fwd`` /
``crossmae::varlen_attn_cpu_bwd`` in one ``TORCH_LIBRARY`` block. This module loads the
extension on first use, registers the ops' fake (meta) implementations, so ``torch.compile``
traces through them, and ties them together with ``register_autograd``.
:func:`crossmae.ops.varlen_attention` is the public entry point.

Without the extension (installed with ``CROSSMAE_SKIP_EXTENSION=1``, or built against another
torch) everything still imports; :func:`unavailable_reason` says why the backend can't run.
"""

from __future__ import annotations

import importlib
import threading

import torch
from torch import Tensor

EXTENSION = "crossmae._C"
_FWD = "crossmae::varlen_attn_cpu_fwd"
_BWD = "crossmae::varlen_attn_cpu_bwd"

_load_result: list[str | None] = []  # empty until the first load attempt, then [reason or None]
_load_lock = threading.Lock()


def _register_python_parts() -> None:
    """Fake implementations of both ops and the forward op's autograd (once, after loading)."""

    @torch.library.register_fake(_FWD)
    def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale):
        out = q.new_empty(q.shape)  # [total_q, H, D]
        lse = q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)  # [H, total_q]
        return out, lse

    @torch.library.register_fake(_BWD)
    def _(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale):
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    torch.library.register_autograd(_FWD, _backward, setup_context=_setup_context)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k)
    ctx.max_seqlen_q, ctx.max_seqlen_k, ctx.softmax_scale = max_seqlen_q, max_seqlen_k, softmax_scale
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
    dq, dk, dv = torch.ops.crossmae.varlen_attn_cpu_bwd(
        dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, ctx.max_seqlen_q, ctx.max_seqlen_k, ctx.softmax_scale
    )
    return dq, dk, dv, None, None, None, None, None


@torch.compiler.assume_constant_result
def unavailable_reason() -> str | None:
    """Why the compiled kernels can't run here (loading them on the first call), or None when they can."""
    with _load_lock:
        if not _load_result:
            try:
                importlib.import_module(EXTENSION)
            except ImportError as exc:
                _load_result.append(
                    f"the compiled extension {EXTENSION} can't be imported ({exc}); build it with "
                    "`pip install --no-build-isolation -e .` (it is skipped when CROSSMAE_SKIP_EXTENSION=1)"
                )
            else:
                _register_python_parts()
                _load_result.append(None)
        return _load_result[0]


def isa() -> str | None:
    """The instruction set the kernels run with here (``"avx512"``, ``"avx2"``, ``"default"``), or None."""
    if unavailable_reason() is not None:
        return None
    return importlib.import_module(EXTENSION).cpu_isa


def cpu_varlen_attention(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
    max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float,
) -> Tensor:
    """The ``cpu`` backend: the compiled forward op, differentiable through the compiled backward op."""
    out, _ = torch.ops.crossmae.varlen_attn_cpu_fwd(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, float(softmax_scale)
    )
    return out
