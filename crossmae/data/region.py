"""A region as the sample: grids over one region and site sets of gauges inside it, cut into windows of days
(``data.source: region``).

Where the data comes from
    ``data.region.synthetic`` ``full`` / ``small``: the built-in synthetic region
    (:mod:`crossmae.data.synthetic_region`). Empty: files (:class:`crossmae.config.RegionConfig`), relative paths
    joined to ``data.region.root``:
    grids: NetCDF or Zarr through :class:`crossmae.data.readers.GridReader` (every grid source setting of
        ``data.files.grids`` applies); each grid's mask (``mask_path``/``mask_variable``) says which cells are
        land; every grid must have the shape of the first, whose cells are the region's grid frame.
    site sets: a long-format gauge table, CSV or Parquet, one row per (site, day): ``site_column``,
        ``date_column`` (ISO 8601 or ``date_format``) and the ``variables``; empty fields, ``NA``, NaN,
        infinities and ``missing_values`` are missing; a day with no row is missing. Or one file per site in a
        per-site format (``mhm_gauge``, ``camels_streamflow``, :mod:`crossmae.data.readers`), ``{site}`` in the
        path. The site table (CSV or Parquet) gives each site's id, coordinates and numeric attributes; the
        coordinates are placed on the grid frame (:mod:`crossmae.data.sites` states the frame): ``rowcol`` as
        given, ``xy`` through the first grid's 1-D y and x coordinates, ``latlon`` through its 1-D latitude and
        longitude coordinates or, on a projected grid, its 2-D ``lat``/``lon`` variables (nearest cell centre,
        refined linearly between neighbouring centres). Sites of the site table that the gauge table never
        names are left out (logged).
    Bad input stops with a :class:`crossmae.data.readers.DataFileError` naming the file, the row and the value:
    a gauge row naming a site missing from the site table, a site outside the grid, a (site, date) given twice,
    a date that does not parse, a value that is not a number.

Record, windows, splits
    The record runs from the first to the last day any grid or site set covers. A window is ``data.steps`` days
    over the whole region; windows start every ``data.stride`` days inside a split's period and never straddle
    a boundary. ``split``: ``[first day, last day]`` of train, val and test; all empty: the last
    ``data.val_fraction`` of the record is val, the rest train.

Normalisation (``norm_stats``, saved with the run)
    Grids: per channel, after its transform, mean and std over the land cells of the training days. Site sets:
    per variable, after its transform, over every site's training days; variables in ``per_site`` are
    standardised with each site's own training mean and std (a site with fewer than 2 training values, or a
    constant one, takes the variable's mean and std over all sites), saved under the modality's ``per_site``
    entry as ``{variable: {site id: [mean, std]}}``; the modality's ``mean``/``std`` stay the all-site ones.
    Site attributes: mean and std over the sites (NaN ignored; a constant attribute gets std 1), under
    ``site_static``. The grouping of every site set (:class:`crossmae.data.sites.SiteLayout`) is saved under
    ``site_layouts``: validation, evaluation and resumed runs receive these statistics and so the same groups.

Samples (:class:`crossmae.data.sample.Sample`)
    ``grids[name]`` ``[T, C, H, W]`` float32 (normalised, NaN = missing, 0.0 off land) with its land mask
    ``basin_masks[name]`` ``[H, W]``; ``sites[name]`` ``[T, G, K, F]`` float32 (NaN = missing; an empty slot,
    and a site with no data in the window, is all NaN, so it never makes a token), ``site_masks[name]``
    ``[G, K]`` and ``site_static[name]`` ``[G, K, A]`` (NaN = unknown or empty slot). No sample-level static
    attributes. ``meta``: ``start`` (ISO), ``start_day``, ``split``, ``index``.

Memory
    Site values are kept for the split's days only, normalised (``[days, S, F]`` float32); grids are read (or,
    synthetic, rendered) per window, so a window costs ``T · C · H · W`` floats per grid and nothing of the
    record is copied per sample.
"""

from __future__ import annotations

import copy
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from torch.utils.data import Dataset

from crossmae.config import DataConfig, GridSource, GroupingConfig, RegionConfig, SiteSetSource, SiteTableSource
from crossmae.data.normstats import NormStats
from crossmae.data.readers import (
    DataFileError,
    GridOptions,
    GridReader,
    day_to_iso,
    iso_to_day,
    mark_missing,
    read_basin_mask,
    read_camels_streamflow,
    read_mhm_gauge,
    resolve_grid_paths,
    resolve_path,
    to_days,
)
from crossmae.data.sample import DatasetSpec, ModalitySpec, Sample, window_key
from crossmae.data.sites import SiteLayout, build_layout, group_values

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
STATS_BLOCK_DAYS = 366
MISSING_TEXT = ("", "na", "nan", "n/a", "null", "none")


# -- what a region source provides -----------------------------------------------------------------------
class RegionGrid(Protocol):
    """One grid modality of a region: ``variables`` (C names), ``shape`` (H, W), ``mask`` bool ``[H, W]`` (land),
    ``days`` (first, last) covered."""

    variables: list[str]
    shape: tuple[int, int]
    mask: np.ndarray
    days: tuple[int, int]

    def read(self, day0: int, day1: int) -> np.ndarray:
        """Days ``[day0, day1)`` → ``[D, C, H, W]`` float32 in physical units, NaN = missing."""

    def moments(self, day0: int, day1: int, transforms: Sequence[str]) -> np.ndarray:
        """``[3, C]`` float64: count, sum and sum of squares of the transformed land values of days
        ``[day0, day1]`` (inclusive)."""


