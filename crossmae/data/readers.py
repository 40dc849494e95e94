"""Readers of water data files: grids (NetCDF, Zarr), per-basin series (CAMELS-US, mHM, CSV), attribute tables.

Every reader returns plain arrays in physical units with NaN for missing values and days as integers
(days since 1970-01-01, :func:`to_days`); every failure raises :class:`DataFileError` (a ``ValueError``)
or ``FileNotFoundError`` with a message naming the file, the variable or column, and what was expected.

File formats
    NetCDF / Zarr grid (``netcdf``, ``zarr``), read lazily through xarray (NetCDF by whichever engine is
        installed: h5netcdf for NetCDF-4/HDF5 files). Each variable has dims ``(time, y, x)`` in any order;
        the time coordinate decodes to dates (only the day counts; gaps in time are missing days); values
        equal to ``_FillValue`` or a configured marker are missing. The basin mask is a variable of the same
        file or of its own file: cells that are finite and non-zero are inside (mHM: 1 inside, NaN outside);
        length-1 dims (e.g. ``time``) are dropped and its remaining 2-D shape must be the grid's.
    CAMELS-US basin-mean forcing (``camels_forcing``): three header lines (latitude, elevation, area in m²),
        then a whitespace table whose header is ``Year Mnth Day Hr dayl(s) prcp(mm/day) srad(W/m2) swe(mm)
        tmax(C) tmin(C) vp(Pa)`` (case varies between data sets; columns match case-insensitively, with or
        without the units).
    CAMELS-US USGS streamflow (``camels_streamflow``): ``gauge year month day Q(cfs) flag`` per line,
        whitespace separated; ``-999`` marks a missing value.
    mHM gauge text (``mhm_gauge``): five header lines (name, ``nodata <value>``, ``n <measurements per day>``,
        ``start …``, ``end …``), then ``YYYY MM DD HH MM value``; the ``nodata`` value marks a missing value.
        Only daily gauges (``n 1``) are read.
    Generic CSV (``csv``): a delimited table with a header line, a date column (ISO 8601 or a ``strptime``
        format), value columns by name, optional lines to skip (such as a units line), one row per day.
    Attribute tables (``camels_attributes``: ``;``-separated, keyed by ``gauge_id``; or ``csv``): one row per
        basin; the chosen columns must be numeric; empty fields, ``NA`` and configured markers are missing.
"""

from __future__ import annotations

import difflib
import glob
import logging
import os
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

EPOCH = np.datetime64("1970-01-01", "D")
CACHE_BYTES = 256 * 2**20  # a grid variable up to this size (per basin, after the crop) is loaded whole


class DataFileError(ValueError):
    """A data file that can't be used as configured; the message names the file, the variable and why."""


def to_days(dates) -> np.ndarray:
    """Dates (datetime64 of any unit, or anything ``np.datetime64`` takes) → int64 days since 1970-01-01."""
    return (np.asarray(dates).astype("datetime64[D]") - EPOCH).astype(np.int64)


def day_to_iso(day: int) -> str:
    return str(EPOCH + np.timedelta64(int(day), "D"))


def iso_to_day(text: str) -> int:
    return int((np.datetime64(text, "D") - EPOCH).astype(np.int64))


def resolve_path(pattern: str, what: str) -> str:
    """``pattern`` itself, or the one file a glob pattern (``*``, ``?``) matches; FileNotFoundError otherwise."""
    if any(c in pattern for c in "*?["):
        matches = sorted(glob.glob(pattern))
        if len(matches) != 1:
            found = "no file" if not matches else f"{len(matches)} files ({', '.join(matches[:3])} ...)"
            raise FileNotFoundError(f"{what}: the pattern {pattern!r} matches {found}; expected exactly one file")
        return matches[0]
    if not os.path.exists(pattern):
        raise FileNotFoundError(f"{what}: file {pattern!r} does not exist")
    return pattern


def mark_missing(values: np.ndarray, markers: list[float]) -> np.ndarray:
    """``values`` (float) with infinities and every marker (to 1e-6 relative) set to NaN, in place."""
    values[~np.isfinite(values)] = np.nan
    for marker in markers:
        values[np.abs(values - marker) <= 1e-6 * max(1.0, abs(marker))] = np.nan
    return values


