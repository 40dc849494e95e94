"""Typed run configuration: dataclasses, named presets, YAML files and ``--section.key=value`` overrides.

Resolution order: the preset's defaults, then the YAML file (``--config``), then command-line
overrides. Every value is checked against its field's type; an unknown key or a value of the
wrong type raises :class:`ConfigError` naming the key, before any work is done.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml


class ConfigError(ValueError):
    """A configuration value, key or file that can't be used; the message names it."""


@dataclass
class SyntheticConfig:
    """The built-in synthetic water data set (:mod:`crossmae.data.synthetic`).

    Attributes:
        num_basins: basins in the data set; each has its own irregular mask and response.
        record_days: days simulated per basin (windows are cut from this record).
        grid_size: cells per side of the square grid.
        basin_patches: fewest and most patches of the patch grid that a basin touches.
        grids: grid modalities to provide (``precip``, ``temperature``, ``soil_moisture``).
        series: series modalities to provide (``streamflow``, ``evaporation``).
        static: whether to provide static basin attributes.
        missing_frames: largest fraction of a window's days whose grids are entirely missing.
        series_gap_rate: expected gaps per 100 days in each series (gaps last 3–30 days).
    """

    num_basins: int = 16
    record_days: int = 1095
    grid_size: int = 32
    basin_patches: list[int] = field(default_factory=lambda: [8, 16])
    grids: list[str] = field(default_factory=lambda: ["precip", "temperature", "soil_moisture"])
    series: list[str] = field(default_factory=lambda: ["streamflow", "evaporation"])
    static: bool = True
    missing_frames: float = 0.0
    series_gap_rate: float = 0.5


GRID_FORMATS = ("netcdf", "zarr")
SERIES_FORMATS = ("camels_forcing", "camels_streamflow", "mhm_gauge", "csv")
STATIC_FORMATS = ("camels_attributes", "csv")
TRANSFORMS = ("none", "log1p")


@dataclass
class GridSource:
    """One grid modality read from NetCDF or Zarr files through xarray (:mod:`crossmae.data.readers`).

    Attributes:
        name: the modality's name (``pre``, ``tavg`` ...).
        format: ``netcdf`` or ``zarr``.
        path: the file (a Zarr store: its folder), a glob matching several (``era5/tp_*.nc``) or a list of
            either: one series along time, split over files (by year, say); ``{basin}`` is replaced by the
            basin id. Files that overlap in time are an error; a gap between two is logged, recorded with
            the run's statistics, and its days are missing.
        variables: the variables read as channels, each with dims (time, y, x) in some order;
            empty = ``[name]``.
        time_dim: the time dimension: CF times in a standard, ``noleap``/``365_day``,
            ``all_leap``/``366_day`` or ``360_day`` calendar (``noleap``: 29 February is a missing day;
            ``all_leap``: 29 February of other years is dropped), at daily or sub-daily steps.
        calendar_360: how a ``360_day`` calendar maps to real days: ``refuse`` (an error), ``rescale_year``
            (day k of the model year becomes day floor((k + 0.5) * N / 360) of the real year of N days;
            5 or 6 real days a year are missing) or ``keep_date`` (month and day kept; every 31st is
            missing, 30 February is dropped).
        aggregate: how sub-daily steps (hourly, 3-hourly …) become days: ``sum``, ``mean``, ``min``,
            ``max`` or ``last`` (the day's final step: a field accumulated since the start of the day, as
            ERA5-Land's ``tp``), for every variable, or a mapping per variable (``{tp: sum, t2m: mean}``).
        day_start_hour: hours after 00:00 UTC at which a day of sub-daily steps starts; a step stamped t
            belongs to the day of t - day_start_hour (``1`` for steps stamped at the end of their hour).
        max_missing_steps: steps a cell may lack in a day (absent or missing) and still get a value that
            day (``sum``: the mean of the present steps times the steps per day); more, and it is missing
            (``last``: missing when the final step is).
        units_to: the unit to convert to from each variable's CF ``units`` attribute, for every variable or
            per variable (``{tp: mm/day, t2m: degC}``); empty = as stored.
        mask_path: file holding the basin mask (``{basin}`` allowed); empty = the first file of ``path``.
        mask_variable: the mask variable: cells that are finite and non-zero lie inside the basin. With 1-D
            coordinates on both, each grid cell takes the nearest mask cell within ``coord_tolerance``
            (latitude in either order, longitudes modulo 360); else its spatial shape must match the grid
            (extra length-1 dims such as time are dropped). Empty: no mask, every cell is inside.
        crop: ``[y0, y1, x0, x1]`` cell index ranges (half-open, in file order) to keep; empty = all.
        crop_bounds: ``[lat_min, lat_max, lon_min, lon_max]`` (the coordinate values of the y and x dims)
            of the cells to keep, inclusive; instead of ``crop``.
        coord_tolerance: largest coordinate difference, in cells, at which two files or a file and its
            mask count as the same grid.
        missing_values: values that mean "missing" besides NaN and the file's ``_FillValue``.
        transform: ``none`` or ``log1p`` (applied before standardisation) for every variable.
        transforms: per-variable overrides of ``transform``, e.g. ``{pre: log1p}``.
    """

    name: str = ""
    format: str = "netcdf"
    path: str | list[str] = ""
    variables: list[str] = field(default_factory=list)
    time_dim: str = "time"
    calendar_360: str = "refuse"
    aggregate: str | dict[str, str] = ""
    day_start_hour: float = 0.0
    max_missing_steps: int = 0
    units_to: str | dict[str, str] = ""
    mask_path: str = ""
    mask_variable: str = ""
    crop: list[int] = field(default_factory=list)
    crop_bounds: list[float] = field(default_factory=list)
    coord_tolerance: float = 0.01
    missing_values: list[float] = field(default_factory=lambda: [-9999.0, -999.0])
    transform: str = "none"
    transforms: dict[str, str] = field(default_factory=dict)

    def per_variable(self, setting: str) -> dict[str, str]:
        """``aggregate`` or ``units_to`` as a mapping variable → value (a single value applies to all)."""
        value = getattr(self, setting)
        if isinstance(value, dict):
            return dict(value)
        return {v: value for v in self.variables or [self.name]} if value else {}


