"""Bucketed batches: every packed total of a batch padded up to one of a few sizes, so that a few captured
CUDA graphs (``train.cuda_graphs``, :class:`crossmae.engine.CudaGraphSteps`) serve every batch.

A captured graph replays fixed shapes and fixed host arguments. :func:`pad_batch` turns a collated
:class:`crossmae.data.collate.PackedBatch` of B samples into one of B + 1 samples whose every row count, and
every ``max_seqlen``, depends only on its :class:`Bucket`.

The padding sample
    Sample B. In each modality it holds as many visible, predicted and hidden tokens as the bucket's
    capacities leave over; its tokens sit at (b, t, p) = (B, 0, 0) with value 0 and loss weight 0; it has no
    static token (its static attributes are all unknown: ``missing`` True) and day of year 0. It is its own
    segment in every packed set (encoder sequences, joint memory, queries, standard decoder sequences), so it
    attends only to its own rows and no real token attends to it; its predicted tokens are its first hidden
    ones. Its loss weight being 0, it adds 0 to every loss sum and count and the gradient reaching its rows is
    exactly 0: the bucketed step computes the unbucketed step's loss and gradients, the sums only running over
    more (zero) terms, so they agree to fp32 rounding of the summation order (``tests/test_buckets.py``).
    Every :class:`Packed` of a padded batch has ``max_seqlen`` equal to its padded total, a bound that holds
    whatever the lengths (varlen kernels launch blocks over ``max_seqlen``; the ones past a segment's end exit
    at once). Only grid and series modalities are padded; other kinds are refused.

Bucket sizes
    Per modality three capacities: visible tokens, predicted tokens, and hidden tokens that are not predicted
    (the hidden capacity is the sum of the last two, so the padding sample's hidden tokens include its predicted
    ones). :meth:`BucketSet.from_totals` takes these totals over a scan of batches (the trainer scans the first
    :data:`SCAN_BATCHES` batches of the run's own batch order) and makes ``count`` buckets (:data:`BUCKETS`):
    bucket k's capacity for a part is the ``ceil((k + 1) · n / count)``-th smallest of the n scanned totals of
    that part (a nearest-rank quantile), rounded up to a multiple of :data:`ALIGN` rows; so the last bucket
    holds the largest batch seen. A batch takes the smallest bucket (in that order) that holds every part; a
    batch larger than every bucket adds one (the largest bucket's capacities raised to the batch's totals,
    rounded up), so the set grows by one capture.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from crossmae.data.collate import (
    EncoderTokens,
    HiddenTokens,
    JointMemory,
    ModalityBatch,
    PackedBatch,
    Queries,
    StandardDecoderSequences,
    StaticAttributes,
    Targets,
)
from crossmae.packed import Packed, trust_cu_seqlens

log = logging.getLogger(__name__)

ALIGN = 64
"""Capacities are multiples of this many rows."""
SCAN_BATCHES = 16
"""Batches the trainer scans to choose the bucket sizes."""
BUCKETS = 4
"""Buckets the trainer makes from the scan."""
PADDED_KINDS = ("grid", "series")


def check_kinds(kinds: dict[str, str], what: str) -> None:
    """Raise ValueError naming ``what`` when a modality is of a kind the padding does not handle."""
    other = {name: kind for name, kind in kinds.items() if kind not in PADDED_KINDS}
    if other:
        raise ValueError(f"{what} pads only {' and '.join(PADDED_KINDS)} modalities; the data set has {other}")


@dataclass(frozen=True)
class Bucket:
    """Row capacities of a padded batch.

    Attributes:
        capacity: per modality, in the batch's modality order, ``(name, visible, predicted, extra)``: its
            visible tokens, predicted tokens, and hidden tokens that are not predicted.
    """

    capacity: tuple[tuple[str, int, int, int], ...]

    def holds(self, totals: dict[str, tuple[int, int, int]]) -> bool:
        """Whether every part of ``totals`` (:func:`batch_totals`) fits."""
        caps = {name: parts for name, *parts in self.capacity}
        if caps.keys() != totals.keys():
            return False
        return all(need <= cap for name, parts in totals.items() for need, cap in zip(parts, caps[name]))

    @property
    def rows(self) -> int:
        """The bucket's token capacity (its size, for ordering and logs)."""
        return sum(v + p + e for _, v, p, e in self.capacity)


def batch_totals(batch: PackedBatch) -> dict[str, tuple[int, int, int]]:
    """modality → (visible, predicted, hidden and not predicted) token totals of ``batch`` (host ints)."""
    check_kinds({n: mb.kind for n, mb in batch.modalities.items()}, "pad_batch")
    return {name: (mb.encoder.visible.total, mb.queries.packed.total,
                   mb.hidden.packed.total - mb.queries.packed.total) for name, mb in batch.modalities.items()}