def _match_columns(wanted: list[str], available: list[str], path: str, what: str) -> list[int]:
    """Positions of the ``wanted`` columns among ``available``: exact, else case-insensitive, else without units."""

    def bare(name: str) -> str:
        return name.split("(")[0].strip().lower()

    positions = []
    for name in wanted:
        for candidates in ([a == name for a in available], [a.lower() == name.lower() for a in available],
                           [bare(a) == bare(name) for a in available]):
            if sum(candidates) == 1:
                positions.append(candidates.index(True))
                break
        else:
            close = difflib.get_close_matches(name, available, n=3)
            hint = f"; did you mean {close}?" if close else ""
            raise DataFileError(f"{what}: column {name!r} is not in {path!r} (columns there: {available}){hint}")
    return positions


# -- series -------------------------------------------------------------------------------------------------
@dataclass
class SeriesTable:
    """One basin's series: days ``[N]`` int64 (sorted, unique), values ``[N, F]`` float64 (NaN = missing)."""

    path: str
    columns: list[str]
    days: np.ndarray
    values: np.ndarray


def _table(path: str, what: str, columns: list[str], days: np.ndarray, values: np.ndarray,
           markers: list[float]) -> SeriesTable:
    order = np.argsort(days, kind="stable")
    days, values = days[order], values[order]
    duplicate = np.flatnonzero(np.diff(days) == 0)
    if duplicate.size:
        raise DataFileError(f"{what}: {path!r} holds day {day_to_iso(days[duplicate[0]])} more than once; "
                            "expected one row per day")
    return SeriesTable(path, columns, days, mark_missing(values.astype(np.float64), markers))


def _read_whitespace(path: str, what: str, skiprows: int, header: int | None):
    import pandas as pd

    try:
        return pd.read_csv(path, sep=r"\s+", skiprows=skiprows, header=header, dtype=str)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataFileError(f"{what}: can't read {path!r} as a whitespace table: {exc}") from None


def _data_lines(first: int, skip: list[int] = ()):
    """1-based file line of data row i, for a table whose header is the first line not in ``skip`` (0-based
    line numbers) at or after 0-based line ``first - 2``."""
    skipped = set(skip)

    def line_of(i: int) -> int:
        n, kept = first - 3, -1
        while kept < i + 1:
            n += 1
            kept += n not in skipped
        return n + 1

    return line_of


def _numbers(frame, column, path: str, what: str, line_of) -> np.ndarray:
    """A column of strings → float64, with NaN for empty/NA; DataFileError naming the first bad value and where
    it is (``line_of(row)``: a 1-based line number, or a phrase)."""
    import pandas as pd

    raw = frame[column]
    out = pd.to_numeric(raw, errors="coerce").to_numpy(dtype=np.float64)
    text = raw.astype(str).str.strip()
    bad = np.isnan(out) & raw.notna().to_numpy() & ~text.str.lower().isin(["", "na", "nan", "n/a", "null"]).to_numpy()
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        place = line_of(i)
        place = f"on line {place}" if isinstance(place, int) else place
        raise DataFileError(f"{what}: column {str(column)!r} of {path!r} holds {raw.iloc[i]!r} {place}; expected a "
                            "number (or a missing-value marker)")
    return out


def _dates_from_parts(frame, cols, path: str, what: str, line_of) -> np.ndarray:
    parts = [_numbers(frame, c, path, what, line_of) for c in cols]
    if any(np.isnan(p).any() for p in parts):
        i = int(np.flatnonzero(np.any([np.isnan(p) for p in parts], axis=0))[0])
        raise DataFileError(f"{what}: line {line_of(i)} of {path!r} has no complete date; expected year, "
                            "month and day")
    year, month, day = (p.astype(np.int64) for p in parts)
    try:
        text = [f"{y:04d}-{m:02d}-{d:02d}" for y, m, d in zip(year, month, day)]
        return to_days(np.array(text, dtype="datetime64[D]"))
    except ValueError as exc:
        raise DataFileError(f"{what}: {path!r} holds an impossible date ({exc}); expected year month day") from None


def read_camels_forcing(path: str, columns: list[str], markers: list[float], what: str) -> SeriesTable:
    """CAMELS-US basin-mean forcing: 3 header lines, then ``Year Mnth Day Hr <columns…>``."""
    frame = _read_whitespace(path, what, skiprows=3, header=0)
    available = [str(c) for c in frame.columns]
    date_cols = [available[i] for i in _match_columns(["Year", "Mnth", "Day"], available, path, what)]
    value_cols = [available[i] for i in _match_columns(columns, available, path, what)]
    line_of = _data_lines(5)
    days = _dates_from_parts(frame, date_cols, path, what, line_of)
    values = np.stack([_numbers(frame, c, path, what, line_of) for c in value_cols], axis=1)
    return _table(path, what, value_cols, days, values, markers)