@dataclass
class SeriesSource:
    """One series modality read from per-basin text files (:mod:`crossmae.data.readers`).

    Attributes:
        name: the modality's name (``streamflow``, ``forcing`` ...).
        format: ``camels_forcing`` (CAMELS-US basin-mean forcing), ``camels_streamflow`` (USGS
            ``gauge year month day Q flag``), ``mhm_gauge`` (mHM gauge text: 5 header lines, then
            ``YYYY MM DD HH MM value``) or ``csv`` (a delimited table with a date column).
        path: the file; ``{basin}`` is replaced by the basin id; a glob pattern (``*``) must match
            exactly one file (CAMELS forcing files carry a data set name: ``{basin}_lump_*_forcing_leap.txt``).
        columns: the value columns, as features of one token. ``camels_forcing``: names as in the header,
            with or without the units (``prcp`` or ``prcp(mm/day)``); ``csv``: header names;
            ``camels_streamflow`` and ``mhm_gauge`` have one value column (leave empty).
        date_column: ``csv``: the date column.
        date_format: ``csv``: a ``strptime`` format such as ``%d.%m.%Y``; empty = ISO 8601.
        delimiter: ``csv``: the field separator (``,``, ``;``, ``\\t``; a single space means any whitespace).
        skip_rows: ``csv``: 0-based line numbers of the file to skip, e.g. ``[1]`` for a units line
            under the header.
        missing_values: values that mean "missing" besides NaN and empty fields (``mhm_gauge`` also
            takes the ``nodata`` value of its header).
        transform, transforms: as for :class:`GridSource` (per column).
        flow: streamflow-like: evaluation reports NSE and KGE of its reconstructed days.
    """

    name: str = ""
    format: str = "csv"
    path: str = ""
    columns: list[str] = field(default_factory=list)
    date_column: str = "date"
    date_format: str = ""
    delimiter: str = ","
    skip_rows: list[int] = field(default_factory=list)
    missing_values: list[float] = field(default_factory=lambda: [-9999.0, -999.0])
    transform: str = "none"
    transforms: dict[str, str] = field(default_factory=dict)
    flow: bool = False


@dataclass
class StaticSource:
    """Static basin attributes from delimited tables keyed by basin id (all files are joined on it).

    Attributes:
        format: ``camels_attributes`` (``;``-separated, keyed by ``gauge_id``) or ``csv``.
        paths: the tables (CAMELS: ``camels_clim.txt``, ``camels_topo.txt`` ...).
        columns: the numeric columns to use, by name; empty = no static attributes.
        id_column: the basin id column; empty = the format's (``gauge_id``; ``basin`` for csv).
        delimiter: ``csv``: the field separator.
        missing_values: values that mean "missing" besides NaN, empty fields and ``NA``.
    """

    format: str = "camels_attributes"
    paths: list[str] = field(default_factory=list)
    columns: list[str] = field(default_factory=list)
    id_column: str = ""
    delimiter: str = ","
    missing_values: list[float] = field(default_factory=lambda: [-9999.0, -999.0])


@dataclass
class SplitConfig:
    """How windows are assigned to the train, val and test splits.

    Attributes:
        by: ``period`` (every basin, cut by dates) or ``basin`` (whole records of listed basins).
        train, val, test: ``period``: ``[first day, last day]`` ISO dates, inclusive; ``basin``: basin
            ids. ``period`` with all three empty: the last ``data.val_fraction`` of each basin's record
            is val, the rest train, and there is no test split. ``basin`` with ``train`` empty: every
            basin not in val or test.
    """

    by: str = "period"
    train: list[str] = field(default_factory=list)
    val: list[str] = field(default_factory=list)
    test: list[str] = field(default_factory=list)


@dataclass
class FilesConfig:
    """Real data from files (:mod:`crossmae.data.files`): grids, series and static attributes per basin.

    Attributes:
        root: the folder that relative paths resolve against. A relative ``root`` (empty included)
            given in a YAML file resolves against that file's folder; one given on the command line, or
            with no file, against the working directory. :func:`resolve_config` stores it absolute, so a
            saved run finds its data from anywhere.
        basins: basin ids (quote them in YAML: ``'01022500'``); they fill ``{basin}`` in paths.
        basins_file: a text file with one basin id a line, used when ``basins`` is empty.
        grids, series: the modalities, in this order in the model.
        static: the static attribute tables.
        split: train / val / test assignment.
    """

    root: str = ""
    basins: list[str] = field(default_factory=list)
    basins_file: str = ""
    grids: list[GridSource] = field(default_factory=list)
    series: list[SeriesSource] = field(default_factory=list)
    static: StaticSource = field(default_factory=StaticSource)
    split: SplitConfig = field(default_factory=SplitConfig)


GROUPINGS = ("site", "file", "kmeans")
SITE_TABLE_FORMATS = ("csv", "parquet")
SITE_COORDS = ("latlon", "rowcol", "xy")
SITE_FILE_FORMATS = ("mhm_gauge", "camels_streamflow")
REGION_SYNTHETIC = ("full", "small")
DATA_SOURCES = ("synthetic", "files", "region")


@dataclass
class GroupingConfig:
    """How the sites of a site set become groups of tokens (:mod:`crossmae.data.sites`).

    Attributes:
        method: ``site`` (one site per token), ``file`` (groups from ``file``) or ``kmeans`` (k-means on the
            site coordinates, ``size`` sites at most per group; computed once and saved with the run).
        size: K, most sites per group (``kmeans``).
        file: ``file``: a CSV with the columns ``site_id`` and ``group`` (relative to the region's root).
        seed: seeds the k-means start.
    """

    method: str = "kmeans"
    size: int = 8
    file: str = ""
    seed: int = 0