def _round_up(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


class BucketSet:
    """The buckets of a run, smallest first; :meth:`choose` picks one for a batch (adding one when none fits).

    Args:
        buckets: at least one :class:`Bucket`, all over the same modalities.
    """

    def __init__(self, buckets: Sequence[Bucket]):
        if not buckets:
            raise ValueError("buckets must hold at least one Bucket")
        names = [tuple(c[0] for c in b.capacity) for b in buckets]
        if len(set(names)) != 1:
            raise ValueError(f"buckets must cover the same modalities, got {sorted(set(names))}")
        self.buckets = list(buckets)

    @classmethod
    def from_totals(cls, totals: Sequence[dict[str, tuple[int, int, int]]], count: int = BUCKETS) -> BucketSet:
        """``count`` buckets at nearest-rank quantiles of scanned batch totals (the module docstring's rule).

        Args:
            totals: :func:`batch_totals` of each scanned batch (at least one).
            count: buckets to make (identical ones are merged).
        """
        if not totals:
            raise ValueError("totals must hold the totals of at least one batch")
        if count < 1:
            raise ValueError(f"count must be at least 1, got {count}")
        names = list(totals[0])
        n = len(totals)
        buckets = []
        for k in range(count):
            rank = math.ceil((k + 1) * n / count) - 1  # 0-based nearest rank
            capacity = []
            for name in names:
                parts = [sorted(t[name][i] for t in totals) for i in range(3)]
                capacity.append((name, *(_round_up(p[rank]) for p in parts)))
            bucket = Bucket(tuple(capacity))
            if bucket not in buckets:
                buckets.append(bucket)
        return cls(buckets)

    def choose(self, totals: dict[str, tuple[int, int, int]]) -> Bucket:
        """The first bucket that holds ``totals``; when none does, a new one (logged) that does."""
        for bucket in self.buckets:
            if bucket.holds(totals):
                return bucket
        largest = self.buckets[-1]
        missing = [n for n in totals if n not in {c[0] for c in largest.capacity}]
        if missing or len(totals) != len(largest.capacity):
            raise ValueError(f"the batch's modalities {list(totals)} are not the buckets' "
                             f"{[c[0] for c in largest.capacity]}")
        bucket = Bucket(tuple((name, *(max(cap, _round_up(need)) for cap, need in zip(caps, totals[name])))
                              for name, *caps in largest.capacity))
        log.info("a batch larger than every bucket: new bucket of %d token rows (%d buckets)", bucket.rows,
                 len(self.buckets) + 1)
        self.buckets.append(bucket)
        return bucket


def scan_totals(batches: Iterable[PackedBatch]) -> list[dict[str, tuple[int, int, int]]]:
    """:func:`batch_totals` of each batch."""
    return [batch_totals(b) for b in batches]


def _extend(packed: Packed, rows: int) -> Packed:
    """``packed`` with one more segment of ``rows`` rows; ``max_seqlen`` = the new total (no host read)."""
    cu = torch.cat([packed.cu_seqlens, packed.cu_seqlens[-1:] + rows])  # [B + 2]
    total = packed.total + rows
    lengths = torch.cat([packed.lengths, torch.tensor([rows], dtype=packed.lengths.dtype)])  # [B + 1], host
    min_len = min(int(packed.lengths.min()), rows) if packed.lengths.numel() else rows
    trust_cu_seqlens(cu, total=total, max_len=max(packed.max_seqlen, rows), min_len=min_len)
    return Packed(cu_seqlens=cu, lengths=lengths, max_seqlen=total, total=total)


def _more_rows(x: torch.Tensor, rows: int, value: float = 0.0) -> torch.Tensor:
    """``x [n, ...]`` with ``rows`` rows of ``value`` appended → ``[n + rows, ...]``."""
    return torch.cat([x, x.new_full((rows, *x.shape[1:]), value)])


def _arange(start: int, rows: int, device) -> torch.Tensor:
    return torch.arange(start, start + rows, dtype=torch.int64, device=device)


def _padding_index(index: torch.Tensor, rows: int, sample: int) -> torch.Tensor:
    """``index [n, 3]`` (b, t, p) with ``rows`` rows (sample, 0, 0) appended."""
    pad = index.new_zeros(rows, 3)
    pad[:, 0] = sample
    return torch.cat([index, pad])  # [n + rows, 3]


def pad_batch(batch: PackedBatch, bucket: Bucket) -> PackedBatch:
    """``batch`` (B samples) with the padding sample appended, every packed total at ``bucket``'s capacities.

    Runs on the batch's device with host-known sizes only (no host read of a device tensor).

    Raises:
        ValueError: ``bucket`` does not hold the batch, or a modality is of a kind that is not padded.
    """
    totals = batch_totals(batch)
    if not bucket.holds(totals):
        raise ValueError(f"bucket {bucket.capacity} does not hold the batch's totals {totals}")
    b = batch.batch_size
    caps = {name: parts for name, *parts in bucket.capacity}
    device = batch.memory.order.device
    modalities: dict[str, ModalityBatch] = {}
    pad_seq: dict[str, int] = {}  # modality → the padding sample's encoder sequence rows
    for name, mb in batch.modalities.items():
        vis_cap, pred_cap, extra_cap = caps[name]
        enc = mb.encoder
        n_vis = vis_cap - enc.visible.total
        n_pred = pred_cap - mb.queries.packed.total
        n_hidden = pred_cap + extra_cap - mb.hidden.packed.total
        if name in batch.settings.static_tokens:
            # rows of cat([static [B + 1], values]): value rows move one down
            order = torch.cat([torch.where(enc.order >= b, enc.order + 1, enc.order),
                               _arange(b + 1 + enc.visible.total, n_vis, device)])
        else:
            order = _arange(0, enc.seq.total + n_vis, device)
        encoder = EncoderTokens(values=_more_rows(enc.values, n_vis), index=_padding_index(enc.index, n_vis, b),
                                visible=_extend(enc.visible, n_vis), seq=_extend(enc.seq, n_vis), order=order)
        queries = Queries(index=_padding_index(mb.queries.index, n_pred, b), packed=_extend(mb.queries.packed, n_pred))
        targets = Targets(values=_more_rows(mb.targets.values, n_pred), weight=_more_rows(mb.targets.weight, n_pred),
                          count=mb.targets.count)
        hidden = HiddenTokens(
            index=_padding_index(mb.hidden.index, n_hidden, b), packed=_extend(mb.hidden.packed, n_hidden),
            predicted_rows=torch.cat([mb.hidden.predicted_rows, _arange(mb.hidden.packed.total, n_pred, device)]))
        modalities[name] = dataclasses.replace(mb, encoder=encoder, queries=queries, targets=targets, hidden=hidden)
        pad_seq[name] = n_vis

    memory = batch.memory
    in_memory = list(memory.rows)
    old_sizes = [batch.modalities[n].encoder.seq.total for n in in_memory]
    shift = torch.cat([torch.full((size,), sum(pad_seq[m] for m in in_memory[:i]), dtype=torch.int64, device=device)
                       for i, size in enumerate(old_sizes)])  # [Σ total_seq]: how far each encoder row moves
    new_starts = [sum(old_sizes[:i]) + sum(pad_seq[m] for m in in_memory[:i]) for i in range(len(in_memory))]
    padding_rows = [_arange(new_starts[i] + old_sizes[i], pad_seq[n], device) for i, n in enumerate(in_memory)]
    mem_pad = sum(pad_seq[n] for n in in_memory)
    rows, offset = {}, 0
    for n in in_memory:
        rows[n] = torch.cat([memory.rows[n], _arange(memory.packed.total + offset, pad_seq[n], device)])
        offset += pad_seq[n]
    joint = JointMemory(packed=_extend(memory.packed, mem_pad), order=torch.cat([memory.order + shift[memory.order],
                                                                                 *padding_rows]), rows=rows)

    for name, mb in batch.modalities.items():
        std = mb.standard
        if std is None:
            continue
        own = batch.settings.memory != "joint"
        first, grown = (mb.encoder.seq.total, pad_seq[name]) if own else (memory.packed.total, mem_pad)
        n_hidden = modalities[name].hidden.packed.total - mb.hidden.packed.total
        order = torch.cat([torch.where(std.order >= first, std.order + grown, std.order),
                           _arange(first, grown, device),
                           _arange(first + grown + mb.hidden.packed.total, n_hidden, device)])
        query_rows = torch.cat([std.query_rows, _arange(std.seq.total + grown, n_hidden, device)])
        modalities[name].standard = StandardDecoderSequences(seq=_extend(std.seq, grown + n_hidden), order=order,
                                                             query_rows=query_rows)

    static = None
    if batch.static is not None:
        static = StaticAttributes(values=_more_rows(batch.static.values, 1),
                                  missing=_more_rows(batch.static.missing, 1, True))
    day_of_year = None if batch.day_of_year is None else _more_rows(batch.day_of_year, 1)
    return PackedBatch(modalities=modalities, static=static, day_of_year=day_of_year, memory=joint,
                       settings=batch.settings, batch_size=b + 1, steps=batch.steps,
                       meta=[*batch.meta, {"padding": True}])
