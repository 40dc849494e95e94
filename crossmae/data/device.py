"""The device-resident data path (``data.on_device``): windows, validity, masks and packed indices made on the
training device from a device copy of the data set's values.

:class:`DeviceDataset` copies a data set's normalised values to the device once: per grid modality the days of
every basin that a window of the split covers, as patch tokens (``[rows, P, C·ps²]`` float32), and the basin
masks; per series modality the same days (``[rows, F]``); the static attributes, each window's first row, and
(synthetic source) each window's missing frames. :class:`DeviceCollator` then turns a list of window keys into
the :class:`crossmae.data.collate.PackedBatch` that the host path (``dataset[key]`` for each key, then
:class:`crossmae.data.collate.MaskingCollator`) makes of the same keys, with torch ops on the device:

- the host chooses the windows (their keys), and draws each mask group's noise with the collator's own
  per-sample generators (``torch.Generator`` seeded by the key's noise seed, on the CPU: the same numbers, so
  the same masks); the noise goes to the device in one copy per mask group;
- the device gathers the windows' token rows, applies the basin masks and missing frames, decides validity,
  draws the masks from the noise (:func:`crossmae.data.collate.draw_masks`), builds every packed index
  (``nonzero_static`` once the sizes are known) and the per-sample concatenations;
- the host reads back one small vector per batch: every segment length and each modality's count of
  predicted values (packed boundaries and ``max_seqlen`` are host ints by the project's contract).

On CUDA, a batch is made on a side stream, so that read waits for the data's kernels only, not for the
training step queued before it.

Identical to the host path: every mask mode but ``span`` draws on the device; ``span`` (runs of whole days,
drawn by a sequential loop on each sample's generator) is drawn on the host from the device's validity (one
copy of ``valid [B, T, P]`` each way). Ranks among equal noise values follow ``torch.argsort`` on the device
(ties that straddle a sample's hidden count are the only place where a CUDA result could differ from the
CPU's; on the CPU both paths are bit for bit the same, ``tests/test_device_data.py``). ``Targets.count`` is the
exact integer count of predicted values (the host's float32 sum equals it below 2**24 values per modality).

Sources: ``synthetic`` (the fields rendered over each basin's windowed days, normalised as
``SyntheticWaterDataset.__getitem__`` does) and ``files`` (each grid reader's days read in blocks of its
``block_days``, normalised and padded as ``FilesDataset.__getitem__`` does; basins sharing a reader share its
rows). Grid and series modalities only; other kinds are refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence

import numpy as np
import torch

from crossmae.data.collate import (
    EncoderTokens,
    HiddenTokens,
    JointMemory,
    MaskingCollator,
    ModalityBatch,
    PackedBatch,
    Queries,
    StandardDecoderSequences,
    StaticAttributes,
    Targets,
    TokenValues,
    day_of_year,
    patch_grid_shape,
    patchify,
)
from crossmae.data.sample import Sample, window_key
from crossmae.packed import Packed

DEVICE_KINDS = ("grid", "series")


def _check_kinds(spec) -> None:
    other = {m.name: m.kind for m in spec.modalities if m.kind not in DEVICE_KINDS}
    if other:
        raise ValueError(f"data.on_device makes {' and '.join(DEVICE_KINDS)} modalities on the device; the data set "
                         f"has {other} (set data.on_device=false)")


class DeviceDataset:
    """A data set's windows as device tensors (see the module docstring).

    Grids are kept as patch tokens (:func:`crossmae.data.collate.patchify`'s layout, cells past the grid NaN), so
    a batch's grid values are one row gather.

    Args:
        dataset: a :class:`crossmae.data.synthetic.SyntheticWaterDataset` or
            :class:`crossmae.data.files.FilesDataset`.
        device: where the copy lives.
        patch_size: grid patch side in cells (the collator's).

    Attributes:
        spec: the data set's modalities.
        steps: T.
        patch_size: grid patch side in cells.
        grids: grid modality → ``[rows, P, C·ps²]`` float32 normalised days as patch tokens (cells outside a basin
            as read).
        inside: grid modality → ``[basins, P, C·ps²]`` bool, True at the cells inside each basin.
        series: series modality → ``[rows, F]`` float32.
        first_row: modality → ``[windows]`` int64, the row of each window's first day.
        basin: ``[windows]`` int64, each window's basin.
        outage: ``[windows, T]`` bool, the window's entirely missing frames (synthetic), or None.
        static: ``[basins, S]`` float32 (NaN = unknown), or None.
        day_of_year: ``[windows, T]`` float32, or None when the windows have no calendar.
        outside: how cells outside a basin become 0: ``multiply`` (by the mask, as the synthetic source does)
            or ``where`` (set to +0, as the files source does).
    """

    def __init__(self, dataset, device: torch.device | str, patch_size: int):
        from crossmae.data.files import FilesDataset
        from crossmae.data.synthetic import SyntheticWaterDataset

        _check_kinds(dataset.spec)
        if not isinstance(dataset, (SyntheticWaterDataset, FilesDataset)):
            raise ValueError(f"data.on_device supports the synthetic and files sources, got a "
                             f"{type(dataset).__name__} (set data.on_device=false)")
        if patch_size < 1:
            raise ValueError(f"patch_size must be at least 1, got {patch_size}")
        self.device = torch.device(device)
        self.spec = dataset.spec
        self.steps = dataset.steps
        self.patch_size = patch_size
        self.size = len(dataset)
        self.grids: dict[str, torch.Tensor] = {}
        self.inside: dict[str, torch.Tensor] = {}
        self.series: dict[str, torch.Tensor] = {}
        self.first_row: dict[str, torch.Tensor] = {}
        self.outage = None
        self.static = None
        if isinstance(dataset, SyntheticWaterDataset):
            self.outside = "multiply"
            self._from_synthetic(dataset)
        else:
            self.outside = "where"
            self._from_files(dataset)
        starts = torch.tensor([s for _, s in dataset.starts], dtype=torch.int64)  # [windows] first days
        self.basin = torch.tensor([b for b, _ in dataset.starts], dtype=torch.int64, device=self.device)
        table = np.stack([day_of_year(int(s), self.steps).numpy() for s in starts.unique().tolist()])
        position = torch.searchsorted(starts.unique(), starts)  # [windows]
        self.day_of_year = torch.from_numpy(table)[position].to(self.device)  # [windows, T]

    def _put(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device)

    def _from_synthetic(self, ds) -> None:
        t = self.steps
        spans = {}  # basin → (first day, days) covered by its windows
        for b, s in ds.starts:
            first, end = spans.get(b, (s, s + t))
            spans[b] = (min(first, s), max(end, s + t))
        spans = {b: (first, end - first) for b, (first, end) in sorted(spans.items())}
        offset, row_of = 0, {}
        for b, (first, days) in spans.items():
            row_of[b] = offset - first
            offset += days
        for name in ds.grid_names:
            entry = ds.stats.modalities[name]
            parts = []
            for b, (first, days) in spans.items():
                x = ds.render_window(b, first, days)[name]  # [days, H, W], normalised below as __getitem__ does
                if entry.transforms[0] == "log1p":
                    np.log1p(x, out=x)
                np.subtract(x, np.asarray(entry.mean[0], x.dtype), out=x)
                np.multiply(x, np.asarray(1.0 / entry.std[0], x.dtype), out=x)
                parts.append(self._tokens(torch.from_numpy(x[:, None])))  # [days, P, ps²]
            self.grids[name] = torch.cat(parts)  # [rows, P, ps²]
            self.inside[name] = self._inside(torch.from_numpy(ds.basin_masks), 1)  # [basins, P, ps²]
        for name in ds.series_names:
            record = ds._series[name]  # [basins, record_days]
            self.series[name] = self._put(np.concatenate([record[b, first:first + days, None]
                                                          for b, (first, days) in spans.items()]))  # [rows, 1]
        rows = torch.tensor([row_of[b] + s for b, s in ds.starts], dtype=torch.int64, device=self.device)
        self.first_row = {m.name: rows for m in self.spec.modalities}
        if ds.missing_frames > 0:
            outage = torch.zeros(len(ds.starts), t, dtype=torch.bool)
            for i, (b, s) in enumerate(ds.starts):
                outage[i, torch.from_numpy(ds._outage_days(b, s))] = True
            self.outage = outage.to(self.device)
        if ds._static is not None:
            self.static = self._put(ds._static)
        self._meta = [{"basin": b, "start": s, "split": ds.split, "index": i} for i, (b, s) in enumerate(ds.starts)]

    def _from_files(self, ds) -> None:
        from crossmae.data.readers import day_to_iso

        for name, readers in ds._grids.items():
            height, width = ds._grid_shape[name]
            spans: dict[int, tuple[int, int]] = {}  # reader (by id) → its windowed basins' record span
            for b in sorted({b for b, _ in ds.starts}):
                reader = readers[b]
                first, last = ds.records[b]
                lo, hi = spans.get(id(reader), (first, last))
                spans[id(reader)] = (min(lo, first), max(hi, last))
            rows = sum(last - first + 1 for first, last in spans.values())
            channels = len(ds.channel_names[name])
            grid_rows, grid_cols = patch_grid_shape(height, width, self.patch_size)
            table = torch.empty(rows, grid_rows * grid_cols, channels * self.patch_size**2, device=self.device)
            start_row, offset = {}, 0
            for reader in readers:
                if id(reader) not in spans or id(reader) in start_row:
                    continue
                first, last = spans[id(reader)]
                for block in range(first, last + 1, reader.block_days):
                    end = min(block + reader.block_days, last + 1)
                    x = ds.stats.normalize(name, reader.read(block, end))  # [L, C, h, w]
                    padded = np.zeros((*x.shape[:2], height, width), dtype=np.float32)  # as __getitem__ pads
                    padded[..., :x.shape[2], :x.shape[3]] = x
                    table[offset + block - first:offset + end - first] = self._tokens(torch.from_numpy(padded))
                reader.close()  # drops the reader's cache: the device holds the days now
                start_row[id(reader)] = offset - first
                offset += last - first + 1
            self.grids[name] = table  # [rows, P, C·ps²]
            self.inside[name] = self._inside(torch.from_numpy(np.stack(ds._masks[name])), channels)
            self.first_row[name] = torch.tensor([start_row[id(readers[b])] + s for b, s in ds.starts],
                                                dtype=torch.int64, device=self.device)
        for name, per_basin in ds._series.items():
            offsets = np.cumsum([0] + [len(x) for x in per_basin])
            self.series[name] = self._put(np.concatenate(per_basin).astype(np.float32))  # [rows, F]
            self.first_row[name] = torch.tensor([int(offsets[b]) + s - ds.records[b][0] for b, s in ds.starts],
                                                dtype=torch.int64, device=self.device)
        if ds._static is not None:
            self.static = self._put(ds._static)
        self._meta = [{"basin": ds.basins[b], "start": day_to_iso(s), "start_day": s, "split": ds.split, "index": i}
                      for i, (b, s) in enumerate(ds.starts)]

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Days ``x [L, C, H, W]`` → ``[L, P, C·ps²]`` patch tokens on the device (cells past the grid NaN)."""
        tokens, _ = patchify(x[None], torch.ones(1, *x.shape[-2:], dtype=torch.bool), self.patch_size)
        return tokens[0].to(self.device)  # [L, P, C·ps²]

    def _inside(self, masks: torch.Tensor, channels: int) -> torch.Tensor:
        """Basin masks ``[basins, H, W]`` → ``[basins, P, C·ps²]`` bool on the device."""
        grid = torch.zeros(masks.shape[0], 1, channels, *masks.shape[-2:])  # [basins, 1, C, H, W]
        _, inside = patchify(grid, masks.bool(), self.patch_size)
        return inside.to(self.device)

    def meta(self, index: int) -> dict:
        """The metadata the data set's ``__getitem__`` gives window ``index``."""
        return dict(self._meta[index])

    def window_values(self, name: str, index: torch.Tensor) -> torch.Tensor:
        """Series modality ``name``'s windows ``index [B]`` (device int64) → ``[B, T, F]`` (NaN = missing)."""
        days = self.first_row[name][index][:, None] + torch.arange(self.steps, device=self.device)  # [B, T]
        table = self.series[name]
        return table.index_select(0, days.view(-1)).view(*days.shape, table.shape[-1])  # [B, T, F]

    def window_tokens(self, name: str, index: torch.Tensor):
        """Grid modality ``name``'s windows ``index [B]`` as :func:`crossmae.data.collate.grid_tokens` makes them
        from the samples: values (:class:`TokenValues`), valid ``[B, T, P]``, cell weight ``[B, P, C·ps²]``.

        One gather of the token rows, then in place: the basin mask (the synthetic source multiplies by it, the
        files source sets outside cells to +0: the host's bits either way) and the missing frames (NaN).
        """
        days = self.first_row[name][index][:, None] + torch.arange(self.steps, device=self.device)  # [B, T]
        table = self.grids[name]
        tokens = table.index_select(0, days.view(-1)).view(*days.shape, *table.shape[1:])  # [B, T, P, K]
        inside = self.inside[name][self.basin[index]]  # [B, P, K]
        if self.outside == "multiply":
            tokens.mul_(inside[:, None])
        else:
            tokens.masked_fill_(~inside[:, None], 0.0)
        if self.outage is not None:
            tokens.masked_fill_(self.outage[index][:, :, None, None], float("nan"))
        finite = (tokens * 0) == 0  # isfinite (x · 0 is ±0 for a finite x, NaN otherwise), in fewer passes on a CPU
        valid = finite.logical_or_(~inside[:, None]).all(-1) & inside.any(-1)[:, None]  # [B, T, P]
        return TokenValues(tokens=tokens, finite=False), valid, inside.float()


def _concat_on(parts: Sequence[Packed], device: torch.device) -> tuple[Packed, torch.Tensor, list[torch.Tensor]]:
    """:func:`crossmae.packed.concat_segments` with the index arithmetic on ``device`` (host lengths give sizes)."""
    batch = parts[0].batch_size
    lengths = torch.stack([p.lengths for p in parts])  # [n_parts, B], host
    out = Packed.from_lengths(lengths.sum(0), device=device)
    dev = lengths.to(device)  # [n_parts, B]
    per_sample = dev.sum(0)  # [B]
    out_starts = torch.cumsum(per_sample, 0) - per_sample  # [B]
    before = torch.cumsum(dev, 0) - dev  # [n_parts, B]
    order = torch.empty(out.total, dtype=torch.int64, device=device)
    samples = torch.arange(batch, device=device)
    dest, base = [], 0
    for i, part in enumerate(parts):
        seg = torch.repeat_interleave(samples, dev[i], output_size=part.total)  # [total_i]
        part_starts = torch.cumsum(dev[i], 0) - dev[i]  # [B]
        pos = torch.arange(part.total, device=device) - part_starts[seg]  # [total_i]
        rows = out_starts[seg] + before[i, seg] + pos  # [total_i]
        order[rows] = torch.arange(base, base + part.total, device=device)
        dest.append(rows)
        base += part.total
    return out, order, dest


class _MaskDraws(MaskingCollator):
    """The run's collator's mask draws (its groups, streams and rules), with each group's noise on ``device``."""

    def __init__(self, collator: MaskingCollator, device: torch.device):
        s = collator.settings
        super().__init__(collator.spec, collator.mask, s.patch_size, s.steps, memory=s.memory,
                         standard_decoder=s.standard_decoder, static_tokens=s.static_tokens, calendar=s.calendar,
                         memory_modalities=s.memory_modalities)
        self.device = device

    def _noise(self, samples, stream, shape):
        return super()._noise(samples, stream, shape).to(self.device, non_blocking=True)


class DeviceCollator:
    """Window keys → the :class:`PackedBatch` the host path makes of them, made on the data's device.

    Args:
        collator: the host collator of the run (:func:`crossmae.data.loader.make_collator`): its spec, mask
            settings and :class:`crossmae.data.collate.CollateSettings` are used as they are.
        data: the device copy of the same data set.
    """

    def __init__(self, collator: MaskingCollator, data: DeviceDataset):
        _check_kinds(collator.spec)
        if collator.steps != data.steps or collator.patch_size != data.patch_size:
            raise ValueError(f"the collator's steps and patch size ({collator.steps}, {collator.patch_size}) differ "
                             f"from the device data set's ({data.steps}, {data.patch_size})")
        if collator.spec != data.spec:
            raise ValueError("the collator and the device data set must describe the same modalities")
        self.collator, self.data = collator, data
        self.device = data.device
        self.span = collator.mask.mode == "span"
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._draws = _MaskDraws(collator, torch.device("cpu") if self.span else self.device)

    def __call__(self, keys: Sequence[int | tuple[int, int]]) -> PackedBatch:
        """The batch of windows ``keys`` (window index, or ``(index, noise seed)`` as the run's batch order gives)."""
        if not keys:
            raise ValueError("keys must name at least one window")
        keys = [window_key(k, self.data.size) for k in keys]
        context = torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()
        with context:
            batch = self._build(keys)
        if self.stream is not None:
            main = torch.cuda.current_stream(self.device)
            main.wait_stream(self.stream)
            for t in batch_tensors(batch):
                t.record_stream(main)
        return batch

    def _build(self, keys: list[tuple[int, int]]) -> PackedBatch:
        data, settings, device = self.data, self.collator.settings, self.device
        b = len(keys)
        index = torch.tensor([i for i, _ in keys], dtype=torch.int64).to(device, non_blocking=True)  # [B]
        seeds = [Sample(noise_seed=s) for _, s in keys]
        tokens = {}
        for m in data.spec.modalities:
            if m.kind == "grid":
                tokens[m.name] = data.window_tokens(m.name, index)
            else:
                series = data.window_values(m.name, index)[:, :, None, :]  # [B, T, 1, F]
                tokens[m.name] = (TokenValues(tokens=series, finite=False), torch.isfinite(series).all(-1),
                                  torch.ones(b, 1, series.shape[-1], device=device))
        valid = {name: v for name, (_, v, _) in tokens.items()}
        if self.span:
            masks = {n: (mk.to(device), pr.to(device)) for n, (mk, pr) in
                     self._draws._masks(seeds, {n: v.cpu() for n, v in valid.items()}).items()}
        else:
            masks = self._draws._masks(seeds, valid)

        # one read: every segment length and each modality's count of predicted values
        selections, counted = {}, []
        for m in data.spec.modalities:
            masked, predicted = masks[m.name]
            selections[m.name] = (valid[m.name] & ~masked, predicted, masked)
            weight = tokens[m.name][2]  # [B, P, K]
            counted.append((predicted.sum(1).double() * weight.sum(-1).double()).sum().view(1))
        lengths = torch.cat([torch.stack([s.sum((1, 2)) for s in sel]).view(-1).double()
                             for sel in selections.values()] + counted).cpu()
        lengths = lengths.to(torch.int64)
        n_mod = len(selections)
        per_modality = lengths[:3 * b * n_mod].view(n_mod, 3, b)
        count = lengths[3 * b * n_mod:].tolist()

        static_token = Packed.from_lengths([1] * b, device=device)
        modalities = {}
        for k, m in enumerate(data.spec.modalities):
            values, v, weight = tokens[m.name]
            t, p = v.shape[1:]
            vis_sel, pred_sel, hidden_sel = selections[m.name]
            packs = [Packed.from_lengths(per_modality[k, j], device=device) for j in range(3)]
            vis, pred, hidden = packs
            vis_index, pred_index, hidden_index = (torch.nonzero_static(sel, size=pk.total)
                                                   for sel, pk in zip((vis_sel, pred_sel, hidden_sel), packs))
            if m.name in settings.static_tokens:
                seq, order, _ = _concat_on([static_token, vis], device)
            else:
                seq, order = vis, torch.arange(vis.total, device=device)
            rank_in_hidden = torch.cumsum(hidden_sel.flatten(), 0) - 1  # [B·T·P]
            pb, pt, pp = pred_index.unbind(1)
            target_weight = weight.reshape(-1, weight.shape[-1]).index_select(0, pb * p + pp)  # [total_pred, K]
            vb, vt, vp = vis_index.unbind(1)
            grid_shape = patch_grid_shape(m.height, m.width, settings.patch_size) if m.kind == "grid" else (1, 1)
            modalities[m.name] = ModalityBatch(
                name=m.name, kind=m.kind, patch_grid=grid_shape,
                encoder=EncoderTokens(values=values.rows(vb, vt, vp), index=vis_index, visible=vis, seq=seq,
                                      order=order),
                queries=Queries(index=pred_index, packed=pred),
                targets=Targets(values=values.rows(pb, pt, pp), weight=target_weight, count=float(count[k])),
                hidden=HiddenTokens(index=hidden_index, packed=hidden,
                                    predicted_rows=rank_in_hidden[(pb * t + pt) * p + pp]),
            )
        in_memory = settings.memory_modalities
        mem, mem_order, dest = _concat_on([modalities[n].encoder.seq for n in in_memory], device)
        memory = JointMemory(packed=mem, order=mem_order, rows=dict(zip(in_memory, dest)))
        if settings.standard_decoder:
            for mb in modalities.values():
                own = mem if settings.memory == "joint" else mb.encoder.seq
                seq, order, (_, query_rows) = _concat_on([own, mb.hidden.packed], device)
                mb.standard = StandardDecoderSequences(seq=seq, order=order, query_rows=query_rows)
        static = None
        if data.static is not None:
            raw = data.static[data.basin[index]]  # [B, S]
            missing = ~torch.isfinite(raw)
            static = StaticAttributes(values=torch.where(missing, 0.0, raw), missing=missing)
        return PackedBatch(
            modalities=modalities, static=static,
            day_of_year=data.day_of_year[index] if settings.calendar else None,
            memory=memory, settings=settings, batch_size=b, steps=data.steps,
            meta=[data.meta(i) for i, _ in keys],
        )


def batch_tensors(obj):
    """Every tensor inside a batch (dataclasses, dicts, :class:`Packed`)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, Packed):
        yield obj.cu_seqlens
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from batch_tensors(value)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from batch_tensors(getattr(obj, f.name))
