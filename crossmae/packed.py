"""The packed layout: B ragged sequences stored as one ``[total, ...]`` tensor.

Sample b owns rows ``cu_seqlens[b] : cu_seqlens[b + 1]``. ``cu_seqlens`` is int32 of shape
``[B + 1]`` with ``cu_seqlens[0] == 0``, non-decreasing; ``max_seqlen`` is a host int
computed when the batch is built (never read back from the device inside a forward).
Zero-length sequences are legal everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch.utils.weak import WeakIdKeyDictionary


class CuSeqlensSummary(NamedTuple):
    """What the checks of a ``cu_seqlens`` tensor need, read once from its values."""

    first: int
    last: int
    max_len: int
    min_len: int


# cu_seqlens tensor -> (its version counter when summarised, summary). Reading the values
# of a device tensor synchronises with the host, so it happens once per tensor, and
# never for tensors built on the host by Packed.
_SUMMARIES = WeakIdKeyDictionary()


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # inference tensors carry no version counter
        return None


def trust_cu_seqlens(cu_seqlens: torch.Tensor, *, total: int, max_len: int, min_len: int = 0) -> None:
    """Record the summary of a ``cu_seqlens`` built on the host, so checks need not read it back."""
    version = _version(cu_seqlens)
    if version is not None:
        _SUMMARIES[cu_seqlens] = (version, CuSeqlensSummary(0, total, max_len, min_len))


def summarize_cu_seqlens(cu_seqlens: torch.Tensor) -> CuSeqlensSummary:
    """First and last entry and the longest and shortest segment of ``cu_seqlens`` (int32 ``[B + 1]``).

    Cached per tensor (and its version counter): a device tensor is read back once.
    """
    version = _version(cu_seqlens)
    if version is not None:
        hit = _SUMMARIES.get(cu_seqlens)
        if hit is not None and hit[0] == version:
            return hit[1]
    values = cu_seqlens.detach().to("cpu", torch.int64)
    lengths = values[1:] - values[:-1]
    summary = CuSeqlensSummary(
        first=int(values[0]),
        last=int(values[-1]),
        max_len=int(lengths.max()) if lengths.numel() else 0,
        min_len=int(lengths.min()) if lengths.numel() else 0,
    )
    if version is not None:
        _SUMMARIES[cu_seqlens] = (version, summary)
    return summary


@dataclass(frozen=True)
class Packed:
    """Boundaries of B ragged sequences packed into one ``[total, ...]`` tensor.

    Attributes:
        cu_seqlens: int32 ``[B + 1]`` on the data's device.
        lengths: int64 ``[B]`` on the host (CPU): each sequence's length.
        max_seqlen: longest sequence (host int; 0 for an empty batch).
        total: number of packed rows (host int).
    """

    cu_seqlens: torch.Tensor
    lengths: torch.Tensor
    max_seqlen: int
    total: int

    @classmethod
    def from_lengths(cls, lengths: Sequence[int] | torch.Tensor, device: torch.device | str = "cpu") -> Packed:
        """Build the boundaries from per-sample lengths given on the host."""
        lengths = torch.as_tensor(lengths, dtype=torch.int64, device="cpu").reshape(-1)
        if (lengths < 0).any():
            raise ValueError(f"lengths must be non-negative, got {lengths.tolist()}")
        cu = torch.zeros(lengths.numel() + 1, dtype=torch.int64)
        torch.cumsum(lengths, 0, out=cu[1:])
        total = int(cu[-1])
        if total > torch.iinfo(torch.int32).max:
            raise ValueError(f"total length {total} does not fit in int32 cu_seqlens")
        max_seqlen = int(lengths.max()) if lengths.numel() else 0
        cu_seqlens = cu.to(torch.int32).to(device)
        min_len = int(lengths.min()) if lengths.numel() else 0
        trust_cu_seqlens(cu_seqlens, total=total, max_len=max_seqlen, min_len=min_len)
        return cls(cu_seqlens=cu_seqlens, lengths=lengths, max_seqlen=max_seqlen, total=total)

    @property
    def batch_size(self) -> int:
        return self.lengths.numel()

    def to(self, device: torch.device | str) -> Packed:
        cu_seqlens = self.cu_seqlens.to(device, non_blocking=True)
        min_len = int(self.lengths.min()) if self.lengths.numel() else 0
        trust_cu_seqlens(cu_seqlens, total=self.total, max_len=self.max_seqlen, min_len=min_len)
        return Packed(cu_seqlens=cu_seqlens, lengths=self.lengths, max_seqlen=self.max_seqlen, total=self.total)

    def segment_ids(self, device: torch.device | str | None = None) -> torch.Tensor:
        """int64 ``[total]``: the sample each packed row belongs to."""
        device = self.cu_seqlens.device if device is None else device
        return torch.repeat_interleave(torch.arange(self.batch_size), self.lengths).to(device)


def segment_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """int64 ``[total]``: the sample each packed row belongs to (no host sync)."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    batch = torch.arange(lengths.numel(), device=cu_seqlens.device)
    return torch.repeat_interleave(batch, lengths, output_size=total)


