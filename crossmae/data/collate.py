"""Collate + masking: from a list of samples to one packed batch.

Everything ragged is decided here, on the host, in the DataLoader: tokens, validity, each
sample's mask, the predicted subset, and every packed index, ``cu_seqlens`` and ``max_seqlen``.
The model only gathers rows by these indices. ``docs/batch.md`` describes the batch's parts;
``docs/masking.md`` states the masking rules (counts, rounding, modes) once.

Tokens
    grid modality (``[T, C, H, W]``, basin mask ``[H, W]``): cut into patches of
    ``patch_size`` cells; token (t, p) holds the ``C·patch_size²`` values of patch p at day t.
    The grid is padded with outside cells up to a multiple of the patch size.
    series modality (``[T, F]``): one token per day with its F values (p = 0).
    site set (``[T, G, K, F]``, slots ``[G, K]``): token (t, g) holds the ``K·F`` values of group g's
    sites on day t, slot-major (value index ``k·F + f``), p = g. A value counts when its slot holds
    a site and the value is finite; a token without any such value is invalid.

Masks depend only on each sample's ``noise_seed``, not on the batch it lands in, so the same
global batch split over several processes draws the same masks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from crossmae.config import MASK_MODES, MaskConfig
from crossmae.data.sample import DatasetSpec, ModalitySpec, Sample
from crossmae.packed import Packed, concat_segments


def _map_tensors(obj, fn, packed_fn):
    """``obj`` with ``fn`` applied to every tensor and ``packed_fn`` to every :class:`Packed` inside it
    (dataclasses, dicts)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, Packed):
        return packed_fn(obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn, packed_fn) for k, v in obj.items()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type) and not isinstance(obj, CollateSettings):
        return dataclasses.replace(obj, **{f.name: _map_tensors(getattr(obj, f.name), fn, packed_fn)
                                           for f in dataclasses.fields(obj)})
    return obj


@dataclass(frozen=True)
class CollateSettings:
    """What a collator was built with that the model depends on (the model checks it once per collator).

    Attributes:
        patch_size: grid patch side in cells.
        steps: T, days per window.
        memory: ``joint`` or ``own``: the memory the standard decoder's sequences hold.
        standard_decoder: whether the standard MAE decoder's sequences are built.
        static_tokens: modalities whose encoder sequence starts with a static-attribute token.
        calendar: whether each token's day of year is provided.
        memory_modalities: the modalities in the joint memory, in modality order.
    """

    patch_size: int
    steps: int
    memory: str = "joint"
    standard_decoder: bool = False
    static_tokens: tuple[str, ...] = ()
    calendar: bool = False
    memory_modalities: tuple[str, ...] = ()


@dataclass
class EncoderTokens:
    """What one modality's encoder reads: its visible tokens.

    Attributes:
        values: ``[total_vis, token_dim]`` the visible tokens' values.
        index: ``[total_vis, 3]`` int64 (b, t, p) of each visible token.
        visible: boundaries of the visible tokens per sample.
        seq: boundaries of the encoder sequence per sample: the static token (when the modality
            takes one), then the visible tokens.
        order: ``[total_seq]`` int64 rows of ``cat([static tokens [B], values [total_vis]])`` in
            sequence order (without a static token: ``arange(total_vis)``, rows of ``values``).
    """

    values: torch.Tensor
    index: torch.Tensor
    visible: Packed
    seq: Packed
    order: torch.Tensor


@dataclass
class Queries:
    """What one modality's CrossMAE decoder queries: the predicted tokens.

    Attributes:
        index: ``[total_pred, 3]`` int64 (b, t, p) of each predicted token.
        packed: boundaries of the predicted tokens per sample.
    """

    index: torch.Tensor
    packed: Packed


@dataclass
class Targets:
    """What the predicted tokens are scored against, row for row with :class:`Queries`.

    Attributes:
        values: ``[total_pred, token_dim]`` the true values.
        weight: ``[total_pred, token_dim]`` 1 where a value counts in the loss (a basin cell; for a site set a
            filled slot's finite value), else 0.
        count: host float, ``weight.sum()`` (for logging; the model counts on the device).
    """

    values: torch.Tensor
    weight: torch.Tensor
    count: float


@dataclass
class HiddenTokens:
    """Every hidden token (the predicted ones and the rest).

    Attributes:
        index: ``[total_hidden, 3]`` int64 (b, t, p) of each hidden token.
        packed: boundaries of the hidden tokens per sample.
        predicted_rows: ``[total_pred]`` int64 row of each predicted token among the hidden ones.
    """

    index: torch.Tensor
    packed: Packed
    predicted_rows: torch.Tensor


@dataclass
class StandardDecoderSequences:
    """The standard MAE decoder's sequences (the baseline): per sample the memory rows, then a mask
    token at every hidden position.

    Attributes:
        seq: boundaries of the sequences per sample.
        order: ``[total_seq]`` int64 rows of ``cat([memory [total_mem], hidden queries [total_hidden]])``.
        query_rows: ``[total_hidden]`` int64 row of each hidden query in the sequences.
    """

    seq: Packed
    order: torch.Tensor
    query_rows: torch.Tensor