@dataclass
class SiteSetData:
    """One site set in physical units, before grouping.

    Attributes:
        name: the modality's name.
        ids: the S site ids.
        rows, cols: float64 ``[S]`` positions in the grid frame (cells).
        first_day: the day of ``values[0]``.
        values: float32 ``[N, S, F]`` physical values from ``first_day`` on, NaN = missing.
        variables: the F variable names.
        transforms: per variable, ``none`` or ``log1p``.
        per_site: variables standardised per site.
        flow: streamflow-like variables.
        attr_names: the A attribute names.
        attrs: float64 ``[S, A]`` attributes (NaN = unknown).
        grouping: how sites become groups.
    """

    name: str
    ids: list[str]
    rows: np.ndarray
    cols: np.ndarray
    first_day: int
    values: np.ndarray
    variables: list[str]
    transforms: list[str]
    per_site: list[str]
    flow: list[str]
    attr_names: list[str]
    attrs: np.ndarray
    grouping: GroupingConfig


@dataclass
class RegionData:
    """Everything a :class:`RegionDataset` cuts windows from.

    Attributes:
        grids: name → :class:`RegionGrid`, in modality order.
        grid_transforms: name → per channel transform.
        site_sets: the site sets, in modality order (after the grids).
        frame: (H, W) of the grid frame.
        record: (first day, last day) covered by any modality.
        periods: split → (first day, last day) as configured (absent: no such period).
        paths: every file read (the run's data fingerprint).
        describe: a phrase for messages (``synthetic region 'small'``, a root folder).
    """

    grids: dict[str, RegionGrid]
    grid_transforms: dict[str, list[str]]
    site_sets: list[SiteSetData]
    frame: tuple[int, int]
    record: tuple[int, int]
    periods: dict[str, tuple[int, int]]
    paths: list[str] = field(default_factory=list)
    describe: str = ""


# -- reading files ----------------------------------------------------------------------------------------
class FileGrid:
    """A grid modality read from NetCDF/Zarr through :class:`GridReader`, with its land mask."""

    def __init__(self, reader: GridReader, mask: np.ndarray, variables: list[str]):
        self.reader, self.mask, self.variables = reader, mask, variables
        self.shape = reader.shape
        self.days = (int(reader.days[0]), int(reader.days[-1]))

    def read(self, day0: int, day1: int) -> np.ndarray:
        return self.reader.read(day0, day1)

    def moments(self, day0: int, day1: int, transforms: Sequence[str]) -> np.ndarray:
        sums = np.zeros((3, len(transforms)))
        block = min(STATS_BLOCK_DAYS, self.reader.block_days)
        for start in range(day0, day1 + 1, block):
            x = self.reader.read(start, min(start + block, day1 + 1))  # [L, C, H, W]
            for c, tr in enumerate(transforms):
                v = _transform(x[:, c][:, self.mask].astype(np.float64), tr)  # [L, land cells]
                v = v[np.isfinite(v)]
                sums[:, c] += (v.size, v.sum(), (v * v).sum())
        self.reader.close()
        return sums


def _transform(x: np.ndarray, transform: str) -> np.ndarray:
    if transform == "log1p":
        with np.errstate(invalid="ignore"):
            return np.log1p(np.where(x > -1.0, x, np.nan))
    return x


def _read_table(path: str, delimiter: str, what: str):
    """A CSV (``delimiter``) or Parquet (by extension) table as strings, with ``line_of(i)``: where row i is."""
    import pandas as pd

    if path.lower().endswith((".parquet", ".pq")):
        try:
            frame = pd.read_parquet(path)
        except ImportError as exc:
            raise DataFileError(f"{what}: reading the Parquet file {path!r} needs pyarrow (pip install pyarrow): "
                                f"{exc}") from None
        except (OSError, ValueError) as exc:
            raise DataFileError(f"{what}: can't read {path!r} as Parquet: {exc}") from None
        frame = frame.reset_index(drop=True)
        return frame, (lambda i: f"row {i}"), "parquet"
    sep = r"\s+" if delimiter == " " else delimiter
    try:
        frame = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataFileError(f"{what}: can't read {path!r} as a table separated by {delimiter!r}: {exc}") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    return frame, (lambda i: f"line {i + 2}"), "csv"


def _column(frame, name: str, path: str, what: str):
    if name not in frame.columns:
        raise DataFileError(f"{what}: {path!r} has no column {name!r} (columns there: {list(frame.columns)})")
    return frame[name]


def _numeric(frame, name: str, path: str, what: str, line_of) -> np.ndarray:
    """Column ``name`` as float64, NaN for empty/NA; DataFileError naming the first value that is not a number."""
    import pandas as pd

    raw = _column(frame, name, path, what)
    if pd.api.types.is_numeric_dtype(raw) and not pd.api.types.is_bool_dtype(raw):
        return raw.to_numpy(dtype=np.float64, na_value=np.nan)
    out = pd.to_numeric(raw, errors="coerce").to_numpy(dtype=np.float64)
    text = raw.astype(str).str.strip().str.lower()
    bad = np.isnan(out) & raw.notna().to_numpy() & ~text.isin(MISSING_TEXT).to_numpy()
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataFileError(f"{what}: column {name!r} of {path!r} holds {raw.iloc[i]!r} on {line_of(i)}; expected a "
                            "number (or a missing-value marker)")
    return out