@dataclass
class SiteTableSource:
    """The table of a site set's sites: one row per site with its id, coordinates and attributes.

    Attributes:
        path: a CSV or Parquet file (by extension: ``.parquet``/``.pq`` is Parquet).
        delimiter: CSV field separator.
        skip_rows: 0-based line numbers of the CSV file to skip (lines above the header, a units line under it).
        id_column: the site id column.
        coords: ``latlon`` (``lat_column``/``lon_column``, degrees: placed on the grid by its latitude and
            longitude coordinates, 1-D or 2-D), ``rowcol`` (``row_column``/``col_column``: the grid frame in
            cells, cell (i, j) covering rows [i, i + 1) and columns [j, j + 1)) or ``xy`` (``y_column``/
            ``x_column`` in the units of the grid's 1-D y and x coordinates, e.g. metres of a projection).
        lat_column, lon_column, row_column, col_column, y_column, x_column: the coordinate columns.
        attributes: numeric columns used as static site attributes (FiLM / static tokens); empty = none.
        missing_values: values that mean "missing" besides NaN, empty fields and ``NA``.
    """

    path: str = ""
    delimiter: str = ","
    skip_rows: list[int] = field(default_factory=list)
    id_column: str = "site_id"
    coords: str = "latlon"
    lat_column: str = "lat"
    lon_column: str = "lon"
    row_column: str = "row"
    col_column: str = "col"
    y_column: str = "y"
    x_column: str = "x"
    attributes: list[str] = field(default_factory=list)
    missing_values: list[float] = field(default_factory=lambda: [-9999.0, -999.0])


@dataclass
class SiteSetSource:
    """One site set read from files: a long-format gauge table (or one file per site) and its site table.

    Attributes:
        name: the modality's name (``gauges``).
        format: ``csv`` or ``parquet`` (a long table: one row per site and day, columns ``site_column``,
            ``date_column`` and ``variables``), or a per-site file format, ``mhm_gauge`` or
            ``camels_streamflow``, with ``{site}`` in ``path`` (one variable each).
        path: the gauge table, or the per-site file template.
        site_column, date_column: the long table's site id and date columns.
        date_format: a ``strptime`` format of the dates; empty = ISO 8601 or another unambiguous common format.
        delimiter: CSV field separator.
        skip_rows: 0-based line numbers of the CSV file to skip (lines above the header, a units line under it).
        variables: the value columns (F, the features of each site); per-site formats: one name.
        missing_values: values that mean "missing" besides NaN and empty fields.
        transform, transforms: ``none`` or ``log1p`` for every variable, and per-variable overrides.
        per_site: variables standardised per site (each site's own training mean and std) instead of over
            all sites.
        flow: streamflow-like variables (evaluation reports per-site NSE and KGE of their masked days).
        sites: the site table.
        grouping: how sites become groups of tokens.
    """

    name: str = "gauges"
    format: str = "csv"
    path: str = ""
    site_column: str = "site_id"
    date_column: str = "date"
    date_format: str = ""
    delimiter: str = ","
    skip_rows: list[int] = field(default_factory=list)
    variables: list[str] = field(default_factory=list)
    missing_values: list[float] = field(default_factory=lambda: [-9999.0, -999.0])
    transform: str = "none"
    transforms: dict[str, str] = field(default_factory=dict)
    per_site: list[str] = field(default_factory=list)
    flow: list[str] = field(default_factory=list)
    sites: SiteTableSource = field(default_factory=SiteTableSource)
    grouping: GroupingConfig = field(default_factory=GroupingConfig)


@dataclass
class RegionConfig:
    """A region (:mod:`crossmae.data.region`): grids over one region and site sets of gauges inside it; a sample
    is the whole region over one window of days.

    Attributes:
        synthetic: ``full`` (the built-in synthetic region at the seed's shapes: 290 x 180 cells, ~600 gauges),
            ``small`` (its CPU-sized variant) or empty: read ``grids`` and ``site_sets`` from files.
        root: the folder relative paths resolve against (as ``data.files.root``).
        grids: the grid modalities over the region (as ``data.files.grids``; every grid has the same shape,
            cells outside each grid's mask are not data). ``{basin}`` is not used.
        site_sets: the site sets.
        split: ``by: period`` only: ``[first day, last day]`` of train, val and test; all empty: the last
            ``data.val_fraction`` of the record is val.
        grouping: the synthetic region's grouping of its gauges.
        per_site: the synthetic region's variables standardised per site (``riverflow``, ``evaporation``).
    """

    synthetic: str = "small"
    root: str = ""
    grids: list[GridSource] = field(default_factory=list)
    site_sets: list[SiteSetSource] = field(default_factory=list)
    split: SplitConfig = field(default_factory=SplitConfig)
    grouping: GroupingConfig = field(default_factory=GroupingConfig)
    per_site: list[str] = field(default_factory=list)


@dataclass
class DataConfig:
    """Where samples come from and how they are cut into tokens.

    Attributes:
        source: ``synthetic`` (built in, no files needed), ``files`` (real data, :class:`FilesConfig`) or
            ``region`` (a whole region of grids and gauge site sets per sample, :class:`RegionConfig`).
        steps: T, days per sample window.
        stride: days between the starts of consecutive windows.
        patch_size: cells per side of a grid patch (a grid token is C·patch_size² values).
        val_fraction: the last fraction of each basin's record is the validation period (``files``: only
            when ``files.split`` names no periods).
        batch_size: samples per step on each process.
        num_workers: DataLoader worker processes.
        seed: seeds the data set's generation (synthetic) and nothing else.
        on_device: keep a device copy of the data set's values and make windows, masks and packed indices
            on the training device (:mod:`crossmae.data.device`); the host only picks windows and mask seeds.
        synthetic: the ``synthetic`` source's settings.
        files: the ``files`` source's settings.
        region: the ``region`` source's settings.
    """

    source: str = "synthetic"
    steps: int = 32
    stride: int = 8
    patch_size: int = 8
    val_fraction: float = 0.25
    batch_size: int = 8
    num_workers: int = 0
    seed: int = 0
    on_device: bool = False
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    files: FilesConfig = field(default_factory=FilesConfig)
    region: RegionConfig = field(default_factory=RegionConfig)