def read_camels_streamflow(path: str, markers: list[float], what: str) -> SeriesTable:
    """CAMELS-US USGS streamflow: ``gauge year month day Q flag`` (flag optional)."""
    frame = _read_whitespace(path, what, skiprows=0, header=None)
    if frame.shape[1] < 5:
        raise DataFileError(f"{what}: {path!r} has {frame.shape[1]} columns; expected 'gauge year month day Q flag'")
    line_of = _data_lines(1)
    days = _dates_from_parts(frame, [1, 2, 3], path, what, line_of)
    values = _numbers(frame, 4, path, what, line_of)[:, None]
    return _table(path, what, ["Q"], days, values, [*markers, -999.0])


def read_mhm_gauge(path: str, markers: list[float], what: str) -> SeriesTable:
    """mHM gauge text: 5 header lines (``nodata`` and ``n`` read from lines 2 and 3), then ``Y M D h m value``."""
    with open(path, errors="replace") as f:
        header = [f.readline().split() for _ in range(5)]
    markers = list(markers)
    for line in header:
        if len(line) >= 2 and line[0].lower() == "nodata":
            try:
                markers.append(float(line[1]))
            except ValueError:
                raise DataFileError(f"{what}: {path!r} header line 'nodata {line[1]}' is not a number") from None
        if len(line) >= 2 and line[0].lower() == "n" and line[1] != "1":
            raise DataFileError(f"{what}: {path!r} holds {line[1]} measurements per day; expected a daily gauge (n 1)")
    frame = _read_whitespace(path, what, skiprows=5, header=None)
    if frame.shape[1] != 6:
        raise DataFileError(f"{what}: {path!r} has {frame.shape[1]} columns after its 5 header lines; expected "
                            "'YYYY MM DD HH MM value'")
    line_of = _data_lines(6)
    days = _dates_from_parts(frame, [0, 1, 2], path, what, line_of)
    values = _numbers(frame, 5, path, what, line_of)[:, None]
    return _table(path, what, ["value"], days, values, markers)