# cu_seqlens tensor -> {(version, total, max_seqlen): padded index}: the padded paths call
# padded_index for q, k and v of every layer with the same boundaries.
_PADDED_INDEX = WeakIdKeyDictionary()


def padded_index(cu_seqlens: torch.Tensor, total: int, max_seqlen: int) -> torch.Tensor:
    """int64 ``[total]``: for each packed row, its flat index ``b * max_seqlen + t`` in a padded batch.

    Cached per ``cu_seqlens`` tensor (outside ``torch.compile``), so a model's layers share it.
    """
    version = None if torch.compiler.is_compiling() else _version(cu_seqlens)
    key = (version, total, max_seqlen)
    if version is not None:
        cached = _PADDED_INDEX.get(cu_seqlens)
        if cached is not None and key in cached:
            return cached[key]
    seg = segment_ids(cu_seqlens, total)  # [total]
    pos = torch.arange(total, device=cu_seqlens.device) - cu_seqlens.long()[seg]  # [total]
    index = seg * max_seqlen + pos
    if version is not None:
        entry = _PADDED_INDEX.get(cu_seqlens)
        if entry is None or next(iter(entry))[0] != version:
            entry = {}
            _PADDED_INDEX[cu_seqlens] = entry
        entry[key] = index
    return index


def pad_packed(x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, value: float = 0.0) -> torch.Tensor:
    """``x [total, ...]`` → ``[B, max_seqlen, ...]``, rows past a sample's length filled with ``value``."""
    batch = cu_seqlens.numel() - 1
    flat = x.new_full((batch * max_seqlen, *x.shape[1:]), value)  # [B * max_seqlen, ...]
    flat = flat.index_copy(0, padded_index(cu_seqlens, x.shape[0], max_seqlen), x)
    return flat.view(batch, max_seqlen, *x.shape[1:])  # [B, max_seqlen, ...]


def unpad(x: torch.Tensor, cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """``x [B, max_seqlen, ...]`` → ``[total, ...]``: the inverse of :func:`pad_packed`."""
    batch, max_seqlen = x.shape[:2]
    flat = x.reshape(batch * max_seqlen, *x.shape[2:])  # [B * max_seqlen, ...]
    return flat[padded_index(cu_seqlens, total, max_seqlen)]  # [total, ...]


def key_padding_mask(cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
    """bool ``[B, max_seqlen]``: True where a padded position holds a real row."""
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]  # [B]
    return torch.arange(max_seqlen, device=cu_seqlens.device)[None, :] < lengths[:, None]


def concat_segments(parts: Sequence[Packed]) -> tuple[Packed, torch.Tensor, list[torch.Tensor]]:
    """Per-sample concatenation of packed sets: sample b's rows are part 0's rows of b, then part 1's, ...

    Runs on the host lengths (in the collate, not in the model).

    Returns:
        packed: the boundaries of the concatenation (on the parts' cu_seqlens device).
        order: int64 ``[total]``: ``torch.cat(part_tensors)[order]`` is the concatenation.
        dest: per part, int64 ``[total_i]``: the row each of its rows lands on.
    """
    if not parts:
        raise ValueError("concat_segments needs at least one part")
    batch = parts[0].batch_size
    for i, part in enumerate(parts):
        if part.batch_size != batch:
            raise ValueError(f"part {i} has {part.batch_size} samples, part 0 has {batch}")
    lengths = torch.stack([p.lengths for p in parts])  # [n_parts, B]
    out = Packed.from_lengths(lengths.sum(0), device=parts[0].cu_seqlens.device)
    out_starts = torch.cumsum(lengths.sum(0), 0) - lengths.sum(0)  # [B]
    before = torch.cumsum(lengths, 0) - lengths  # [n_parts, B]: rows of earlier parts in the same sample
    order = torch.empty(out.total, dtype=torch.int64)
    dest, base = [], 0
    for i, part in enumerate(parts):
        seg = torch.repeat_interleave(torch.arange(batch), part.lengths)  # [total_i]
        part_starts = torch.cumsum(part.lengths, 0) - part.lengths  # [B]
        pos = torch.arange(part.total) - part_starts[seg]  # [total_i]
        rows = out_starts[seg] + before[i, seg] + pos  # [total_i]
        order[rows] = torch.arange(base, base + part.total)
        dest.append(rows)
        base += part.total
    return out, order, dest
