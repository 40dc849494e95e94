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
        ``date_column`` and the ``variables`` (other columns ignored, rows in any order); empty fields,
        :data:`MISSING_TEXT` (``NA``, ``nan``, ``-`` ...), infinities and ``missing_values`` are missing; a day
        with no row is missing. Or one file per site in a per-site format (``mhm_gauge``,
        ``camels_streamflow``, :mod:`crossmae.data.readers`), ``{site}`` in the path. The site table (CSV or
        Parquet) gives each site's id, coordinates and numeric attributes; the coordinates are placed on the
        grid frame (:mod:`crossmae.data.sites` states the frame): ``rowcol`` as given, ``xy`` through the first
        grid's 1-D y and x coordinates, ``latlon`` through its 1-D latitude and longitude coordinates or, on a
        projected grid, its 2-D ``lat``/``lon`` variables (nearest cell centre, refined linearly between
        neighbouring centres); longitudes modulo 360; a lat/lon or x/y site on the grid's outer edge is in the
        edge cell. Sites of the site table that the gauge data never names (or, per-site files, that have no
        file) are left out, wherever they lie; a site with rows but no value is kept and never a token (both
        logged).
    Tables as users write them (:func:`read_user_table`, :func:`read_gauge_table`, :func:`read_site_table`):
        the separator of the header when it is not the configured one; decimal commas in files not separated
        by commas, thousands separators beside a decimal mark; UTF-8 (byte-order mark or not), Latin-1 or
        UTF-16 (with its mark); ``skip_rows``, a units line under the header, blank lines dropped, every row
        keeping its file line for messages; column names matched in any case,
        without units in brackets, or by a usual other name (:data:`COLUMN_ALIASES`); dates in ISO 8601 (times
        and zones dropped to the local date), ``date_format``, the one of :data:`DATE_FORMATS` that reads every
        date, or year/month/day columns; site ids as text (leading zeros kept; an id of digits that lost them
        matches the one site-table id of that number).
    Bad input stops with a :class:`crossmae.data.readers.DataFileError` naming the file, the row (the CSV line
    as the user sees it, or the Parquet row) and the value: a gauge row naming a site missing from the site
    table, a site outside the grid (or a latitude beyond ±90), a (site, date) given twice, a date that is missing,
    does not parse or reads both day first and month first, a value that is not a number, beyond float32, a fill
    value (readers.FILL_VALUES) or, under ``log1p``, -1 or less, a missing or ambiguous column (a wide table is
    named as one), a row without a site id. A training period sharing a day with val or test is a ConfigError
    (raised when the config is validated); windows that hold no day of any grid are logged.

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

import bz2
import copy
import difflib
import gzip
import logging
import lzma
import math
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from torch.utils.data import Dataset

