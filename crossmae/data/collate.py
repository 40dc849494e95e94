"""Collate + masking: from a list of samples to one packed batch (DESIGN §3–4).

Everything ragged is decided here, on the host, in the DataLoader: tokens, validity, each
sample's mask, the predicted subset, and every packed index, ``cu_seqlens`` and ``max_seqlen``.
The model only gathers rows by these indices.

Tokens
    grid modality (``[T, C, H, W]``, basin mask ``[H, W]``): cut into patches of
    ``patch_size`` cells; token (t, p) holds the ``C·patch_size²`` values of patch p at day t.
    The grid is padded with outside cells up to a multiple of the patch size.
    series modality (``[T, F]``): one token per day with its F values (p = 0).

Mask semantics (stated once)
    valid  [B, T, P]: True = a real observation: the patch holds at least one basin cell and
                      every basin cell of it is finite that day (series: every value finite).
    masked [B, T, P]: True = hidden from the encoder; drawn per sample over its own valid
                      tokens (``round(ratio · n_valid)`` of them). Visible = valid & ~masked.
    predicted:        a ``kept_mask_ratio`` subset of the masked tokens; only these are
                      decoder queries and loss terms. Invalid tokens are never tokens.
    Within a valid grid token, cells outside the basin carry weight 0 in the loss.

Masks depend only on each sample's ``noise_seed``, not on the batch it lands in, so the same
global batch split over several processes draws the same masks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields

import torch

from crossmae.config import MaskConfig
from crossmae.data.sample import DatasetSpec, ModalitySpec, Sample
from crossmae.packed import Packed, concat_segments


@dataclass
class ModalityBatch:
    """One modality's tokens in a batch, packed in (sample, time, patch) order.

    Attributes:
        name, kind: the modality.
        patch_grid: (rows, cols) of the patch grid; (1, 1) for series.
        vis_values: ``[total_vis, token_dim]`` visible tokens' values (encoder input).
        vis_t, vis_p: ``[total_vis]`` int64 time step and patch position of each visible token.
        vis: boundaries of the visible tokens per sample.
        enc: boundaries of the encoder sequence per sample: the static token (if any), then
            the visible tokens.
        enc_order: ``[total_enc]`` int64 rows of ``cat([static tokens [B], visible [total_vis]])``.
        pred_t, pred_p: ``[total_pred]`` positions of the predicted tokens (decoder queries).
        pred: boundaries of the predicted tokens per sample.
        target: ``[total_pred, token_dim]`` their true values.
        target_weight: ``[total_pred, token_dim]`` 1 where a value counts in the loss, else 0.
        target_count: host float, ``target_weight.sum()``.
        masked_t, masked_p, masked: every masked token (the standard MAE decoder's queries).
        pred_in_masked: ``[total_pred]`` row of each predicted token among the masked ones.
        pred_index: ``[total_pred, 3]`` int64 (b, t, p) of each predicted token, for evaluation.
        mae, mae_order, mae_query_rows: the standard MAE decoder's sequence (only when the
            collator builds it): per sample the memory rows then the masked queries; rows of
            ``cat([memory, masked queries])``; where the masked queries land.
    """

    name: str
    kind: str
    patch_grid: tuple[int, int]
    vis_values: torch.Tensor
    vis_t: torch.Tensor
    vis_p: torch.Tensor
    vis: Packed
    enc: Packed
    enc_order: torch.Tensor
    pred_t: torch.Tensor
    pred_p: torch.Tensor
    pred: Packed
    target: torch.Tensor
    target_weight: torch.Tensor
    target_count: float
    masked_t: torch.Tensor
    masked_p: torch.Tensor
    masked: Packed
    pred_in_masked: torch.Tensor
    pred_index: torch.Tensor
    mae: Packed | None = None
    mae_order: torch.Tensor | None = None
    mae_query_rows: torch.Tensor | None = None

    def to(self, device, non_blocking: bool = True) -> ModalityBatch:
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                value = value.to(device, non_blocking=non_blocking)
            elif isinstance(value, Packed):
                value = value.to(device)
            moved[f.name] = value
        return ModalityBatch(**moved)


@dataclass
class PackedBatch:
    """A whole batch: every modality's packed tokens plus the joint memory's layout.

    Attributes:
        modalities: name → :class:`ModalityBatch`, in the data set's modality order.
        static: ``[B, S]`` static attributes (NaN replaced by 0), or None.
        batch_size: B.
        steps: T.
        memory: boundaries of the joint memory per sample: every modality's encoder rows of
            that sample, in modality order.
        memory_order: ``[total_mem]`` rows of ``cat([encoder output of each modality])``.
        meta: per-sample metadata from the data set.
    """

    modalities: dict[str, ModalityBatch]
    static: torch.Tensor | None
    batch_size: int
    steps: int
    memory: Packed
    memory_order: torch.Tensor
    meta: list[dict] = field(default_factory=list)

    def to(self, device, non_blocking: bool = True) -> PackedBatch:
        return PackedBatch(
            modalities={k: m.to(device, non_blocking) for k, m in self.modalities.items()},
            static=None if self.static is None else self.static.to(device, non_blocking=non_blocking),
            batch_size=self.batch_size,
            steps=self.steps,
            memory=self.memory.to(device),
            memory_order=self.memory_order.to(device, non_blocking=non_blocking),
            meta=self.meta,
        )

    @property
    def num_tokens(self) -> int:
        """Encoder plus decoder tokens of the batch (for throughput)."""
        return sum(m.enc.total + m.pred.total for m in self.modalities.values())

    def pin_memory(self) -> PackedBatch:
        for m in self.modalities.values():
            for f in fields(m):
                value = getattr(m, f.name)
                if isinstance(value, torch.Tensor):
                    setattr(m, f.name, value.pin_memory())
        return self


def patch_grid_shape(height: int, width: int, patch_size: int) -> tuple[int, int]:
    return -(-height // patch_size), -(-width // patch_size)


def patchify(grid: torch.Tensor, basin: torch.Tensor, patch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut grids into patch tokens.

    Args:
        grid: ``[B, T, C, H, W]`` values (NaN = missing).
        basin: ``[B, H, W]`` bool, True inside the basin.

    Returns:
        values ``[B, T, P, C·ps²]`` (padding cells NaN) and inside ``[B, P, C·ps²]`` bool.
    """
    b, t, c, h, w = grid.shape
    rows, cols = patch_grid_shape(h, w, patch_size)
    pad_h, pad_w = rows * patch_size - h, cols * patch_size - w
    if pad_h or pad_w:
        grid = torch.nn.functional.pad(grid, (0, pad_w, 0, pad_h), value=float("nan"))
        basin = torch.nn.functional.pad(basin, (0, pad_w, 0, pad_h), value=False)
    x = grid.reshape(b, t, c, rows, patch_size, cols, patch_size)  # [B, T, C, R, ps, Q, ps]
    x = x.permute(0, 1, 3, 5, 2, 4, 6).reshape(b, t, rows * cols, c * patch_size**2)  # [B, T, P, C·ps²]
    m = basin.reshape(b, rows, patch_size, cols, patch_size).permute(0, 1, 3, 2, 4)  # [B, R, Q, ps, ps]
    m = m.reshape(b, rows * cols, 1, patch_size**2).expand(b, rows * cols, c, patch_size**2)  # [B, P, C, ps²]
    return x, m.reshape(b, rows * cols, c * patch_size**2)  # [B, P, C·ps²]


