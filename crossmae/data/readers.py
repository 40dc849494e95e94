"""Readers of water data files: grids (NetCDF, Zarr), per-basin series (CAMELS-US, mHM, CSV), attribute tables.

Every reader returns plain arrays in physical units with NaN for missing values and days as integers
(days since 1970-01-01, :func:`to_days`); every failure raises :class:`DataFileError` (a ``ValueError``)
or ``FileNotFoundError`` with a message naming the file, the variable or column, and what was expected.

File formats
    NetCDF / Zarr grid (``netcdf``, ``zarr``), read lazily through xarray (NetCDF by whichever engine is
        installed: h5netcdf for NetCDF-4/HDF5 files), one file or a series split over many (by year, say):
        :class:`GridReader`. Each variable has dims ``(time, y, x)`` in any order; the time coordinate holds
        CF times in a standard or model calendar (``noleap``, ``all_leap``, ``360_day``: :func:`calendar_rule`)
        at daily steps (gaps are missing days) or sub-daily steps (aggregated to days); values equal to
        ``_FillValue`` or a configured marker are missing; CF ``units`` convert on request
        (:func:`unit_conversion`). The basin mask is a variable of the same file or of its own file: cells
        that are finite and non-zero are inside (mHM: 1 inside, NaN outside); length-1 dims (e.g. ``time``)
        are dropped; it is matched to the grid by coordinates when both have them, else by shape
        (:func:`read_basin_mask`).
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
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)

EPOCH = np.datetime64("1970-01-01", "D")
CACHE_BYTES = 256 * 2**20  # a grid record up to this size (days, per basin, after the crop) is read once and kept


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


FILL_VALUES = (  # values that tools write for "no data", never a measurement
    9.969209968386869e36,  # netCDF's default fill of float and double variables
    float(np.finfo(np.float32).max),  # GDAL's and ArcGIS's float NoData (either sign)
    1e20,  # the CF missing_value of climate-model output
)


def fill_value_hits(values: np.ndarray) -> np.ndarray:
    """Bool mask of ``values`` (any shape) equal to one of :data:`FILL_VALUES`, either sign, to 1e-6 relative."""
    with np.errstate(invalid="ignore"):
        magnitude = np.abs(values)
        hits = np.zeros(values.shape, dtype=bool)
        if not (magnitude >= (1 - 1e-6) * min(FILL_VALUES)).any():  # one pass where nothing is near a fill value
            return hits
        for marker in FILL_VALUES:
            hits |= np.abs(magnitude - marker) <= 1e-6 * marker
    return hits


def mark_missing(values: np.ndarray, markers: list[float]) -> np.ndarray:
    """``values`` (float) with infinities and every marker (to 1e-6 relative) set to NaN, in place (one
    scratch array of ``values``' size)."""
    values[~np.isfinite(values)] = np.nan
    scratch = np.empty_like(values) if markers else None
    for marker in markers:
        np.subtract(values, marker, out=scratch)
        np.abs(scratch, out=scratch)
        values[scratch <= 1e-6 * max(1.0, abs(marker))] = np.nan
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
        # index_col=False: a line ending in the separator (a trailing empty field) must not shift the columns
        frame = pd.read_csv(path, sep=sep, skiprows=skip_rows or None, dtype=str,
                            skipinitialspace=True, index_col=False)
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
            frame = pd.read_csv(path, sep=sep, dtype=str, index_col=False)  # trailing separators shift nothing
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
STANDARD_CALENDARS = ("standard", "gregorian", "proleptic_gregorian")
NOLEAP_CALENDARS = ("noleap", "365_day")
ALL_LEAP_CALENDARS = ("all_leap", "366_day")
CALENDARS = (*STANDARD_CALENDARS, *NOLEAP_CALENDARS, *ALL_LEAP_CALENDARS, "360_day")
CALENDAR_360_RULES = ("refuse", "rescale_year", "keep_date")
AGGREGATES = ("sum", "mean", "min", "max", "last")
MAX_OPEN_FILES = 8  # files of one grid source kept open at once in each process
READ_BLOCK_BYTES = 64 * 2**20  # raw steps read at once (float32, after the crop), whatever the window or block


def _open_xarray(path: str, fmt: str, what: str):
    """``path`` opened lazily (no array is read), times left as numbers: :func:`decode_time` decodes them."""
    import xarray as xr

    try:
        if fmt == "zarr":
            return xr.open_dataset(path, engine="zarr", chunks=None, decode_times=False)
        return xr.open_dataset(path, chunks=None, decode_times=False)
    except (OSError, ValueError, TypeError) as exc:
        raise DataFileError(f"{what}: can't open {path!r} as {fmt}: {exc}") from None


def resolve_grid_paths(path: str | list[str], what: str) -> list[str]:
    """The files of a grid source: ``path`` (one file, or a glob matching one or more, sorted) or a list of
    such; FileNotFoundError naming the pattern that matches nothing."""
    paths = []
    for pattern in [path] if isinstance(path, str) else path:
        if any(c in pattern for c in "*?["):
            matches = sorted(glob.glob(pattern))
            if not matches:
                raise FileNotFoundError(f"{what}: the pattern {pattern!r} matches no file")
            paths += matches
        elif not os.path.exists(pattern):
            raise FileNotFoundError(f"{what}: file {pattern!r} does not exist")
        else:
            paths.append(pattern)
    repeated = sorted({p for p in paths if paths.count(p) > 1})
    if repeated:
        raise DataFileError(f"{what}: {repeated} listed more than once; expected each file once")
    return paths


# -- time axes: model calendars, sub-daily steps --
def _days_from_civil(year: np.ndarray, month: np.ndarray, day: np.ndarray) -> np.ndarray:
    """Proleptic Gregorian (year, month, day) → days since 1970-01-01 (int64), without validating the day."""
    y = year - (month <= 2)
    era = np.floor_divide(y, 400)
    yoe = y - era * 400
    mp = (month + 9) % 12
    doy = (153 * mp + 2) // 5 + day - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


def _is_leap(year: np.ndarray) -> np.ndarray:
    return (year % 4 == 0) & ((year % 100 != 0) | (year % 400 == 0))


def _month_length(year: np.ndarray, month: np.ndarray) -> np.ndarray:
    lengths = np.array([31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31])
    return lengths[month - 1] + ((month == 2) & _is_leap(year))


def calendar_rule(calendar: str, rule_360: str) -> str:
    """How dates of ``calendar`` become real (Gregorian) days, in words; recorded with a run's statistics."""
    if calendar in STANDARD_CALENDARS:
        return "dates are real dates"
    if calendar in NOLEAP_CALENDARS:
        return "model dates are real dates; 29 February of leap years has no field and is a missing day"
    if calendar in ALL_LEAP_CALENDARS:
        return "model dates are real dates; 29 February of other years has no real day and is dropped"
    if rule_360 == "rescale_year":
        return ("day k (0-based) of a 360-day model year becomes day floor((k + 0.5) * N / 360) of the real year "
                "of N days: no field is dropped, the 5 (leap years: 6) real days no model day reaches are missing")
    return ("keep_date: model month and day kept; the 31st of each month is a missing day, 30 February (and 29 "
            "February of non-leap years) is dropped")


@dataclass
class TimeAxis:
    """The time steps of one grid file placed on real days.

    Attributes:
        native: ``[S]`` float64, seconds since 1970-01-01 counted in the file's own calendar (order, steps,
            gaps and overlaps are judged on it, so 29 February of a ``noleap`` file is no gap).
        instant: ``[S]`` int64, the real time of each step in seconds since 1970-01-01 (UTC).
        keep: ``[S]`` bool, False for a model date that has no real day (dropped, never read).
        labels: ``[S]`` the model dates as ISO text (for messages).
        calendar: the file's calendar, lower case.
    """

    native: np.ndarray
    instant: np.ndarray
    keep: np.ndarray
    labels: list[str]
    calendar: str


def decode_time(values: np.ndarray, units: str, calendar: str, rule_360: str, path: str, what: str,
                time_dim: str) -> TimeAxis:
    """CF time numbers (``units`` like ``hours since 1950-01-01``, any calendar of :data:`CALENDARS`) → a
    :class:`TimeAxis`; model dates become real dates by :func:`calendar_rule`."""
    import cftime

    calendar = (calendar or "standard").lower()
    if calendar not in CALENDARS:
        raise DataFileError(f"{what}: the {time_dim!r} coordinate of {path!r} uses the calendar {calendar!r}; "
                            f"expected one of {list(CALENDARS)}")
    if calendar == "360_day" and rule_360 not in ("rescale_year", "keep_date"):
        raise DataFileError(f"{what}: {path!r} uses the 360_day calendar (12 months of 30 days), which has no "
                            "one-to-one map to real days; set calendar_360: rescale_year (" +
                            calendar_rule("360_day", "rescale_year") + ") or calendar_360: keep_date (" +
                            calendar_rule("360_day", "keep_date")[len("keep_date: "):] + ")")
    if not units or " since " not in units:
        raise DataFileError(f"{what}: the {time_dim!r} coordinate of {path!r} has units {units!r}; expected CF "
                            "time units such as 'days since 1989-01-01'")
    try:
        dates = cftime.num2date(np.asarray(values, dtype=np.float64), units, calendar=calendar,
                                only_use_cftime_datetimes=True)
        native = np.asarray(cftime.date2num(dates, "seconds since 1970-01-01", calendar=calendar), dtype=np.float64)
    except (ValueError, TypeError, OverflowError) as exc:
        raise DataFileError(f"{what}: the {time_dim!r} coordinate of {path!r} does not decode to dates (units "
                            f"{units!r}, calendar {calendar!r}: {exc}); expected CF time units such as 'days since "
                            "1989-01-01'") from None
    dates = np.atleast_1d(dates)
    native = np.atleast_1d(native)
    fields = np.array([(d.year, d.month, d.day, d.hour * 3600 + d.minute * 60 + d.second) for d in dates],
                      dtype=np.int64).reshape(-1, 4)
    year, month, mday, seconds = fields.T
    keep = np.ones(len(dates), dtype=bool)
    if calendar == "360_day" and rule_360 == "rescale_year":
        k = (month - 1) * 30 + (mday - 1)
        length = 365 + _is_leap(year)
        day = _days_from_civil(year, np.ones_like(year), np.ones_like(year)) + ((2 * k + 1) * length) // 720
    else:
        keep = mday <= _month_length(year, month)
        day = _days_from_civil(year, month, mday)
    labels = [d.isoformat() for d in dates]
    return TimeAxis(native, (day * 86400 + seconds).astype(np.int64), keep, labels, calendar)


# -- units --
_TEMPERATURES = {
    "k": ("K", 273.15), "kelvin": ("K", 273.15), "degk": ("K", 273.15), "deg_k": ("K", 273.15),
    **{name: ("degC", 0.0) for name in ("degc", "°c", "c", "celsius", "deg_c", "degrees_c", "degree_c",
                                        "degrees_celsius", "degree_celsius", "degreec", "degreesc")},
}
# symbol → (length exponent, time exponent, size in mm and days); kg is water: 1 kg m-2 = 1 mm
_UNIT_SYMBOLS = {
    "kg": (3, 0, 1e6), "g": (3, 0, 1e3), "m": (1, 0, 1e3), "cm": (1, 0, 10.0), "mm": (1, 0, 1.0),
    "s": (0, 1, 1 / 86400), "sec": (0, 1, 1 / 86400), "h": (0, 1, 1 / 24), "hr": (0, 1, 1 / 24),
    "hour": (0, 1, 1 / 24), "d": (0, 1, 1.0), "day": (0, 1, 1.0),
}
UNIT_HELP = ("known conversions: water depths per step (m, mm, kg m-2) and rates (kg m-2 s-1, mm/s, mm/h, "
             "mm/day, m/day) into each other (a depth becomes a daily rate when the day's steps are summed), "
             "and temperatures K <-> degC")


def _parse_water_unit(text: str) -> tuple[int, int, float] | None:
    """``kg m-2 s-1``, ``mm/day``, ``m`` … → (length exponent, time exponent, size in mm and days); None when
    the text is not a water depth or rate."""
    import re

    text = text.strip().lower().replace("**", "").replace("^", "")
    parts = text.split("/")
    length, time, size = 0, 0, 1.0
    for i, part in enumerate(parts):
        tokens = [t for t in re.split(r"[\s.*]+", part) if t]
        if not tokens:
            return None
        for token in tokens:
            match = re.fullmatch(r"([a-z]+)(-?\d+)?", token)
            if match is None or match.group(1) not in _UNIT_SYMBOLS:
                return None
            power = int(match.group(2) or 1) * (-1 if i > 0 else 1)
            dl, dt, s = _UNIT_SYMBOLS[match.group(1)]
            length, time, size = length + dl * power, time + dt * power, size * s**power
    return (length, time, size) if (length, time) in ((1, 0), (1, -1)) else None


@dataclass
class UnitConversion:
    """``converted = raw * scale + offset``, applied to every step before the daily aggregation."""

    scale: float = 1.0
    offset: float = 0.0
    text: str = ""


def unit_conversion(source: str, target: str, steps_per_day: int, aggregate: str, variable: str, path: str,
                    what: str) -> UnitConversion:
    """How variable ``variable`` in ``source`` units becomes ``target`` units; DataFileError naming both units
    when no conversion is known or the day's aggregation would make it wrong."""
    if source.strip() == target.strip():
        return UnitConversion(text=f"{source} (unchanged)")
    name = f"variable {variable!r} of {path!r}"
    src_t, dst_t = _TEMPERATURES.get(source.strip().lower()), _TEMPERATURES.get(target.strip().lower())
    if src_t and dst_t:
        return UnitConversion(1.0, dst_t[1] - src_t[1] if src_t[0] != dst_t[0] else 0.0, f"{source} -> {target}")
    src, dst = _parse_water_unit(source), _parse_water_unit(target)
    if src is None or dst is None or (src_t or dst_t):
        raise DataFileError(f"{what}: can't convert {name} from {source!r} to {target!r} (units_to); {UNIT_HELP}")
    subdaily = steps_per_day > 1
    if src[1] == -1 and dst[1] == 0 and subdaily:
        raise DataFileError(f"{what}: can't convert {name} from the rate {source!r} to the depth {target!r} with "
                            f"{steps_per_day} steps a day; expected a rate as target, such as 'mm/day'")
    if src[1] == 0 and dst[1] == -1 and subdaily and aggregate not in ("sum", "last"):
        raise DataFileError(f"{what}: {name} is a depth per step ({source!r}); it becomes {target!r} only when the "
                            f"day's {steps_per_day} steps are summed (or the last holds the day's accumulation): "
                            f"expected aggregate 'sum' or 'last', got {aggregate!r}")
    if src[1] == -1 and subdaily and aggregate == "sum":
        raise DataFileError(f"{what}: {name} is a rate ({source!r}); summing its {steps_per_day} steps a day gives "
                            "no rate: expected aggregate 'mean' (or 'min', 'max')")
    return UnitConversion(src[2] / dst[2], 0.0, f"{source} -> {target}")


# -- coordinates --
def _is_longitude(coord) -> bool:
    units = str(coord.attrs.get("units", "")).lower()
    return (coord.attrs.get("standard_name") == "longitude" or units.startswith(("degrees_east", "degree_east"))
            or str(coord.name).lower() in ("lon", "longitude", "long", "nav_lon"))


def _wrap(delta: np.ndarray) -> np.ndarray:
    """Longitude differences brought into [-180, 180)."""
    return (np.asarray(delta) + 180.0) % 360.0 - 180.0


def _spacing(coord: np.ndarray) -> float:
    return float(np.median(np.abs(np.diff(coord)))) if coord.size > 1 else 0.0


def _describe_axis(name: str, coord: np.ndarray) -> str:
    if coord.size == 0:
        return f"{name}: no cell"
    return f"{name} {coord[0]:g}..{coord[-1]:g} ({coord.size} cells, spacing {_spacing(coord):g})"


def _align_axis(grid: np.ndarray, other: np.ndarray, longitude: bool, tolerance: float) -> np.ndarray | None:
    """For each grid coordinate the position of the nearest ``other`` coordinate, or None when one is farther
    than ``tolerance`` cells (longitudes compared modulo 360)."""
    if len(other) == 0:
        return None
    g, o = (grid % 360.0, other % 360.0) if longitude else (grid, other)
    order = np.argsort(o, kind="stable")
    ranked = o[order]
    right = np.searchsorted(ranked, g)  # [n_grid]
    candidates = np.stack([right - 1, right])  # [2, n_grid]: the neighbours below and above
    candidates = candidates % len(o) if longitude else np.clip(candidates, 0, len(o) - 1)
    distance = np.abs(ranked[candidates] - g[None, :])
    if longitude:
        distance = np.minimum(distance, 360.0 - distance)
    best = np.argmin(distance, axis=0)
    columns = np.arange(len(g))
    step = _spacing(grid) or _spacing(other)
    limit = (tolerance * step if step else 0.0) + 1e-9 * max(1.0, float(np.abs(grid).max()))
    if np.any(distance[best, columns] > limit):
        return None
    return order[candidates[best, columns]]


@dataclass
class GridOptions:
    """How a grid source is read (everything of ``data.files.grids[i]`` but where it is and what it is called).

    Attributes:
        variables: the variables read as channels (same dims and shape).
        time_dim: the time dimension.
        crop: ``(y0, y1, x0, x1)`` cell index ranges, or None.
        crop_bounds: ``(y_min, y_max, x_min, x_max)`` coordinate values (lat, lon) of the cells to keep, or None.
        markers: missing-value markers besides NaN and ``_FillValue``.
        units_to: variable → the unit to convert it to (from its ``units`` attribute).
        aggregate: variable → ``sum``, ``mean``, ``min``, ``max`` or ``last`` of a day's sub-daily steps.
        day_start_hour: hours after 00:00 UTC at which a day of sub-daily steps starts.
        max_missing_steps: sub-daily steps a cell may lack in a day and still have a value that day.
        calendar_360: ``refuse``, ``rescale_year`` or ``keep_date`` for files in the 360_day calendar.
        coord_tolerance: largest coordinate difference, in cells, at which files and masks count as one grid.
    """

    variables: list[str]
    time_dim: str = "time"
    crop: tuple[int, int, int, int] | None = None
    crop_bounds: tuple[float, float, float, float] | None = None
    markers: list[float] = field(default_factory=lambda: [-9999.0, -999.0])
    units_to: dict[str, str] = field(default_factory=dict)
    aggregate: dict[str, str] = field(default_factory=dict)
    day_start_hour: float = 0.0
    max_missing_steps: int = 0
    calendar_360: str = "refuse"
    coord_tolerance: float = 0.01


class GridReader:
    """One grid source of one basin: one file or a time series split over many, opened on first use in each
    process (no handle or array is pickled) and read a window at a time.

    Time: every file's time coordinate is decoded in its own calendar (:func:`decode_time`); files are
    ordered by their first step, must not overlap, and a gap between two of them is logged and recorded
    (its days are missing). Daily steps give one field a day (gaps are missing days); sub-daily steps
    (hourly, 3-hourly …) are reduced to days by each variable's ``aggregate``: with ``sum``, ``mean``, ``min``
    and ``max`` a cell of a day holds a value when it lacks at most ``max_missing_steps`` of the day's steps
    (absent or missing), ``sum`` then being the mean of the present steps times the steps per day; otherwise
    the cell is missing that day. ``last`` takes the day's final step (for fields accumulated since the start
    of the day, as ERA5-Land's), missing when that step is.

    Space: every file must have the same dims, sizes and (within ``coord_tolerance`` cells, longitudes modulo
    360) coordinates. ``crop`` keeps index ranges, ``crop_bounds`` the cells whose coordinate values lie
    within the bounds (either order of latitude; longitudes in 0..360 or -180..180 alike).

    Args:
        paths: the NetCDF files or Zarr stores.
        fmt: ``netcdf`` or ``zarr``.
        options: :class:`GridOptions`.
        what: how messages name this source (``data.files.grids[0] 'pre'``).

    Attributes set at construction: ``days [N]`` int64, the real days with at least one step; ``shape``
    (H, W) after the crop; ``dims`` (y, x) names; ``full_shape`` before the crop; ``crop`` (index ranges,
    also when given as bounds); ``coords`` the y and x coordinates before the crop (None where a dim has no
    1-D coordinate); ``longitude`` whether each is a longitude; ``steps_per_day``; ``calendar``; ``gaps``
    between files; ``conversions`` per variable.
    """

    def __init__(self, paths: list[str], fmt: str, options: GridOptions, what: str):
        self.paths, self.fmt, self.options, self.what = list(paths), fmt, options, what
        self.path = paths[0] if len(paths) == 1 else f"{paths[0]} (and {len(paths) - 1} more files)"
        self.variables, self.time_dim, self.markers = options.variables, options.time_dim, options.markers
        self._open: dict[int, object] = {}
        self._cache: np.ndarray | None = None
        self.describe()
        self.close()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_open"] = {}
        state["_cache"] = None
        return state

    def close(self) -> None:
        for ds in self._open.values():
            ds.close()
        self._open, self._cache = {}, None

    def _dataset(self, index: int):
        """File ``index`` opened (at most :data:`MAX_OPEN_FILES` stay open: the least recently used closes)."""
        ds = self._open.pop(index, None)
        if ds is None:
            ds = _open_xarray(self.paths[index], self.fmt, self.what)
            if len(self._open) >= MAX_OPEN_FILES:
                self._open.pop(next(iter(self._open))).close()
        self._open[index] = ds
        return ds

    # -- construction --
    def _check_variables(self, ds, path: str) -> tuple[str, str]:
        dims = None
        for name in self.variables:
            if name not in ds.variables:
                raise DataFileError(f"{self.what}: variable {name!r} is not in {path!r} (variables there: "
                                    f"{sorted(str(v) for v in ds.data_vars)})")
            var = ds[name]
            if self.time_dim not in var.dims or var.ndim != 3:
                raise DataFileError(f"{self.what}: variable {name!r} in {path!r} has dims {var.dims}; expected "
                                    f"3 dims: {self.time_dim!r} and two spatial dims (y, x)")
            space = tuple(d for d in var.dims if d != self.time_dim)
            if dims is not None and (space != dims or var.shape != ds[self.variables[0]].shape):
                raise DataFileError(f"{self.what}: variables {self.variables[0]!r} and {name!r} in {path!r} "
                                    "differ in dims or shape; expected one grid")
            dims = space
        return dims

    def grid_coordinates(self) -> dict[str, tuple[np.ndarray, dict]]:
        """The first file's 2-D coordinates on the grid's dims (``lat``/``lon`` of a projected grid, say): name →
        (values ``[h, w]`` after the crop, attributes). Dimension coordinates are in :attr:`coords`."""
        ds = self._dataset(0)
        y0, y1, x0, x1 = self.crop or (0, self.full_shape[0], 0, self.full_shape[1])
        out = {}
        for name, coord in ds.coords.items():
            if set(coord.dims) == set(self.dims) and coord.ndim == 2:
                values = np.asarray(coord.transpose(*self.dims).values)[y0:y1, x0:x1]  # [h, w]
                out[str(name)] = (values, dict(coord.attrs))
        return out

    def describe(self) -> None:
        """Check every file, decode and order their times, resolve the crop (fills the attributes)."""
        opt = self.options
        axes, units = [], None
        for i, path in enumerate(self.paths):
            ds = self._dataset(i)
            dims = self._check_variables(ds, path)
            sizes = (ds.sizes[dims[0]], ds.sizes[dims[1]])
            coords = tuple(np.asarray(ds[d].values, dtype=np.float64) if d in ds.variables and ds[d].ndim == 1
                           else None for d in dims)
            longitude = tuple(d in ds.variables and _is_longitude(ds[d]) for d in dims)
            file_units = {v: str(ds[v].attrs.get("units", "")) for v in self.variables}
            if i == 0:
                self.dims, self.full_shape, self.coords, self.longitude = dims, sizes, coords, longitude
                units = file_units
            else:
                self._check_same_grid(path, dims, sizes, coords)
                differ = {v: (units[v], u) for v, u in file_units.items() if u != units[v]}
                if differ:
                    raise DataFileError(f"{self.what}: {path!r} and {self.paths[0]!r} give variables different "
                                        f"units {differ}; expected the same units in every file")
            if self.time_dim not in ds.variables:
                raise DataFileError(f"{self.what}: {path!r} has no {self.time_dim!r} coordinate; expected CF time "
                                    "values such as 'days since 1989-01-01'")
            time = ds[self.time_dim]
            axis = decode_time(time.values, str(time.attrs.get("units", "")), str(time.attrs.get("calendar", "")),
                               opt.calendar_360, path, self.what, self.time_dim)
            if np.any(np.diff(axis.native) <= 0):
                raise DataFileError(f"{self.what}: the {self.time_dim!r} coordinate of {path!r} is not strictly "
                                    "increasing; expected one field per time step, in order")
            axes.append(axis)
        self.units = units
        self._order_files(axes)
        self._resolve_crop()
        self.shape = (self.crop[1] - self.crop[0], self.crop[3] - self.crop[2]) if self.crop else self.full_shape
        self._conversions()

    def _check_same_grid(self, path: str, dims, sizes, coords) -> None:
        if dims != self.dims or sizes != self.full_shape:
            raise DataFileError(f"{self.what}: {path!r} has a {sizes[0]}x{sizes[1]} grid ({dims[0]} x {dims[1]}) but "
                                f"{self.paths[0]!r} a {self.full_shape[0]}x{self.full_shape[1]} one ({self.dims[0]} "
                                f"x {self.dims[1]}); expected every file of a source on one grid")
        for axis in range(2):
            mine, theirs = self.coords[axis], coords[axis]
            if mine is None or theirs is None:
                continue
            aligned = _align_axis(mine, theirs, self.longitude[axis], self.options.coord_tolerance)
            if aligned is None or np.any(aligned != np.arange(len(mine))):
                raise DataFileError(f"{self.what}: {path!r} has {_describe_axis(dims[axis], theirs)}, but "
                                    f"{self.paths[0]!r} has {_describe_axis(self.dims[axis], mine)}; expected every "
                                    f"file of a source on one grid (within {self.options.coord_tolerance} cell)")

    def _order_files(self, axes: list[TimeAxis]) -> None:
        """Sort files by time, refuse overlaps, record gaps, detect the step; fills the step index."""
        order = sorted(range(len(axes)), key=lambda i: axes[i].native[0] if axes[i].native.size else np.inf)
        self.paths = [self.paths[i] for i in order]
        axes = [axes[i] for i in order]
        self.close()
        calendars = {a.calendar for a in axes}
        if len(calendars) > 1:
            raise DataFileError(f"{self.what}: the files use different calendars {sorted(calendars)} "
                                f"({', '.join(f'{p!r}: {a.calendar}' for p, a in zip(self.paths, axes))}); "
                                "expected one calendar")
        self.calendar = axes[0].calendar
        steps = sorted({float(np.median(np.diff(a.native))) for a in axes if a.native.size > 1})
        step = steps[0] if steps else 86400.0
        if len(steps) > 1 and steps[-1] - steps[0] > 1e-6 * steps[0]:
            raise DataFileError(f"{self.what}: the files have different time steps ({[s / 3600 for s in steps]} "
                                "hours); expected one step in every file")
        if step > 86400 * 1.01:
            raise DataFileError(f"{self.what}: {self.path!r} has a time step of {step / 86400:g} days; expected "
                                "daily or sub-daily steps")
        self.steps_per_day = 1 if step >= 86400 * 0.99 else round(86400 / step)
        if self.steps_per_day > 1 and abs(86400 / self.steps_per_day - step) > 1e-3:
            raise DataFileError(f"{self.what}: {self.path!r} has a time step of {step / 3600:g} hours, which does "
                                "not divide a day; expected a step such as 1, 3 or 6 hours")
        self.gaps = []
        for (pa, a), (pb, b) in zip(zip(self.paths, axes), zip(self.paths[1:], axes[1:])):
            if not a.native.size or not b.native.size:
                continue
            if b.native[0] <= a.native[-1]:
                raise DataFileError(f"{self.what}: {pa!r} ({a.labels[0]}..{a.labels[-1]}) and {pb!r} "
                                    f"({b.labels[0]}..{b.labels[-1]}) overlap; expected files that follow each "
                                    "other in time, each time step in one file")
            if b.native[0] - a.native[-1] > 1.5 * step:
                gap = {"after": pa, "before": pb, "last": a.labels[-1], "next": b.labels[0]}
                self.gaps.append(gap)
                log.warning("%s: no time step between %s (end of %s) and %s (start of %s): those days are missing",
                            self.what, gap["last"], pa, gap["next"], pb)
        file_of = np.concatenate([np.full(a.native.size, i, dtype=np.int64) for i, a in enumerate(axes)])
        position = np.concatenate([np.arange(a.native.size, dtype=np.int64) for a in axes])
        instant = np.concatenate([a.instant for a in axes])
        if self.steps_per_day > 1:  # a step stamped t belongs to the day of t - day_start_hour
            instant = instant - round(self.options.day_start_hour * 3600)
        day = np.floor_divide(instant, 86400)
        keep = np.concatenate([a.keep for a in axes])
        self.dropped_steps = int((~keep).sum())
        self._step_file = file_of[keep].astype(np.int32)  # [S] per kept step: its file,
        self._step_position = position[keep].astype(np.int32)  # its position there,
        self._step_day = day[keep].astype(np.int32)  # its real day (days since 1970-01-01)
        self._step_ends_day = (instant[keep] - day[keep] * 86400) > 86400 - 1.5 * step  # the day's final step
        if self._step_day.size == 0:
            raise DataFileError(f"{self.what}: {self.path!r} holds no time step; expected at least one day")
        if self.steps_per_day == 1 and np.any(np.diff(self._step_day) <= 0):
            i = int(np.flatnonzero(np.diff(self._step_day) <= 0)[0])
            raise DataFileError(f"{self.what}: the {self.time_dim!r} coordinate of {self.path!r} is not strictly "
                                f"increasing day by day (two steps on day {day_to_iso(self._step_day[i + 1])}); "
                                "expected one field per day")
        self.days = np.unique(self._step_day)

    def _resolve_crop(self) -> None:
        opt = self.options
        h, w = self.full_shape
        self.crop = tuple(opt.crop) if opt.crop else None
        if opt.crop_bounds:
            ranges = []
            for axis, (lo, hi) in enumerate((opt.crop_bounds[:2], opt.crop_bounds[2:])):
                coord = self.coords[axis]
                if coord is None:
                    raise DataFileError(f"{self.what}: crop_bounds needs coordinate values along {self.dims[axis]!r}, "
                                        f"but {self.path!r} has no 1-D {self.dims[axis]!r} coordinate; expected "
                                        "crop: [y0, y1, x0, x1] (cell indices) instead")
                if self.longitude[axis]:
                    inside = (coord - lo) % 360.0 <= (hi - lo) % 360.0 + 1e-9
                else:
                    inside = (coord >= lo - 1e-9) & (coord <= hi + 1e-9)
                cells = np.flatnonzero(inside)
                if cells.size == 0 or cells[-1] - cells[0] + 1 != cells.size:
                    where = "no cell" if cells.size == 0 else "cells that are not contiguous (the bounds cross the " \
                                                              "file's longitude seam)"
                    raise DataFileError(f"{self.what}: crop_bounds [{lo:g}, {hi:g}] along {self.dims[axis]!r} select "
                                        f"{where} of {self.path!r}, whose {_describe_axis(self.dims[axis], coord)}; "
                                        "expected bounds that select a contiguous run of cells")
                ranges += [int(cells[0]), int(cells[-1]) + 1]
            self.crop = tuple(ranges)
        if self.crop is not None:
            y0, y1, x0, x1 = self.crop
            if y1 > h or x1 > w:
                raise DataFileError(f"{self.what}: crop {list(self.crop)} exceeds the {h}x{w} grid ({self.dims[0]} x "
                                    f"{self.dims[1]}) of {self.path!r}")

    def _conversions(self) -> None:
        opt = self.options
        self.aggregate = []
        self.conversions = []
        for v in self.variables:
            how = opt.aggregate.get(v, "")
            if self.steps_per_day > 1 and how not in AGGREGATES:
                raise DataFileError(f"{self.what}: {self.path!r} holds {self.steps_per_day} steps a day; set the "
                                    f"daily aggregate of variable {v!r}: aggregate: one of {list(AGGREGATES)}")
            self.aggregate.append(how)
            target = opt.units_to.get(v, "")
            if not target:
                self.conversions.append(UnitConversion(text=self.units[v]))
                continue
            if not self.units[v]:
                raise DataFileError(f"{self.what}: variable {v!r} of {self.path!r} has no 'units' attribute, so it "
                                    f"can't be converted to {target!r}; expected CF units such as 'kg m-2 s-1' or 'K'")
            self.conversions.append(unit_conversion(self.units[v], target, self.steps_per_day, how, v, self.path,
                                                    self.what))

    def facts(self) -> dict:
        """What reading did to the files (calendar, steps, units, gaps), JSON-serialisable."""
        out = {"files": len(self.paths), "calendar": self.calendar,
               "calendar_rule": calendar_rule(self.calendar, self.options.calendar_360),
               "steps_per_day": self.steps_per_day,
               "units": {v: c.text for v, c in zip(self.variables, self.conversions)}}
        if self.steps_per_day > 1:
            out.update(aggregate=dict(zip(self.variables, self.aggregate)), day_start_hour=self.options.day_start_hour,
                       max_missing_steps=self.options.max_missing_steps)
        if self.dropped_steps:
            out["dropped_steps"] = self.dropped_steps
        if self.gaps:
            out["gaps"] = self.gaps
        return out

    # -- reading --
    @property
    def block_days(self) -> int:
        """Days read at once so that the raw steps of a block stay within :data:`READ_BLOCK_BYTES`."""
        per_day = self.steps_per_day * len(self.variables) * self.shape[0] * self.shape[1] * 4
        return max(1, READ_BLOCK_BYTES // per_day)

    def _read_steps(self, k0: int, k1: int) -> np.ndarray:
        """Kept steps ``[k0, k1)`` → ``[L, C, H, W]`` float32 in target units, missing as NaN."""
        out = np.empty((k1 - k0, len(self.variables), *self.shape), dtype=np.float32)
        files, positions = self._step_file[k0:k1], self._step_position[k0:k1]
        index = {}
        if self.crop is not None:
            y0, y1, x0, x1 = self.crop
            index = {self.dims[0]: slice(y0, y1), self.dims[1]: slice(x0, x1)}
        row = 0
        for f in np.unique(files):
            pos = positions[files == f]
            p0, p1 = int(pos[0]), int(pos[-1]) + 1
            ds = self._dataset(int(f))
            for c, v in enumerate(self.variables):
                values = ds[v].isel({self.time_dim: slice(p0, p1), **index}).transpose(self.time_dim, *self.dims)
                values = values.values  # [p1 - p0, H, W], the file's dtype
                out[row:row + pos.size, c] = values if pos.size == p1 - p0 else values[pos - p0]
            row += pos.size
        mark_missing(out, self.markers)
        self._refuse_fill_values(out, files, positions)
        for c, conv in enumerate(self.conversions):
            if conv.scale != 1.0:
                out[:, c] *= conv.scale
            if conv.offset != 0.0:
                out[:, c] += conv.offset
        return out

    def _refuse_fill_values(self, steps: np.ndarray, files: np.ndarray, positions: np.ndarray) -> None:
        """Raise DataFileError naming the file, variable, step and cell of the first undeclared fill value in
        ``steps [L, C, H, W]`` (markers already NaN): a tool's "no data" left in would pass for a measurement
        and wreck the statistics."""
        hits = fill_value_hits(steps)
        if not hits.any():
            return
        row, c, y, x = (int(a[0]) for a in np.nonzero(hits))
        raise DataFileError(
            f"{self.what}: {self.paths[int(files[row])]!r} holds {float(steps[row, c, y, x]):g} in variable "
            f"{self.variables[c]!r} at time step {int(positions[row])} (cell {y}, {x} of the read area), a fill "
            f"value for no data that the file does not declare; expected a measurement (give the file a _FillValue "
            f"or add the value to missing_values)")

    def _aggregate(self, steps: np.ndarray, step_day: np.ndarray, ends_day: np.ndarray, out: np.ndarray,
                   day0: int) -> None:
        """Sub-daily ``steps [L, C, H, W]`` of days ``step_day [L]`` (``ends_day [L]``: the day's final step)
        → their days in ``out [D, C, H, W]``."""
        starts = np.flatnonzero(np.r_[True, np.diff(step_day) != 0])
        days = step_day[starts] - day0
        finite = np.isfinite(steps)
        count = np.add.reduceat(finite, starts, axis=0)  # [days, C, H, W]
        total = np.add.reduceat(np.where(finite, steps, 0.0), starts, axis=0)
        lacking = self.steps_per_day - count > self.options.max_missing_steps
        with np.errstate(invalid="ignore", divide="ignore"):
            for c, how in enumerate(self.aggregate):
                if how == "last":
                    out[step_day[ends_day] - day0, c] = steps[ends_day, c]
                    continue
                if how == "min":
                    value = np.fmin.reduceat(steps[:, c], starts, axis=0)
                elif how == "max":
                    value = np.fmax.reduceat(steps[:, c], starts, axis=0)
                else:
                    value = total[:, c] / count[:, c] * (self.steps_per_day if how == "sum" else 1)
                value[lacking[:, c]] = np.nan
                out[days, c] = value

    def _read_days(self, day0: int, day1: int) -> np.ndarray:
        out = np.full((day1 - day0, len(self.variables), *self.shape), np.nan, dtype=np.float32)
        for block in range(day0, day1, self.block_days):
            end = min(block + self.block_days, day1)
            k0, k1 = (int(k) for k in np.searchsorted(self._step_day, [block, end]))
            if k1 <= k0:
                continue
            steps = self._read_steps(k0, k1)
            if self.steps_per_day == 1:
                out[self._step_day[k0:k1] - day0] = steps
            else:
                self._aggregate(steps, self._step_day[k0:k1], self._step_ends_day[k0:k1], out, day0)
        return out

    def read(self, day0: int, day1: int) -> np.ndarray:
        """Days ``[day0, day1)`` → ``[day1 - day0, C, H, W]`` float32; days the files lack are NaN. Reads only
        the steps of those days, unless the whole record (as days, after the crop) fits in
        :data:`CACHE_BYTES`: then it is read once and kept."""
        first, last = int(self.days[0]), int(self.days[-1])
        if self._cache is None and (last - first + 1) * len(self.variables) * self.shape[0] * self.shape[1] * 4 \
                <= CACHE_BYTES:
            self._cache = self._read_days(first, last + 1)
        if self._cache is None:
            return self._read_days(day0, day1)
        out = np.full((day1 - day0, len(self.variables), *self.shape), np.nan, dtype=np.float32)
        lo, hi = max(day0, first), min(day1, last + 1)
        if hi > lo:
            out[lo - day0:hi - day0] = self._cache[lo - first:hi - first]
        return out


def read_basin_mask(path: str, fmt: str, variable: str, grid: GridReader, what: str) -> np.ndarray:
    """The basin mask ``[H, W]`` bool of ``grid`` (cropped like it) from ``variable`` in ``path``.

    When the mask's dims and the grid's dims both have 1-D coordinates, each grid cell takes the mask cell
    nearest to it (within ``coord_tolerance`` cells; longitudes modulo 360; either latitude order), so the
    mask may cover a larger area or be stored the other way up; dims of other names pair up in order, or
    by which one is a longitude. Otherwise the mask must have the grid's shape, in file order."""
    ds = _open_xarray(path, fmt, what)
    try:
        if variable not in ds.variables:
            raise DataFileError(f"{what}: mask variable {variable!r} is not in {path!r} (variables there: "
                                f"{sorted(str(v) for v in ds.data_vars)})")
        var = ds[variable]
        var = var.squeeze([d for d, n in var.sizes.items() if n == 1])
        if var.ndim == 2 and all(d in grid.dims for d in var.dims):
            var = var.transpose(*grid.dims)
        elif var.ndim == 2 and [d in ds.variables and _is_longitude(ds[d]) for d in var.dims][::-1] == \
                list(grid.longitude) and any(grid.longitude):
            var = var.transpose(*var.dims[::-1])  # other names, stored (lon, lat): put longitude where the grid has it
        values = var.values.astype(np.float64)
        mask_coords = [np.asarray(ds[d].values, dtype=np.float64) if d in ds.variables and ds[d].ndim == 1 else None
                       for d in var.dims]
    finally:
        ds.close()
    inside = np.isfinite(values) & (values != 0)
    if var.ndim == 2 and all(c is not None for c in [*mask_coords, *grid.coords]):
        y0, y1, x0, x1 = grid.crop if grid.crop is not None else (0, grid.full_shape[0], 0, grid.full_shape[1])
        picks = []
        for axis, (lo, hi) in enumerate(((y0, y1), (x0, x1))):
            cells = grid.coords[axis][lo:hi]
            pick = _align_axis(cells, mask_coords[axis], grid.longitude[axis], grid.options.coord_tolerance)
            if pick is None:
                raise DataFileError(
                    f"{what}: mask {variable!r} in {path!r} is on another grid: its "
                    f"{_describe_axis(var.dims[axis], mask_coords[axis])}, the grid's in {grid.path!r} "
                    f"{_describe_axis(grid.dims[axis], cells)}; expected a mask cell within "
                    f"{grid.options.coord_tolerance} cell of every grid cell")
            picks.append(pick)
        inside = inside[np.ix_(*picks)]
    else:
        if values.shape != tuple(grid.full_shape):
            raise DataFileError(f"{what}: mask {variable!r} in {path!r} has shape {values.shape} (dims {var.dims}), "
                                f"but the grid in {grid.path!r} is {grid.full_shape[0]}x{grid.full_shape[1]} "
                                f"({grid.dims[0]} x {grid.dims[1]}); expected a mask on the same grid")
        if grid.crop is not None:
            y0, y1, x0, x1 = grid.crop
            inside = inside[y0:y1, x0:x1]
    if not inside.any():
        raise DataFileError(f"{what}: mask {variable!r} in {path!r} has no cell inside the basin"
                            + (f" within crop {list(grid.crop)}" if grid.crop is not None else "")
                            + "; expected finite non-zero cells inside")
    return inside