def read_csv_series(path: str, date_column: str, date_format: str, columns: list[str], delimiter: str,
                    skip_rows: list[int], markers: list[float], what: str) -> SeriesTable:
    """A delimited table with a header, a date column and value columns; one row per day."""
    import pandas as pd

    sep = r"\s+" if delimiter == " " else delimiter
    try:
        frame = pd.read_csv(path, sep=sep, skiprows=skip_rows or None, dtype=str,
                            skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataFileError(f"{what}: can't read {path!r} as a table separated by {delimiter!r}: {exc}") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    available = list(frame.columns)
    date_col = available[_match_columns([date_column], available, path, what)[0]]
    value_cols = [available[i] for i in _match_columns(columns, available, path, what)]
    line_of = _data_lines(2, skip_rows)

    raw = frame[date_col].astype(str).str.strip()
    if date_format:
        parsed = pd.to_datetime(raw, format=date_format, errors="coerce")
        expected = f"dates in the format {date_format!r}"
    else:
        parsed = pd.to_datetime(raw, format="ISO8601", errors="coerce")
        expected = "ISO 8601 dates (YYYY-MM-DD; set date_format for others)"
    bad = parsed.isna().to_numpy()
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataFileError(f"{what}: column {date_col!r} of {path!r} holds {raw.iloc[i]!r} on line {line_of(i)}, "
                            f"which does not parse; expected {expected}")
    days = to_days(parsed.to_numpy().astype("datetime64[D]"))
    values = np.stack([_numbers(frame, c, path, what, line_of) for c in value_cols], axis=1)
    return _table(path, what, value_cols, days, values, markers)


# -- static attributes --------------------------------------------------------------------------------------
def read_attribute_tables(paths: list[str], id_column: str, delimiter: str, columns: list[str], basins: list[str],
                          markers: list[float], what: str) -> np.ndarray:
    """The ``columns`` of ``basins`` from tables joined on ``id_column``: ``[len(basins), len(columns)]`` float64.

    A column is taken from the first table that has it; every chosen column must be numeric.
    """
    import pandas as pd

    tables = []
    for path in paths:
        path = resolve_path(path, what)
        sep = r"\s+" if delimiter == " " else delimiter
        try:
            frame = pd.read_csv(path, sep=sep, dtype=str)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
            raise DataFileError(f"{what}: can't read {path!r} as a table separated by {delimiter!r}: {exc}") from None
        frame.columns = [str(c).strip() for c in frame.columns]
        if id_column not in frame.columns:
            raise DataFileError(f"{what}: {path!r} has no basin id column {id_column!r} (columns there: "
                                f"{list(frame.columns)})")
        frame[id_column] = frame[id_column].astype(str).str.strip()
        tables.append((path, frame.set_index(id_column)))
    out = np.full((len(basins), len(columns)), np.nan)
    for j, column in enumerate(columns):
        source = next(((p, t) for p, t in tables if column in t.columns), None)
        if source is None:
            every = [c for _, t in tables for c in t.columns]
            close = difflib.get_close_matches(column, every, n=3)
            raise DataFileError(f"{what}: column {column!r} is in none of {[p for p, _ in tables]}"
                                + (f"; did you mean {close}?" if close else ""))
        path, table = source
        missing = [b for b in basins if b not in table.index]
        if missing:
            raise DataFileError(f"{what}: {path!r} has no row for basin(s) {missing[:5]} (column {id_column!r})")
        rows = table.loc[basins, [column]].reset_index()
        out[:, j] = _numbers(rows, column, path, what, lambda i: f"for basin {basins[i]}")
    return mark_missing(out, markers)


# -- grids --------------------------------------------------------------------------------------------------
def _open_xarray(path: str, fmt: str, what: str):
    import xarray as xr

    try:
        if fmt == "zarr":
            return xr.open_dataset(path, engine="zarr", chunks=None)
        return xr.open_dataset(path, chunks=None)
    except (OSError, ValueError, TypeError) as exc:
        raise DataFileError(f"{what}: can't open {path!r} as {fmt}: {exc}") from None


class GridFile:
    """One grid source of one basin, opened on first use in each process (the handle is not pickled).

    Args:
        path: the NetCDF file or Zarr store.
        fmt: ``netcdf`` or ``zarr``.
        variables: the variables read as channels (same dims and shape).
        time_dim: the time dimension.
        crop: ``(y0, y1, x0, x1)`` or None.
        markers: missing-value markers besides NaN and ``_FillValue``.
        what: how messages name this source (``data.files.grids[0] 'pre'``).

    Attributes set by :meth:`describe`: ``days [N]`` int64 of the time coordinate, ``shape`` (H, W) after the
    crop, ``dims`` (y, x) names and ``full_shape`` before the crop.
    """

    def __init__(self, path: str, fmt: str, variables: list[str], time_dim: str, crop: tuple[int, int, int, int] | None,
                 markers: list[float], what: str):
        self.path, self.fmt, self.variables, self.time_dim = path, fmt, variables, time_dim
        self.crop, self.markers, self.what = crop, markers, what
        self._ds = None
        self._cache: np.ndarray | None = None
        self.describe()
        self.close()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_ds"] = None
        state["_cache"] = None
        return state

    def close(self) -> None:
        if self._ds is not None:
            self._ds.close()
        self._ds, self._cache = None, None

    def _dataset(self):
        if self._ds is None:
            self._ds = _open_xarray(self.path, self.fmt, self.what)
        return self._ds

    def describe(self) -> None:
        """Check the variables and read the time coordinate (fills ``days``, ``shape``, ``dims``)."""
        ds = self._dataset()
        dims = None
        for name in self.variables:
            if name not in ds.variables:
                raise DataFileError(f"{self.what}: variable {name!r} is not in {self.path!r} (variables there: "
                                    f"{sorted(str(v) for v in ds.data_vars)})")
            var = ds[name]
            if self.time_dim not in var.dims or var.ndim != 3:
                raise DataFileError(f"{self.what}: variable {name!r} in {self.path!r} has dims {var.dims}; expected "
                                    f"3 dims: {self.time_dim!r} and two spatial dims (y, x)")
            space = tuple(d for d in var.dims if d != self.time_dim)
            if dims is not None and (space != dims or var.shape != ds[self.variables[0]].shape):
                raise DataFileError(f"{self.what}: variables {self.variables[0]!r} and {name!r} in {self.path!r} "
                                    "differ in dims or shape; expected one grid")
            dims = space
        self.dims = dims
        self.full_shape = (ds.sizes[dims[0]], ds.sizes[dims[1]])
        times = ds[self.time_dim].values
        if not np.issubdtype(times.dtype, np.datetime64):
            raise DataFileError(f"{self.what}: the {self.time_dim!r} coordinate of {self.path!r} does not decode to "
                                f"dates (dtype {times.dtype}); expected CF time units such as 'days since 1989-01-01' "
                                "in a standard calendar")
        days = to_days(times)
        if np.any(np.diff(days) <= 0):
            raise DataFileError(f"{self.what}: the {self.time_dim!r} coordinate of {self.path!r} is not strictly "
                                "increasing day by day; expected one field per day")
        self.days = days
        h, w = self.full_shape
        if self.crop is not None:
            y0, y1, x0, x1 = self.crop
            if y1 > h or x1 > w:
                raise DataFileError(f"{self.what}: crop {list(self.crop)} exceeds the {h}x{w} grid ({dims[0]} x "
                                    f"{dims[1]}) of {self.path!r}")
            h, w = y1 - y0, x1 - x0
        self.shape = (h, w)

    def _select(self, var, time: slice):
        """``var`` → ``[L, H, W]`` float64 (time, y, x), cropped."""
        index = {self.time_dim: time}
        if self.crop is not None:
            y0, y1, x0, x1 = self.crop
            index.update({self.dims[0]: slice(y0, y1), self.dims[1]: slice(x0, x1)})
        return var.isel(index).transpose(self.time_dim, *self.dims).values.astype(np.float64)

    def _read_positions(self, p0: int, p1: int) -> np.ndarray:
        """Time positions ``[p0, p1)`` of the file → ``[L, C, H, W]`` float32, missing as NaN."""
        ds = self._dataset()
        out = np.stack([mark_missing(self._select(ds[v], slice(p0, p1)), self.markers) for v in self.variables], 1)
        return out.astype(np.float32)

    def read(self, day0: int, day1: int) -> np.ndarray:
        """Days ``[day0, day1)`` → ``[day1 - day0, C, H, W]`` float32; days the file lacks are NaN."""
        if self._cache is None:
            size = len(self.days) * len(self.variables) * self.shape[0] * self.shape[1] * 4
            if size <= CACHE_BYTES:
                self._cache = self._read_positions(0, len(self.days))
        p0, p1 = np.searchsorted(self.days, [day0, day1])
        out = np.full((day1 - day0, len(self.variables), *self.shape), np.nan, dtype=np.float32)
        if p1 > p0:
            block = self._cache[p0:p1] if self._cache is not None else self._read_positions(int(p0), int(p1))
            out[self.days[p0:p1] - day0] = block
        return out


def read_basin_mask(path: str, fmt: str, variable: str, grid: GridFile, what: str) -> np.ndarray:
    """The basin mask ``[H, W]`` bool of ``grid`` (cropped like it) from ``variable`` in ``path``."""
    ds = _open_xarray(path, fmt, what)
    try:
        if variable not in ds.variables:
            raise DataFileError(f"{what}: mask variable {variable!r} is not in {path!r} (variables there: "
                                f"{sorted(str(v) for v in ds.data_vars)})")
        var = ds[variable]
        var = var.squeeze([d for d, n in var.sizes.items() if n == 1])
        values = var.values.astype(np.float64)
        if var.ndim == 2 and all(d in grid.dims for d in var.dims):
            values = var.transpose(*grid.dims).values.astype(np.float64)
    finally:
        ds.close()
    if values.shape != tuple(grid.full_shape):
        raise DataFileError(f"{what}: mask {variable!r} in {path!r} has shape {values.shape} (dims {var.dims}), but "
                            f"the grid in {grid.path!r} is {grid.full_shape[0]}x{grid.full_shape[1]} ({grid.dims[0]} x "
                            f"{grid.dims[1]}); expected a mask on the same grid")
    inside = np.isfinite(values) & (values != 0)
    if grid.crop is not None:
        y0, y1, x0, x1 = grid.crop
        inside = inside[y0:y1, x0:x1]
    if not inside.any():
        raise DataFileError(f"{what}: mask {variable!r} in {path!r} has no cell inside the basin"
                            + (f" within crop {list(grid.crop)}" if grid.crop is not None else "")
                            + "; expected finite non-zero cells inside")
    return inside

