"""Other libraries' varlen attention kernels behind the packed contract.

Each wrapper is a :class:`~crossmae.ops.signature.VarlenAttentionFn`: q ``[total_q, H, D]``,
k/v ``[total_k, H, D]`` in, ``[total_q, H, D]`` out. Libraries are imported lazily; the
``*_unavailable`` functions say why a backend can't be used here (looked up once per process).
Batches with no queries or no keys at all never reach these wrappers
(:func:`crossmae.ops.varlen_attention` computes those with the reference).

What a wrapper derives from ``cu_seqlens`` alone (xformers' block-diagonal mask, FlexAttention's
block mask) is built once per pair of cu_seqlens tensors and kept while both tensors live
(:func:`cached_per_cu_seqlens`), so the layers of one step share it and a new batch builds anew.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
from collections.abc import Callable, Hashable
from typing import TypeVar

import torch
from torch.utils.weak import WeakIdKeyDictionary

from crossmae.packed import segment_ids

T = TypeVar("T")

# cu_seqlens_q -> (cu_seqlens_k -> {kind: (key, value)}): entries die with either tensor
_PER_CU_SEQLENS = WeakIdKeyDictionary()


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # inference tensors carry no version counter
        return None


def cached_per_cu_seqlens(kind: str, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, key: Hashable,
                          build: Callable[[], T]) -> T:
    """``build()``, kept per (cu_seqlens_q, cu_seqlens_k) tensor pair, their versions, ``kind`` and ``key``.

    Holds one value per kind and pair, so memory is bounded by the live cu_seqlens tensors;
    under ``torch.compile`` or for tensors without a version counter it builds every time.
    """
    full_key = (_version(cu_seqlens_q), _version(cu_seqlens_k), key)
    if torch.compiler.is_compiling() or None in full_key[:2]:
        return build()
    per_k = _PER_CU_SEQLENS.get(cu_seqlens_q)
    if per_k is None:
        per_k = _PER_CU_SEQLENS[cu_seqlens_q] = WeakIdKeyDictionary()
    entries = per_k.get(cu_seqlens_k)
    if entries is None:
        entries = per_k[cu_seqlens_k] = {}
    hit = entries.get(kind)
    if hit is not None and hit[0] == full_key:
        return hit[1]
    value = build()
    entries[kind] = (full_key, value)
    return value


def flash_head_dim_supported(d: int) -> bool:
    return 8 <= d <= 256 and d % 8 == 0


def flex_head_dim_supported(d: int) -> bool:
    return 16 <= d <= 256 and d & (d - 1) == 0


def sm80_reasons(device: torch.device, dtype: torch.dtype, head_dim: int) -> list[str]:
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0):
        return ["needs a GPU of compute capability 8.0 or newer"]
    return []


def _missing(module: str) -> str | None:
    if importlib.util.find_spec(module) is None:
        return f"{module} is not installed"
    return None


# -- torch.nn.attention.varlen (PyTorch >= 2.10) -----------------------------------------
@functools.cache
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


@functools.cache
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
@functools.cache
def xformers_unavailable() -> str | None:
    if not torch.cuda.is_available():
        return "needs CUDA"
    return _missing("xformers")


def _xformers_mask(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, total_q: int):
    """The block-diagonal bias and bool ``[total_q]`` rows whose sample has no keys (one host read)."""
    from xformers.ops import fmha

    lengths_q = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).tolist()  # the bias is built on the host
    lengths_k = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).tolist()
    bias = fmha.attn_bias.BlockDiagonalMask.from_seqlens(q_seqlen=lengths_q, kv_seqlen=lengths_k)
    no_keys = torch.tensor([lk == 0 for lk in lengths_k], device=cu_seqlens_q.device)  # [B]
    return bias, no_keys[segment_ids(cu_seqlens_q, total_q)]  # [total_q]


def xformers_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale):
    from xformers.ops import fmha

    total_q = q.shape[0]
    bias, rows_without_keys = cached_per_cu_seqlens(
        "xformers", cu_seqlens_q, cu_seqlens_k, total_q, lambda: _xformers_mask(cu_seqlens_q, cu_seqlens_k, total_q)
    )
    out = fmha.memory_efficient_attention(q[None], k[None], v[None], attn_bias=bias, scale=softmax_scale)[0]
    # rows whose sample has no keys: xformers leaves them undefined, the contract says 0
    return out.masked_fill(rows_without_keys[:, None, None], 0.0)


# -- FlexAttention -------------------------------------------------------------------------
@functools.cache
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


def _same_sample(seg_q: torch.Tensor, seg_k: torch.Tensor, b, h, q_idx, kv_idx):
    """FlexAttention mask_mod (bound to the segment ids by ``functools.partial``): same sample."""
    return seg_q[q_idx] == seg_k[kv_idx]


FLEX_BLOCK = 128  # FlexAttention's default tile, in rows, on both sides


def _block_segments(seg: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per tile of FLEX_BLOCK rows: its first and last row's sample, and whether the tile is whole."""
    starts = torch.arange(0, total, FLEX_BLOCK, device=seg.device)  # [n_blocks]
    ends = (starts + FLEX_BLOCK).clamp(max=total)  # [n_blocks]
    return seg[starts], seg[ends - 1], ends - starts == FLEX_BLOCK