def _dates(frame, name: str, date_format: str, path: str, what: str, line_of) -> np.ndarray:
    """Column ``name`` as days since 1970-01-01; DataFileError naming the first date that does not parse."""
    import pandas as pd

    raw = _column(frame, name, path, what)
    if pd.api.types.is_datetime64_any_dtype(raw):
        parsed = raw
        expected = "dates"
    else:
        text = raw.astype(str).str.strip()
        if date_format:
            parsed = pd.to_datetime(text, format=date_format, errors="coerce")
            expected = f"dates in the format {date_format!r}"
        else:
            parsed = pd.to_datetime(text, format="ISO8601", errors="coerce")
            expected = "ISO 8601 dates (YYYY-MM-DD; set date_format for others)"
    bad = parsed.isna().to_numpy()
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataFileError(f"{what}: column {name!r} of {path!r} holds {raw.iloc[i]!r} on {line_of(i)}, which does "
                            f"not parse; expected {expected}")
    return to_days(parsed.to_numpy().astype("datetime64[D]"))


def read_site_table(path: str, table: SiteTableSource, what: str):
    """``(ids [S], coordinate columns {name: [S] float64}, attributes [S, A] float64)`` of a site table."""
    frame, line_of, _ = _read_table(path, table.delimiter, what)
    ids = _column(frame, table.id_column, path, what).astype(str).str.strip().to_numpy()
    for i, site in enumerate(ids):
        if site.lower() in MISSING_TEXT:
            raise DataFileError(f"{what}: column {table.id_column!r} of {path!r} holds {site!r} on {line_of(i)}; "
                                "expected a site id")
    seen: dict[str, int] = {}
    for i, site in enumerate(ids):
        if site in seen:
            raise DataFileError(f"{what}: {path!r} lists site {site!r} twice ({line_of(seen[site])} and "
                                f"{line_of(i)}); expected one row per site")
        seen[site] = i
    names = {"latlon": (table.lat_column, table.lon_column), "rowcol": (table.row_column, table.col_column),
             "xy": (table.y_column, table.x_column)}[table.coords]
    coords = {}
    for name in names:
        values = _numeric(frame, name, path, what, line_of)
        if not np.isfinite(values).all():
            i = int(np.flatnonzero(~np.isfinite(values))[0])
            raise DataFileError(f"{what}: column {name!r} of {path!r} has no value for site {ids[i]!r} on "
                                f"{line_of(i)}; expected the site's coordinates")
        coords[name] = values
    attrs = np.stack([_numeric(frame, a, path, what, line_of) for a in table.attributes], axis=1) \
        if table.attributes else np.zeros((len(ids), 0))
    return [str(s) for s in ids], coords, mark_missing(attrs, list(table.missing_values))


