"""Transformer layers that run on packed or padded tokens.

Every layer except attention is per token, so it runs unchanged on packed ``[total, d]`` or
padded ``[B, L, d]`` tensors. Attention takes a *layout* that knows how the rows of the batch
belong to samples, and the layout owns the conversion from packed rows into its own form and back:

- :class:`PackedLayout`  packed rows, one :func:`crossmae.ops.varlen_attention` call (the fast path);
- :class:`PaddedLayout`  ``[B, L, ...]`` padded tensors, one SDPA call with a key-padding mask;
- :class:`LoopLayout`    ``[B, L, ...]`` padded tensors, one SDPA call per sample (the seed's way).

A stage reads: ``x = layout.enter(x)``, blocks, ``x = layout.leave(x)``; per-sample vectors reach
the rows through ``layout.per_sample``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from crossmae.ops import AttentionBackend, varlen_attention
from crossmae.packed import Packed, key_padding_mask, pad_packed, segment_ids, unpad


class PackedLayout:
    """Queries and keys packed: ``q [total_q, H, D]``, ``k/v [total_k, H, D]``.

    Args:
        q, k: boundaries of the query and key rows per sample.
        backend: the varlen attention backend: a name, or one resolved ahead by :func:`crossmae.ops.resolve_backend`.
    """

    def __init__(self, q: Packed, k: Packed, backend: str | AttentionBackend = "auto"):
        self.q, self.k, self.backend = q, k, backend

    def enter(self, x: torch.Tensor, keys: bool = False) -> torch.Tensor:
        """Packed rows ``[total, d]`` into this layout's form (here: unchanged)."""
        return x

    def leave(self, x: torch.Tensor) -> torch.Tensor:
        """Query rows in this layout's form back to packed ``[total_q, d]`` (here: unchanged)."""
        return x

    def per_sample(self, v: torch.Tensor) -> torch.Tensor:
        """``v [B, d]`` → one row per query row ``[total_q, d]``."""
        return v[segment_ids(self.q.cu_seqlens, self.q.total)]  # [total_q, d]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return varlen_attention(
            q, k, v, self.q.cu_seqlens, self.k.cu_seqlens, self.q.max_seqlen, self.k.max_seqlen, backend=self.backend
        )


class PaddedLayout:
    """Padded ``q [B, Lq, H, D]``, ``k/v [B, Lk, H, D]``: one SDPA call with a key-padding mask.

    Args:
        q, k: boundaries of the query and key rows per sample.
    """

    def __init__(self, q: Packed, k: Packed):
        self.q, self.k = q, k
        self.key_mask = key_padding_mask(k.cu_seqlens, k.max_seqlen)  # [B, Lk], True at real keys

    def enter(self, x: torch.Tensor, keys: bool = False) -> torch.Tensor:
        """Packed rows ``[total, d]`` (query rows, or key rows with ``keys``) → padded ``[B, L, d]``."""
        side = self.k if keys else self.q
        return pad_packed(x, side.cu_seqlens, side.max_seqlen)  # [B, L, d]

    def leave(self, x: torch.Tensor) -> torch.Tensor:
        """Padded query rows ``[B, Lq, d]`` → packed ``[total_q, d]``."""
        return unpad(x, self.q.cu_seqlens, self.q.total)  # [total_q, d]

    def per_sample(self, v: torch.Tensor) -> torch.Tensor:
        """``v [B, d]`` → ``[B, 1, d]``, broadcast over each sample's rows."""
        return v[:, None]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        has_keys = self.key_mask.any(dim=1)  # [B]
        # a sample without keys would softmax over nothing: let it see its padding, then zero it
        mask = (self.key_mask | ~has_keys[:, None])[:, None, None, :]  # [B, 1, 1, Lk]
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
        )  # [B, H, Lq, D]
        out = out * has_keys[:, None, None, None].to(out.dtype)
        return out.transpose(1, 2)  # [B, Lq, H, D]


class LoopLayout(PaddedLayout):
    """Padded ``q [B, Lq, H, D]``, ``k/v [B, Lk, H, D]``; one SDPA call per sample on its real rows."""

    def __init__(self, q: Packed, k: Packed):
        super().__init__(q, k)
        self.lengths_q, self.lengths_k = q.lengths.tolist(), k.lengths.tolist()

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        outs = []
        for b, (lq, lk) in enumerate(zip(self.lengths_q, self.lengths_k)):
            if lq == 0 or lk == 0:
                outs.append(q[b] * 0.0)
                continue
            ob = F.scaled_dot_product_attention(
                q[b : b + 1, :lq].transpose(1, 2), k[b : b + 1, :lk].transpose(1, 2), v[b : b + 1, :lk].transpose(1, 2)
            )  # [1, H, lq, D]: 4-D, as SDPA's fused kernels need
            outs.append(F.pad(ob[0].transpose(0, 1), (0, 0, 0, 0, 0, q.shape[1] - lq)))  # [Lq, H, D]
        return torch.stack(outs)  # [B, Lq, H, D]


LAYOUT_PATHS = ("packed", "padded", "loop")


def make_layout(
    path: str, q: Packed, k: Packed, backend: str | AttentionBackend = "auto"
) -> PackedLayout | PaddedLayout:
    """The layout of ``path`` (``packed``, ``padded`` or ``loop``) for queries ``q`` and keys ``k``."""
    if path == "packed":
        return PackedLayout(q, k, backend)
    if path == "padded":
        return PaddedLayout(q, k)
    if path == "loop":
        return LoopLayout(q, k)
    raise ValueError(f"path must be one of {LAYOUT_PATHS}, got {path!r}")


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(F.gelu(self.fc1(x))))