def unpatchify(tokens: torch.Tensor, height: int, width: int, channels: int, patch_size: int) -> torch.Tensor:
    """``[..., P, C·ps²]`` → ``[..., C, H, W]``: the inverse of :func:`patchify` (padding dropped)."""
    rows, cols = patch_grid_shape(height, width, patch_size)
    lead = tokens.shape[:-2]
    x = tokens.reshape(*lead, rows, cols, channels, patch_size, patch_size)  # [..., R, Q, C, ps, ps]
    n = len(lead)
    perm = (*range(n), n + 2, n, n + 3, n + 1, n + 4)
    x = x.permute(perm).reshape(*lead, channels, rows * patch_size, cols * patch_size)  # [..., C, R·ps, Q·ps]
    return x[..., :height, :width]


def _rank_within(scores: torch.Tensor) -> torch.Tensor:
    """Rank of each entry along the last dim (0 = smallest)."""
    return torch.argsort(torch.argsort(scores, dim=-1), dim=-1)


def draw_masks(valid: torch.Tensor, noise: torch.Tensor, ratio: float, kept: float, per_frame: bool):
    """Hidden and predicted tokens from per-sample noise.

    Args:
        valid: ``[B, T, P]`` bool.
        noise: ``[2, B, T, P]`` uniform noise: one draw for the mask, one for the kept subset.
        ratio: fraction of valid tokens hidden (per sample, or per frame with ``per_frame``).
        kept: fraction of hidden tokens predicted.

    Returns:
        masked, predicted: ``[B, T, P]`` bool.
    """
    b, t, p = valid.shape
    score = torch.where(valid, noise[0], 2.0)  # invalid tokens rank last
    if per_frame:
        rank = _rank_within(score)  # [B, T, P]
        n_mask = torch.round(valid.sum(-1, keepdim=True) * ratio)  # [B, T, 1]
    else:
        rank = _rank_within(score.reshape(b, t * p)).reshape(b, t, p)
        n_mask = torch.round(valid.sum((1, 2)) * ratio).view(b, 1, 1)  # [B, 1, 1]
    masked = valid & (rank < n_mask)
    kept_score = torch.where(masked, noise[1], 2.0).reshape(b, t * p)
    kept_rank = _rank_within(kept_score).reshape(b, t, p)
    n_pred = torch.round(masked.sum((1, 2)) * kept).view(b, 1, 1)
    predicted = masked & (kept_rank < n_pred)
    return masked, predicted


