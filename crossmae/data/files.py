"""Real water data from files: grid, series and static modalities per basin, cut into windows (``data.source: files``).

The data set is configured by :class:`crossmae.config.FilesConfig`; the file formats are those of
:mod:`crossmae.data.readers`. Paths are joined to ``data.files.root`` (an absolute folder once the config is
resolved: see :func:`crossmae.config.resolve_config`); ``{basin}`` in a path is replaced by each basin id.

Record, windows and splits
    A basin's record runs from the first to the last day that any of its files covers (the union over its
    modalities). Days a file lacks, and values that are NaN, infinite, the file's ``_FillValue`` or a
    configured marker (``-9999``, ``-999`` by default), are missing; a grid value equal to an undeclared
    :data:`crossmae.data.readers.FILL_VALUES` entry is a DataFileError. A series file with a header and no
    row leaves that basin's series missing throughout (logged); a basin with no day in any file is an error.
    Windows of ``data.steps`` days start every ``data.stride`` days inside each split's range and never straddle
    a split boundary.
    ``split.by: period``: every basin, cut by the ``[first day, last day]`` of each split (all empty: the
    last ``data.val_fraction`` of each record is val). ``split.by: basin``: whole records of the listed basins.

Normalisation (``norm_stats``, JSON, saved with the run)
    Per channel, after the channel's transform (``none`` or ``log1p``; ``log1p`` of a value ≤ -1 is
    missing), mean and standard deviation over the training split only: every finite value of the training
    windows' days (grids: cells inside the basin), of the training basins. A (nearly) constant channel
    gets std 1. Static attributes: mean and std over the training basins (NaN ignored); a column with no
    value or one value for all training basins is dropped (its name is not in ``norm_stats['static']['names']``).
    Validation and test data sets receive the training statistics. Each grid modality's entry also holds
    ``reading``: what reading did to its files (:meth:`crossmae.data.readers.GridReader.facts`: calendar
    and the rule that placed it on real days, steps a day and their aggregate, unit conversions, gaps
    between files), one record, or one per basin when basins differ.

Samples (docs/batch.md)
    grid ``[T, C, H, W]`` float32 (normalised; NaN = missing; cells outside the basin hold 0.0) with its basin
    mask ``[H, W]`` bool; series ``[T, F]`` float32; static ``[S]`` float32 (NaN = unknown). A modality
    missing on every day of a window is all NaN: the collate makes no token of it and the sample trains on
    the others. Basins whose grids differ in size are padded (bottom and right) with outside cells to the
    largest. ``meta``: ``basin`` (id), ``start`` (first day, ISO), ``start_day`` (days since 1970-01-01),
    ``split``, ``index``.

Lazy reading
    Construction reads the grids' time coordinates and the training data for the statistics, then closes
    every file. The data set pickles without open handles or arrays: each DataLoader worker opens the grid
    files on its first ``__getitem__`` and keeps a grid's whole record (as days, after the crop) in memory
    when it is at most :data:`crossmae.data.readers.CACHE_BYTES`; else each window reads only the time
    steps of its own days, from the files that hold them (a grid split over many files opens only those).
    The statistics read the training days in blocks of at most a year and
    :data:`crossmae.data.readers.READ_BLOCK_BYTES` of raw steps. Series and static attributes are small
    and are read once, at construction.
"""

from __future__ import annotations

import copy
import logging
import math
import os

import numpy as np
import torch
from torch.utils.data import Dataset

from crossmae.config import DataConfig, FilesConfig, GridSource, SeriesSource
from crossmae.data.normstats import NormStats, apply_transform
from crossmae.data.readers import (
    DataFileError,
    GridOptions,
    GridReader,
    SeriesTable,
    day_to_iso,
    iso_to_day,
    read_attribute_tables,
    read_basin_mask,
    read_camels_forcing,
    read_camels_streamflow,
    read_csv_series,
    read_mhm_gauge,
    resolve_grid_paths,
    resolve_path,
)
from crossmae.data.sample import DatasetSpec, ModalitySpec, Sample, window_key

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
STATS_BLOCK_DAYS = 366  # grids are read in blocks of this many days for the statistics