def _sparse_rows(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bool ``[nq, nk]`` tiles → FlexAttention's (count ``[1, 1, nq]``, indices ``[1, 1, nq, nk]``), int32."""
    count = blocks.sum(dim=-1, dtype=torch.int32)  # [nq]
    indices = torch.argsort(blocks.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)  # [nq, nk]
    return count[None, None], indices[None, None]


def _flex_block_mask(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, total_q: int, total_k: int):
    """The document mask over ``[total_q, total_k]``, built tile by tile from the segment ids.

    Samples are contiguous runs of rows, so a query tile and a key tile share a sample only if
    their ranges of sample ids overlap; such a pair is a full tile when both are whole tiles of
    one and the same sample, and a partial one (the mask_mod decides per element) otherwise.
    This is ``O(tiles)`` work, without the dense ``[total_q, total_k]`` mask (or the compile)
    ``create_block_mask`` needs.
    """
    from torch.nn.attention.flex_attention import BlockMask

    seg_q = segment_ids(cu_seqlens_q, total_q)  # [total_q]
    seg_k = segment_ids(cu_seqlens_k, total_k)  # [total_k]
    first_q, last_q, whole_q = _block_segments(seg_q, total_q)  # [nq] each
    first_k, last_k, whole_k = _block_segments(seg_k, total_k)  # [nk] each
    overlap = (first_q[:, None] <= last_k[None, :]) & (first_k[None, :] <= last_q[:, None])  # [nq, nk]
    one_sample_q = whole_q & (first_q == last_q)  # [nq]
    one_sample_k = whole_k & (first_k == last_k)  # [nk]
    full = one_sample_q[:, None] & one_sample_k[None, :] & (first_q[:, None] == first_k[None, :])  # [nq, nk]
    partial_count, partial_indices = _sparse_rows(overlap & ~full)
    full_count, full_indices = _sparse_rows(full)
    return BlockMask.from_kv_blocks(
        partial_count, partial_indices, full_count, full_indices, BLOCK_SIZE=FLEX_BLOCK,
        # one module-level mask_mod with the ids as arguments: compiled code is reused across batches
        mask_mod=functools.partial(_same_sample, seg_q, seg_k), seq_lengths=(total_q, total_k),
    )


def flex_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale):
    from torch.nn.attention.flex_attention import flex_attention as eager_flex

    total_q, total_k = q.shape[0], k.shape[0]
    block_mask = cached_per_cu_seqlens(
        "flex", cu_seqlens_q, cu_seqlens_k, (total_q, total_k),
        lambda: _flex_block_mask(cu_seqlens_q, cu_seqlens_k, total_q, total_k),
    )
    if not torch.is_grad_enabled():  # FlexAttention on CPU refuses inputs that require grad, even under no_grad
        q, k, v = q.detach(), k.detach(), v.detach()
    attend = _compiled_flex() if q.is_cuda else eager_flex
    out = attend(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
        block_mask=block_mask, scale=softmax_scale,
    )  # [1, H, total_q, D]
    return out[0].transpose(0, 1)  # [total_q, H, D]