MASK_MODES = ("free", "frame", "unified", "span")


@dataclass
class MaskConfig:
    """How each sample's tokens are hidden and which hidden ones are predicted (rules: ``docs/masking.md``).

    Attributes:
        grid_ratio: fraction of a sample's valid grid tokens hidden from the encoder.
        series_ratio: the same for series tokens.
        ratios: per-modality overrides, e.g. ``{streamflow: 0.9}``.
        mode: ``free`` (each modality drawn alone, uniform over the sample's valid tokens), ``frame``
            (the ratio within each time step's valid patches; series as in ``free``) or ``unified``
            (one draw shared by all grid modalities and one by all series: the same (t, p) positions
            hidden in each, over the union of their valid positions) or ``span`` (each modality hides runs of
            whole days, as real gaps are: a series' days, a grid's frames).
        span_days: ``[shortest, longest]`` run of hidden days in ``span`` mode, each run's length uniform.
        kept_mask_ratio: fraction of *all* of a sample's valid tokens that are predicted (CrossMAE's
            partial reconstruction: at most the mask ratio); empty (None) predicts every hidden token.
    """

    grid_ratio: float = 0.75
    series_ratio: float = 0.5
    ratios: dict[str, float] = field(default_factory=dict)
    mode: str = "free"
    span_days: list[int] = field(default_factory=lambda: [3, 60])
    kept_mask_ratio: float | None = None

    def ratio(self, modality: str, kind: str) -> float:
        return self.ratios.get(modality, self.grid_ratio if kind == "grid" else self.series_ratio)


STATIC_MODES = ("token", "film", "both")
LOSS_REDUCTIONS = ("values", "samples")


@dataclass
class ModelConfig:
    """The multimodal CrossMAE (``docs/model.md`` explains each option).

    Attributes:
        enc_dim, enc_depth, enc_heads: every modality encoder's width, blocks and heads.
        dec_dim, dec_depth, dec_heads: every modality decoder's width, blocks and heads.
        mlp_ratio: MLP hidden width over the model width.
        dropout: dropout after every attention and MLP output (0 = none).
        fusion_depth: shared fusion blocks over the joint memory (varlen self-attention per sample
            across modalities) before any decoder; 0 = none.
        static: how static attributes enter the encoders: ``token`` (one token at the start of the
            sequence), ``film`` (every block's output scaled and shifted by γ, β from the attributes)
            or ``both``.
        static_on: ``all`` encoders or only the ``series`` encoders take the static attributes.
        day_of_year: add a learned projection of the day of year's (sin, cos) to every token.
        learned_space: add a learned per-patch embedding to grid tokens (besides the sin-cos one).
        use_cross_attn: False gives the standard MAE decoder (self-attention over the memory
            and a mask token at every hidden position): the baseline.
        decoder_self_attn: self-attention among the queries of a sample, first in each decoder block.
        use_weighted_fm: decoder block i attends to a learned mix of encoder layers.
        use_fm_layers: encoder layers to mix (indices over ``enc_depth + fusion_depth`` layers; empty = all).
        use_input: also mix the encoder's input embeddings.
        memory: ``joint`` (every modality's visible tokens) or ``own`` (the decoder's own modality).
        memory_drop: modalities left out of the joint memory (an ablation: no decoder sees them, and their
            encoders don't run); needs ``memory: joint``.
        attn_backend: varlen attention backend of the packed path (``auto`` or a registry name).
        norm_pix_loss: normalise each target token by its own mean and (unbiased) variance.
        norm_pix_modalities: the modalities ``norm_pix_loss`` applies to (empty = all); each needs
            tokens of at least 2 values.
        loss_reduction: ``values`` (a modality's loss is the mean over all its counted values in the
            batch) or ``samples`` (the mean over samples of each sample's mean).
        loss_weights: per-modality loss weights (default 1).
        interp_prior: series modalities whose decoder predicts a correction to the linear interpolation
            between the sample's nearest visible tokens of that modality before and after the predicted day
            (its head starts at zero, so the untrained model predicts the interpolation); names that are not
            modalities of the data set are ignored with a warning; empty = none.
    """

    enc_dim: int = 64
    enc_depth: int = 3
    enc_heads: int = 4
    dec_dim: int = 64
    dec_depth: int = 2
    dec_heads: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    fusion_depth: int = 0
    static: str = "token"
    static_on: str = "all"
    day_of_year: bool = False
    learned_space: bool = False
    use_cross_attn: bool = True
    decoder_self_attn: bool = False
    use_weighted_fm: bool = False
    use_fm_layers: list[int] = field(default_factory=list)
    use_input: bool = False
    memory: str = "joint"
    memory_drop: list[str] = field(default_factory=list)
    attn_backend: str = "auto"
    norm_pix_loss: bool = False
    norm_pix_modalities: list[str] = field(default_factory=list)
    loss_reduction: str = "values"
    loss_weights: dict[str, float] = field(default_factory=dict)
    interp_prior: list[str] = field(default_factory=list)


@dataclass
class TrainConfig:
    """The optimisation and the run's bookkeeping.

    Attributes:
        max_steps: optimizer steps.
        lr, min_lr: peak and final learning rate (linear warm-up, then cosine decay).
        warmup_steps: steps of linear warm-up.
        weight_decay, beta1, beta2: AdamW.
        grad_clip: clip the global gradient norm to this (0 disables).
        log_every: steps between reads of the metrics the device accumulates (one ``metrics.csv`` row per
            step is written at each read; reads also happen at validation and checkpoint steps). Under DDP a
            stop signal takes effect at the next read.
        val_every: steps between validation passes (0 disables).
        val_batches: batches per validation pass.
        ckpt_every: steps between checkpoints (0: only at the end).
        keep_checkpoints: how many recent checkpoints to keep (at least 1; the one just written is always kept).
        max_nonfinite_steps: consecutive steps with a non-finite loss or gradient (their updates skipped) before
            the run stops; checked when the metrics are read.
        amp: ``auto`` (bf16 autocast on CUDA), ``bf16`` or ``none``.
        compile: compile the whole model once with ``torch.compile`` (packed rows dynamic).
        cuda_graphs: pad each batch's packed totals up to one of a few bucket sizes (a padding segment that
            attends to nothing and is in no loss) and replay one captured CUDA graph per bucket.
        device: ``auto``, ``cpu`` or ``cuda[:N]``.
        seed: seeds weights, sampling order and masks.
        out_dir: the run folder.
        fused: the packed path (varlen attention, ``attn_backend``); False runs the seed's path.
    """

    max_steps: int = 300
    lr: float = 2e-3
    min_lr: float = 1e-4
    warmup_steps: int = 20
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    log_every: int = 10
    val_every: int = 100
    val_batches: int = 4
    ckpt_every: int = 100
    keep_checkpoints: int = 2
    max_nonfinite_steps: int = 5
    amp: str = "auto"
    compile: bool = False
    cuda_graphs: bool = False
    device: str = "auto"
    seed: int = 0
    out_dir: str = "runs/default"
    fused: bool = False