def _mean_std(count: float, s1: float, s2: float) -> tuple[float, float]:
    """(mean, std) from a count, sum and sum of squares; std 1.0 when the values are (nearly) constant."""
    mean = s1 / count
    std = math.sqrt(max(s2 / count - mean * mean, 0.0))
    return mean, (std if std > 1e-6 * max(1.0, abs(mean)) else 1.0)


class FilesDataset(Dataset):
    """Windows of real basin data read from files, as configured by ``data.files``.

    Args:
        data: the data section (``source: files``); ``data.files.root`` should be absolute (relative: the
            working directory).
        split: ``train``, ``val`` or ``test``.
        norm_stats: the training split's statistics (val and test), a saved dict or a
            :class:`crossmae.data.normstats.NormStats`; None computes them from the training split, whatever
            ``split`` is.

    Attributes:
        spec: the modalities (grids, then series, in config order) and the static attribute count.
        norm_stats: normalisation (JSON-serialisable, the saved form), see the module docstring.
        stats: the same as a :class:`crossmae.data.normstats.NormStats` (normalize, denormalize).
        basins: the basin ids this data set read (its split's basins, plus the training basins when it
            computed the statistics).
        starts: ``(basin position, first day)`` of each window.
        channel_names: modality → its variables or columns.
        flow_modalities: series modalities marked ``flow: true`` (streamflow-like, for NSE/KGE).
    """

    def __init__(self, data: DataConfig, split: str = "train", norm_stats: dict | NormStats | None = None):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        files = data.files
        self.config = copy.deepcopy(data)
        self.split = split
        self.steps, self.stride = data.steps, data.stride
        self.root = files.root or os.getcwd()
        self._inputs: set[str] = set()
        self._all_basins = self._basin_ids(files)
        split_basins = self._split_basins(files, self._all_basins, split)
        train_basins = self._split_basins(files, self._all_basins, "train")
        needed = set(split_basins) | (set(train_basins) if norm_stats is None else set())
        self.basins = [b for b in self._all_basins if b in needed]

        self.channel_names: dict[str, list[str]] = {}
        self.flow_modalities = [s.name for s in files.series if s.flow]
        self._grids: dict[str, list[GridReader]] = {}
        self._masks: dict[str, list[np.ndarray]] = {}
        self._grid_shape: dict[str, tuple[int, int]] = {}
        coverage: list[list[tuple[int, int, str]]] = [[] for _ in self.basins]  # (first, last, path)
        for i, src in enumerate(files.grids):
            self._load_grid(i, src, coverage)
        tables: dict[str, list[SeriesTable]] = {}
        for i, src in enumerate(files.series):
            tables[src.name] = self._load_series(i, src, coverage)
        self.records = self._records(coverage)
        self._coverage = coverage

        self._ranges = {s: self._split_ranges(files, s) for s in {split, "train"}}
        raw_series = {name: [self._dense(t, b) for b, t in enumerate(ts)] for name, ts in tables.items()}
        self._raw_series = raw_series
        static_raw = self._load_static(files)
        if norm_stats is None:
            norm_stats = self._compute_stats(files, raw_series, static_raw, train_basins)
        kinds = {**{g.name: "grid" for g in files.grids}, **{s.name: "series" for s in files.series}}
        self.stats = NormStats.coerce(norm_stats, kinds)
        self.stats.check({name: (kinds[name], self.channel_names[name]) for name in kinds}, files.static.columns)
        self.norm_stats = norm_stats if isinstance(norm_stats, dict) else self.stats.to_dict()

        modalities = [ModalitySpec(s.name, "grid", len(self.channel_names[s.name]), *self._grid_shape[s.name])
                      for s in files.grids]
        modalities += [ModalitySpec(s.name, "series", len(self.channel_names[s.name])) for s in files.series]
        self.static_names = list(self.stats.static_names)
        self.spec = DatasetSpec(tuple(modalities), static_dim=len(self.static_names))
        self._series = {name: [self.stats.normalize(name, x) for x in per_basin]
                        for name, per_basin in raw_series.items()}
        self._static = None
        if self.static_names:
            keep = [files.static.columns.index(n) for n in self.static_names]
            self._static = ((static_raw[:, keep] - np.asarray(self.stats.static_mean))
                            / np.asarray(self.stats.static_std)).astype(np.float32)
        self.starts = self._windows()
        for grid_files in self._grids.values():
            for g in grid_files:
                g.close()
        log.info("%s split: %d windows of %d days from %d basin(s)", split, len(self.starts), self.steps,
                 len(split_basins))

    # -- construction ------------------------------------------------------------------------------------
    def _path(self, template: str, basin: str) -> str:
        path = os.path.expanduser(template.replace("{basin}", basin))
        return path if os.path.isabs(path) else os.path.normpath(os.path.join(self.root, path))

    def _basin_ids(self, files: FilesConfig) -> list[str]:
        if files.basins:
            return list(files.basins)
        path = self._path(files.basins_file, "")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"data.files.basins_file: file {path!r} does not exist")
        self._inputs.add(path)
        with open(path) as f:
            ids = [line.strip() for line in f if line.strip() and not line.startswith("#")]
        if not ids:
            raise DataFileError(f"data.files.basins_file: {path!r} lists no basin; expected one id a line")
        return ids

    @staticmethod
    def _split_basins(files: FilesConfig, basins: list[str], split: str) -> list[str]:
        sp = files.split
        if sp.by == "period":
            return basins
        for part in ("val", "test"):
            unknown = [b for b in getattr(sp, part) if b not in basins]
            if unknown:
                raise DataFileError(f"data.files.split.{part} names basins {unknown} that are not in the basin list")
        if split == "train" and not sp.train:
            return [b for b in basins if b not in sp.val and b not in sp.test]
        chosen = getattr(sp, split)
        if not chosen:
            raise DataFileError(f"data.files.split.{split} lists no basin; expected the ids of the {split} basins")
        return [b for b in basins if b in chosen]

    def _load_grid(self, index: int, src: GridSource, coverage) -> None:
        what = f"data.files.grids[{index}] {src.name!r}"
        variables = src.variables or [src.name]
        options = GridOptions(
            variables=list(variables), time_dim=src.time_dim, crop=tuple(src.crop) if src.crop else None,
            crop_bounds=tuple(src.crop_bounds) if src.crop_bounds else None, markers=list(src.missing_values),
            units_to=src.per_variable("units_to"), aggregate=src.per_variable("aggregate"),
            day_start_hour=src.day_start_hour, max_missing_steps=src.max_missing_steps,
            calendar_360=src.calendar_360, coord_tolerance=src.coord_tolerance)
        templates = [src.path] if isinstance(src.path, str) else src.path
        shared: dict[tuple[str, ...], GridReader] = {}
        files, masks = [], []
        for b, basin in enumerate(self.basins):
            paths = tuple(resolve_grid_paths([self._path(t, basin) for t in templates], what))
            if paths not in shared:
                shared[paths] = GridReader(list(paths), src.format, options, what)
            grid = shared[paths]
            if src.mask_variable:
                mask_path = resolve_path(self._path(src.mask_path, basin), what) if src.mask_path else grid.paths[0]
                mask = read_basin_mask(mask_path, src.format, src.mask_variable, grid, what)
                self._inputs.add(mask_path)
            else:
                mask = np.ones(grid.shape, dtype=bool)
            files.append(grid)
            masks.append(mask)
            self._inputs.update(grid.paths)
            coverage[b].append((int(grid.days[0]), int(grid.days[-1]), grid.path))
        height = max(g.shape[0] for g in files)
        width = max(g.shape[1] for g in files)
        padded = []
        for m in masks:
            out = np.zeros((height, width), dtype=bool)
            out[:m.shape[0], :m.shape[1]] = m
            padded.append(out)
        self._grids[src.name], self._masks[src.name] = files, padded
        self._grid_shape[src.name] = (height, width)
        self.channel_names[src.name] = list(variables)

    def _load_series(self, index: int, src: SeriesSource, coverage) -> list[SeriesTable]:
        what = f"data.files.series[{index}] {src.name!r}"
        tables = []
        for b, basin in enumerate(self.basins):
            path = resolve_path(self._path(src.path, basin), what)
            if src.format == "camels_forcing":
                table = read_camels_forcing(path, src.columns, src.missing_values, what)
            elif src.format == "camels_streamflow":
                table = read_camels_streamflow(path, src.missing_values, what)
            elif src.format == "mhm_gauge":
                table = read_mhm_gauge(path, src.missing_values, what)
            else:
                table = read_csv_series(path, src.date_column, src.date_format, src.columns, src.delimiter,
                                        src.skip_rows, src.missing_values, what)
            tables.append(table)
            self._inputs.add(path)
            if table.days.size == 0:  # a header and nothing else: the basin's record of this series is all missing
                log.warning("%s: %r holds no data row: basin %r has no %s value", what, path, basin, src.name)
                continue
            coverage[b].append((int(table.days[0]), int(table.days[-1]), path))
        self.channel_names[src.name] = list(src.columns) if src.columns else list(tables[0].columns)
        unknown = [c for c in src.transforms if c not in self.channel_names[src.name]]
        if unknown:
            raise DataFileError(f"{what}: transforms name {unknown}, which are not among its columns "
                                f"{self.channel_names[src.name]}")
        return tables

    def _records(self, coverage) -> list[tuple[int, int]]:
        """Each basin's record: from the first to the last day any of its files covers."""
        empty = [basin for basin, cov in zip(self.basins, coverage) if not cov]
        if empty:
            raise DataFileError(f"data.files: no file of basin(s) {empty} holds a day of data (their series files "
                                "hold no data row and there is no grid); expected at least one day per basin, or "
                                "leave them out of data.files.basins")
        return [(min(c[0] for c in cov), max(c[1] for c in cov)) for cov in coverage]

    def _dense(self, table: SeriesTable, basin: int) -> np.ndarray:
        """A series table on its basin's record: ``[record days, F]`` float64, NaN where the file has no row."""
        first, last = self.records[basin]
        out = np.full((last - first + 1, table.values.shape[1]), np.nan)
        out[table.days - first] = table.values
        return out

    def _load_static(self, files: FilesConfig) -> np.ndarray | None:
        st = files.static
        if not st.columns:
            return None
        id_column = st.id_column or ("gauge_id" if st.format == "camels_attributes" else "basin")
        delimiter = ";" if st.format == "camels_attributes" else st.delimiter
        paths = [self._path(p, "") for p in st.paths]
        self._inputs.update(paths)
        return read_attribute_tables(paths, id_column, delimiter, st.columns, self.basins, st.missing_values,
                                     "data.files.static")

    def _split_ranges(self, files: FilesConfig, split: str) -> dict[int, tuple[int, int]]:
        """Basin position → the inclusive day range of ``split`` within its record."""
        sp = files.split
        ranges = {}
        if sp.by == "basin":
            chosen = self._split_basins(files, self._all_basins, split)
            return {b: self.records[b] for b, basin in enumerate(self.basins) if basin in chosen}
        explicit = sp.train or sp.val or sp.test
        if explicit and not getattr(sp, split):
            raise DataFileError(f"data.files.split.{split} is not set; expected [first day, last day] of the "
                                f"{split} period")
        for b, (first, last) in enumerate(self.records):
            if explicit:
                p0, p1 = (iso_to_day(d) for d in getattr(sp, split))
                if max(first, p0) <= min(last, p1):  # a basin whose record misses the period has no range
                    ranges[b] = (max(first, p0), min(last, p1))
            else:
                if split == "test":
                    raise DataFileError("data.files.split names no periods, so there is no test split; set "
                                        "data.files.split.train, .val and .test to [first day, last day]")
                n_val = round(self.config.val_fraction * (last - first + 1))
                ranges[b] = (first, last - n_val) if split == "train" else (last - n_val + 1, last)
        return ranges

    def _windows(self) -> list[tuple[int, int]]:
        starts = []
        for b, (d0, d1) in sorted(self._ranges[self.split].items()):
            starts += [(b, s) for s in range(d0, d1 - self.steps + 2, self.stride)]
        if starts:
            return starts
        longest = max(range(len(self.basins)), key=lambda b: self.records[b][1] - self.records[b][0])
        first, last = self.records[longest]
        record_files = ", ".join(sorted({c[2] for c in self._coverage[longest]}))
        if self.steps > last - first + 1:
            raise DataFileError(
                f"data.steps is {self.steps} days, longer than the record: the longest, basin "
                f"{self.basins[longest]!r}, has {last - first + 1} days ({day_to_iso(first)}..{day_to_iso(last)}) "
                f"in {record_files}; expected data.steps of at most {last - first + 1}")
        spans = {self.basins[b]: f"{day_to_iso(d0)}..{day_to_iso(d1)} ({max(d1 - d0 + 1, 0)} days)"
                 for b, (d0, d1) in self._ranges[self.split].items()}
        raise DataFileError(
            f"the {self.split} split holds no window of data.steps={self.steps} days: its days per basin are "
            f"{spans or 'none'} (records from {record_files}); expected a {self.split} period of at least "
            f"{self.steps} days within the record, a shorter data.steps, or other split dates")

    # -- statistics ----------------------------------------------------------------------------------------
    def _transforms(self, name: str, src) -> list[str]:
        return [src.transforms.get(c, src.transform) for c in self.channel_names[name]]

    def _compute_stats(self, files: FilesConfig, raw_series, static_raw, train_basins: list[str]) -> dict:
        ranges = self._ranges["train"]
        stats: dict = {"source": "files", "modalities": {}, "static": {}}
        for i, src in enumerate(files.grids):
            transforms = self._transforms(src.name, src)
            sums = np.zeros((3, len(transforms)))
            for b, (d0, d1) in ranges.items():
                grid, inside = self._grids[src.name][b], self._masks[src.name][b]
                h, w = grid.shape
                block_days = min(STATS_BLOCK_DAYS, grid.block_days)
                for block in range(d0, d1 + 1, block_days):
                    x = grid.read(block, min(block + block_days, d1 + 1))  # [L, C, h, w]
                    for c, tr in enumerate(transforms):
                        v = apply_transform(x[:, c][:, inside[:h, :w]].astype(np.float64), tr)  # [L, cells]
                        v = v[np.isfinite(v)]
                        sums[:, c] += (v.size, v.sum(), (v * v).sum())
            stats["modalities"][src.name] = self._channel_stats(f"data.files.grids[{i}] {src.name!r}", src.name,
                                                                "grid", transforms, sums, ranges)
            stats["modalities"][src.name]["reading"] = self._reading_facts(src.name)
        for i, src in enumerate(files.series):
            transforms = self._transforms(src.name, src)
            sums = np.zeros((3, len(transforms)))
            for b, (d0, d1) in ranges.items():
                first = self.records[b][0]
                x = raw_series[src.name][b][d0 - first:d1 - first + 1]  # [L, F]
                for c, tr in enumerate(transforms):
                    v = apply_transform(x[:, c], tr)
                    v = v[np.isfinite(v)]
                    sums[:, c] += (v.size, v.sum(), (v * v).sum())
            stats["modalities"][src.name] = self._channel_stats(f"data.files.series[{i}] {src.name!r}", src.name,
                                                                "series", transforms, sums, ranges)
        stats["static"] = self._static_stats(files, static_raw, train_basins)
        return stats

    def _reading_facts(self, name: str) -> dict:
        """What reading did to a grid modality's files (calendar and its rule, steps a day and their aggregate,
        units, gaps between files): one record when every basin's files agree, else one per basin."""
        facts = {self.basins[b]: grid.facts() for b, grid in enumerate(self._grids[name])}
        first = next(iter(facts.values()))
        return first if all(f == first for f in facts.values()) else facts

    def _channel_stats(self, what: str, name: str, kind: str, transforms: list[str], sums: np.ndarray,
                       ranges) -> dict:
        means, stds = [], []
        for c, channel in enumerate(self.channel_names[name]):
            count, s1, s2 = sums[:, c]
            if count == 0:
                spans = ", ".join(f"{self.basins[b]} {day_to_iso(d0)}..{day_to_iso(d1)}" for b, (d0, d1) in
                                  ranges.items())
                raise DataFileError(f"{what}: {channel!r} has no valid value in the training split ({spans}); "
                                    "expected observed values in the training period or basins")
            mean, std = _mean_std(count, s1, s2)
            means.append(mean)
            stds.append(std)
        return {"kind": kind, "channels": list(self.channel_names[name]), "transform": transforms,
                "mean": means, "std": stds}

    def _static_stats(self, files: FilesConfig, static_raw, train_basins: list[str]) -> dict:
        out = {"names": [], "mean": [], "std": [], "dropped": []}
        if static_raw is None:
            return out
        rows = [self.basins.index(b) for b in train_basins]
        for j, name in enumerate(files.static.columns):
            col = static_raw[rows, j]
            col = col[np.isfinite(col)]
            std = float(col.std()) if col.size else 0.0
            if col.size == 0 or std <= 1e-9 * max(1.0, abs(float(col.mean()))):
                out["dropped"].append(name)
                continue
            out["names"].append(name)
            out["mean"].append(float(col.mean()))
            out["std"].append(std)
        if out["dropped"]:
            log.info("static attributes %s are missing or constant over the %d training basin(s): dropped",
                     out["dropped"], len(rows))
        return out

    # -- samples -------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, key: int | tuple[int, int]) -> Sample:
        index, noise_seed = window_key(key, len(self))
        b, start = self.starts[index]
        sample = Sample(noise_seed=noise_seed, first_day=start, meta={
            "basin": self.basins[b], "start": day_to_iso(start), "start_day": start, "split": self.split,
            "index": index,
        })
        for name, grids in self._grids.items():
            x = self.stats.normalize(name, grids[b].read(start, start + self.steps))  # [T, C, h, w]
            inside = self._masks[name][b]  # [H, W], padded
            height, width = self._grid_shape[name]
            if x.shape[-2:] != (height, width):
                padded = np.zeros((*x.shape[:2], height, width), dtype=np.float32)
                padded[..., :x.shape[2], :x.shape[3]] = x
                x = padded
            x[..., ~inside] = 0.0  # outside the basin: finite, no information
            sample.grids[name] = torch.from_numpy(x)
            sample.basin_masks[name] = torch.from_numpy(inside.copy())
        first = self.records[b][0]
        for name, per_basin in self._series.items():
            sample.series[name] = torch.from_numpy(per_basin[b][start - first:start - first + self.steps].copy())
        if self._static is not None:
            sample.static = torch.from_numpy(self._static[b].copy())  # [S]
        return sample

    def physical_record(self, name: str, basin: int) -> np.ndarray:
        """Modality ``name`` of basin position ``basin`` over its whole record (``records[basin]``), in physical
        units as read (NaN = missing): series ``[N, F]`` float64, grid ``[N, C, h, w]`` float32 (the basin's own
        grid, before padding)."""
        if name in self._raw_series:
            return self._raw_series[name][basin]
        if name not in self._grids:
            raise ValueError(f"name must be one of {list(self._grids) + list(self._raw_series)}, got {name!r}")
        first, last = self.records[basin]
        return self._grids[name][basin].read(first, last + 1)

    def input_files(self) -> list[str]:
        """Every file this data set read (series, grids, basin masks, static tables, the basin list), sorted."""
        return sorted(self._inputs)

    def split_ranges(self, split: str) -> dict[int, tuple[int, int]]:
        """Basin position → the inclusive day range of ``split`` (this data set's split, or ``train``)."""
        if split not in self._ranges:
            raise ValueError(f"split must be one of {sorted(self._ranges)}, got {split!r}")
        return dict(self._ranges[split])

    def grid_reader(self, name: str, basin: int) -> GridReader:
        """The reader of grid modality ``name`` for basin position ``basin`` (its ``shape``, ``dims``, ``coords``,
        ``crop``)."""
        return self._grids[name][basin]

    def basin_mask(self, name: str, basin: int) -> np.ndarray:
        """``[h, w]`` bool: the cells of basin position ``basin``'s own grid of modality ``name`` inside the basin."""
        h, w = self._grids[name][basin].shape
        return self._masks[name][basin][:h, :w]

    def denormalize(self, name: str, values: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
        """Normalised values of modality ``name`` (grid ``[..., C, H, W]``, series ``[..., F]``) or ``static``
        (``[..., S]``) → physical units (:meth:`crossmae.data.normstats.NormStats.denormalize`)."""
        return self.stats.denormalize(name, values)