def _axis_position(values: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Fractional cell index (cell i covers [i, i + 1)) of ``values`` along an axis of cell ``centres`` (monotonic,
    at least 2, evenly or unevenly spaced; beyond the ends the end spacing goes on)."""
    n = centres.size
    index = np.arange(n, dtype=np.float64)
    if centres[-1] < centres[0]:
        centres, index = centres[::-1], index[::-1]
    pos = np.interp(values, centres, index)
    low, high = values < centres[0], values > centres[-1]
    pos[low] = index[0] + (values[low] - centres[0]) / (centres[1] - centres[0]) * (index[1] - index[0])
    pos[high] = index[-1] + (values[high] - centres[-1]) / (centres[-1] - centres[-2]) * (index[-1] - index[-2])
    return pos + 0.5


def _latlon_2d(reader: GridReader, what: str) -> tuple[np.ndarray, np.ndarray]:
    """The 2-D latitude and longitude of the grid's cells (after its crop) from its first file."""
    import xarray as xr

    path = reader.paths[0]
    ds = xr.open_dataset(path, engine="zarr" if reader.fmt == "zarr" else None, decode_times=False)
    try:
        found = {}
        for want, names in (("lat", ("lat", "latitude")), ("lon", ("lon", "longitude"))):
            name = next((n for n in names if n in ds.variables and set(ds[n].dims) == set(reader.dims)), None)
            if name is None:
                raise DataFileError(f"{what}: {path!r} has neither 1-D latitude/longitude coordinates nor a 2-D "
                                    f"{want} variable on dims {reader.dims}; expected one of them to place sites "
                                    "given by latitude and longitude (or give row/col or x/y coordinates)")
            found[want] = np.asarray(ds[name].transpose(*reader.dims).values, dtype=np.float64)
    finally:
        ds.close()
    if reader.crop is not None:
        y0, y1, x0, x1 = reader.crop
        found = {k: v[y0:y1, x0:x1] for k, v in found.items()}
    return found["lat"], found["lon"]


def _position_2d(lat: np.ndarray, lon: np.ndarray, grid_lat: np.ndarray, grid_lon: np.ndarray) -> tuple[float, float]:
    """Fractional (row, col) of one point on a grid of 2-D cell-centre coordinates: the nearest centre, refined by
    the local linear map between neighbouring centres."""
    scale = math.cos(math.radians(float(lat)))
    d2 = (grid_lat - lat) ** 2 + ((grid_lon - lon) * scale) ** 2
    i, j = np.unravel_index(int(np.argmin(d2)), d2.shape)
    h, w = grid_lat.shape

    def derivative(a: np.ndarray, axis: int) -> float:
        n = a.shape[axis]
        lo, hi = ((i, j), (i, j))
        if axis == 0:
            lo, hi = (max(i - 1, 0), j), (min(i + 1, n - 1), j)
        else:
            lo, hi = (i, max(j - 1, 0)), (i, min(j + 1, n - 1))
        steps = (hi[axis] - lo[axis]) or 1
        return float(a[hi] - a[lo]) / steps

    jac = np.array([[derivative(grid_lat, 0), derivative(grid_lat, 1)],
                    [derivative(grid_lon, 0) * scale, derivative(grid_lon, 1) * scale]])
    if h == 1 or w == 1 or abs(np.linalg.det(jac)) < 1e-12:
        return i + 0.5, j + 0.5
    delta = np.linalg.solve(jac, [lat - grid_lat[i, j], (lon - grid_lon[i, j]) * scale])
    return i + 0.5 + float(delta[0]), j + 0.5 + float(delta[1])


def place_sites(coords: dict[str, np.ndarray], table: SiteTableSource, reader: GridReader | None,
                frame: tuple[int, int], ids: list[str], path: str, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Site coordinates → float64 ``(rows [S], cols [S])`` in the grid frame; DataFileError naming the first site
    that lies outside the grid."""
    if table.coords == "rowcol":
        rows, cols = coords[table.row_column], coords[table.col_column]
    else:
        if reader is None:
            raise DataFileError(f"{what}: sites given by {table.coords} need a grid to place them on; give row/col "
                                "coordinates (coords: rowcol) or a grid")
        ys, xs = (reader.coords[a] for a in (0, 1))
        if reader.crop is not None:
            y0, y1, x0, x1 = reader.crop
            ys, xs = (None if ys is None else ys[y0:y1]), (None if xs is None else xs[x0:x1])
        if table.coords == "xy" or (ys is not None and xs is not None and reader.longitude[1]):
            if ys is None or xs is None or min(ys.size, xs.size) < 2:
                raise DataFileError(f"{what}: the grid in {reader.path!r} has no 1-D y and x coordinates of 2 cells "
                                    f"or more ({reader.dims}); expected them to place sites by {table.coords}")
            if table.coords == "xy":
                y, x = coords[table.y_column], coords[table.x_column]
            else:
                y = coords[table.lat_column]
                x = coords[table.lon_column].copy()
                x = xs.min() + np.mod(x - xs.min(), 360.0)
            rows, cols = _axis_position(y, ys), _axis_position(x, xs)
        else:
            grid_lat, grid_lon = _latlon_2d(reader, what)
            placed = [_position_2d(a, o, grid_lat, grid_lon)
                      for a, o in zip(coords[table.lat_column], coords[table.lon_column], strict=True)]
            rows = np.array([p[0] for p in placed])
            cols = np.array([p[1] for p in placed])
    outside = ~((rows >= 0) & (rows < frame[0]) & (cols >= 0) & (cols < frame[1]))
    if outside.any():
        i = int(np.flatnonzero(outside)[0])
        given = ", ".join(f"{n}={coords[n][i]:g}" for n in coords)
        raise DataFileError(f"{what}: site {ids[i]!r} of {path!r} ({given}) lies outside the {frame[0]}x{frame[1]} "
                            f"grid (at row {rows[i]:.2f}, col {cols[i]:.2f} of the grid frame); expected every site "
                            "inside the grid")
    return rows.astype(np.float64), cols.astype(np.float64)


def read_gauge_table(path: str, src: SiteSetSource, known: dict[str, int], what: str
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A long gauge table → ``(site index [R] into known, day [R], values [R, F] float64)``; DataFileError naming
    the row and value of an unknown site, an unparseable date, a duplicate (site, date) or a non-number."""
    frame, line_of, _ = _read_table(path, src.delimiter, what)
    names = _column(frame, src.site_column, path, what).astype(str).str.strip()
    found = names.map(known)
    if found.isna().any():
        i = int(np.flatnonzero(found.isna().to_numpy())[0])
        raise DataFileError(f"{what}: {path!r} names site {names.iloc[i]!r} on {line_of(i)}, which is not in the site "
                            f"table {src.sites.path!r}; expected every gauge in the site table")
    index, sites = found.to_numpy(dtype=np.int64), names.to_numpy()
    days = _dates(frame, src.date_column, src.date_format, path, what, line_of)
    key = index * 10**7 + (days - days.min() if days.size else days)
    order = np.argsort(key, kind="stable")
    repeated = np.flatnonzero(np.diff(key[order]) == 0)
    if repeated.size:
        first, second = int(order[repeated[0]]), int(order[repeated[0] + 1])
        raise DataFileError(f"{what}: {path!r} gives site {sites[second]!r} on {day_to_iso(days[second])} twice "
                            f"({line_of(first)} and {line_of(second)}); expected one row per site and date")
    values = np.stack([_numeric(frame, v, path, what, line_of) for v in src.variables], axis=1) \
        if src.variables else np.zeros((sites.size, 0))
    return index, days, mark_missing(values, list(src.missing_values))


def _grid_periods(region: RegionConfig) -> dict[str, tuple[int, int]]:
    return {part: (iso_to_day(getattr(region.split, part)[0]), iso_to_day(getattr(region.split, part)[1]))
            for part in SPLITS if getattr(region.split, part)}


def load_region_files(data: DataConfig) -> RegionData:
    """Read a region from files as ``data.region`` configures (module docstring)."""
    region = data.region
    root = region.root or os.getcwd()

    def path_of(template: str) -> str:
        path = os.path.expanduser(template)
        return path if os.path.isabs(path) else os.path.normpath(os.path.join(root, path))

    paths: list[str] = []
    grids: dict[str, RegionGrid] = {}
    transforms: dict[str, list[str]] = {}
    first_reader: GridReader | None = None
    frame: tuple[int, int] | None = None
    for i, src in enumerate(region.grids):
        reader, mask, variables = _open_grid(i, src, path_of)
        paths += reader.paths + ([path_of(src.mask_path)] if src.mask_path else [])
        if frame is None:
            first_reader, frame = reader, reader.shape
        elif reader.shape != frame:
            raise DataFileError(f"data.region.grids[{i}] {src.name!r}: {reader.path!r} is a {reader.shape[0]}x"
                                f"{reader.shape[1]} grid, but the first grid {region.grids[0].name!r} is "
                                f"{frame[0]}x{frame[1]}; expected every grid of a region on the same cells")
        grids[src.name] = FileGrid(reader, mask, variables)
        transforms[src.name] = [src.transforms.get(v, src.transform) for v in variables]
    site_sets = []
    for i, src in enumerate(region.site_sets):
        what = f"data.region.site_sets[{i}] {src.name!r}"
        site_sets.append(_load_site_set(src, what, path_of, first_reader, frame, paths))
        if src.grouping.method == "file":
            paths.append(path_of(src.grouping.file))
    spans = [g.days for g in grids.values()]
    for s in site_sets:
        finite = np.flatnonzero(np.isfinite(s.values).any(axis=(1, 2)))
        if finite.size:
            spans.append((s.first_day + int(finite[0]), s.first_day + int(finite[-1])))
    if not spans:
        raise DataFileError("data.region: the grids and site sets hold no day with data")
    record = (min(a for a, _ in spans), max(b for _, b in spans))
    return RegionData(grids, transforms, site_sets, frame or (0, 0), record, _grid_periods(region),
                      sorted(set(paths)), f"region under {root!r}")


def _open_grid(index: int, src: GridSource, path_of) -> tuple[GridReader, np.ndarray, list[str]]:
    what = f"data.region.grids[{index}] {src.name!r}"
    variables = list(src.variables or [src.name])
    options = GridOptions(
        variables=variables, time_dim=src.time_dim, crop=tuple(src.crop) if src.crop else None,
        crop_bounds=tuple(src.crop_bounds) if src.crop_bounds else None, markers=list(src.missing_values),
        units_to=src.per_variable("units_to"), aggregate=src.per_variable("aggregate"),
        day_start_hour=src.day_start_hour, max_missing_steps=src.max_missing_steps,
        calendar_360=src.calendar_360, coord_tolerance=src.coord_tolerance)
    templates = [src.path] if isinstance(src.path, str) else src.path
    reader = GridReader(resolve_grid_paths([path_of(t) for t in templates], what), src.format, options, what)
    if src.mask_variable:
        mask_path = resolve_path(path_of(src.mask_path), what) if src.mask_path else reader.paths[0]
        mask = read_basin_mask(mask_path, src.format, src.mask_variable, reader, what)
    else:
        mask = np.ones(reader.shape, dtype=bool)
    return reader, mask, variables


def _load_site_set(src: SiteSetSource, what: str, path_of, reader: GridReader | None, frame, paths: list[str]
                   ) -> SiteSetData:
    table_path = resolve_path(path_of(src.sites.path), f"{what} site table")
    paths.append(table_path)
    ids, coords, attrs = read_site_table(table_path, src.sites, f"{what} site table")
    if frame is None:
        if src.sites.coords != "rowcol":
            raise DataFileError(f"{what}: a region without grids needs site coordinates as row/col (coords: rowcol)")
        frame = tuple(int(math.floor(coords[c].max())) + 1 for c in (src.sites.row_column, src.sites.col_column))
    rows, cols = place_sites(coords, src.sites, reader, frame, ids, table_path, f"{what} site table")
    known = {s: i for i, s in enumerate(ids)}
    if src.format in ("csv", "parquet"):
        path = resolve_path(path_of(src.path), what)
        paths.append(path)
        site_index, days, values = read_gauge_table(path, src, known, what)
    else:
        parts = []
        for s, site in enumerate(ids):
            path = resolve_path(path_of(src.path.replace("{site}", site)), f"{what} site {site!r}")
            paths.append(path)
            reader_fn = read_mhm_gauge if src.format == "mhm_gauge" else read_camels_streamflow
            table = reader_fn(path, list(src.missing_values), f"{what} site {site!r}")
            parts.append((np.full(table.days.size, s), table.days, table.values))
        site_index = np.concatenate([p[0] for p in parts])
        days = np.concatenate([p[1] for p in parts])
        values = np.concatenate([p[2] for p in parts])
    named = np.zeros(len(ids), dtype=bool)
    named[site_index] = True
    if not named.all():
        log.info("%s: sites %s of the site table have no row in the gauge data: left out", what,
                 [ids[s] for s in np.flatnonzero(~named)][:10])
    keep = np.flatnonzero(named)
    remap = np.full(len(ids), -1)
    remap[keep] = np.arange(keep.size)
    if days.size == 0:
        raise DataFileError(f"{what}: the gauge data holds no row; expected one row per site and day")
    first, last = int(days.min()), int(days.max())
    dense = np.full((last - first + 1, keep.size, len(src.variables)), np.nan, dtype=np.float32)
    dense[days - first, remap[site_index]] = values
    return SiteSetData(
        name=src.name, ids=[ids[s] for s in keep], rows=rows[keep], cols=cols[keep], first_day=first, values=dense,
        variables=list(src.variables), transforms=[src.transforms.get(v, src.transform) for v in src.variables],
        per_site=list(src.per_site), flow=list(src.flow), attr_names=list(src.sites.attributes), attrs=attrs[keep],
        grouping=src.grouping)


# -- the data set ---------------------------------------------------------------------------------------------
def load_region(data: DataConfig) -> RegionData:
    """The region ``data.region`` describes: synthetic or from files."""
    if data.region.synthetic:
        from crossmae.data.synthetic_region import synthetic_region

        return synthetic_region(data.region.synthetic, data.seed, data.region)
    return load_region_files(data)


class RegionDataset(Dataset):
    """Windows of a whole region: every grid and site set over ``data.steps`` days (module docstring).

    Args:
        data: the data section (``source: region``).
        split: ``train``, ``val`` or ``test``.
        norm_stats: the training split's statistics and site layouts (val, test, evaluation, resume), a saved
            dict or a :class:`NormStats`; None computes them from the training split.

    Attributes:
        spec: grids (``[T, C, H, W]``), then site sets (kind ``sites``); ``grid_shape`` the frame.
        norm_stats, stats: the statistics (saved form, and as :class:`NormStats`).
        site_layouts: site set → its :class:`SiteLayout`.
        land_mask: bool ``[H, W]``: cells that are land in any grid (None without grids).
        starts: first day of each window.
        channel_names: modality → its variables.
        flow_variables: site set → its streamflow-like variables.
        data_paths: the files read (empty for a synthetic region).
    """

    def __init__(self, data: DataConfig, split: str = "train", norm_stats: dict | NormStats | None = None):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.config = copy.deepcopy(data)
        self.split, self.steps, self.stride = split, data.steps, data.stride
        self.region = load_region(data)
        r = self.region
        self.data_paths = list(r.paths)
        self._ranges = {s: self._range(s) for s in {split, "train"}}
        self.channel_names = {**{n: list(g.variables) for n, g in r.grids.items()},
                              **{s.name: list(s.variables) for s in r.site_sets}}
        self.flow_variables = {s.name: list(s.flow) for s in r.site_sets}
        if norm_stats is None:
            norm_stats = self._compute_stats()
        raw = norm_stats.to_dict() if isinstance(norm_stats, NormStats) else copy.deepcopy(dict(norm_stats))
        self.stats = NormStats.from_dict(raw)
        self.stats.check({**{n: ("grid", self.channel_names[n]) for n in r.grids},
                          **{s.name: ("sites", s.variables) for s in r.site_sets}})
        self.norm_stats = raw
        self.site_layouts = {s.name: self._layout(s, raw) for s in r.site_sets}
        self.land_mask = None
        if r.grids:
            self.land_mask = torch.from_numpy(np.logical_or.reduce([g.mask for g in r.grids.values()]))
        self._site_values, self._site_static, self._slot_stats = {}, {}, {}
        for s in r.site_sets:
            self._prepare_sites(s, raw, *self._ranges[split])
        modalities = [ModalitySpec(n, "grid", len(g.variables), *g.shape) for n, g in r.grids.items()]
        modalities += [ModalitySpec(s.name, "sites", len(s.variables), groups=self.site_layouts[s.name].groups,
                                    group_size=self.site_layouts[s.name].group_size,
                                    locations=self.site_layouts[s.name].locations(), site_attrs=len(s.attr_names))
                       for s in r.site_sets]
        self.spec = DatasetSpec(tuple(modalities), static_dim=0, grid_shape=tuple(r.frame))
        self.starts = self._windows()
        log.info("%s split: %d windows of %d days over %s", split, len(self.starts), self.steps, r.describe)

    # -- construction ----------------------------------------------------------------------------------------
    def _range(self, split: str) -> tuple[int, int]:
        r = self.region
        first, last = r.record
        if r.periods:
            if split not in r.periods:
                raise DataFileError(f"data.region.split.{split} is not set; expected [first day, last day] of the "
                                    f"{split} period")
            p0, p1 = r.periods[split]
            return max(first, p0), min(last, p1)
        if split == "test":
            raise DataFileError("data.region.split names no periods, so there is no test split; set "
                                "data.region.split.train, .val and .test to [first day, last day]")
        n_val = round(self.config.val_fraction * (last - first + 1))
        return (first, last - n_val) if split == "train" else (last - n_val + 1, last)

    def _windows(self) -> list[int]:
        d0, d1 = self._ranges[self.split]
        starts = list(range(d0, d1 - self.steps + 2, self.stride))
        if not starts:
            raise DataFileError(
                f"the {self.split} split holds no window of data.steps={self.steps} days: its period is "
                f"{day_to_iso(d0)}..{day_to_iso(d1)} ({max(d1 - d0 + 1, 0)} days) of the record "
                f"{day_to_iso(self.region.record[0])}..{day_to_iso(self.region.record[1])} ({self.region.describe}); "
                f"expected a {self.split} period of at least {self.steps} days, a shorter data.steps, or other "
                "split dates")
        return starts

    @staticmethod
    def _days(s: SiteSetData, d0: int, d1: int) -> np.ndarray:
        """Site values of days ``[d0, d1]`` (NaN where the set has no record): ``[d1 - d0 + 1, S, F]`` float32."""
        out = np.full((max(d1 - d0 + 1, 0), len(s.ids), len(s.variables)), np.nan, dtype=np.float32)
        lo, hi = max(d0, s.first_day), min(d1, s.first_day + s.values.shape[0] - 1)
        if hi >= lo:
            out[lo - d0:hi - d0 + 1] = s.values[lo - s.first_day:hi - s.first_day + 1]
        return out

    def _compute_stats(self) -> dict:
        r = self.region
        d0, d1 = self._ranges["train"]
        stats: dict = {"source": "region", "modalities": {}, "static": {"names": [], "mean": [], "std": []},
                       "site_static": {}, "site_layouts": {}}
        for name, grid in r.grids.items():
            sums = grid.moments(d0, d1, r.grid_transforms[name])
            stats["modalities"][name] = self._channel_stats(name, "grid", r.grid_transforms[name], sums, d0, d1)
        for s in r.site_sets:
            x = self._days(s, d0, d1)  # [L, S, F] physical
            sums = np.zeros((3, len(s.variables)))
            per_site: dict[str, dict[str, list[float]]] = {}
            for f, tr in enumerate(s.transforms):
                v = _transform(x[..., f].astype(np.float64), tr)  # [L, S]
                finite = np.isfinite(v)
                sums[:, f] = (finite.sum(), np.where(finite, v, 0).sum(), np.where(finite, v * v, 0).sum())
                if s.variables[f] in s.per_site:
                    count = finite.sum(axis=0)
                    mean = np.where(finite, v, 0).sum(axis=0) / np.maximum(count, 1)
                    var = np.where(finite, (v - mean) ** 2, 0).sum(axis=0) / np.maximum(count, 1)
                    per_site[s.variables[f]] = {site: [float(mean[i]), float(math.sqrt(var[i]))]
                                                for i, site in enumerate(s.ids)
                                                if count[i] >= 2 and math.sqrt(var[i]) > 1e-6 * max(1, abs(mean[i]))}
            entry = self._channel_stats(s.name, "sites", s.transforms, sums, d0, d1)
            if per_site:
                entry["per_site"] = per_site
            stats["modalities"][s.name] = entry
            layout = build_layout(s.ids, s.rows, s.cols, s.grouping.method, group_size=s.grouping.size,
                                  groups_file=self._grouping_file(s.grouping), seed=s.grouping.seed)
            stats["site_layouts"][s.name] = layout.to_dict()
            if s.attr_names:
                empty = [s.attr_names[a] for a in np.flatnonzero(~np.isfinite(s.attrs).any(axis=0))]
                if empty:
                    raise DataFileError(f"site set {s.name!r}: attributes {empty} have no value for any site; "
                                        "expected at least one value each (or leave them out)")
                mean, std = np.nanmean(s.attrs, axis=0), np.nanstd(s.attrs, axis=0)
                std = np.where(std > 1e-9 * np.maximum(1.0, np.abs(mean)), std, 1.0)
                stats["site_static"][s.name] = {"names": list(s.attr_names), "mean": mean.tolist(),
                                                "std": std.tolist()}
        return stats

    def _grouping_file(self, grouping: GroupingConfig) -> str:
        if not grouping.file:
            return ""
        root = self.config.region.root or os.getcwd()
        return grouping.file if os.path.isabs(grouping.file) else os.path.join(root, grouping.file)

    def _channel_stats(self, name: str, kind: str, transforms: list[str], sums: np.ndarray, d0: int, d1: int) -> dict:
        means, stds = [], []
        for c, channel in enumerate(self.channel_names[name]):
            count, s1, s2 = sums[:, c]
            if count == 0:
                raise DataFileError(f"{kind} {name!r}: {channel!r} has no valid value in the training period "
                                    f"{day_to_iso(d0)}..{day_to_iso(d1)}; expected observed values there")
            mean = s1 / count
            std = math.sqrt(max(s2 / count - mean * mean, 0.0))
            means.append(float(mean))
            stds.append(std if std > 1e-6 * max(1.0, abs(mean)) else 1.0)
        return {"kind": kind, "channels": list(self.channel_names[name]), "transform": list(transforms),
                "mean": means, "std": stds}

    def _layout(self, s: SiteSetData, raw: dict) -> SiteLayout:
        saved = raw.get("site_layouts", {}).get(s.name)
        if saved is None:
            raise ValueError(f"norm_stats['site_layouts'] has no layout for the site set {s.name!r}; expected the "
                             "statistics saved by a region run")
        layout = SiteLayout.from_dict(saved)
        absent = [i for i in layout.site_ids if i not in set(s.ids)]
        if absent:
            log.warning("site set %r: sites %s of the run's layout are not in the data: their slots are empty",
                        s.name, absent[:10])
        extra = sorted(set(s.ids) - set(layout.site_ids))
        if extra:
            log.warning("site set %r: sites %s are not in the run's layout: left out", s.name, extra[:10])
        return layout

    def _prepare_sites(self, s: SiteSetData, raw: dict, d0: int, d1: int) -> None:
        """Normalised site values of this split's days in layout order, slot statistics and site attributes."""
        layout = self.site_layouts[s.name]
        entry = self.stats.modalities[s.name]
        position = {site: i for i, site in enumerate(s.ids)}
        per_site = raw["modalities"][s.name].get("per_site", {})
        order = layout.site_ids
        mean = np.tile(np.asarray(entry.mean), (len(order), 1))  # [S, F]
        std = np.tile(np.asarray(entry.std), (len(order), 1))
        for f, var in enumerate(s.variables):
            for i, site in enumerate(order):
                if site in per_site.get(var, {}):
                    mean[i, f], std[i, f] = per_site[var][site]
        x = self._days(s, d0, d1)  # [L, S data, F]
        values = np.full((x.shape[0], len(order), len(s.variables)), np.nan, dtype=np.float32)
        present = [i for i, site in enumerate(order) if site in position]
        values[:, present] = x[:, [position[order[i]] for i in present]]
        for f, tr in enumerate(entry.transforms):
            values[..., f] = (_transform(values[..., f], tr) - mean[:, f]) / std[:, f]
        self._site_values[s.name] = (d0, values)
        self._slot_stats[s.name] = (group_values(mean[None], layout)[0].numpy(),  # [G, K, F]
                                    group_values(std[None], layout)[0].numpy(), entry.transforms)
        if s.attr_names:
            st = raw.get("site_static", {}).get(s.name)
            if st is None or list(st["names"]) != list(s.attr_names):
                raise ValueError(f"norm_stats['site_static'][{s.name!r}] must name the attributes {s.attr_names}, "
                                 f"got {st!r}")
            attrs = np.full((len(order), len(s.attr_names)), np.nan)
            attrs[present] = s.attrs[[position[order[i]] for i in present]]
            attrs = (attrs - np.asarray(st["mean"])) / np.asarray(st["std"])
            self._site_static[s.name] = group_values(attrs[None].astype(np.float32), layout)[0]  # [G, K, A]

    # -- samples ---------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, key: int | tuple[int, int]) -> Sample:
        index, noise_seed = window_key(key, len(self))
        start = self.starts[index]
        sample = Sample(noise_seed=noise_seed, first_day=start, meta={
            "start": day_to_iso(start), "start_day": start, "split": self.split, "index": index})
        for name, grid in self.region.grids.items():
            x = self.stats.normalize(name, grid.read(start, start + self.steps))  # [T, C, H, W]
            x[..., ~grid.mask] = 0.0  # off land: finite, no information
            sample.grids[name] = torch.from_numpy(x)
            sample.basin_masks[name] = torch.from_numpy(grid.mask.copy())
        for name, layout in self.site_layouts.items():
            d0, values = self._site_values[name]
            window = values[start - d0:start - d0 + self.steps]  # [T, S, F]
            sample.sites[name] = group_values(torch.from_numpy(np.ascontiguousarray(window)), layout)  # [T, G, K, F]
            sample.site_masks[name] = torch.from_numpy(layout.slot_mask)
            if name in self._site_static:
                sample.site_static[name] = self._site_static[name].clone()
        return sample

    def denormalize(self, name: str, values: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
        """Normalised values → physical units: a grid's ``[..., C, H, W]``, or a site set's grouped
        ``[..., G, K, F]`` (each slot with its site's statistics). Tensor or ndarray in, same type out."""
        if name not in self._slot_stats:
            return self.stats.denormalize(name, values)
        mean, std, transforms = self._slot_stats[name]
        if tuple(values.shape[-3:]) != mean.shape:
            raise ValueError(f"values of site set {name!r} must be [..., G, K, F] = [..., "
                             f"{', '.join(map(str, mean.shape))}], got {tuple(values.shape)}")
        if isinstance(values, torch.Tensor):
            out = values * torch.as_tensor(std, dtype=values.dtype, device=values.device) \
                + torch.as_tensor(mean, dtype=values.dtype, device=values.device)
            expm1 = torch.expm1
        else:
            out = np.asarray(values) * std + mean
            expm1 = np.expm1
        for f, tr in enumerate(transforms):
            if tr == "log1p":
                out[..., f] = expm1(out[..., f])
        return out

    def split_range(self, split: str) -> tuple[int, int]:
        """The inclusive day range of ``split`` (this data set's split, or ``train``)."""
        if split not in self._ranges:
            raise ValueError(f"split must be one of {sorted(self._ranges)}, got {split!r}")
        return self._ranges[split]
