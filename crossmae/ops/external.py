"""Other libraries' varlen attention kernels behind the packed contract.

Each wrapper takes ``(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
softmax_scale)`` with q ``[total_q, H, D]`` and k/v ``[total_k, H, D]`` and returns
``[total_q, H, D]``. Libraries are imported lazily; the ``*_unavailable`` functions say why a
backend can't be used here. Batches with no queries or no keys at all never reach these
wrappers (:func:`crossmae.ops.varlen_attention` computes those with the reference).
"""

from __future__ import annotations

import functools
import importlib.util
import inspect

import torch

from crossmae.packed import segment_ids


def flash_head_dim_supported(d: int) -> bool:
    return 8 <= d <= 256 and d % 8 == 0


def flex_head_dim_supported(d: int) -> bool:
    return 16 <= d <= 256 and d & (d - 1) == 0


def sm80_reasons(q: torch.Tensor) -> list[str]:
    if q.is_cuda and torch.cuda.get_device_capability(q.device) < (8, 0):
        return ["needs a GPU of compute capability 8.0 or newer"]
    return []


def _missing(module: str) -> str | None:
    if importlib.util.find_spec(module) is None:
        return f"{module} is not installed"
    return None


# -- torch.nn.attention.varlen (PyTorch >= 2.10) -----------------------------------------
def torch_varlen_unavailable() -> str | None:
    if not torch.cuda.is_available():
        return "needs CUDA"
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return f"torch.nn.attention.varlen needs PyTorch >= 2.10, this is {torch.__version__}"
    return None


@functools.cache
def _varlen_attn_takes_scale() -> bool:
    from torch.nn.attention.varlen import varlen_attn

    return "scale" in inspect.signature(varlen_attn).parameters


def torch_varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale):
    from torch.nn.attention.varlen import varlen_attn

    if _varlen_attn_takes_scale():
        return varlen_attn(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale=softmax_scale)
    q = q * (softmax_scale * q.shape[-1] ** 0.5)  # the default scale is D**-0.5
    return varlen_attn(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)


# -- flash_attn (FA3's flash_attn_interface if present, else FA2) ------------------------
@functools.cache
def _flash_varlen_func():
    if importlib.util.find_spec("flash_attn_interface") is not None:
        import flash_attn_interface

        return flash_attn_interface.flash_attn_varlen_func
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func


def flash_attn_unavailable() -> str | None:
    if not torch.cuda.is_available():
        return "needs CUDA"
    if _missing("flash_attn_interface") is None:
        return None
    return _missing("flash_attn")


def flash_attn_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale):
    out = _flash_varlen_func()(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale=softmax_scale, causal=False
    )
    return out[0] if isinstance(out, tuple) else out  # FA3 returns (out, lse)


# -- xformers ------------------------------------------------------------------------------
def xformers_unavailable() -> str | None:
    if not torch.cuda.is_available():
        return "needs CUDA"
    return _missing("xformers")


def xformers_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale):
    from xformers.ops import fmha

    lengths_q = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).tolist()  # host sync: the mask is built on the host
    lengths_k = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).tolist()
    bias = fmha.attn_bias.BlockDiagonalMask.from_seqlens(q_seqlen=lengths_q, kv_seqlen=lengths_k)
    out = fmha.memory_efficient_attention(q[None], k[None], v[None], attn_bias=bias, scale=softmax_scale)[0]
    # rows whose sample has no keys: xformers leaves them undefined, the contract says 0
    no_keys = torch.tensor([lk == 0 for lk in lengths_k], device=q.device)
    rows_without_keys = no_keys[segment_ids(cu_seqlens_q, q.shape[0])]  # [total_q]
    return out.masked_fill(rows_without_keys[:, None, None], 0.0)


# -- FlexAttention -------------------------------------------------------------------------
def flex_unavailable() -> str | None:
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return f"FlexAttention needs PyTorch >= 2.5, this is {torch.__version__}"
    return None


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True)


def flex_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale):
    from torch.nn.attention.flex_attention import create_block_mask
    from torch.nn.attention.flex_attention import flex_attention as eager_flex

    total_q, total_k = q.shape[0], k.shape[0]
    seg_q = segment_ids(cu_seqlens_q, total_q)  # [total_q]
    seg_k = segment_ids(cu_seqlens_k, total_k)  # [total_k]

    def same_sample(b, h, q_idx, kv_idx):
        return seg_q[q_idx] == seg_k[kv_idx]

    block_mask = create_block_mask(same_sample, None, None, total_q, total_k, device=q.device)
    if not torch.is_grad_enabled():  # FlexAttention on CPU refuses inputs that require grad, even under no_grad
        q, k, v = q.detach(), k.detach(), v.detach()
    attend = _compiled_flex() if q.is_cuda else eager_flex
    out = attend(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
        block_mask=block_mask, scale=softmax_scale,
    )  # [1, H, total_q, D]
    return out[0].transpose(0, 1)  # [total_q, H, D]