from crossmae.config import (
    DataConfig,
    GridSource,
    GroupingConfig,
    RegionConfig,
    SiteSetSource,
    SiteTableSource,
)
from crossmae.data.normstats import NormStats, apply_transform
from crossmae.data.readers import (
    DataFileError,
    GridOptions,
    GridReader,
    day_to_iso,
    fill_value_hits,
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
from crossmae.data.sites import SiteLayout, build_layout, group_values, id_number

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
STATS_BLOCK_DAYS = 366
STRAY_YEARS = 10  # a gap in a gauge table's dates beyond which a few rows are most likely a mistyped year
MISSING_TEXT = frozenset(("", "na", "nan", "-nan", "n/a", "#n/a", "#na", "<na>", "null", "none", "-", "--"))
TABLE_DELIMITERS = (",", ";", "\t", "|")
DATE_FORMATS = ("%Y/%m/%d", "%d.%m.%Y", "%Y.%m.%d", "%Y%m%d", "%d/%m/%Y", "%m/%d/%Y", "%d-%m-%Y", "%d-%b-%Y",
                "%d %b %Y")
ISO_ZONE = r"(?<=\d:\d\d)(?::\d\d(?:\.\d+)?)?\s*(?:Z|[+-]\d\d(?::?\d\d)?)$"  # seconds and the zone of an ISO time
DATE_PARTS = (("year", "yyyy", "yr"), ("month", "mnth", "mon", "mm"), ("day", "dd"))
COLUMN_ALIASES = {  # a default column name -> the other names a table may give that column
    "site_id": ("site", "id", "gauge_id", "gauge", "station_id", "station"),
    "date": ("time", "datetime", "timestamp"),
    "lat": ("latitude", "gauge_lat"),
    "lon": ("longitude", "long", "lng", "gauge_lon"),
}


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
        source: where the values come from (the gauge table, or the per-site file template), for messages.
        unused: ids of the site table that the data does not use (left out).
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
    source: str = ""
    unused: list[str] = field(default_factory=list)


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
        self.source = reader.path  # for messages
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
                v = apply_transform(x[:, c][:, self.mask].astype(np.float64), tr)  # [L, land cells]
                v = v[np.isfinite(v)]
                sums[:, c] += (v.size, v.sum(), (v * v).sum())
        self.reader.close()
        return sums


# -- users' tables ----------------------------------------------------------------------------------------
@dataclass
class UserTable:
    """A gauge or site table as a user wrote it, rows in file order (blank lines and rows of empty fields dropped).

    Attributes:
        path: the file.
        frame: the columns, names stripped (CSV: strings as written; Parquet: as stored).
        places: int64 ``[R]``: where each row is, as the user sees it: the CSV file's 1-based line number, or
            the Parquet row (0-based).
        csv: a CSV file (else Parquet).
        decimal_comma: a comma inside a number is its decimal separator (``3,5``): CSV files separated by
            something else than commas, and text columns of Parquet files.
    """

    path: str
    frame: object
    places: np.ndarray
    csv: bool
    decimal_comma: bool

    def where(self, i: int) -> str:
        """Row ``i`` as the user finds it: ``line 7`` (CSV) or ``row 5`` (Parquet)."""
        return f"{'line' if self.csv else 'row'} {int(self.places[i])}"

    def keep(self, rows: np.ndarray) -> None:
        """Keep only ``rows`` (bool ``[R]``)."""
        self.frame = self.frame[rows].reset_index(drop=True)
        self.places = self.places[rows]


def read_user_table(path: str, delimiter: str, skip_rows: Sequence[int], what: str) -> UserTable:
    """A CSV or Parquet table (Parquet by its extension or its first bytes; a spreadsheet or an Arrow file, by
    either, is an error asking for CSV or Parquet).

    CSV: separated by ``delimiter``, or by the one of ``, ; tab |`` that the header holds more often, or by
    whitespace when the header holds none of them; UTF-16 after its byte-order mark, else UTF-8 with or without
    one, else Latin-1; ``skip_rows`` (0-based file lines) are skipped, and so are blank and ``#`` comment lines
    above the header; blank lines and lines of empty fields are dropped; every other row keeps its file line
    number."""
    import pandas as pd

    start = b"" if os.path.isdir(path) else _file_start(path, what)  # a directory: a partitioned Parquet data set
    if path.lower().endswith((".parquet", ".pq")) or start.startswith(b"PAR1"):
        try:
            frame = pd.read_parquet(path)
        except ImportError as exc:
            raise DataFileError(f"{what}: reading the Parquet file {path!r} needs pyarrow (pip install pyarrow): "
                                f"{exc}") from None
        except (OSError, ValueError) as exc:
            raise DataFileError(f"{what}: can't read {path!r} as Parquet: {exc}") from None
        if not isinstance(frame.index, pd.RangeIndex):  # ids or dates written as the index
            frame = frame.reset_index()
        frame = frame.reset_index(drop=True)
        frame.columns = [str(c).strip() for c in frame.columns]
        return UserTable(path, frame, np.arange(len(frame)), csv=False, decimal_comma=True)
    named = path.lower().endswith((".xlsx", ".xls", ".xlsm", ".ods"))
    if named or start.startswith((b"PK\x03\x04", b"\xd0\xcf\x11\xe0")):  # zip (xlsx, ods) or OLE (xls) inside
        raise DataFileError(f"{what}: {path!r} is a spreadsheet; expected a CSV (or Parquet) file: save the sheet as "
                            f"CSV{'' if named else ' (or, if it is a zip archive, unpack it)'}")
    if start.startswith((b"ARROW1", b"FEA1")):
        raise DataFileError(f"{what}: {path!r} is an Arrow (Feather) file; expected a CSV or Parquet file: write it "
                            "as Parquet (pandas.read_feather(path).to_parquet(...))")
    skip = sorted({int(r) for r in skip_rows})
    if skip and skip[0] < 0:
        raise DataFileError(f"{what}: skip_rows holds {skip[0]}; expected 0-based line numbers of {path!r}")
    utf16 = start[:2] in (b"\xff\xfe", b"\xfe\xff")  # a spreadsheet's "Unicode text"
    header, skip = _header(path, skip, what, "utf-16" if utf16 else "utf-8")
    sep = _sniff_delimiter(header, delimiter, path, what)
    frame, encoding = None, "utf-8-sig"
    for encoding in ("utf-16",) if utf16 else ("utf-8-sig", "latin-1"):
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", pd.errors.ParserWarning)
                frame = pd.read_csv(path, sep=r"\s+" if sep == " " else sep, dtype=str, keep_default_na=False,
                                    skipinitialspace=True, skip_blank_lines=False, skiprows=skip or None,
                                    encoding=encoding, index_col=False)  # never the first column as an index
            break
        except UnicodeDecodeError:
            log.info("%s: %r is not UTF-8: read as Latin-1", what, path)
        except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
            raise DataFileError(f"{what}: can't read {path!r} as a table separated by {sep!r}: {exc}") from None
    if any(issubclass(w.category, pd.errors.ParserWarning) for w in caught):
        _check_extra_fields(path, sep, skip, len(frame.columns), encoding, what)
    frame.columns = [str(c).strip() for c in frame.columns]
    twice = sorted({c for c in frame.columns if list(frame.columns).count(c) > 1})
    if twice:
        raise DataFileError(f"{what}: {path!r} names the columns {twice} more than once (spaces aside); expected "
                            "one column of each name")
    read = np.ones(len(frame) + len(skip) + 1, dtype=bool)
    read[[r for r in skip if r < read.size]] = False
    lines = np.flatnonzero(read)  # 0-based file lines of the header and the rows
    table = UserTable(path, frame, lines[1:len(frame) + 1] + 1, csv=True, decimal_comma=sep != ",")
    if len(frame.columns):
        first = frame.iloc[:, 0].str.strip() == ""
        if first.any():
            blank = frame[first.to_numpy()].apply(lambda c: c.str.strip() == "").all(axis=1)
            empty = np.zeros(len(frame), dtype=bool)
            empty[np.flatnonzero(first.to_numpy())[blank.to_numpy()]] = True
            table.keep(~empty)
    return table


def _check_extra_fields(path: str, sep: str, skip: list[int], width: int, encoding: str, what: str) -> None:
    """DataFileError naming the first line of more non-empty fields than the header's ``width`` (a trailing
    separator, an empty last field, is fine)."""
    import csv

    skipped = set(skip)
    with _opener(path)(path, "rt", encoding=encoding, newline="") as handle:
        lines = (line for n, line in enumerate(handle) if n not in skipped)
        next(lines, None)  # the header
        for n, line in enumerate(lines):
            fields = line.split() if sep == " " else next(csv.reader([line], delimiter=sep), [])
            extra = [f for f in fields[width:] if f.strip()]
            if extra:
                raise DataFileError(f"{what}: line {_file_line(n, skip)} of {path!r} holds {len(fields)} fields, the "
                                    f"header {width}: extra {extra[:3]}; expected one value per header column")


def _file_line(i: int, skip: list[int]) -> int:
    """The 1-based file line of data line ``i`` (0-based, after the header) when ``skip`` lines are skipped."""
    read = np.ones(i + len(skip) + 2, dtype=bool)
    read[[r for r in skip if r < read.size]] = False
    return int(np.flatnonzero(read)[i + 1]) + 1


def _opener(path: str):
    """``open``, or the opener of the file's compression (by extension)."""
    return {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}.get(os.path.splitext(path)[1].lower(), open)


def _file_start(path: str, what: str) -> bytes:
    """The first 8 bytes of the file (decompressed), which say what it is whatever its name: Parquet, a
    spreadsheet, Arrow, or text with a UTF-16 byte-order mark."""
    try:
        with _opener(path)(path, "rb") as handle:
            return handle.read(8)
    except (OSError, EOFError, lzma.LZMAError) as exc:
        raise DataFileError(f"{what}: can't read {path!r}: {exc}") from None


def _header(path: str, skip: list[int], what: str, encoding: str = "utf-8") -> tuple[str, list[int]]:
    """The header line of a CSV file, and ``skip`` with the blank and ``#`` comment lines above the header."""
    skip = list(skip)
    try:
        with _opener(path)(path, "rt", encoding=encoding, errors="replace") as handle:
            for n, line in enumerate(handle):
                if n in skip:
                    continue
                if line.strip("\ufeff \t\r\n") and not line.lstrip("\ufeff \t").startswith("#"):
                    return line, sorted(skip)
                skip.append(n)
    except (OSError, EOFError, lzma.LZMAError) as exc:
        raise DataFileError(f"{what}: can't read {path!r}: {exc}") from None
    raise DataFileError(f"{what}: {path!r} holds no header line; expected a table with a header")


def _sniff_delimiter(header: str, delimiter: str, path: str, what: str) -> str:
    """``delimiter``, or the one of ``, ; tab |`` that the header line holds more often, or whitespace."""
    if delimiter == " ":
        return delimiter
    counts = {d: header.count(d) for d in TABLE_DELIMITERS}
    best = max(TABLE_DELIMITERS, key=lambda d: counts[d])
    if counts[best] == 0 and header.count(delimiter) == 0 and len(header.split()) > 1:
        best = " "
    elif counts[best] <= header.count(delimiter):
        return delimiter
    log.info("%s: the header of %r is separated by %r, not %r: read with %r", what, path, best, delimiter, best)
    return best


def _bare(name: str) -> str:
    """A column name without units in brackets, case, and space: ``Q [m3/s]`` → ``q``, ``Site ID`` → ``site_id``."""
    return re.sub(r"[\s\-]+", "_", re.sub(r"[\(\[\{][^\)\]\}]*[\)\]\}]", " ", name).strip().lower())


def _find_column(table: UserTable, name: str, what: str, required: bool = True) -> str | None:
    """The column of ``table`` that ``name`` means: the exact name, else the one that equals it in any case or
    without units in brackets, else (for a default name) one of its usual other names (``latitude`` for ``lat``)."""
    columns = [str(c) for c in table.frame.columns]
    if name in columns:
        return name
    aliases = {_bare(a) for a in COLUMN_ALIASES.get(name, ())}
    for matches in ([c for c in columns if c.lower() == name.lower()], [c for c in columns if _bare(c) == _bare(name)],
                    [c for c in columns if _bare(c) in aliases]):
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise DataFileError(f"{what}: {table.path!r} has several columns that could be {name!r}: {matches}; "
                                "expected one (give its exact name in the config)")
    if not required:
        return None
    close = difflib.get_close_matches(name, columns, n=3)
    raise DataFileError(f"{what}: {table.path!r} has no column {name!r} (columns there: {columns})"
                        + (f"; did you mean {close}?" if close else ""))


def _numbers(table: UserTable, column: str, what: str) -> np.ndarray:
    """Column ``column`` as float64 ``[R]``, NaN for empty fields and missing-value text (``NA``, ``nan``, ``-``
    ...); DataFileError naming the line and the first value that is not a number."""
    import pandas as pd

    raw = table.frame[column]
    if pd.api.types.is_numeric_dtype(raw) and not pd.api.types.is_bool_dtype(raw):
        return np.require(raw.to_numpy(dtype=np.float64, na_value=np.nan), requirements="W")
    text = raw
    if table.decimal_comma and pd.api.types.is_string_dtype(raw) and raw.str.contains(",", regex=False).any():
        text = raw.str.replace(",", ".", regex=False)  # a number with both '.' and ',' stays unread
    out = np.require(pd.to_numeric(text, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan),
                     requirements="W")  # a view of Arrow memory is read-only
    unread = np.flatnonzero(np.isnan(out))
    if unread.size == 0:
        return out
    cells = raw.iloc[unread].astype(str).str.strip()
    missing = raw.iloc[unread].isna().to_numpy() | cells.str.lower().isin(MISSING_TEXT).to_numpy()
    unread, cells = unread[~missing], cells[~missing]
    cells = cells.str.replace("\u2212", "-", regex=False)  # the Unicode minus of typeset or localised exports
    thousands, decimal = (".", ",") if table.decimal_comma else (",", ".")
    plain = cells.where(~cells.str.fullmatch(rf"[+-]?\d{{1,3}}(?:\{thousands}\d{{3}})+\{decimal}\d*"),
                        cells.str.replace(thousands, "", regex=False))  # 1,234.5 (or 1.234,5): thousands separators
    if table.decimal_comma:
        plain = plain.str.replace(",", ".", regex=False)
    found = pd.to_numeric(plain, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    read = ~np.isnan(found)
    out[unread[read]] = found[read]
    unread = unread[~read]
    if unread.size:
        value = raw.iloc[unread[0]]
        hint = ""
        if re.fullmatch(r"[+-]?\d{1,3}(?:,\d{3})+", str(value).strip()) and not table.decimal_comma:
            hint = (" (a thousands separator or a decimal comma? write numbers without thousands separators and "
                    "with a decimal point)")
        elif "," in str(value) and not table.decimal_comma:
            hint = " (decimal commas are read in files separated by ';' or tabs)"
        elif "," in str(value) and "." in str(value):
            hint = " (without thousands separators)"
        elif table.csv and unread[0] == 0:
            hint = f" (for a line of units or names under the header, skip_rows: [{int(table.places[0]) - 1}])"
        raise DataFileError(f"{what}: column {column!r} of {table.path!r} holds {value!r} on "
                            f"{table.where(unread[0])}; expected a number{hint} or a missing-value marker")
    return out


def _factorize_text(table: UserTable, column: str) -> tuple[np.ndarray, list[str]]:
    """``(codes [R] int64, distinct values as stripped text)`` of a column; code -1 = an empty or missing field.
    Integers (and whole floats of a Parquet column) are written without a fraction."""
    import pandas as pd

    codes, uniques = pd.factorize(table.frame[column])
    text = []
    for u in uniques:
        if isinstance(u, (int, np.integer)) and not isinstance(u, bool):
            text.append(str(int(u)))
        elif isinstance(u, (float, np.floating)) and math.isfinite(u) and float(u).is_integer():
            text.append(str(int(u)))
        else:
            text.append(str(u).strip())
    missing = np.array([t.lower() in MISSING_TEXT for t in text] + [True])  # the last entry: code -1
    return np.where(missing[codes], -1, codes).astype(np.int64), text


def _site_ids(table: UserTable, column: str, what: str) -> tuple[np.ndarray, list[str]]:
    """``(codes [R], ids)`` of the site id column; DataFileError naming the first row without an id."""
    codes, ids = _factorize_text(table, column)
    if (codes < 0).any():
        i = int(np.flatnonzero(codes < 0)[0])
        value = table.frame[column].iloc[i]
        value = value.item() if isinstance(value, np.generic) else value  # nan, not np.float64(nan)
        raise DataFileError(f"{what}: column {column!r} of {table.path!r} holds {value!r} on {table.where(i)}; "
                            "expected a site id")
    return codes, ids


def _parse_dates(text, date_format: str, column: str, table: UserTable, what: str):
    """Distinct date texts → ``(DatetimeIndex (NaT = does not parse), what was expected)``: ``date_format``, or
    ISO 8601, or the one of :data:`DATE_FORMATS` that reads every text (DataFileError when two read them
    differently, as ``05/01/2001`` day first and month first)."""
    import pandas as pd

    if date_format:  # exactly, else at the start of the text (a time of day after the date)
        parsed = pd.to_datetime(text, format=date_format, errors="coerce")
        if parsed.isna().any():
            parsed = parsed.where(~parsed.isna(), pd.to_datetime(text, format=date_format, exact=False,
                                                                 errors="coerce"))
        return pd.DatetimeIndex(parsed), f"dates in the format {date_format!r}"
    expected = f"ISO 8601 dates (YYYY-MM-DD) or one of {list(DATE_FORMATS)}; set date_format for others"
    iso = _iso_dates(text)
    if not iso.isna().any():
        return iso, expected
    fits = []
    for fmt in DATE_FORMATS:
        parsed = pd.to_datetime(text, format=fmt, exact=False, errors="coerce")
        if not parsed.isna().any():
            fits.append((fmt, parsed))
    if not fits:
        return iso, expected
    differ = [f for f, parsed in fits[1:] if not parsed.equals(fits[0][1])]
    if differ:
        example = next(t for t, a, b in zip(text, fits[0][1], dict(fits)[differ[0]], strict=True) if a != b)
        raise DataFileError(f"{what}: the dates of column {column!r} of {table.path!r} (such as {example!r}) read "
                            f"as {fits[0][0]!r} and as {differ[0]!r}; set date_format to say which")
    return fits[0][1], expected


def _iso_dates(text):
    """Date texts → DatetimeIndex by ISO 8601 (NaT = not ISO), each at its local date: a zone after a time of day
    is dropped, so offsets that change within the column (summer time) read too."""
    import pandas as pd

    try:
        return pd.DatetimeIndex(pd.to_datetime(text, format="ISO8601", errors="coerce"))
    except (ValueError, TypeError):  # offsets that differ between rows
        local = pd.Index(text).str.replace(ISO_ZONE, "", regex=True)
        try:
            return pd.DatetimeIndex(pd.to_datetime(local, format="ISO8601", errors="coerce"))
        except (ValueError, TypeError):
            return pd.DatetimeIndex([pd.NaT] * len(text))


def _dates(table: UserTable, column: str, date_format: str, what: str) -> np.ndarray:
    """Column ``column`` as int64 days since 1970-01-01 ``[R]`` (a time of day is dropped; a time zone kept as
    the local date); DataFileError naming the line and the first date that is empty or does not parse."""
    import pandas as pd

    raw = table.frame[column]
    if pd.api.types.is_datetime64_any_dtype(raw):
        values = raw.dt.tz_localize(None) if getattr(raw.dt, "tz", None) is not None else raw
        if values.isna().any():
            i = int(np.flatnonzero(values.isna().to_numpy())[0])
            raise DataFileError(f"{what}: column {column!r} of {table.path!r} has no date on {table.where(i)}")
        return to_days(values.to_numpy().astype("datetime64[D]"))
    codes, text = _factorize_text(table, column)
    if (codes < 0).any():
        i = int(np.flatnonzero(codes < 0)[0])
        raise DataFileError(f"{what}: column {column!r} of {table.path!r} holds {raw.iloc[i]!r} on {table.where(i)}; "
                            "expected a date")
    parsed, expected = _parse_dates(pd.Index(text), date_format, column, table, what)
    if parsed.tz is not None:
        parsed = parsed.tz_localize(None)
    bad = np.asarray(parsed.isna())
    if bad.any():
        i = int(np.flatnonzero(bad[codes])[0])
        serial = re.fullmatch(r"\d{5}(?:\.\d*)?", str(raw.iloc[i]).strip())  # 36892: 2001-01-01 in a spreadsheet
        hint = " (a spreadsheet's day number? format the column as dates before saving)" if serial else ""
        raise DataFileError(f"{what}: column {column!r} of {table.path!r} holds {raw.iloc[i]!r} on {table.where(i)}, "
                            f"which does not parse{hint}; expected {expected}")
    return to_days(parsed.to_numpy().astype("datetime64[D]"))[codes]


def _date_from_parts(table: UserTable, what: str) -> np.ndarray | None:
    """Days ``[R]`` from year, month and day columns, or None when the table has not all three."""
    import pandas as pd

    columns = [next((c for c in table.frame.columns if _bare(str(c)) in names), None) for names in DATE_PARTS]
    if any(c is None for c in columns):
        return None
    parts = np.stack([_numbers(table, c, what) for c in columns], axis=1)  # [R, 3]
    whole = np.isfinite(parts).all(axis=1) & (parts == np.round(parts)).all(axis=1)
    parts = np.where(whole[:, None], parts, 1)
    dates = pd.to_datetime(pd.DataFrame({"year": parts[:, 0], "month": parts[:, 1], "day": parts[:, 2]}),
                           errors="coerce")
    bad = ~whole | dates.isna().to_numpy()
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        given = "-".join(str(table.frame[c].iloc[i]) for c in columns)
        raise DataFileError(f"{what}: columns {columns} of {table.path!r} hold {given!r} on {table.where(i)}, which "
                            "is no date; expected year, month and day")
    return to_days(dates.to_numpy().astype("datetime64[D]"))


def _looks_like_a_date(text: str) -> bool:
    import pandas as pd

    if not pd.isna(pd.to_datetime(text, format="ISO8601", errors="coerce")):
        return True
    return any(not pd.isna(pd.to_datetime(text, format=fmt, exact=False, errors="coerce")) for fmt in DATE_FORMATS)


def _drop_units_row(table: UserTable, numeric: list[str], date: str | None, what: str) -> None:
    """Drop the table's first row when it holds units (or other text) rather than data: no ``numeric`` column
    holds a number there, at least one holds text, and ``date`` (if given) holds no date."""
    import pandas as pd

    if not len(table.frame) or not table.csv or not numeric:
        return
    cells = [str(table.frame[c].iloc[0]).strip() for c in numeric]
    numbers = pd.to_numeric(pd.Series([c.replace(",", ".").replace("\u2212", "-") for c in cells]), errors="coerce")
    if numbers.notna().any() or all(c.lower() in MISSING_TEXT for c in cells):
        return
    if date is not None and _looks_like_a_date(str(table.frame[date].iloc[0]).strip()):
        return
    log.info("%s: %s of %r holds %s under the header, no values: read as a units line and skipped", what,
             table.where(0), table.path, cells)
    table.keep(np.arange(len(table.frame)) > 0)


@dataclass
class SiteTable:
    """A site table as read: every row, whether or not the gauge data uses the site.

    Attributes:
        path: the file.
        ids: the S site ids, in table order.
        coords: configured coordinate column name → float64 ``[S]`` (NaN = not given).
        attrs: float64 ``[S, A]`` attributes (NaN = unknown).
        where: ``[S]`` each site's place in the file (``line 7``, ``row 5``).
    """

    path: str
    ids: list[str]
    coords: dict[str, np.ndarray]
    attrs: np.ndarray
    where: list[str]

    def __iter__(self):
        """Unpacks as ``ids, coords, attrs``."""
        return iter((self.ids, self.coords, self.attrs))


def read_site_table(path: str, table: SiteTableSource, what: str) -> SiteTable:
    """A site table (CSV or Parquet, read as :func:`read_user_table`): ids, coordinates and attributes; a row that
    repeats a site with the same coordinates and attributes is read once (logged); DataFileError naming the line
    and value of a row without an id, an id listed twice with other values, a non-number."""
    t = read_user_table(path, table.delimiter, table.skip_rows, what)
    id_column = _find_column(t, table.id_column, what)
    names = {"latlon": (table.lat_column, table.lon_column), "rowcol": (table.row_column, table.col_column),
             "xy": (table.y_column, table.x_column)}[table.coords]
    coord_columns = [_find_column(t, n, what) for n in names]
    attr_columns = [_find_column(t, a, what) for a in table.attributes]
    _drop_units_row(t, coord_columns + attr_columns, None, what)
    codes, text = _site_ids(t, id_column, what)
    used = coord_columns + attr_columns
    seen: dict[str, int] = {}
    repeats = np.zeros(len(codes), dtype=bool)
    for i, site in enumerate(text[c] for c in codes):
        if site in seen:
            j = seen[site]
            differ = [c for c in used if str(t.frame[c].iloc[i]).strip() != str(t.frame[c].iloc[j]).strip()]
            if differ:
                raise DataFileError(f"{what}: {path!r} lists site {site!r} twice ({t.where(j)} and {t.where(i)}), with "
                                    f"other {differ[0]!r} ({t.frame[differ[0]].iloc[j]!r} and "
                                    f"{t.frame[differ[0]].iloc[i]!r}); expected one row per site")
            repeats[i] = True
        else:
            seen[site] = i
    if repeats.any():
        first = int(np.flatnonzero(repeats)[0])
        log.warning("%s: %r repeats %d rows of sites listed before with the same values (the first on %s): read once",
                    what, path, int(repeats.sum()), t.where(first))
        t.keep(~repeats)
        codes = codes[~repeats]
    ids = [text[c] for c in codes]
    markers = list(table.missing_values)
    coords = {name: mark_missing(_numbers(t, column, what), markers)
              for name, column in zip(names, coord_columns, strict=True)}
    attrs = np.stack([_numbers(t, c, what) for c in attr_columns], axis=1) if attr_columns \
        else np.zeros((len(ids), 0))
    return SiteTable(path, ids, coords, mark_missing(attrs, markers), [t.where(i) for i in range(len(ids))])


def _match_sites(names: list[str], codes: np.ndarray, known: dict[str, int], table: UserTable, site_table: str,
                 what: str) -> np.ndarray:
    """Site-table index (int64) of each distinct gauge-table id ``names``: the same text, else, for ids of digits
    only (or ending in ``.0``), the same number when one site-table id has it (``1022500`` or ``1022500.0`` for
    ``01022500``, ``0001`` for ``1.0``: leading zeros lost by a spreadsheet, a number column on either side).
    DataFileError naming the first row of an id in neither form, with the site-table ids of its number or the
    one that differs only in case or in its other characters (``USGS-01022500``)."""
    index = np.array([known.get(n, -1) for n in names], dtype=np.int64)
    unknown = np.flatnonzero(index < 0)
    if unknown.size:
        by_number: dict[int, list[str]] = {}
        for site in known:
            number = id_number(site)
            if number is not None:
                by_number.setdefault(number, []).append(site)
        matched = []
        for u in unknown:
            number = id_number(names[u])
            candidates = by_number.get(number, []) if number is not None else []
            if len(candidates) == 1:
                index[u] = known[candidates[0]]
                matched.append(names[u])
        if matched:
            log.warning("%s: %r names sites %s that the site table %r writes otherwise (leading zeros or a "
                        "fraction): matched by number", what, table.path, matched[:10], site_table)
    if (index < 0).any():
        i = int(np.flatnonzero(index[codes] < 0)[0])
        name = names[codes[i]]
        number = id_number(name)
        same = by_number.get(number, []) if number is not None else []
        digits = re.sub(r"\D", "", name)
        alike = [site for site in known if site.lower() == name.lower()] or \
            [site for site in known if digits and re.sub(r"\D", "", site).lstrip("0") == digits.lstrip("0")]
        hint = f" (the site table has {same} of that number and can't tell which)" if same else \
            f" (the site table writes {alike[0]!r})" if len(alike) == 1 else ""
        raise DataFileError(f"{what}: {table.path!r} names site {name!r} on {table.where(i)}, which is not in the "
                            f"site table {site_table!r}{hint}; expected every gauge in the site table")
    return index


def read_gauge_table(path: str, src: SiteSetSource, known: dict[str, int], what: str
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A long gauge table → ``(site index [R] into known, day [R], values [R, F] float64)``; DataFileError naming
    the row and value of an unknown site, an unparseable date, a duplicate (site, date) or a non-number."""
    t = read_user_table(path, src.delimiter, src.skip_rows, what)
    site_column = _find_column(t, src.site_column, what, required=False)
    if site_column is None:
        columns = [str(c) for c in t.frame.columns]
        sites = [c for c in columns if c in known]
        shown = f"{columns[:12]}{' ...' if len(columns) > 12 else ''}"
        wide = (f"; its columns {sites[:5]} are sites of the site table: a wide table (one column per site) must be "
                "written long first (pandas.melt)") if sites else ""
        raise DataFileError(f"{what}: {path!r} has no site id column {src.site_column!r} (columns there: {shown}); "
                            f"expected a long table, one row per site and day, of the columns site id, date and "
                            f"{list(src.variables)}{wide}")
    date_column = _find_column(t, src.date_column, what, required=False)
    value_columns = [_find_column(t, v, what) for v in src.variables]
    _drop_units_row(t, value_columns, date_column, what)
    codes, names = _site_ids(t, site_column, what)
    index = _match_sites(names, codes, known, t, src.sites.path, what)[codes]
    days = _dates(t, date_column, src.date_format, what) if date_column is not None else _date_from_parts(t, what)
    if days is None:
        raise DataFileError(f"{what}: {path!r} has no column {src.date_column!r} and no year, month and day columns "
                            f"(columns there: {[str(c) for c in t.frame.columns]}); expected the dates")
    _warn_stray_dates(days, t, what)
    key = index * 10**7 + (days - days.min() if days.size else days)
    order = np.argsort(key, kind="stable")
    repeated = np.flatnonzero(np.diff(key[order]) == 0)
    if repeated.size:
        first, second = int(order[repeated[0]]), int(order[repeated[0] + 1])
        hint = ""
        if date_column is not None:
            stamps = [str(t.frame[date_column].iloc[r]).strip() for r in (first, second)]
            if stamps[0] != stamps[1]:
                hint = f" (at {stamps[0]!r} and {stamps[1]!r}: daily values are expected, not sub-daily ones)"
        raise DataFileError(f"{what}: {path!r} gives site {names[codes[second]]!r} on {day_to_iso(days[second])} "
                            f"twice ({t.where(first)} and {t.where(second)}){hint}; expected one row per site and "
                            "date")
    values = np.stack([_numbers(t, c, what) for c in value_columns], axis=1) if value_columns \
        else np.zeros((index.size, 0))
    values = mark_missing(values, list(src.missing_values))  # [R, F]
    bad = _bad_value(values, [src.transforms.get(v, src.transform) for v in src.variables])
    if bad is not None:
        (r, f), why = bad
        column = value_columns[f]
        raise DataFileError(f"{what}: column {column!r} of {path!r} holds {t.frame[column].iloc[r]!r} on "
                            f"{t.where(r)}, {why}")
    return index, days, values


def _warn_stray_dates(days: np.ndarray, table: UserTable, what: str) -> None:
    """Log the rows (under 1 % of the table) whose dates lie beyond a gap of more than :data:`STRAY_YEARS` years
    from all the others at the start or the end of the record: most likely a mistyped year, which would stretch
    the record (and its memory) over the gap."""
    distinct = np.unique(days)
    gaps = np.flatnonzero(np.diff(distinct) > STRAY_YEARS * 365.25)
    if not gaps.size:
        return
    for stray in (days > distinct[gaps[-1]], days < distinct[gaps[0] + 1]):  # [R] beyond the last / first gap
        if 0 < stray.sum() < 0.01 * days.size:
            i = int(np.flatnonzero(stray)[0])
            log.warning("%s: %r gives %d rows beyond a gap of more than %d years from all other dates (the first on "
                        "%s, %s): a mistyped year? The record, and the site values kept in memory, run over the gap",
                        what, table.path, int(stray.sum()), STRAY_YEARS, table.where(i), day_to_iso(int(days[i])))


def _bad_value(values: np.ndarray, transforms: Sequence[str]) -> tuple[tuple[int, int], str] | None:
    """The first ``(row, column)`` of ``values`` ``[R, F]`` (missing values already NaN) that is no measurement,
    and why: beyond float32, one of readers.FILL_VALUES (either sign, to 1e-6 relative), or -1 or less in a column
    transformed by ``log1p``; None when every value is fine."""
    with np.errstate(invalid="ignore"):
        magnitude = np.abs(values)  # [R, F]
        huge = magnitude > np.finfo(np.float32).max
        fill = fill_value_hits(values)
        low = (values <= -1.0) & np.array([tr == "log1p" for tr in transforms], dtype=bool)  # [R, F]
    for found, why in ((huge, "beyond float32"), (fill, "a fill value for no data")):
        if found.any():
            r, f = (int(a[0]) for a in np.nonzero(found))
            return (r, f), f"{why}; expected a measurement (or add the value to missing_values)"
    if low.any():
        r, f = (int(a[0]) for a in np.nonzero(low))
        return (r, f), ("which the transform log1p can't take; expected values above -1 for a log1p variable (or "
                        "add the value to missing_values, or set its transform to none)")
    return None


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


def _wrap_degrees(delta):
    """Longitude differences brought into [-180, 180)."""
    return (delta + 180.0) % 360.0 - 180.0


def _position_2d(lat: np.ndarray, lon: np.ndarray, grid_lat: np.ndarray, grid_lon: np.ndarray) -> tuple[float, float]:
    """Fractional (row, col) of one point on a grid of 2-D cell-centre coordinates: the nearest centre, refined by
    the local linear map between neighbouring centres."""
    scale = math.cos(math.radians(float(lat)))
    d2 = (grid_lat - lat) ** 2 + (_wrap_degrees(grid_lon - lon) * scale) ** 2
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
        step = a[hi] - a[lo]
        return float(_wrap_degrees(step) if a is grid_lon else step) / steps

    jac = np.array([[derivative(grid_lat, 0), derivative(grid_lat, 1)],
                    [derivative(grid_lon, 0) * scale, derivative(grid_lon, 1) * scale]])
    if h == 1 or w == 1 or abs(np.linalg.det(jac)) < 1e-12:
        return i + 0.5, j + 0.5
    delta = np.linalg.solve(jac, [lat - grid_lat[i, j], _wrap_degrees(lon - grid_lon[i, j]) * scale])
    return i + 0.5 + float(delta[0]), j + 0.5 + float(delta[1])


def place_sites(coords: dict[str, np.ndarray], table: SiteTableSource, reader: GridReader | None,
                frame: tuple[int, int], ids: list[str], path: str, what: str,
                where: Sequence[str] = ()) -> tuple[np.ndarray, np.ndarray]:
    """Site coordinates → float64 ``(rows [S], cols [S])`` in the grid frame; DataFileError naming the first site
    with a latitude beyond ±90 or that lies outside the grid (and its place in the file, ``where[i]``, when
    given), with the grid's extent, and a hint when latitude and longitude swapped would place it inside.

    Longitudes are compared modulo 360 (a table in 0..360 on a grid in -180..180, or the other way round). A site
    given by latitude/longitude or x/y exactly on the grid's outer edge belongs to the edge cell; row/col
    coordinates are the frame itself, so row H (or column W) is outside."""
    if table.coords == "latlon":
        lat = coords[table.lat_column]
        beyond = np.flatnonzero(np.abs(lat) > 90)
        if beyond.size:
            i = int(beyond[0])
            raise DataFileError(f"{what}: site {ids[i]!r} of {path!r}{f' ({where[i]})' if len(where) else ''} has "
                                f"{table.lat_column}={lat[i]:g}, which is no latitude"
                                f"{' (metres of a projection? set coords: xy)' if abs(lat[i]) > 1000 else ''}; "
                                "expected -90..90")
    rows, cols, extent = _frame_position(coords, table, reader, frame, what)
    outside = ~((rows >= 0) & (rows < frame[0]) & (cols >= 0) & (cols < frame[1]))
    if outside.any():
        i = int(np.flatnonzero(outside)[0])
        given = ", ".join(f"{n}={coords[n][i]:g}" for n in coords)
        line = f", {where[i]}" if len(where) else ""
        spans = f"; the grid's cell centres span {extent}" if extent else ""
        if table.coords == "latlon" and abs(coords[table.lon_column][i]) <= 90:
            swapped = {table.lat_column: coords[table.lon_column][i:i + 1].copy(),
                       table.lon_column: coords[table.lat_column][i:i + 1].copy()}
            r, c, _ = _frame_position(swapped, table, reader, frame, what)
            if 0 <= r[0] < frame[0] and 0 <= c[0] < frame[1]:
                spans += " (latitude and longitude swapped?)"
        raise DataFileError(f"{what}: site {ids[i]!r} of {path!r} ({given}) lies outside the {frame[0]}x{frame[1]} "
                            f"grid (at row {rows[i]:.2f}, col {cols[i]:.2f} of the grid frame{line}){spans}; expected "
                            "every site inside the grid")
    return rows.astype(np.float64), cols.astype(np.float64)


def _frame_position(coords: dict[str, np.ndarray], table: SiteTableSource, reader: GridReader | None,
                    frame: tuple[int, int], what: str) -> tuple[np.ndarray, np.ndarray, str]:
    """Site coordinates → ``(rows [S], cols [S], the grid's extent)`` in the grid frame, inside or not (a site
    on the outer edge to 1e-6 cells moved into the edge cell); the extent is a phrase of the cell centres' span
    (empty for row/col)."""
    extent = ""
    if table.coords == "rowcol":
        return coords[table.row_column], coords[table.col_column], extent
    if reader is None:
        raise DataFileError(f"{what}: sites given by {table.coords} need a grid to place them on; give row/col "
                            "coordinates (coords: rowcol) or a grid")
    ys, xs = (reader.coords[a] for a in (0, 1))
    if reader.crop is not None:
        y0, y1, x0, x1 = reader.crop
        ys, xs = (None if ys is None else ys[y0:y1]), (None if xs is None else xs[x0:x1])
    one_d = ys is not None and xs is not None and any(reader.longitude)
    if table.coords == "xy" or one_d:
        if ys is None or xs is None or min(ys.size, xs.size) < 2:
            raise DataFileError(f"{what}: the grid in {reader.path!r} has no 1-D y and x coordinates of 2 cells "
                                f"or more ({reader.dims}); expected them to place sites by {table.coords}")
        if table.coords == "xy":
            y, x = coords[table.y_column], coords[table.x_column]
            extent = f"y {float(ys.min()):g}..{float(ys.max()):g}, x {float(xs.min()):g}..{float(xs.max()):g}"
        else:
            y, x = coords[table.lat_column], coords[table.lon_column]
            lats, lons = (ys, xs) if reader.longitude[1] else (xs, ys)
            middle = (float(lons.min()) + float(lons.max())) / 2
            x = middle + _wrap_degrees(x - middle)
            if not reader.longitude[1]:  # dims (lon, lat): rows run along longitude
                y, x = x, y
            extent = (f"latitude {float(lats.min()):g}..{float(lats.max()):g}, longitude {float(lons.min()):g}.."
                      f"{float(lons.max()):g}")
        rows, cols = _axis_position(y, ys), _axis_position(x, xs)
    else:
        grid_lat, grid_lon = _latlon_2d(reader, what)
        extent = (f"latitude {float(grid_lat.min()):g}..{float(grid_lat.max()):g}, longitude "
                  f"{float(grid_lon.min()):g}..{float(grid_lon.max()):g}")
        placed = [_position_2d(a, o, grid_lat, grid_lon)
                  for a, o in zip(coords[table.lat_column], coords[table.lon_column], strict=True)]
        rows = np.array([p[0] for p in placed])
        cols = np.array([p[1] for p in placed])
    edge = 1e-6  # on the outer edge, to rounding: in the edge cell
    for pos, n in ((rows, frame[0]), (cols, frame[1])):
        on_edge = ((pos >= -edge) & (pos < 0)) | ((pos >= n) & (pos <= n + edge))
        pos[on_edge] = np.clip(pos[on_edge], 0.0, np.nextafter(n, 0))
    return rows, cols, extent


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
    sites = read_site_table(table_path, src.sites, f"{what} site table")
    ids = sites.ids
    known = {s: i for i, s in enumerate(ids)}
    if src.format in ("csv", "parquet"):
        path = resolve_path(path_of(src.path), what)
        paths.append(path)
        site_index, days, values = read_gauge_table(path, src, known, what)
    else:
        parts, absent = [], []
        for s, site in enumerate(ids):
            try:
                path = resolve_path(path_of(src.path.replace("{site}", site)), f"{what} site {site!r}")
            except FileNotFoundError as exc:
                absent.append(exc)
                continue
            paths.append(path)
            reader_fn = read_mhm_gauge if src.format == "mhm_gauge" else read_camels_streamflow
            table = reader_fn(path, list(src.missing_values), f"{what} site {site!r}")
            parts.append((np.full(table.days.size, s), table.days, table.values))
        if not parts:
            raise absent[0]
        if absent:
            log.warning("%s: %d sites of the site table have no file, left out (%s)", what, len(absent), absent[0])
        site_index = np.concatenate([p[0] for p in parts])
        days = np.concatenate([p[1] for p in parts])
        values = np.concatenate([p[2] for p in parts])
    named = np.zeros(len(ids), dtype=bool)
    named[site_index] = True
    observed = np.zeros(len(ids), dtype=bool)
    observed[site_index[np.isfinite(values).any(axis=1)]] = True
    no_rows = ~named if src.format in ("csv", "parquet") else np.zeros(len(ids), dtype=bool)  # files: logged above
    for absent, why in ((no_rows, "have no row in the gauge data: left out"),
                        (named & ~observed, "have rows but no value: kept, never a token")):
        if absent.any():
            log.warning("%s: %d sites of the site table %s (%s%s)", what, int(absent.sum()), why,
                        [ids[s] for s in np.flatnonzero(absent)][:10], " ..." if absent.sum() > 10 else "")
    if not observed.any():
        raise DataFileError(f"{what}: no site of the site table {table_path!r} has a value in the gauge data; "
                            "expected one row per site and day with observed values")
    keep = np.flatnonzero(named)
    coords = {name: values[keep] for name, values in sites.coords.items()}
    for name, given in coords.items():
        if not np.isfinite(given).all():
            i = int(np.flatnonzero(~np.isfinite(given))[0])
            raise DataFileError(f"{what} site table: column {name!r} of {table_path!r} has no value for site "
                                f"{ids[keep[i]]!r} on {sites.where[keep[i]]}; expected the coordinates of every "
                                "site the gauge data names")
    given = np.concatenate([np.stack(list(coords.values()), axis=1), sites.attrs[keep]], axis=1)  # [S, 2 + A]
    bad = _bad_value(given, ["none"] * given.shape[1])
    if bad is not None:
        (r, f), why = bad
        column = [*coords, *src.sites.attributes][f]
        raise DataFileError(f"{what} site table: column {column!r} of {table_path!r} holds {given[r, f]:g} for site "
                            f"{ids[keep[r]]!r} on {sites.where[keep[r]]}, {why}")
    if frame is None:
        if src.sites.coords != "rowcol":
            raise DataFileError(f"{what}: a region without grids needs site coordinates as row/col (coords: rowcol)")
        frame = tuple(int(math.floor(coords[c].max())) + 1 for c in (src.sites.row_column, src.sites.col_column))
    rows, cols = place_sites(coords, src.sites, reader, frame, [ids[s] for s in keep], table_path,
                             f"{what} site table", [sites.where[s] for s in keep])
    bad = _bad_value(values, [src.transforms.get(v, src.transform) for v in src.variables])
    if bad is not None:  # per-site files (a gauge table is checked as it is read)
        (r, f), why = bad
        site = ids[site_index[r]]
        raise DataFileError(f"{what}: {path_of(src.path.replace('{site}', site))!r} gives site {site!r} on "
                            f"{day_to_iso(days[r])} the {src.variables[f]!r} value {values[r, f]:g}, {why}")
    remap = np.full(len(ids), -1)
    remap[keep] = np.arange(keep.size)
    first, last = int(days.min()), int(days.max())
    dense = np.full((last - first + 1, keep.size, len(src.variables)), np.nan, dtype=np.float32)
    dense[days - first, remap[site_index]] = values
    return SiteSetData(
        name=src.name, ids=[ids[s] for s in keep], rows=rows, cols=cols, first_day=first, values=dense,
        variables=list(src.variables), transforms=[src.transforms.get(v, src.transform) for v in src.variables],
        per_site=list(src.per_site), flow=list(src.flow), attr_names=list(src.sites.attributes),
        attrs=sites.attrs[keep], grouping=src.grouping, source=path_of(src.path),
        unused=[ids[s] for s in np.flatnonzero(~named)])


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
        self._warn_windows_without_grids()

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
            p0, p1 = self.region.periods.get(self.split, (d0, d1))
            period = f"{day_to_iso(d0)}..{day_to_iso(d1)}" if d1 >= d0 else \
                f"{day_to_iso(p0)}..{day_to_iso(p1)} (data.region.split.{self.split}), outside"
            raise DataFileError(
                f"the {self.split} split holds no window of data.steps={self.steps} days: its period is "
                f"{period} ({max(d1 - d0 + 1, 0)} days) of the record "
                f"{day_to_iso(self.region.record[0])}..{day_to_iso(self.region.record[1])} ({self.region.describe}); "
                f"expected a {self.split} period of at least {self.steps} days, a shorter data.steps, or other "
                "split dates")
        return starts

    def _warn_windows_without_grids(self) -> None:
        """Log the windows that hold no day of any grid (the site sets' data run beyond the grids)."""
        spans = [g.days for g in self.region.grids.values()]
        if not spans:
            return
        starts = np.asarray(self.starts)
        bare = np.ones(starts.size, dtype=bool)
        for first, last in spans:
            bare &= (starts + self.steps - 1 < first) | (starts > last)
        if bare.any():
            log.warning("%s split: %d of %d windows (from %s) hold no day of any grid (the grids cover %s): their "
                        "samples carry site values only; set data.region.split inside the grids' days to leave them "
                        "out", self.split, int(bare.sum()), starts.size, day_to_iso(int(starts[bare][0])),
                        ", ".join(f"{n} {day_to_iso(a)}..{day_to_iso(b)}" for n, (a, b) in
                                  zip(self.region.grids, spans, strict=True)))

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
            stats["modalities"][name] = self._channel_stats(name, "grid", r.grid_transforms[name], sums, d0, d1,
                                                            getattr(grid, "source", ""), grid.days)
        for s in r.site_sets:
            x = self._days(s, d0, d1)  # [L, S, F] physical
            sums = np.zeros((3, len(s.variables)))
            per_site: dict[str, dict[str, list[float]]] = {}
            for f, tr in enumerate(s.transforms):
                v = apply_transform(x[..., f].astype(np.float64), tr)  # [L, S]
                finite = np.isfinite(v)
                sums[:, f] = (finite.sum(), np.where(finite, v, 0).sum(), np.where(finite, v * v, 0).sum())
                if s.variables[f] in s.per_site:
                    count = finite.sum(axis=0)
                    mean = np.where(finite, v, 0).sum(axis=0) / np.maximum(count, 1)
                    var = np.where(finite, (v - mean) ** 2, 0).sum(axis=0) / np.maximum(count, 1)
                    per_site[s.variables[f]] = {site: [float(mean[i]), float(math.sqrt(var[i]))]
                                                for i, site in enumerate(s.ids)
                                                if count[i] >= 2 and math.sqrt(var[i]) > 1e-6 * max(1, abs(mean[i]))}
            observed = np.flatnonzero(np.isfinite(s.values).any(axis=(1, 2)))
            covered = (s.first_day + int(observed[0]), s.first_day + int(observed[-1])) if observed.size else None
            entry = self._channel_stats(s.name, "sites", s.transforms, sums, d0, d1, s.source, covered)
            if per_site:
                entry["per_site"] = per_site
            stats["modalities"][s.name] = entry
            layout = build_layout(s.ids, s.rows, s.cols, s.grouping.method, group_size=s.grouping.size,
                                  groups_file=self._grouping_file(s.grouping), seed=s.grouping.seed,
                                  unused=s.unused)
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

    def _channel_stats(self, name: str, kind: str, transforms: list[str], sums: np.ndarray, d0: int, d1: int,
                       source: str = "", covered: tuple[int, int] | None = None) -> dict:
        means, stds = [], []
        for c, channel in enumerate(self.channel_names[name]):
            count, s1, s2 = sums[:, c]
            if count == 0:
                where = f" ({source})" if source else ""
                span = f" (its data run {day_to_iso(covered[0])}..{day_to_iso(covered[1])})" if covered else ""
                raise DataFileError(f"{kind} {name!r}{where}: {channel!r} has no valid value in the training period "
                                    f"{day_to_iso(d0)}..{day_to_iso(d1)}{span}; expected observed values there")
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
        with np.errstate(over="ignore"):
            for f, tr in enumerate(entry.transforms):
                values[..., f] = (apply_transform(values[..., f], tr) - mean[:, f]) / std[:, f]
        if np.isinf(values).any():
            day, site, f = (int(a[0]) for a in np.nonzero(np.isinf(values)))
            raise DataFileError(f"site set {s.name!r} ({s.source or 'synthetic'}): {s.variables[f]!r} of site "
                                f"{order[site]!r} on {day_to_iso(d0 + day)} is {x[day, position[order[site]], f]:g}, "
                                f"beyond float32 once standardised (mean {mean[site, f]:g}, std {std[site, f]:g}); "
                                "expected a measurement (or add the value to missing_values)")
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
