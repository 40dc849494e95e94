"""The packed reconstruction loss: weighted sum of squared errors, fused in Triton on the packed path.

``masked_sse(pred, target, weight)`` = ``sum(weight * (pred - target)²)`` in fp32. With
``fused=True`` on a CUDA tensor it runs our Triton kernels (``crossmae_kernels.packed_mse``),
registered as ``crossmae::masked_sse_triton`` with autograd and a fake implementation; otherwise
plain PyTorch, which is also the reference. (Tests call the op on CPU tensors under
``TRITON_INTERPRET=1``.)
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    from crossmae_kernels import packed_mse as _kernels
except ImportError:  # triton missing: the PyTorch path only
    _kernels = None


@torch.library.custom_op("crossmae::masked_sse_triton", mutates_args=())
def masked_sse_triton(pred: Tensor, target: Tensor, weight: Tensor) -> Tensor:
    return _kernels.masked_sse_fwd(pred, target, weight)


@masked_sse_triton.register_fake
def _(pred, target, weight):
    return pred.new_empty((), dtype=torch.float32)


@torch.library.custom_op("crossmae::masked_sse_triton_bwd", mutates_args=())
def masked_sse_triton_bwd(grad_out: Tensor, pred: Tensor, target: Tensor, weight: Tensor) -> Tensor:
    return _kernels.masked_sse_bwd(grad_out, pred, target, weight)


@masked_sse_triton_bwd.register_fake
def _(grad_out, pred, target, weight):
    return pred.new_empty(pred.shape)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_out):
    pred, target, weight = ctx.saved_tensors
    return masked_sse_triton_bwd(grad_out, pred, target, weight), None, None


masked_sse_triton.register_autograd(_backward, setup_context=_setup_context)


def masked_sse_reference(pred: Tensor, target: Tensor, weight: Tensor) -> Tensor:
    return ((pred.float() - target).square() * weight).sum()


def fused_loss_available(device: torch.device) -> bool:
    return _kernels is not None and device.type == "cuda"


def masked_sse(pred: Tensor, target: Tensor, weight: Tensor, *, fused: bool = False) -> Tensor:
    """Weighted sum of squared errors (fp32 scalar) of ``pred [N, K]`` against ``target``/``weight [N, K]`` (fp32)."""
    if fused and fused_loss_available(pred.device) and pred.stride(-1) == 1:
        return masked_sse_triton(pred, target.contiguous(), weight.contiguous())
    return masked_sse_reference(pred, target, weight)