@dataclass
class Config:
    preset: str = "default"
    data: DataConfig = field(default_factory=DataConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# -- presets (docs/presets.md) ---------------------------------------------------------------
def _workload_preset(name: str) -> Config:
    """The workload preset ``name`` of :data:`crossmae.presets.PRESETS` as a run: one grid modality
    (100×100 cells in 10×10-cell patches, patch_dim 100), no series, no static attributes."""
    from crossmae.presets import get_preset

    w = get_preset(name)
    config = Config(preset=name)
    config.data.batch_size = w.batch
    config.data.steps = w.steps
    config.data.stride = w.steps
    config.data.patch_size = w.patch_size
    low = w.min_patches if w.min_patches is not None else w.patches
    config.data.synthetic = SyntheticConfig(
        num_basins=8, record_days=max(4 * w.steps, 365), grid_size=w.patch_grid * config.data.patch_size,
        basin_patches=[low, w.patches], grids=["precip"], series=[], static=False,
        missing_frames=w.max_missing_steps,
    )
    config.mask.grid_ratio = w.mask_ratio
    config.model = ModelConfig(
        enc_dim=w.enc_dim, enc_depth=w.enc_depth, enc_heads=w.enc_heads,
        dec_dim=w.dec_dim, dec_depth=w.dec_depth, dec_heads=w.dec_heads,
    )
    return config


def _preset_default() -> Config:
    return Config()


def _preset_regional(size: str = "full") -> Config:
    """A whole region per sample (:mod:`crossmae.data.synthetic_region`): three 290 x 180-cell grids in 10 x 10-cell
    patches (~94 on land) and ~600 gauges with riverflow and evaporation in k-means groups of 8, T=90 days, the
    seed preset's model widths. ``small`` is the CPU-sized variant (60 x 40 cells, ~40 gauges in groups of 4,
    T=16, B=4, a small model)."""
    config = Config(preset="regional" if size == "full" else "regional_small")
    d = config.data
    d.source = "region"
    d.region = RegionConfig(synthetic=size)
    d.patch_size = 10
    if size == "full":
        d.batch_size, d.steps, d.stride = 8, 90, 30
        d.region.grouping = GroupingConfig(method="kmeans", size=8)
        config.model = ModelConfig(enc_dim=256, enc_depth=6, enc_heads=8, dec_dim=128, dec_depth=4, dec_heads=8)
    else:
        d.batch_size, d.steps, d.stride = 4, 16, 8
        d.region.grouping = GroupingConfig(method="kmeans", size=4)
        config.model = ModelConfig(enc_dim=32, enc_depth=2, enc_heads=4, dec_dim=32, dec_depth=1, dec_heads=4)
    config.mask.grid_ratio = 0.75
    config.mask.series_ratio = 0.5
    return config


PRESETS = {
    "default": _preset_default,
    **{name: (lambda name=name: _workload_preset(name)) for name in ("seed", "wide", "ragged", "cpu")},
    "regional": _preset_regional,
    "regional_small": lambda: _preset_regional("small"),
}


def preset_config(name: str) -> Config:
    if name not in PRESETS:
        raise ConfigError(f"preset must be one of {sorted(PRESETS)}, got {name!r}")
    config = PRESETS[name]()
    config.preset = name
    return config


# -- typed assignment ----------------------------------------------------------------------
def _type_name(hint) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _coerce(value: Any, hint, key: str):
    """``value`` checked (and widened where lossless, int → float) against the type ``hint``."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{key}: unsupported type {hint}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, datetime.date):  # YAML reads 1990-01-01 as a date
            return value.isoformat()
        hint_text = " (quote it in YAML: '01022500' unquoted is read as a number)" if isinstance(value, int) else ""
        raise ConfigError(f"{key} must be a string, got {value!r}{hint_text}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return {_coerce(k, args[0], f"{key} key"): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping of {hint.__name__} fields, got {value!r}")
        obj = hint()
        _apply_mapping(obj, value, key)
        return obj
    raise ConfigError(f"{key}: unsupported field type {_type_name(hint)}")


def _apply_mapping(obj, mapping: dict, prefix: str) -> None:
    hints = typing.get_type_hints(type(obj))
    for name, value in mapping.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in hints:
            known = ", ".join(f.name for f in dataclasses.fields(obj))
            raise ConfigError(f"unknown config key {key!r} (known here: {known})")
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            _apply_mapping(current, value, key)
        else:
            setattr(obj, name, _coerce(value, hints[name], key))


def apply_overrides(config: Config, overrides: list[str]) -> Config:
    """Apply ``section.key=value`` strings; values are parsed as YAML (``3``, ``0.5``, ``true``, ``[1, 2]``)."""
    for item in overrides:
        item = item[2:] if item.startswith("--") else item
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        path, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {path}: can't parse value {raw!r}: {exc}") from None
        mapping: dict = {}
        node = mapping
        parts = path.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
        _apply_mapping(config, mapping, "")
    return config


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections, got {type(data).__name__}")
    return data


def resolve_config(preset: str | None = None, config_file: str | None = None, overrides: list[str] = ()) -> Config:
    """Preset defaults, then the YAML file, then overrides; validated."""
    file_data = load_yaml(config_file) if config_file else {}
    name = preset or file_data.pop("preset", None) or "default"
    file_data.pop("preset", None)
    config = preset_config(name)
    _apply_mapping(config, file_data, "")
    if config_file:  # relative data paths of a YAML file are relative to its folder
        _anchor_files_root(config, Path(config_file).resolve().parent)
    apply_overrides(config, list(overrides))
    _anchor_files_root(config, Path.cwd())
    validate_config(config)
    return config


def _anchor_files_root(config: Config, base: Path) -> None:
    """Make ``data.files.root`` (``data.region.root``) absolute, relative to ``base``, when the files (region)
    source is used."""
    files, region = config.data.files, config.data.region
    if config.data.source == "files" and not os.path.isabs(files.root):
        files.root = os.path.normpath(str(base / files.root))
    if config.data.source == "region" and not os.path.isabs(region.root):
        region.root = os.path.normpath(str(base / region.root))


def validate_config(config: Config) -> None:
    """Range checks a type can't express; raises ConfigError naming the key."""
    d, m, mo, t = config.data, config.mask, config.model, config.train

    def need(ok: bool, message: str):
        if not ok:
            raise ConfigError(message)

    need(d.source in DATA_SOURCES, f"data.source must be one of {list(DATA_SOURCES)}, got {d.source!r}")
    need(d.steps >= 1, f"data.steps must be at least 1, got {d.steps}")
    need(d.stride >= 1, f"data.stride must be at least 1, got {d.stride}")
    need(d.patch_size >= 1, f"data.patch_size must be at least 1, got {d.patch_size}")
    need(0.0 <= d.val_fraction < 1.0, f"data.val_fraction must be in [0, 1), got {d.val_fraction}")
    need(d.batch_size >= 1, f"data.batch_size must be at least 1, got {d.batch_size}")
    need(d.num_workers >= 0, f"data.num_workers must be non-negative, got {d.num_workers}")
    for name, r in [("mask.grid_ratio", m.grid_ratio), ("mask.series_ratio", m.series_ratio),
                    *[(f"mask.ratios.{k}", v) for k, v in m.ratios.items()]]:
        need(0.0 <= r < 1.0, f"{name} must be in [0, 1), got {r}")
    need(m.mode in MASK_MODES, f"mask.mode must be one of {list(MASK_MODES)}, got {m.mode!r}")
    need(len(m.span_days) == 2 and 1 <= m.span_days[0] <= m.span_days[1],
         f"mask.span_days must be [shortest, longest] days with 1 <= shortest <= longest, got {m.span_days}")
    if m.kept_mask_ratio is not None:
        lowest = min([m.grid_ratio, m.series_ratio, *m.ratios.values()])
        need(0.0 < m.kept_mask_ratio <= lowest,
             f"mask.kept_mask_ratio is a fraction of all valid tokens, so it must be in (0, {lowest}] (the lowest "
             f"mask ratio), got {m.kept_mask_ratio}")
    for prefix, dim, heads, depth in [("enc", mo.enc_dim, mo.enc_heads, mo.enc_depth),
                                      ("dec", mo.dec_dim, mo.dec_heads, mo.dec_depth)]:
        need(depth >= 1, f"model.{prefix}_depth must be at least 1, got {depth}")
        need(heads >= 1 and dim % heads == 0,
             f"model.{prefix}_dim ({dim}) must be a multiple of model.{prefix}_heads ({heads})")
    need(mo.memory in ("joint", "own"), f"model.memory must be 'joint' or 'own', got {mo.memory!r}")
    need(not mo.memory_drop or mo.memory == "joint",
         f"model.memory_drop ({mo.memory_drop}) needs model.memory 'joint', got {mo.memory!r}")
    layers = mo.enc_depth + mo.fusion_depth
    for i in mo.use_fm_layers:
        need(-layers <= i < layers,
             f"model.use_fm_layers holds {i}, but the encoder has {layers} layers (enc_depth + fusion_depth)")
    need(mo.fusion_depth >= 0, f"model.fusion_depth must be non-negative, got {mo.fusion_depth}")
    need(0.0 <= mo.dropout < 1.0, f"model.dropout must be in [0, 1), got {mo.dropout}")
    need(mo.static in STATIC_MODES, f"model.static must be one of {list(STATIC_MODES)}, got {mo.static!r}")
    need(mo.static_on in ("all", "series"), f"model.static_on must be 'all' or 'series', got {mo.static_on!r}")
    need(mo.loss_reduction in LOSS_REDUCTIONS,
         f"model.loss_reduction must be one of {list(LOSS_REDUCTIONS)}, got {mo.loss_reduction!r}")
    grid_names = {*d.synthetic.grids} if d.source == "synthetic" else {g.name for g in d.files.grids} \
        if d.source == "files" else set()
    gridded = [n for n in mo.interp_prior if n in grid_names]
    need(not gridded, f"model.interp_prior names the grid modalities {gridded}; it applies to series modalities only")
    need(t.max_steps >= 1, f"train.max_steps must be at least 1, got {t.max_steps}")
    need(t.lr > 0 and t.min_lr >= 0, f"train.lr must be positive and train.min_lr non-negative, got {t.lr}, "
         f"{t.min_lr}")
    need(t.amp in ("auto", "bf16", "none"), f"train.amp must be 'auto', 'bf16' or 'none', got {t.amp!r}")
    need(t.device == "auto" or t.device == "cpu" or t.device.startswith("cuda"),
         f"train.device must be 'auto', 'cpu' or 'cuda[:N]', got {t.device!r}")
    need(t.max_nonfinite_steps >= 1, f"train.max_nonfinite_steps must be at least 1, got {t.max_nonfinite_steps}")
    if d.source == "files":
        _validate_files(d.files)
        return
    if d.source == "region":
        _validate_region(d.region)
        return
    s = d.synthetic
    need(len(s.basin_patches) == 2 and 1 <= s.basin_patches[0] <= s.basin_patches[1],
         f"data.synthetic.basin_patches must be [min, max] with 1 <= min <= max, got {s.basin_patches}")
    n_patches = (-(-s.grid_size // d.patch_size)) ** 2
    need(s.basin_patches[1] <= n_patches,
         f"data.synthetic.basin_patches max {s.basin_patches[1]} exceeds the {n_patches} patches of a "
         f"{s.grid_size}x{s.grid_size} grid in {d.patch_size}-cell patches")
    need(s.grids or s.series, "data.synthetic must provide at least one grid or series modality")
    need(0.0 <= s.missing_frames < 1.0, f"data.synthetic.missing_frames must be in [0, 1), got {s.missing_frames}")


def _validate_files(f: FilesConfig) -> None:
    """The checks of the ``files`` source that need no file: formats, names, transforms, split lists."""

    def need(ok: bool, message: str):
        if not ok:
            raise ConfigError(message)

    need(bool(f.basins) or bool(f.basins_file), "data.files needs basins (a list of ids) or basins_file")
    need(len(set(f.basins)) == len(f.basins), f"data.files.basins holds duplicates: {f.basins}")
    need(bool(f.grids) or bool(f.series), "data.files needs at least one grid or series modality")
    names: list[str] = []
    for kind, sources, formats in (("grids", f.grids, GRID_FORMATS), ("series", f.series, SERIES_FORMATS)):
        for i, src in enumerate(sources):
            key = f"data.files.{kind}[{i}]"
            need(bool(src.name), f"{key}.name must be set (the modality's name)")
            need(src.name not in names, f"{key}.name {src.name!r} is used by another modality")
            need(src.name != "static", f"{key}.name 'static' is reserved for the static attributes")
            names.append(src.name)
            need(src.format in formats, f"{key}.format must be one of {list(formats)}, got {src.format!r}")
            need(bool(src.path), f"{key}.path must be set")
            need(src.transform in TRANSFORMS, f"{key}.transform must be one of {list(TRANSFORMS)}, got "
                 f"{src.transform!r}")
            for col, tr in src.transforms.items():
                need(tr in TRANSFORMS, f"{key}.transforms.{col} must be one of {list(TRANSFORMS)}, got {tr!r}")
            if kind == "grids":
                variables = src.variables or [src.name]
                for col in src.transforms:
                    need(col in variables, f"{key}.transforms names {col!r}, which is not one of its variables "
                         f"{variables}")
                need(len(src.crop) in (0, 4) and (not src.crop or (0 <= src.crop[0] < src.crop[1]
                                                                   and 0 <= src.crop[2] < src.crop[3])),
                     f"{key}.crop must be [y0, y1, x0, x1] with 0 <= y0 < y1 and 0 <= x0 < x1, got {src.crop}")
                _validate_grid_reading(key, src, variables)
            elif src.format in ("camels_forcing", "csv"):
                need(bool(src.columns), f"{key}.columns must name the value columns of its {src.format} files")
            elif src.format in ("camels_streamflow", "mhm_gauge"):
                need(len(src.columns) <= 1, f"{key}.columns: a {src.format} file has one value column, got "
                     f"{src.columns}")
    st = f.static
    if st.columns:
        need(st.format in STATIC_FORMATS, f"data.files.static.format must be one of {list(STATIC_FORMATS)}, got "
             f"{st.format!r}")
        need(bool(st.paths), "data.files.static.columns are set but data.files.static.paths is empty")
    sp = f.split
    need(sp.by in ("period", "basin"), f"data.files.split.by must be 'period' or 'basin', got {sp.by!r}")
    if sp.by == "period":
        _validate_split_periods("data.files.split", sp)
    else:
        for part in ("train", "val", "test"):
            unknown = [b for b in getattr(sp, part) if f.basins and b not in f.basins]
            need(not unknown, f"data.files.split.{part} names basins not in data.files.basins: {unknown}")
        need(bool(sp.val), "data.files.split.val must list the validation basins when split.by is 'basin'")
        overlap = set(sp.train) & set(sp.val) | set(sp.train) & set(sp.test) | set(sp.val) & set(sp.test)
        need(not overlap, f"data.files.split: basins {sorted(overlap)} are in more than one split")


def _validate_grouping(key: str, g: GroupingConfig) -> None:
    if g.method not in GROUPINGS:
        raise ConfigError(f"{key}.method must be one of {list(GROUPINGS)}, got {g.method!r}")
    if g.method == "kmeans" and g.size < 1:
        raise ConfigError(f"{key}.size must be at least 1, got {g.size}")
    if g.method == "file" and not g.file:
        raise ConfigError(f"{key}.file must name the site_id,group CSV when {key}.method is 'file'")


def _validate_split_periods(key: str, sp: SplitConfig) -> None:
    for part in ("train", "val", "test"):
        value = getattr(sp, part)
        if not value:
            continue
        if len(value) != 2:
            raise ConfigError(f"{key}.{part} must be [first day, last day], got {value}")
        try:
            first, last = (datetime.date.fromisoformat(v) for v in value)
        except ValueError:
            raise ConfigError(f"{key}.{part} must hold ISO dates (YYYY-MM-DD), got {value}") from None
        if first > last:
            raise ConfigError(f"{key}.{part}: the first day {value[0]} is after the last {value[1]}")
    if not sp.train and (sp.val or sp.test):
        raise ConfigError(f"{key}.train must be set when val or test periods are (or leave all three empty)")
    periods = {part: [datetime.date.fromisoformat(v) for v in getattr(sp, part)]
               for part in ("train", "val", "test") if getattr(sp, part)}
    for a, b in (("train", "val"), ("train", "test")):  # val and test may share days; neither may hold trained ones
        if a in periods and b in periods:
            shared = (min(periods[a][1], periods[b][1]) - max(periods[a][0], periods[b][0])).days + 1
            if shared > 0:  # the model would be validated or tested on days it trained on
                raise ConfigError(f"{key}.{a} ({'..'.join(getattr(sp, a))}) and {key}.{b} "
                                  f"({'..'.join(getattr(sp, b))}) share {shared} days; expected periods without a "
                                  "common day")


def _validate_region(r: RegionConfig) -> None:
    """The checks of the ``region`` source that need no file."""

    def need(ok: bool, message: str):
        if not ok:
            raise ConfigError(message)

    need(r.synthetic in ("", *REGION_SYNTHETIC),
         f"data.region.synthetic must be one of {list(REGION_SYNTHETIC)} or '' (files), got {r.synthetic!r}")
    need(r.split.by == "period", f"data.region.split.by must be 'period' (a region is split by dates), got "
         f"{r.split.by!r}")
    _validate_split_periods("data.region.split", r.split)
    if r.synthetic:
        _validate_grouping("data.region.grouping", r.grouping)
        unknown = [v for v in r.per_site if v not in ("riverflow", "evaporation")]
        need(not unknown, f"data.region.per_site names {unknown}; the synthetic region's variables are "
             "['riverflow', 'evaporation']")
        need(not r.grids and not r.site_sets, "data.region.grids and site_sets are read only when "
             "data.region.synthetic is '' (files)")
        return
    need(bool(r.grids) or bool(r.site_sets), "data.region needs at least one grid or site set")
    names: list[str] = []
    for i, src in enumerate(r.grids):
        key = f"data.region.grids[{i}]"
        need(bool(src.name), f"{key}.name must be set (the modality's name)")
        need(src.name not in names, f"{key}.name {src.name!r} is used by another modality")
        names.append(src.name)
        need(src.format in GRID_FORMATS, f"{key}.format must be one of {list(GRID_FORMATS)}, got {src.format!r}")
        need(bool(src.path), f"{key}.path must be set")
        variables = src.variables or [src.name]
        for col, tr in {"": src.transform, **src.transforms}.items():
            need(tr in TRANSFORMS, f"{key}.transform{'s.' + col if col else ''} must be one of {list(TRANSFORMS)}, "
                 f"got {tr!r}")
            need(not col or col in variables, f"{key}.transforms names {col!r}, which is not one of its variables "
                 f"{variables}")
        _validate_grid_reading(key, src, variables)
    for i, src in enumerate(r.site_sets):
        key = f"data.region.site_sets[{i}]"
        need(bool(src.name), f"{key}.name must be set (the modality's name)")
        need(src.name not in names, f"{key}.name {src.name!r} is used by another modality")
        names.append(src.name)
        formats = (*SITE_TABLE_FORMATS, *SITE_FILE_FORMATS)
        need(src.format in formats, f"{key}.format must be one of {list(formats)}, got {src.format!r}")
        need(bool(src.path), f"{key}.path must be set")
        need(src.format in SITE_TABLE_FORMATS or "{site}" in src.path,
             f"{key}.path must hold {{site}} for the per-site format {src.format!r}, got {src.path!r}")
        need(bool(src.variables), f"{key}.variables must name the value columns")
        need(src.format in SITE_TABLE_FORMATS or len(src.variables) == 1,
             f"{key}.variables: a {src.format} file has one value column, got {src.variables}")
        need(len(set(src.variables)) == len(src.variables), f"{key}.variables holds duplicates: {src.variables}")
        for col, tr in {"": src.transform, **src.transforms}.items():
            need(tr in TRANSFORMS, f"{key}.transform{'s.' + col if col else ''} must be one of {list(TRANSFORMS)}, "
                 f"got {tr!r}")
            need(not col or col in src.variables, f"{key}.transforms names {col!r}, which is not one of its "
                 f"variables {src.variables}")
        for setting in ("per_site", "flow"):
            unknown = [v for v in getattr(src, setting) if v not in src.variables]
            need(not unknown, f"{key}.{setting} names {unknown}, which are not among its variables {src.variables}")
        st = src.sites
        need(bool(st.path), f"{key}.sites.path must name the site table")
        need(st.coords in SITE_COORDS, f"{key}.sites.coords must be one of {list(SITE_COORDS)}, got {st.coords!r}")
        _validate_grouping(f"{key}.grouping", src.grouping)


def _validate_grid_reading(key: str, src: GridSource, variables: list[str]) -> None:
    """The checks of a grid source's paths, calendar, sub-daily, units and coordinate settings."""
    from crossmae.data.readers import AGGREGATES, CALENDAR_360_RULES

    def need(ok: bool, message: str):
        if not ok:
            raise ConfigError(message)

    paths = [src.path] if isinstance(src.path, str) else src.path
    need(all(paths), f"{key}.path must name files, got {src.path!r}")
    need(src.calendar_360 in CALENDAR_360_RULES, f"{key}.calendar_360 must be one of {list(CALENDAR_360_RULES)}, "
         f"got {src.calendar_360!r}")
    for setting in ("aggregate", "units_to"):
        for var, value in src.per_variable(setting).items():
            need(var in variables, f"{key}.{setting} names {var!r}, which is not one of its variables {variables}")
            need(bool(value), f"{key}.{setting}.{var} is empty")
    for var, how in src.per_variable("aggregate").items():
        need(how in AGGREGATES, f"{key}.aggregate ({var}) must be one of {list(AGGREGATES)}, got {how!r}")
    need(-24.0 < src.day_start_hour < 24.0, f"{key}.day_start_hour must be in (-24, 24) hours, got "
         f"{src.day_start_hour}")
    need(src.max_missing_steps >= 0, f"{key}.max_missing_steps must be non-negative, got {src.max_missing_steps}")
    need(0.0 <= src.coord_tolerance <= 0.5, f"{key}.coord_tolerance must be in [0, 0.5] cells, got "
         f"{src.coord_tolerance}")
    need(not (src.crop and src.crop_bounds), f"{key}: set crop (cell indices) or crop_bounds (coordinates), not both")
    b = src.crop_bounds
    need(len(b) in (0, 4) and (not b or b[0] <= b[1]),
         f"{key}.crop_bounds must be [lat_min, lat_max, lon_min, lon_max] with lat_min <= lat_max, got {b}")


def config_to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))


def config_from_dict(data: dict) -> Config:
    config = Config()
    _apply_mapping(config, data, "")
    return config