@dataclass
class SiteAttributes:
    """A site set's static site attributes, per sample and group (the model gathers a token's row by its
    (b, p = g)).

    Attributes:
        values: ``[B, G, K·A]`` float32 standardised attributes, slot-major (index ``k·A + a``); 0 where unknown.
        missing: ``[B, G, K·A]`` bool, True where the attribute is unknown or the slot holds no site.
        occupied: ``[B, G, K]`` bool, True where a site fills the slot.
    """

    values: torch.Tensor
    missing: torch.Tensor
    occupied: torch.Tensor


@dataclass
class ModalityBatch:
    """One modality's part of a batch, packed in (sample, time, patch) order.

    Attributes:
        name, kind: the modality.
        patch_grid: (rows, cols) of the patch grid; (1, 1) for series; (1, G) for site sets.
        encoder: the visible tokens the encoder reads.
        queries: the predicted tokens the decoder queries.
        targets: their true values and loss weights.
        hidden: every hidden token.
        standard: the standard decoder's sequences (only when the collator builds them).
        site_attributes: a site set's static site attributes (site sets with attributes only).
    """

    name: str
    kind: str
    patch_grid: tuple[int, int]
    encoder: EncoderTokens
    queries: Queries
    targets: Targets
    hidden: HiddenTokens
    standard: StandardDecoderSequences | None = None
    site_attributes: SiteAttributes | None = None


@dataclass
class StaticAttributes:
    """Per-sample static attributes.

    Attributes:
        values: ``[B, S]`` float32, standardised; 0 where missing.
        missing: ``[B, S]`` bool, True where the attribute is unknown (NaN in the sample).
    """

    values: torch.Tensor
    missing: torch.Tensor


@dataclass
class JointMemory:
    """The joint memory's layout: per sample, every memory modality's encoder rows in modality order.

    Attributes:
        packed: boundaries of the memory per sample.
        order: ``[total_mem]`` int64 rows of ``cat([encoder output of each memory modality])``.
        rows: memory modality → ``[total_seq_m]`` int64 memory row of each of its encoder rows.
    """

    packed: Packed
    order: torch.Tensor
    rows: dict[str, torch.Tensor]


@dataclass
class PackedBatch:
    """A whole batch: every modality's parts, the static attributes and the joint memory's layout.

    Attributes:
        modalities: name → :class:`ModalityBatch`, in the data set's modality order.
        static: the static attributes, or None when the data set has none.
        day_of_year: ``[B, T]`` float32 day of year (0 = 1 January) of each window day, or None.
        memory: the joint memory's layout.
        settings: what the collator was built with.
        batch_size: B.
        steps: T.
        meta: per-sample metadata from the data set.
    """

    modalities: dict[str, ModalityBatch]
    static: StaticAttributes | None
    day_of_year: torch.Tensor | None
    memory: JointMemory
    settings: CollateSettings
    batch_size: int
    steps: int
    meta: list[dict] = field(default_factory=list)

    def to(self, device, non_blocking: bool = True) -> PackedBatch:
        return _map_tensors(self, lambda t: t.to(device, non_blocking=non_blocking), lambda p: p.to(device))

    def pin_memory(self) -> PackedBatch:
        return _map_tensors(self, lambda t: t.pin_memory(), lambda p: p)

    @property
    def num_tokens(self) -> int:
        """Encoder plus decoder tokens of the batch (for throughput)."""
        return sum(m.encoder.seq.total + m.queries.packed.total for m in self.modalities.values())


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


