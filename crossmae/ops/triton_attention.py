"""Our Triton kernels as the ``triton`` backend: ``torch.library`` ops with fake implementations and autograd.

Layering: ``crossmae_kernels.varlen_attention`` holds the kernels and launchers; this module
defines ``crossmae::varlen_attn_triton_fwd`` / ``crossmae::varlen_attn_triton_bwd`` from them
(:mod:`crossmae.ops.registration`), so ``torch.compile`` traces through them.
:func:`crossmae.ops.varlen_attention` is the public entry point.
"""

from __future__ import annotations

import os
import shutil

import torch
from torch import Tensor

from crossmae.ops.registration import define_varlen_attention_ops, op_attention_fn

try:
    from crossmae_kernels import varlen_attention as _kernels

    _IMPORT_ERROR = None
except ImportError as exc:  # triton missing or broken on this machine
    _kernels = None
    _IMPORT_ERROR = f"triton kernels can't be imported: {exc}"

_FWD = "crossmae::varlen_attn_triton_fwd"
_BWD = "crossmae::varlen_attn_triton_bwd"


def c_compiler() -> str | None:
    """The C compiler Triton would build its launcher with, as Triton looks for it, or None.

    Triton (``triton/runtime/build.py``) takes ``$CC`` as the program to run when it is set,
    else ``gcc``, else ``clang`` from PATH.
    """
    from_env = os.environ.get("CC")
    if from_env is not None:
        return shutil.which(from_env)
    return shutil.which("gcc") or shutil.which("clang")


_unavailable: list[str | None] = []  # empty until the first check, then [reason or None]


@torch.compiler.assume_constant_result
def unavailable_reason() -> str | None:
    """Why the Triton kernels can't run here at all (import failed; on a GPU, no C compiler), or None.

    Triton compiles a small C launcher the first time a kernel runs on a GPU, so it needs a C
    compiler at run time; the CPU interpreter does not. Checked once per process.
    """
    if not _unavailable:
        reason = _IMPORT_ERROR
        if reason is None and not _kernels.is_interpreting() and c_compiler() is None:
            reason = (
                "Triton needs a C compiler at run time to build its kernel launcher, and none was found "
                "(set CC, or install gcc or clang)"
            )
        _unavailable.append(reason)
    return _unavailable[0]


def head_dim_supported(d: int) -> bool:
    return _kernels is not None and _kernels.head_dim_supported(d)


def device_reasons(device: torch.device, dtype: torch.dtype, head_dim: int) -> list[str]:
    if device.type == "cuda" and dtype == torch.float32 and _kernels.fp32_head_dim_spills(head_dim):
        return [f"float32 at head dim {head_dim} spills registers on the GPU (its tile is "
                f"{_kernels.block_head_dim(head_dim)} wide; bench/results/kernel_report.md): use bf16/fp16"]
    if device.type == "cpu" and not _kernels.is_interpreting():
        return ["runs on CPU tensors only under TRITON_INTERPRET=1 (a slow interpreter, for tests)"]
    if device.type == "cpu" and dtype == torch.bfloat16:
        # the interpreter keeps bfloat16 as raw uint16 and multiplies the bit patterns in tl.dot
        return ["Triton's CPU interpreter has no bfloat16 tl.dot (it multiplies the raw bits)"]
    if device.type == "cuda" and dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) < (8, 0):
        return ["bfloat16 needs a GPU of compute capability 8.0 or newer"]
    return []


def _fwd(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
    max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float,
) -> tuple[Tensor, Tensor]:
    """out ``[total_q, H, D]`` and the base-2 log-sum-exp ``[H, total_q]`` (fp32)."""
    return _kernels.varlen_attn_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale)


def _bwd(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv (contiguous, the inputs' dtype)."""
    return _kernels.varlen_attn_bwd(
        dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
        deterministic=deterministic_backward(),
    )


def deterministic_backward() -> bool:
    """Whether the backward runs the two-pass kernels (bit-for-bit the same on every run).

    True when PyTorch is asked for deterministic algorithms (``torch.use_deterministic_algorithms``)
    or ``CROSSMAE_TRITON_DETERMINISTIC=1``; otherwise the dK/dV pass accumulates dQ with fp32
    atomics (head dims up to 64, FlashAttention-2's single pass), which the static profile in
    bench/results/kernel_report.md predicts faster at both preset head dims (D=16: 0.337 vs 0.205
    of bf16 peak; D=64: 0.58 vs 0.398). dQ's last bits then depend on the order the atomics land in.
    """
    return torch.are_deterministic_algorithms_enabled() or os.environ.get("CROSSMAE_TRITON_DETERMINISTIC", "0") == "1"


varlen_attn_triton_fwd, varlen_attn_triton_bwd = define_varlen_attention_ops(_FWD, _BWD, _fwd, _bwd)
triton_varlen_attention = op_attention_fn(_FWD)