class SelfAttention(nn.Module):
    """Multi-head self-attention over the samples given by the layout."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, layout) -> torch.Tensor:
        qkv = self.qkv(x).unflatten(-1, (3, self.heads, -1))  # [..., 3, H, D]
        q, k, v = qkv.unbind(-3)  # [..., H, D] each
        out = layout.attend(q, k, v)  # [..., H, D]
        return self.drop(self.proj(out.flatten(-2)))  # [..., dim]


class CrossAttention(nn.Module):
    """Queries from ``x [..., dim]`` attend to ``memory [..., mem_dim]`` of the same sample."""

    def __init__(self, dim: int, heads: int, mem_dim: int | None = None, dropout: float = 0.0):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(mem_dim or dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, layout) -> torch.Tensor:
        q = self.q(x).unflatten(-1, (self.heads, -1))  # [..., H, D]
        k, v = self.kv(memory).unflatten(-1, (2, self.heads, -1)).unbind(-3)  # [..., H, D] each
        out = layout.attend(q, k, v)  # [..., H, D]
        return self.drop(self.proj(out.flatten(-2)))  # [..., dim]


class Block(nn.Module):
    """Pre-norm transformer block: self-attention + MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, int(dim * mlp_ratio), dropout)

    def forward(self, x: torch.Tensor, layout) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), layout)
        return x + self.mlp(self.norm2(x))


class CrossAttentionBlock(nn.Module):
    """CrossMAE decoder block, in the paper's order: optional self-attention among the queries of a
    sample, cross-attention to the memory, MLP; all pre-norm."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, self_attn: bool = False, dropout: float = 0.0):
        super().__init__()
        self.self_attn = None
        if self_attn:
            self.norm_s = nn.LayerNorm(dim)
            self.self_attn = SelfAttention(dim, heads, dropout)
        self.norm_q = nn.LayerNorm(dim)
        self.cross = CrossAttention(dim, heads, dropout=dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, int(dim * mlp_ratio), dropout)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, cross_layout, self_layout=None) -> torch.Tensor:
        if self.self_attn is not None:
            x = x + self.self_attn(self.norm_s(x), self_layout)
        x = x + self.cross(self.norm_q(x), memory, cross_layout)
        return x + self.mlp(self.norm2(x))


class FiLM(nn.Module):
    """Feature-wise linear modulation: ``x · (1 + γ) + β`` with ``(γ, β)`` a linear map of a per-sample
    condition. Zero-initialised, so it starts as the identity.

    Args:
        cond_dim: width of the condition ``[B, cond_dim]``.
        dim: width of the modulated rows.
    """

    def __init__(self, cond_dim: int, dim: int):
        super().__init__()
        self.proj = nn.Linear(cond_dim, 2 * dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, layout) -> torch.Tensor:
        """``x`` rows in ``layout``'s form, ``cond [B, cond_dim]`` → ``x`` modulated per sample."""
        gamma, beta = layout.per_sample(self.proj(cond)).chunk(2, dim=-1)  # rows' [.., dim] each
        return x * (1.0 + gamma) + beta

    def forward_rows(self, x: torch.Tensor, cond: torch.Tensor, layout) -> torch.Tensor:
        """``x`` rows in ``layout``'s form, ``cond [total_q, cond_dim]`` one packed row per query row → ``x``
        modulated per row (layout padding rows stay unmodulated)."""
        gamma, beta = layout.enter(self.proj(cond)).chunk(2, dim=-1)  # rows' [.., dim] each
        return x * (1.0 + gamma) + beta


def sincos_embedding(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """Fixed sin-cos embedding of integer positions ``[N]`` → ``[N, dim]`` (dim even)."""
    half = dim // 2
    freq = torch.exp(-torch.arange(half, dtype=torch.float64) * (torch.log(torch.tensor(10000.0)) / max(half, 1)))
    angle = positions.double()[:, None] * freq[None, :]  # [N, half]
    emb = torch.cat([torch.sin(angle), torch.cos(angle)], dim=1)  # [N, 2·half]
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb.float()


def point_sincos_embedding(rows: torch.Tensor, cols: torch.Tensor, dim: int) -> torch.Tensor:
    """2-D sin-cos embedding of points ``rows, cols [N]`` (fractional) → ``[N, dim]`` (half for rows, half for
    columns), with :func:`grid_sincos_embedding`'s frequencies: the point (r, c) = patch (r, c) gets that
    patch's embedding."""
    return torch.cat([sincos_embedding(rows, dim // 2), sincos_embedding(cols, dim - dim // 2)], dim=1)


def grid_sincos_embedding(rows: int, cols: int, dim: int) -> torch.Tensor:
    """2-D sin-cos embedding of a patch grid → ``[rows·cols, dim]`` (half for rows, half for columns)."""
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    return point_sincos_embedding(r.flatten(), c.flatten(), dim)


def site_patch_positions(locations, patch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Site-group centres ``(row, col)`` in cells of the grid frame (cell i covers ``[i, i + 1)``, as in
    ``crossmae/data/sites.py``) → their positions in patch units ``rows, cols [G]`` float64, where patch r's centre
    (``r·ps + ps/2``) is r: a group and the grid patch it lies in get nearby embeddings."""
    cells = torch.tensor(locations, dtype=torch.float64).reshape(-1, 2)  # [G, 2]
    patches = cells / patch_size - 0.5  # [G, 2]
    return patches[:, 0], patches[:, 1]