@dataclass
class TokenValues:
    """A modality's token values; a batch copies out only the rows it uses.

    Attributes:
        tokens: ``[B, T, P, token_dim]`` the values, cells outside the basin multiplied by 0; may hold
            non-finite values (in missing tokens) unless ``finite``.
        finite: every value of ``tokens`` is finite (then rows need no clean-up).
    """

    tokens: torch.Tensor
    finite: bool

    def rows(self, b: torch.Tensor, t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """``[n, token_dim]`` the values of tokens (b, t, p) (``[n]`` int64 each), non-finite values 0."""
        _, steps, patches, dim = self.tokens.shape
        x = self.tokens.view(-1, dim).index_select(0, (b * steps + t) * patches + p)  # [n, token_dim]
        return x if self.finite else torch.nan_to_num_(x, nan=0.0, posinf=0.0, neginf=0.0)

    def gather(self, *selections: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> list[torch.Tensor]:
        """:meth:`rows` of each selection (b, t, p)."""
        return [self.rows(*s) for s in selections]


class NonFiniteGrid(Exception):
    """A grid taken for finite (:class:`GridCells` not ``checked``) holds a non-finite value."""


@dataclass
class GridCells:
    """A grid modality's token values left in the samples' cell layout: a batch copies each token's cells straight
    from its sample's grid (:func:`grid_tokens` makes this when every grid is finite and a whole number of patches).

    Attributes:
        grids: B tensors ``[T, C, H, W]``, H and W multiples of ``patch_size``; every value finite, or
            :meth:`gather` raises :class:`NonFiniteGrid` (``checked`` False: not looked at yet).
        inside: ``[B, H, W]`` float32, 1 inside the basin, 0 outside.
        patch_size: patch side in cells.
        checked: every value of ``grids`` is known to be finite.
    """

    grids: Sequence[torch.Tensor]
    inside: torch.Tensor
    patch_size: int
    checked: bool = True

    def gather(self, *selections: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> list[torch.Tensor]:
        """Per selection, ``[n, C·ps²]`` the values of tokens (b, t, p) (``[n]`` int64 each, sorted by b), cells
        outside the basin multiplied by 0: the rows :class:`TokenValues` gives for :func:`grid_tokens`'s tokens.

        Sample by sample, its grid is multiplied by its basin once (into one reused buffer) and every selection's
        rows of that sample are copied out of it as runs of ``ps`` cells (a patch row of one channel). Unless
        ``checked``, each product's sum is read first (finite only when every value of the grid is).

        Raises:
            NonFiniteGrid: a grid not ``checked`` holds a non-finite value.
        """
        t, c, h, w = self.grids[0].shape
        ps = self.patch_size
        cols = w // ps
        index = torch.int32 if t * c * h * cols < 2**31 else torch.int64  # run numbers
        runs = ((torch.arange(c, dtype=index)[:, None] * h + torch.arange(ps, dtype=index))
                * cols).view(1, c * ps)  # [1, C·ps] run offsets
        # [P] the first run of patch p on day 0 (row-major patches: p = row · cols + col)
        patch_first = (torch.arange(h // ps, dtype=index)[:, None] * (ps * cols)
                       + torch.arange(cols, dtype=index)).view(-1)
        outs, plans = [], []
        for b, tt, p in selections:
            out = torch.empty(b.shape[0], c * ps * ps)
            first = tt.to(index, copy=True).mul_(c * h * cols).add_(patch_first.index_select(0, p))  # [n]
            bounds = torch.searchsorted(b, torch.arange(len(self.grids) + 1)).tolist()  # sample i: [bounds[i], ..+1)
            outs.append(out)
            plans.append((out.view(-1, ps), (first[:, None] + runs).view(-1), bounds))  # [n·C·ps, ps], [n·C·ps]
        masked = torch.empty(t, c, h, w)
        for i, grid in enumerate(self.grids):
            torch.mul(grid, self.inside[i], out=masked)  # NaN · 0 and ±inf · 0 are NaN: the sum still sees them
            if not self.checked and not bool(torch.isfinite(masked.sum())):
                raise NonFiniteGrid(f"sample {i}'s grid holds a non-finite value")
            source = masked.view(-1, ps)  # [T·C·H·Q, ps]: runs of ps cells
            for out, index, bounds in plans:
                lo, hi = bounds[i] * c * ps, bounds[i + 1] * c * ps
                if hi > lo:
                    torch.index_select(source, 0, index[lo:hi], out=out[lo:hi])
        return outs


def grid_tokens(grids: Sequence[torch.Tensor], basin: torch.Tensor, patch_size: int, *,
                assume_finite: bool = False) -> tuple[TokenValues | GridCells, torch.Tensor, torch.Tensor]:
    """A grid modality's tokens: :func:`patchify`'s, with the outside cells 0, and their validity.

    A token is valid when its patch holds a basin cell and every basin cell of it is finite that day. Whether a
    grid holds a non-finite value at all is one read (its sum is finite only when every value is); without any
    (and without padding cells), validity is the basin's alone and the values stay in the grids
    (:class:`GridCells`: a batch copies out only the rows it uses). Otherwise each sample's grid is copied once,
    straight into the batch's token layout (no stacked copy first), and validity is read from the tokens.
    With ``assume_finite``, grids without padding cells are taken for finite unread: the :class:`GridCells`
    looks at each grid as it copies rows out (and raises :class:`NonFiniteGrid` if one is not).

    Args:
        grids: B tensors ``[T, C, H, W]`` of one shape (NaN = missing).
        basin: ``[B, H, W]`` bool, True inside the basin.
        assume_finite: take grids without padding for finite, to be checked later.

    Returns:
        values (:class:`TokenValues` or :class:`GridCells`), valid ``[B, T, P]`` bool, cell weight
        ``[B, P, C·ps²]`` float (1 inside).
    """
    t, c, h, w = grids[0].shape
    b = len(grids)
    rows, cols = patch_grid_shape(h, w, patch_size)
    pad_h, pad_w = rows * patch_size - h, cols * patch_size - w
    for i, grid in enumerate(grids):
        if grid.shape != grids[0].shape:
            raise ValueError(f"grids of one batch must share a shape: sample {i} has {tuple(grid.shape)}, sample 0 "
                             f"{tuple(grids[0].shape)}")
    unpadded = not (pad_h or pad_w)  # padding cells are NaN
    checked = not assume_finite
    if unpadded and (assume_finite or all(bool(torch.isfinite(grid.float().sum())) for grid in grids)):
        m = basin.reshape(b, rows, patch_size, cols, patch_size).permute(0, 1, 3, 2, 4)  # [B, R, Q, ps, ps]
        m = m.reshape(b, rows * cols, 1, patch_size**2).expand(b, rows * cols, c, patch_size**2)  # [B, P, C, ps²]
        inside = m.reshape(b, rows * cols, c * patch_size**2)  # [B, P, C·ps²]
        valid = inside.any(-1)[:, None].expand(b, t, rows * cols).contiguous()  # [B, T, P]
        cells = GridCells(grids=[g.float() for g in grids], inside=basin.float(), patch_size=patch_size,
                          checked=checked)
        return cells, valid, inside.float()
    tokens = torch.empty(b, t, rows, cols, c, patch_size, patch_size)  # [B, T, R, Q, C, ps, ps]
    for i, grid in enumerate(grids):
        grid = grid.float()
        if pad_h or pad_w:
            grid = torch.nn.functional.pad(grid, (0, pad_w, 0, pad_h), value=float("nan"))
        cells = grid.reshape(t, c, rows, patch_size, cols, patch_size)  # [T, C, R, ps, Q, ps]
        tokens[i].copy_(cells.permute(0, 2, 4, 1, 3, 5))
    tokens = tokens.view(b, t, rows * cols, c * patch_size**2)  # [B, T, P, C·ps²]
    if pad_h or pad_w:
        basin = torch.nn.functional.pad(basin, (0, pad_w, 0, pad_h), value=False)
    m = basin.reshape(b, rows, patch_size, cols, patch_size).permute(0, 1, 3, 2, 4)  # [B, R, Q, ps, ps]
    m = m.reshape(b, rows * cols, 1, patch_size**2).expand(b, rows * cols, c, patch_size**2)  # [B, P, C, ps²]
    inside = m.reshape(b, rows * cols, c * patch_size**2)  # [B, P, C·ps²]
    valid = (torch.isfinite(tokens) | ~inside[:, None]).all(-1) & inside.any(-1)[:, None]  # [B, T, P]
    tokens.mul_(inside[:, None])  # outside cells carry 0 (NaN · 0 stays NaN: rows() clears it)
    return TokenValues(tokens=tokens, finite=False), valid, inside.float()


def site_tokens(values: Sequence[torch.Tensor], slots: torch.Tensor) -> tuple[TokenValues, torch.Tensor,
                                                                              torch.Tensor]:
    """A site set's tokens: token (t, g) holds group g's ``K·F`` values of day t, slot-major.

    A value counts when its slot holds a site and the value is finite; a token is valid when one of its values
    counts. Values that don't count are 0 in the tokens.

    Args:
        values: B tensors ``[T, G, K, F]`` of one shape (NaN = missing).
        slots: ``[B, G, K]`` bool, True where a site fills the slot.

    Returns:
        values (:class:`TokenValues`), valid ``[B, T, G]`` bool, value weight ``[B, T, G, K·F]`` float.
    """
    t, g, k, f = values[0].shape
    for i, v in enumerate(values):
        if v.shape != values[0].shape:
            raise ValueError(f"site values of one batch must share a shape: sample {i} has {tuple(v.shape)}, "
                             f"sample 0 {tuple(values[0].shape)}")
    x = torch.stack(values).float()  # [B, T, G, K, F]
    counts = torch.isfinite(x) & slots[:, None, :, :, None]  # [B, T, G, K, F]
    tokens = torch.where(counts, x, 0.0).view(len(values), t, g, k * f)  # [B, T, G, K·F]
    weight = counts.view(len(values), t, g, k * f)  # [B, T, G, K·F]
    return TokenValues(tokens=tokens, finite=True), weight.any(-1), weight.float()


def _lowest(scores: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """True at the ``count`` smallest entries along the last dim: ``rank < count``, where an entry's rank is its
    place in ``torch.argsort(scores)`` (ties in argsort's order).

    A selection (``np.partition``, linear time) finds each row's ``count``-th smallest value v; when no tie
    straddles it (exactly ``count`` entries ≤ v, as with continuous noise but for a rare draw), those entries
    are the answer whatever the tie order; otherwise (and off the CPU or for other dtypes than float32/64) the
    rows are ranked by ``torch.argsort``.

    Args:
        scores: ``[..., N]`` float.
        count: ``[..., 1]`` int (broadcast over the last dim), at most N.

    Returns:
        ``[..., N]`` bool.
    """
    n = scores.shape[-1]
    flat = scores.reshape(-1, n)  # [rows, N]
    k = count.expand(*scores.shape[:-1], 1).reshape(-1)  # [rows]
    numpy_ok = scores.device.type == "cpu" and scores.dtype in (torch.float32, torch.float64)
    kth = sorted(set((k[k > 0] - 1).tolist())) if numpy_ok else None
    if kth is None:
        chosen = None
    elif kth:
        part = torch.from_numpy(np.partition(flat.numpy(), kth, axis=-1))  # [rows, N]
        value = part.gather(1, (k - 1).clamp_min(0)[:, None])  # [rows, 1]: the count-th smallest
        chosen = (flat <= value) & (k > 0)[:, None]
    else:
        chosen = torch.zeros(flat.shape, dtype=torch.bool)
    if chosen is not None and torch.equal(chosen.sum(-1), k):
        return chosen.view(scores.shape)
    order = torch.argsort(scores, dim=-1)  # [..., N]: entry at each rank
    kept = (torch.arange(n, device=scores.device) < count).expand(scores.shape)  # [..., N]: ranks below count
    return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device).scatter_(-1, order, kept)


def _predicted(masked: torch.Tensor, noise: torch.Tensor, n_valid: torch.Tensor, kept: float | None) -> torch.Tensor:
    """The predicted subset of ``masked [B, T, P]``: its ``predicted_count`` entries of lowest ``noise [B, T, P]``
    (every masked entry when ``kept`` is None: they all rank before the unmasked ones)."""
    if kept is None:
        return masked.clone()
    b, t, p = masked.shape
    kept_score = torch.where(masked, noise, 2.0).reshape(b, t * p)
    n_pred = predicted_count(n_valid, masked.sum((1, 2)), kept).view(b, 1)  # [B, 1]
    return masked & _lowest(kept_score, n_pred).view(b, t, p)


def _round_half_up(x: torch.Tensor) -> torch.Tensor:
    return torch.floor(x + 0.5)


def hidden_count(n_valid: torch.Tensor, ratio: float) -> torch.Tensor:
    """Tokens to hide among ``n_valid``: ``ratio · n`` rounded half up; with n ≥ 2 at least 1 and at most
    n − 1 (so something is hidden and something stays visible)."""
    n = n_valid.double()
    k = _round_half_up(ratio * n)
    return torch.where(n >= 2, k.clamp_min(1.0).minimum(n - 1), k).long()


def predicted_count(n_valid: torch.Tensor, n_hidden: torch.Tensor, kept: float | None) -> torch.Tensor:
    """Hidden tokens to predict: all of them (``kept`` None), else ``kept · n_valid`` (a fraction of all
    valid tokens, CrossMAE's partial reconstruction) rounded half up, at least 1 and at most ``n_hidden``
    when anything is hidden."""
    if kept is None:
        return n_hidden
    k = _round_half_up(kept * n_valid.double()).long()
    return torch.minimum(k.clamp_min(1), n_hidden)


def draw_masks(valid: torch.Tensor, noise: torch.Tensor, ratio: float, kept: float | None, per_frame: bool):
    """Hidden and predicted tokens from per-sample noise (rules: ``docs/masking.md``).

    Args:
        valid: ``[B, T, P]`` bool.
        noise: ``[2, B, T, P]`` uniform noise: one draw for the mask, one for the predicted subset.
        ratio: fraction of valid tokens hidden (per sample, or per frame with ``per_frame``).
        kept: fraction of the valid tokens predicted (per sample; None = every hidden token).

    Returns:
        masked, predicted: ``[B, T, P]`` bool.
    """
    b, t, p = valid.shape
    score = torch.where(valid, noise[0], 2.0)  # invalid tokens rank last
    if per_frame:
        n_mask = hidden_count(valid.sum(-1, keepdim=True), ratio)  # [B, T, 1]
        lowest = _lowest(score, n_mask)  # [B, T, P]
    else:
        n_mask = hidden_count(valid.sum((1, 2)), ratio).view(b, 1)  # [B, 1]
        lowest = _lowest(score.reshape(b, t * p), n_mask).view(b, t, p)
    masked = valid & lowest
    return masked, _predicted(masked, noise[1], valid.sum((1, 2)), kept)


def draw_span_masks(valid: torch.Tensor, generators: Sequence[torch.Generator], kept_noise: torch.Tensor,
                    ratio: float, kept: float | None, span_days: Sequence[int]):
    """Hidden runs of whole days (``mask.mode: span``; rules: ``docs/masking.md``).

    Each sample draws runs (length uniform in ``span_days``, start uniform over the starts that overlap the
    window) from its generator and hides their days, day by day in time order, until ``hidden_count`` of its
    valid tokens are hidden (a day hides every valid patch of it, so a grid may hide a few more); with at
    least 2 valid tokens and all of them hidden, the first valid one stays visible.

    Args:
        valid: ``[B, T, P]`` bool.
        generators: one per sample.
        kept_noise: ``[B, T, P]`` uniform noise choosing the predicted subset.
        ratio: fraction of valid tokens hidden.
        kept: fraction of the valid tokens predicted (None = every hidden token).
        span_days: ``(shortest, longest)`` run length in days.

    Returns:
        masked, predicted: ``[B, T, P]`` bool.
    """
    b, t, p = valid.shape
    n_valid = valid.sum((1, 2))  # [B]
    target = hidden_count(n_valid, ratio)  # [B]
    per_day = valid.sum(-1)  # [B, T]
    masked = torch.zeros_like(valid)
    shortest, longest = int(span_days[0]), int(span_days[1])
    for i in range(b):
        hidden_days = torch.zeros(t, dtype=torch.bool)
        count, goal = 0, int(target[i])
        for _ in range(4 * t):
            if count >= goal:
                break
            length = int(torch.randint(shortest, longest + 1, (1,), generator=generators[i]))
            start = int(torch.randint(1 - length, t, (1,), generator=generators[i]))
            for day in range(max(start, 0), min(start + length, t)):
                if count >= goal:
                    break
                if not hidden_days[day]:
                    hidden_days[day] = True
                    count += int(per_day[i, day])
        masked[i] = valid[i] & hidden_days[:, None]
        if n_valid[i] >= 2 and int(masked[i].sum()) == int(n_valid[i]):
            first = valid[i].flatten().nonzero()[0, 0]
            masked[i].view(-1)[first] = False
    return masked, _predicted(masked, kept_noise, n_valid, kept)


def _packed_rows(selected: torch.Tensor) -> tuple[torch.Tensor, Packed]:
    """``selected [B, T, P]`` bool → its (b, t, p) indices ``[n, 3]`` in order and their boundaries."""
    index = selected.nonzero()  # [n, 3], sorted by (b, t, p)
    return index, Packed.from_lengths(selected.sum((1, 2)))


def day_of_year(first_day: int, steps: int) -> torch.Tensor:
    """``[steps]`` float32 day of year (0 = 1 January) of the days ``first_day …`` (days since 1970-01-01)."""
    days = np.arange(first_day, first_day + steps).astype("datetime64[D]")
    return torch.from_numpy((days - days.astype("datetime64[Y]")).astype(np.float32))


class MaskingCollator:
    """Turns a list of :class:`Sample` into a :class:`PackedBatch` (picklable, for DataLoader workers).

    Args:
        spec: the data set's modalities.
        mask: hiding ratios, mode and the predicted fraction.
        patch_size: grid patch side in cells.
        steps: T, days per window.
        memory: ``joint`` or ``own``: the memory the standard MAE decoder's sequence holds.
        standard_decoder: also build the standard MAE decoder's sequences.
        static_tokens: modalities whose encoder sequence starts with a static-attribute token (None:
            every modality when the data set has static attributes; ignored when it has none).
        calendar: provide each window day's day of year (needs ``Sample.first_day``).
        memory_modalities: the modalities whose encoder rows form the joint memory (None: all).

    Attributes:
        assume_finite: the next batch's grids are taken for finite and checked as their rows are copied (True
            until a batch holds a non-finite grid, then again after a batch whose grids were all finite); the
            batch is the same either way.
    """

    def __init__(self, spec: DatasetSpec, mask: MaskConfig, patch_size: int, steps: int, *,
                 memory: str = "joint", standard_decoder: bool = False,
                 static_tokens: Sequence[str] | None = None, calendar: bool = False,
                 memory_modalities: Sequence[str] | None = None):
        if memory not in ("joint", "own"):
            raise ValueError(f"memory must be 'joint' or 'own', got {memory!r}")
        if mask.mode not in MASK_MODES:
            raise ValueError(f"mask.mode must be one of {MASK_MODES}, got {mask.mode!r}")
        names = [m.name for m in spec.modalities]
        if not spec.static_dim:
            static_tokens = ()
        elif static_tokens is None:
            static_tokens = names
        unknown = [n for n in static_tokens if n not in names]
        if unknown:
            raise ValueError(f"static_tokens names {unknown}, which are not modalities of the data set ({names})")
        memory_modalities = names if memory_modalities is None else list(memory_modalities)
        unknown = [n for n in memory_modalities if n not in names]
        if unknown or not memory_modalities:
            raise ValueError(f"memory_modalities must name some of the data set's modalities ({names}), got "
                             f"{memory_modalities}")
        self.spec = spec
        self.mask = mask
        self.groups = self._mask_groups(spec, mask, patch_size)
        self.assume_finite = True
        self.settings = CollateSettings(
            patch_size=patch_size, steps=steps, memory=memory, standard_decoder=standard_decoder,
            static_tokens=tuple(n for n in names if n in static_tokens), calendar=calendar,
            memory_modalities=tuple(n for n in names if n in memory_modalities),
        )

    @staticmethod
    def _mask_groups(spec: DatasetSpec, mask: MaskConfig, patch_size: int) -> list[tuple[ModalitySpec, ...]]:
        """Modalities that share one mask: with ``mask.mode == 'unified'`` all grids (the same (t, p)), and all
        series and site sets (the same days); otherwise each modality alone."""
        if mask.mode != "unified":
            return [(m,) for m in spec.modalities]
        groups = [g for g in (spec.grids, spec.series + spec.sites) if g]
        for group in groups:
            ratios = {m.name: mask.ratio(m.name, m.kind) for m in group}
            if len(set(ratios.values())) > 1:
                raise ValueError(f"mask.mode 'unified' hides the same positions in {list(ratios)}, so their mask "
                                 f"ratios must be equal; got {ratios} (check mask.ratios)")
            shapes = {m.name: patch_grid_shape(m.height, m.width, patch_size) for m in group if m.kind == "grid"}
            if len(set(shapes.values())) > 1:
                raise ValueError(f"mask.mode 'unified' needs grid modalities of one patch grid, got {shapes}")
        return groups

    @property
    def patch_size(self) -> int:
        return self.settings.patch_size

    @property
    def steps(self) -> int:
        return self.settings.steps

    def _tokens(self, m: ModalitySpec, samples: Sequence[Sample]):
        """values (:class:`TokenValues`), valid ``[B, T, P]``, value weight ``[B, P, token_dim]`` (grids, series)
        or ``[B, T, P, token_dim]`` (site sets)."""
        if m.kind == "sites":
            want = (m.groups, m.group_size, m.channels)
            for i, s in enumerate(samples):
                got = tuple(s.sites[m.name].shape[1:]) if m.name in s.sites else None
                slots = tuple(s.site_masks[m.name].shape) if m.name in s.site_masks else None
                if got != want or slots != want[:2]:
                    raise ValueError(f"sample {i} ({s.meta}): site set {m.name!r} must hold values [T, {want[0]}, "
                                     f"{want[1]}, {want[2]}] and slots {list(want[:2])} (groups, group_size, "
                                     f"variables of its ModalitySpec), got values {got} and slots {slots}")
            slots = torch.stack([s.site_masks[m.name] for s in samples]).bool()  # [B, G, K]
            return site_tokens([s.sites[m.name] for s in samples], slots)
        if m.kind == "grid":
            basin = torch.stack([s.basin_masks[m.name] for s in samples]).bool()  # [B, H, W]
            return grid_tokens([s.grids[m.name] for s in samples], basin, self.patch_size,
                               assume_finite=self.assume_finite)
        series = torch.stack([s.series[m.name] for s in samples]).float()[:, :, None, :]  # [B, T, 1, F]
        valid = torch.isfinite(series).all(-1)  # [B, T, 1]
        return TokenValues(tokens=series, finite=bool(valid.all())), valid, torch.ones(len(samples), 1,
                                                                                       series.shape[-1])

    def _noise(self, samples: Sequence[Sample], stream: int, shape: tuple[int, int]) -> torch.Tensor:
        """``[2, B, T, P]`` uniform noise; each sample's from its own generator."""
        draws = []
        for s in samples:
            gen = torch.Generator().manual_seed(int(s.noise_seed) * 1009 + stream)
            draws.append(torch.rand(2, *shape, generator=gen))
        return torch.stack(draws, dim=1)

    def _masks(self, samples: Sequence[Sample], valid: dict[str, torch.Tensor]):
        """modality → (masked, predicted) ``[B, T, P]`` bool, one draw per mask group (in ``unified`` mode, series
        and site sets draw whole days: a hidden day hides every valid token of it)."""
        out = {}
        for group in self.groups:
            first = group[0]
            if self.mask.mode == "unified" and first.kind != "grid":
                union = torch.stack([valid[m.name].any(-1, keepdim=True) for m in group]).any(0)  # [B, T, 1]
            else:
                union = torch.stack([valid[m.name] for m in group]).any(0)  # [B, T, P]
            stream = self.spec.modalities.index(first) + (1000 if len(group) > 1 else 0)
            per_frame = self.mask.mode == "frame" and first.kind in ("grid", "sites")
            if self.mask.mode == "span":
                generators = [torch.Generator().manual_seed(int(s.noise_seed) * 1009 + stream + 500) for s in samples]
                masked, predicted = draw_span_masks(
                    union, generators, self._noise(samples, stream, tuple(union.shape[1:]))[1],
                    self.mask.ratio(first.name, first.kind), self.mask.kept_mask_ratio, self.mask.span_days)
                out.update({m.name: (masked & valid[m.name], predicted & valid[m.name]) for m in group})
                continue
            masked, predicted = draw_masks(union, self._noise(samples, stream, tuple(union.shape[1:])),
                                           self.mask.ratio(first.name, first.kind), self.mask.kept_mask_ratio,
                                           per_frame)
            for m in group:
                out[m.name] = (masked & valid[m.name], predicted & valid[m.name])
        return out

    def _site_attributes(self, m: ModalitySpec, samples: Sequence[Sample]) -> SiteAttributes | None:
        if m.kind != "sites" or not m.site_attrs:
            return None
        want = (m.groups, m.group_size, m.site_attrs)
        for i, s in enumerate(samples):
            got = tuple(s.site_static[m.name].shape) if m.name in s.site_static else None
            if got != want:
                raise ValueError(f"sample {i} ({s.meta}): site set {m.name!r} must carry site_static of shape "
                                 f"{list(want)} (groups, group_size, site_attrs of its ModalitySpec), got {got}")
        raw = torch.stack([s.site_static[m.name] for s in samples]).float()  # [B, G, K, A]
        occupied = torch.stack([s.site_masks[m.name] for s in samples]).bool()  # [B, G, K]
        missing = ~torch.isfinite(raw) | ~occupied[..., None]  # [B, G, K, A]
        b = len(samples)
        return SiteAttributes(values=torch.where(missing, 0.0, raw).view(b, m.groups, -1),  # [B, G, K·A]
                              missing=missing.view(b, m.groups, -1), occupied=occupied)

    def _static(self, samples: Sequence[Sample]) -> StaticAttributes | None:
        if not self.spec.static_dim:
            return None
        for i, s in enumerate(samples):
            if s.static is None or s.static.shape != (self.spec.static_dim,):
                got = None if s.static is None else tuple(s.static.shape)
                raise ValueError(f"sample {i} ({s.meta}) must carry static attributes of shape "
                                 f"({self.spec.static_dim},), got {got}")
        raw = torch.stack([s.static for s in samples]).float()  # [B, S]
        missing = ~torch.isfinite(raw)
        return StaticAttributes(values=torch.where(missing, 0.0, raw), missing=missing)

    def _day_of_year(self, samples: Sequence[Sample]) -> torch.Tensor | None:
        if not self.settings.calendar:
            return None
        for i, s in enumerate(samples):
            if s.first_day is None:
                raise ValueError(f"model.day_of_year needs each sample's first_day, but sample {i} ({s.meta}) has "
                                 "none (its data set has no calendar)")
        return torch.stack([day_of_year(int(s.first_day), self.steps) for s in samples])  # [B, T]

    def __call__(self, samples: Sequence[Sample]) -> PackedBatch:
        """The batch of ``samples``. Grids are first taken for finite (:attr:`assume_finite`, their check made as
        their rows are copied); a batch that shows a non-finite one is made again with every grid checked first,
        and so are the next batches until one has only finite grids."""
        if not samples:
            raise ValueError("cannot collate an empty list of samples")
        try:
            return self._collate(samples)
        except NonFiniteGrid:
            if not self.assume_finite:
                raise
            self.assume_finite = False
            return self._collate(samples)

    def _collate(self, samples: Sequence[Sample]) -> PackedBatch:
        batch = len(samples)
        settings = self.settings
        tokens = {m.name: self._tokens(m, samples) for m in self.spec.modalities}
        if not self.assume_finite:  # checked first: take the next batch's grids for finite if these all were
            self.assume_finite = all(isinstance(values, GridCells) for values, _, _ in
                                     (tokens[m.name] for m in self.spec.grids))
        masks = self._masks(samples, {name: valid for name, (_, valid, _) in tokens.items()})
        static_token = Packed.from_lengths([1] * batch)

        modalities = {}
        for m in self.spec.modalities:
            values, valid, weight = tokens[m.name]  # TokenValues, [B, T, P], [B, P, K] or [B, T, P, K]
            t, p = valid.shape[1:]
            masked, predicted = masks[m.name]
            vis_index, vis = _packed_rows(valid & ~masked)  # [total_vis, 3]
            hidden_index, hidden = _packed_rows(masked)  # [total_hidden, 3]
            if self.mask.kept_mask_ratio is None:  # every hidden token is predicted: predicted equals masked
                pred_index, pred = hidden_index.clone(), Packed.from_lengths(hidden.cu_seqlens.diff())
                predicted_rows = torch.arange(hidden.total)
            else:
                pred_index, pred = _packed_rows(predicted)  # [total_pred, 3]
                rank_in_hidden = torch.cumsum(masked.flatten(), 0) - 1  # [B·T·P]
                pb, pt, pp = pred_index.unbind(1)
                predicted_rows = rank_in_hidden[(pb * t + pt) * p + pp]
            if m.name in settings.static_tokens:
                seq, order, _ = concat_segments([static_token, vis])
            else:
                seq, order = vis, torch.arange(vis.total)
            pb, pt, pp = pred_index.unbind(1)
            weight_row = (pb * t + pt) * p + pp if weight.dim() == 4 else pb * p + pp  # [total_pred]
            target_weight = weight.reshape(-1, weight.shape[-1]).index_select(0, weight_row)  # [total_pred, K]
            if weight.dim() == 3:  # a row's weight is its patch's: count by patch (exact below 2**24, as a float32 sum)
                count = float(weight.sum(-1, dtype=torch.float64).view(-1)[weight_row].sum())
                count = count if count < 2**24 else float(target_weight.sum())
            else:
                count = float(target_weight.sum())
            encoder_values, target_values = values.gather(vis_index.unbind(1), (pb, pt, pp))
            grid_shape = {"grid": patch_grid_shape(m.height, m.width, self.patch_size), "sites": (1, m.groups)
                          }.get(m.kind, (1, 1))
            modalities[m.name] = ModalityBatch(
                name=m.name, kind=m.kind, patch_grid=grid_shape,
                encoder=EncoderTokens(values=encoder_values, index=vis_index, visible=vis, seq=seq, order=order),
                queries=Queries(index=pred_index, packed=pred),
                targets=Targets(values=target_values, weight=target_weight, count=count),
                hidden=HiddenTokens(index=hidden_index, packed=hidden, predicted_rows=predicted_rows),
                site_attributes=self._site_attributes(m, samples),
            )
        in_memory = settings.memory_modalities
        if len(in_memory) == 1:  # the memory is that modality's encoder sequence, in its order
            seq = modalities[in_memory[0]].encoder.seq
            mem, mem_order, dest = Packed.from_lengths(seq.lengths), torch.arange(seq.total), [torch.arange(seq.total)]
        else:
            mem, mem_order, dest = concat_segments([modalities[n].encoder.seq for n in in_memory])
        memory = JointMemory(packed=mem, order=mem_order, rows=dict(zip(in_memory, dest)))
        if settings.standard_decoder:
            for mb in modalities.values():
                own = mem if settings.memory == "joint" else mb.encoder.seq
                seq, order, (_, query_rows) = concat_segments([own, mb.hidden.packed])
                mb.standard = StandardDecoderSequences(seq=seq, order=order, query_rows=query_rows)
        return PackedBatch(
            modalities=modalities, static=self._static(samples), day_of_year=self._day_of_year(samples),
            memory=memory, settings=settings, batch_size=batch, steps=self.steps, meta=[s.meta for s in samples],
        )