def _packed_rows(selected: torch.Tensor) -> tuple[torch.Tensor, Packed]:
    """``selected [B, T, P]`` bool → its (b, t, p) indices ``[n, 3]`` in order and their boundaries."""
    index = selected.nonzero()  # [n, 3], sorted by (b, t, p)
    return index, Packed.from_lengths(selected.sum((1, 2)))


class MaskingCollator:
    """Turns a list of :class:`Sample` into a :class:`PackedBatch` (picklable, for DataLoader workers).

    Args:
        spec: the data set's modalities.
        mask: hiding ratios, mode and the kept (predicted) fraction.
        patch_size: grid patch side in cells.
        steps: T, days per window.
        memory: ``joint`` or ``own``: the memory the standard MAE decoder's sequence holds.
        standard_decoder: also build the standard MAE decoder's sequences.
    """

    def __init__(self, spec: DatasetSpec, mask: MaskConfig, patch_size: int, steps: int, *,
                 memory: str = "joint", standard_decoder: bool = False):
        if memory not in ("joint", "own"):
            raise ValueError(f"memory must be 'joint' or 'own', got {memory!r}")
        self.spec = spec
        self.mask = mask
        self.patch_size = patch_size
        self.steps = steps
        self.memory = memory
        self.standard_decoder = standard_decoder

    def _tokens(self, m: ModalitySpec, samples: Sequence[Sample]):
        """values ``[B, T, P, token_dim]`` (NaN-free), valid ``[B, T, P]``, cell weight ``[B, P, token_dim]``."""
        if m.kind == "grid":
            grid = torch.stack([s.grids[m.name] for s in samples])  # [B, T, C, H, W]
            basin = torch.stack([s.basin_masks[m.name] for s in samples]).bool()  # [B, H, W]
            values, inside = patchify(grid.float(), basin, self.patch_size)
            ok = torch.isfinite(values) | ~inside[:, None]  # every basin cell finite
            valid = ok.all(-1) & inside.any(-1)[:, None]  # [B, T, P]
            weight = inside.float()  # [B, P, token_dim]
        else:
            values = torch.stack([s.series[m.name] for s in samples]).float()[:, :, None, :]  # [B, T, 1, F]
            valid = torch.isfinite(values).all(-1)  # [B, T, 1]
            weight = torch.ones(values.shape[0], 1, values.shape[-1])  # [B, 1, F]
        values = torch.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
        values = values * (weight[:, None] > 0)  # outside cells carry 0
        return values, valid, weight

    def _noise(self, samples: Sequence[Sample], modality_index: int, shape: tuple[int, int]) -> torch.Tensor:
        """``[2, B, T, P]`` uniform noise; each sample's from its own generator."""
        draws = []
        for s in samples:
            gen = torch.Generator().manual_seed(int(s.noise_seed) * 1009 + modality_index)
            draws.append(torch.rand(2, *shape, generator=gen))
        return torch.stack(draws, dim=1)

    def __call__(self, samples: Sequence[Sample]) -> PackedBatch:
        if not samples:
            raise ValueError("cannot collate an empty list of samples")
        batch = len(samples)
        has_static = self.spec.static_dim > 0
        static = None
        if has_static:
            static = torch.stack([s.static for s in samples]).float()  # [B, S]
            static = torch.nan_to_num(static, nan=0.0)
        static_lengths = Packed.from_lengths([int(has_static)] * batch)

        modalities = {}
        for i, m in enumerate(self.spec.modalities):
            values, valid, weight = self._tokens(m, samples)  # [B, T, P, K], [B, T, P], [B, P, K]
            t, p = valid.shape[1:]
            per_frame = self.mask.mode == "frame" and m.kind == "grid"
            masked, predicted = draw_masks(
                valid, self._noise(samples, i, (t, p)), self.mask.ratio(m.name, m.kind),
                self.mask.kept_mask_ratio, per_frame,
            )
            vis_index, vis = _packed_rows(valid & ~masked)  # [total_vis, 3]
            pred_index, pred = _packed_rows(predicted)  # [total_pred, 3]
            masked_index, masked_packed = _packed_rows(masked)  # [total_masked, 3]
            enc, enc_order, _ = concat_segments([static_lengths, vis])
            flat_masked = masked.flatten()
            rank_in_masked = torch.cumsum(flat_masked, 0) - 1  # [B·T·P]
            pb, pt, pp = pred_index.unbind(1)
            flat_pred = (pb * t + pt) * p + pp  # [total_pred]
            target_weight = weight[pb, pp]  # [total_pred, K]
            vb, vt, vp = vis_index.unbind(1)
            grid_shape = patch_grid_shape(m.height, m.width, self.patch_size) if m.kind == "grid" else (1, 1)
            modalities[m.name] = ModalityBatch(
                name=m.name, kind=m.kind, patch_grid=grid_shape,
                vis_values=values[vb, vt, vp], vis_t=vt, vis_p=vp, vis=vis,
                enc=enc, enc_order=enc_order,
                pred_t=pt, pred_p=pp, pred=pred,
                target=values[pb, pt, pp], target_weight=target_weight,
                target_count=float(target_weight.sum()),
                masked_t=masked_index[:, 1], masked_p=masked_index[:, 2], masked=masked_packed,
                pred_in_masked=rank_in_masked[flat_pred], pred_index=pred_index,
            )
        memory, memory_order, _ = concat_segments([mb.enc for mb in modalities.values()])
        if self.standard_decoder:
            for mb in modalities.values():
                own = memory if self.memory == "joint" else mb.enc
                mb.mae, mb.mae_order, (_, mb.mae_query_rows) = concat_segments([own, mb.masked])
        return PackedBatch(
            modalities=modalities, static=static, batch_size=batch, steps=self.steps,
            memory=memory, memory_order=memory_order, meta=[s.meta for s in samples],
        )
