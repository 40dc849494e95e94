"""Region files as users write them: `;` and decimal commas, units lines, bracketed and spaced column names,
missing-value markers, dates in several formats or in year/month/day columns, ids with leading zeros, sites
without rows, unsorted rows, longitudes in 0..360, descending latitudes, sites on the grid's edge, constant
and absent variables, Parquet dates of every kind, a table of a million rows. Every error names the file, the
line (or Parquet row) and the value; no sample holds an infinity."""

import csv
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from crossmae.config import SiteSetSource, SiteTableSource, resolve_config
from crossmae.data.readers import DataFileError, iso_to_day
from crossmae.data.region import RegionDataset, read_gauge_table, read_site_table
from crossmae.data.sites import ungroup_values
from crossmae.engine import Trainer

ROOT = Path(__file__).resolve().parents[1]
DAYS = 60
FIRST = np.datetime64("2001-01-01")
SITES = {"a": (49.96, 7.01, 100.0), "b": (49.51, 7.41, 220.0), "c": (49.73, 7.22, 150.0)}


def flow(s: int, d: int) -> float:
    return 1.0 + s + 0.25 * (d % 7)


def evap(s: int, d: int) -> float:
    return 0.5 * s + 0.125 * (d % 5)


def write_grid(folder: Path, lat=None, lon=None, name: str = "grid.nc") -> None:
    """A 6 x 5 grid of 1-D latitude (north first unless ``lat`` says otherwise) and longitude, one sea cell."""
    import xarray as xr

    lat = 50.0 - np.arange(6) * 0.1 if lat is None else np.asarray(lat, dtype=np.float64)
    lon = 7.0 + np.arange(5) * 0.1 if lon is None else np.asarray(lon, dtype=np.float64)
    rain = np.random.default_rng(0).gamma(0.6, 4.0, (DAYS, 6, 5)).astype(np.float32)
    mask = np.ones((6, 5))
    mask[0, 0] = np.nan
    xr.Dataset({"pre": (("time", "lat", "lon"), rain), "mask": (("lat", "lon"), mask)},
               coords={"time": (FIRST + np.arange(DAYS)).astype("datetime64[ns]"),
                       "lat": ("lat", lat, {"units": "degrees_north"}),
                       "lon": ("lon", lon, {"units": "degrees_east"})}).to_netcdf(folder / name, engine="h5netcdf")


def write_tidy_sites(folder: Path, sites: dict = SITES) -> None:
    lines = ["site_id,lat,lon,area"] + [f"{s},{la},{lo},{ar}" for s, (la, lo, ar) in sites.items()]
    (folder / "sites.csv").write_text("\n".join(lines) + "\n")


def gauge_rows(sites=("a", "b", "c")) -> list[tuple[str, int, float, float]]:
    return [(site, d, flow(s, d), evap(s, d)) for s, site in enumerate(sites) for d in range(DAYS)]


def data_section(folder: Path, site_set: dict, sites: dict | None = None) -> dict:
    gauges = {"name": "gauges", "format": "csv", "path": "gauges.csv", "variables": ["flow", "evap"],
              "flow": ["flow"], "sites": {"path": "sites.csv", "attributes": ["area"]},
              "grouping": {"method": "kmeans", "size": 2}}
    gauges.update(site_set)
    gauges["sites"] = {**{"path": "sites.csv", "attributes": ["area"]}, **(sites or {})}
    return {"source": "region", "steps": 10, "stride": 10, "patch_size": 2, "batch_size": 2, "region": {
        "synthetic": "", "root": str(folder),
        "grids": [{"name": "pre", "path": "grid.nc", "mask_variable": "mask", "transform": "log1p"}],
        "site_sets": [gauges],
        "split": {"train": ["2001-01-01", "2001-01-31"], "val": ["2001-02-01", "2001-03-01"]}}}


def open_region(folder: Path, data: dict, split: str = "train", norm_stats=None) -> RegionDataset:
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump({"data": data}))
    return RegionDataset(resolve_config(None, str(path), []).data, split, norm_stats=norm_stats)


def physical(ds: RegionDataset) -> dict[str, np.ndarray]:
    """Site id → its physical values ``[DAYS, F]`` from 2001-01-01, as the region read them."""
    s = ds.region.site_sets[0]
    start = iso_to_day("2001-01-01") - s.first_day
    out = {}
    for i, site in enumerate(s.ids):
        values = np.full((DAYS, len(s.variables)), np.nan, dtype=np.float32)
        part = s.values[max(start, 0):start + DAYS, i]
        values[max(-start, 0):max(-start, 0) + part.shape[0]] = part
        out[site] = values
    return out


def expected(sites=("a", "b", "c")) -> dict[str, np.ndarray]:
    return {site: np.array([[flow(s, d), evap(s, d)] for d in range(DAYS)], dtype=np.float32)
            for s, site in enumerate(sites)}


def assert_no_infinity(ds: RegionDataset) -> None:
    for i in range(len(ds)):
        sample = ds[i]
        for name, x in {**sample.grids, **sample.sites, **sample.site_static}.items():
            assert not torch.isinf(x).any(), (name, i)


def site_position(ds: RegionDataset, site: str) -> tuple[float, float]:
    layout = ds.site_layouts["gauges"]
    g, k = next((g, k) for g, group in enumerate(layout.ids) for k, s in enumerate(group) if s == site)
    return float(layout.rows[g, k]), float(layout.cols[g, k])


# -- delimiters, decimal commas, units lines, column names, missing markers ---------------------------------
def test_semicolons_decimal_commas_units_lines_and_bracketed_spaced_names(tmp_path):
    """A European export: `;`, decimal commas, a units line under each header, names with units and spaces,
    `NA`/`nan`/empty/`-`/-9999/-999 as missing, an extra text column, a BOM, a trailing `;;;` line."""
    write_grid(tmp_path)
    site_lines = [" Site ID ; Latitude [deg] ; Longitude [deg] ; Area (km2) ", " - ; °N ; °E ; km² "]
    site_lines += [f"{s};{str(la).replace('.', ',')};{str(lo).replace('.', ',')};{str(ar).replace('.', ',')}"
                   for s, (la, lo, ar) in SITES.items()]
    (tmp_path / "sites.csv").write_text("\n".join(site_lines) + "\n", encoding="utf-8")
    markers = ["NA", "nan", "", "-", "-9999", "-999,0"]
    lines = [" site_id ; date ; Q [m3/s] ; evap (mm/d) ; quality flag ", " ; ; m3/s ; mm/d ; "]
    gone = {}
    for n, (site, d, q, e) in enumerate(gauge_rows()):
        q_text = f"{q:.4f}".replace(".", ",")
        if site == "b" and d % 9 == 2:
            q_text = markers[(d // 9) % len(markers)]
            gone[(site, d)] = True
        lines.append(f"{site};{FIRST + d};{q_text};{str(e).replace('.', ',')};{'ok' if n % 3 else 'estimated'}")
    lines.append(";;;;")
    (tmp_path / "gauges.csv").write_text("\ufeff" + "\n".join(lines) + "\n", encoding="utf-8")
    data = data_section(tmp_path, {"delimiter": ";", "variables": ["Q", "evap"], "flow": ["Q"]},
                        {"delimiter": ";", "coords": "latlon", "attributes": ["area"]})
    ds = open_region(tmp_path, data)
    want = expected()
    for site, d in gone:
        want[site][d, 0] = np.nan
    got = physical(ds)
    for site in want:
        np.testing.assert_allclose(got[site], want[site], rtol=1e-6, err_msg=site)
    np.testing.assert_allclose(ds.region.site_sets[0].attrs[:, 0], [100.0, 220.0, 150.0])
    assert site_position(ds, "a") == pytest.approx((0.9, 0.6))
    assert_no_infinity(ds)


def test_a_semicolon_file_read_with_the_default_delimiter_and_a_latin1_file(tmp_path, caplog):
    """The header shows the separator when the config keeps the default ','; a file saved as Latin-1 (a
    spreadsheet's `m³/s`) with Windows line ends reads as well as UTF-8."""
    write_grid(tmp_path)
    write_tidy_sites(tmp_path)
    lines = ["site_id;date;flow [m³/s];evap"] + [f"{s};{FIRST + d};{q};{e}" for s, d, q, e in gauge_rows()]
    (tmp_path / "gauges.csv").write_bytes(("\r\n".join(lines) + "\r\n").encode("latin-1"))  # Windows lines
    with caplog.at_level(logging.INFO, logger="crossmae.data.region"):
        ds = open_region(tmp_path, data_section(tmp_path, {}))
    assert "separated by ';'" in caplog.text
    got = physical(ds)
    for site, values in expected().items():
        np.testing.assert_allclose(got[site], values, rtol=1e-6)


def test_skip_rows_and_blank_lines_keep_the_line_numbers_a_user_sees(tmp_path):
    """Two lines above the header skipped by skip_rows, a blank line and a line of only separators: a bad value
    is reported on its real line of the file."""
    write_grid(tmp_path)
    write_tidy_sites(tmp_path)
    lines = ["# exported 2024-05-01", "# station network X", "site_id,date,flow,evap"]
    lines += [f"{s},{FIRST + d},{q},{e}" for s, d, q, e in gauge_rows()[:5]]
    lines += ["", ",,,"]
    lines += [f"{s},{FIRST + d},{q},{e}" for s, d, q, e in gauge_rows()[5:]]
    good = "\n".join(lines) + "\n"
    (tmp_path / "gauges.csv").write_text(good)
    data = data_section(tmp_path, {"skip_rows": [0, 1]})
    got = physical(open_region(tmp_path, data))
    for site, values in expected().items():
        np.testing.assert_allclose(got[site], values, rtol=1e-6)
    bad = lines.copy()
    bad[11] = "a,2001-01-07,1.0,twelve"  # file line 12, after the blank and the empty line
    (tmp_path / "gauges.csv").write_text("\n".join(bad) + "\n")
    with pytest.raises(DataFileError, match=r"column 'evap' of '.*gauges.csv' holds 'twelve' on line 12; expected a "
                                            r"number"):
        open_region(tmp_path, data)


def test_a_units_line_keeps_the_line_numbers(tmp_path):
    write_grid(tmp_path)
    write_tidy_sites(tmp_path)
    lines = ["site_id,date,flow,evap", "[-],[yyyy-mm-dd],[m3/s],[mm/d]"]
    lines += [f"{s},{FIRST + d},{q},{e}" for s, d, q, e in gauge_rows()]
    lines[4] = "a,2001-01-03,1..0,0.1"
    (tmp_path / "gauges.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataFileError, match=r"column 'flow' of '.*gauges.csv' holds '1..0' on line 5; expected"):
        open_region(tmp_path, data_section(tmp_path, {}))


def test_a_first_data_row_with_text_is_an_error_not_a_units_line(tmp_path):
    write_grid(tmp_path)
    write_tidy_sites(tmp_path)
    lines = ["site_id,date,flow,evap", "a,2001-01-01,high,low"] + [f"{s},{FIRST + d},{q},{e}"
                                                                     for s, d, q, e in gauge_rows()[1:]]
    (tmp_path / "gauges.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataFileError, match=r"column 'flow' of '.*gauges.csv' holds 'high' on line 2; expected a "
                                            r"number \(for a line of units or names under the header, skip_rows: "
                                            r"\[1\]\)"):
        open_region(tmp_path, data_section(tmp_path, {}))


@pytest.mark.parametrize("case,line,message", [
    ("decimal_comma_in_a_comma_file", "a,2001-01-03,\"1,5\",0.1",
     r"column 'flow' of '.*gauges.csv' holds '1,5' on line 4; expected a number \(decimal commas are read in files "
     r"separated by ';' or tabs\)"),
    ("no_date", "a,,1.0,0.1", r"column 'date' of '.*gauges.csv' holds '' on line 4; expected a date"),
    ("no_site", " ,2001-01-03,1.0,0.1", r"column 'site_id' of '.*gauges.csv' holds '' on line 4; expected a site id"),
    ("beyond_float32", "a,2001-01-03,1e39,0.1",
     r"column 'flow' of '.*gauges.csv' holds '1e39' on line 4, beyond float32"),
    ("bad_date", "a,2001-13-03,1.0,0.1",
     r"column 'date' of '.*gauges.csv' holds '2001-13-03' on line 4, which does not parse"),
])
def test_bad_gauge_rows_name_the_file_line_and_value(tmp_path, case, line, message):
    write_grid(tmp_path)
    write_tidy_sites(tmp_path)
    lines = ["site_id,date,flow,evap"] + [f"{s},{FIRST + d},{q},{e}" for s, d, q, e in gauge_rows()]
    lines[3] = line
    (tmp_path / "gauges.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataFileError, match=message):
        open_region(tmp_path, data_section(tmp_path, {}))


def test_a_missing_column_and_an_ambiguous_one_are_named(tmp_path):
    write_grid(tmp_path)
    write_tidy_sites(tmp_path)
    lines = ["site_id,date,Q [m3/s],Q [l/s],evap"] + [f"{s},{FIRST + d},{q},{q * 1000},{e}"
                                                       for s, d, q, e in gauge_rows()]
    (tmp_path / "gauges.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataFileError, match=r"gauges.csv' has several columns that could be 'Q': \['Q \[m3/s\]', "
                                            r"'Q \[l/s\]'\]"):
        open_region(tmp_path, data_section(tmp_path, {"variables": ["Q", "evap"], "flow": ["Q"]}))
    with pytest.raises(DataFileError, match=r"gauges.csv' has no column 'flow' \(columns there: \['site_id', 'date', "
                                            r"'Q \[m3/s\]', 'Q \[l/s\]', 'evap'\]\)"):
        open_region(tmp_path, data_section(tmp_path, {}))
    ds = open_region(tmp_path, data_section(tmp_path, {"variables": ["Q [l/s]", "evap"], "flow": ["Q [l/s]"]}))
    np.testing.assert_allclose(physical(ds)["b"][:, 0], expected()["b"][:, 0] * 1000, rtol=1e-6)


# -- dates ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("style", ["iso", "dotted", "slashed_unpadded", "with_time", "compact", "with_zone",
                                   "us_month_first", "parts"])
def test_dates_as_users_write_them(tmp_path, style):
    write_grid(tmp_path)
    write_tidy_sites(tmp_path)

    def date(d: int) -> str:
        day = (FIRST + d).astype(object)
        return {"iso": f"{day:%Y-%m-%d}", "dotted": f"{day:%d.%m.%Y}", "slashed_unpadded": f"{day.year}/{day.month}/"
                f"{day.day}", "with_time": f"{day:%Y-%m-%d} 00:00", "compact": f"{day:%Y%m%d}",
                "with_zone": f"{day:%Y-%m-%d}T00:00:00+01:00", "us_month_first": f"{day:%m/%d/%Y}",
                "parts": f"{day.year},{day.month},{day.day}"}[style]

    header = "site_id,year,month,day,flow,evap" if style == "parts" else "site_id,date,flow,evap"
    lines = [header] + [f"{s},{date(d)},{q},{e}" for s, d, q, e in gauge_rows()]
    (tmp_path / "gauges.csv").write_text("\n".join(lines) + "\n")
    ds = open_region(tmp_path, data_section(tmp_path, {}))
    assert ds.region.site_sets[0].first_day == iso_to_day("2001-01-01")
    got = physical(ds)
    for site, values in expected().items():
        np.testing.assert_allclose(got[site], values, rtol=1e-6)


def test_day_first_or_month_first_is_asked_when_the_dates_allow_both(tmp_path):
    write_grid(tmp_path)
    write_tidy_sites(tmp_path)
    lines = ["site_id,date,flow,evap"]
    lines += [f"{s},{(FIRST + d).astype(object):%d/%m/%Y},{q},{e}" for s, d, q, e in gauge_rows() if d < 12]
    (tmp_path / "gauges.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataFileError, match=r"dates of column 'date' of '.*gauges.csv' \(such as '02/01/2001'\) read "
                                            r"as '%d/%m/%Y' and as '%m/%d/%Y'; set date_format"):
        open_region(tmp_path, data_section(tmp_path, {}))
    data = data_section(tmp_path, {"date_format": "%d/%m/%Y"})
    data["steps"] = 5
    data["region"]["split"] = {"train": ["2001-01-01", "2001-01-06"], "val": ["2001-01-07", "2001-01-12"]}
    s = open_region(tmp_path, data).region.site_sets[0]
    assert s.first_day == iso_to_day("2001-01-01") and s.values.shape[0] == 12
    lines[1:] = [line.replace("/2001,", "/2001 09:00,") for line in lines[1:]]  # a time after the date_format
    (tmp_path / "gauges.csv").write_text("\n".join(lines) + "\n")
    s = open_region(tmp_path, data).region.site_sets[0]
    assert s.first_day == iso_to_day("2001-01-01") and s.values.shape[0] == 12


def test_year_month_day_columns_with_an_impossible_date(tmp_path):
    write_grid(tmp_path)
    write_tidy_sites(tmp_path)
    lines = ["site_id,YYYY,MM,DD,flow,evap", "a,2001,2,30,1.0,0.5"]
    (tmp_path / "gauges.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataFileError, match=r"columns \['YYYY', 'MM', 'DD'\] of '.*gauges.csv' hold '2001-2-30' on "
                                            r"line 2, which is no date"):
        open_region(tmp_path, data_section(tmp_path, {}))


@pytest.mark.parametrize("kind", ["datetime64", "string", "date32", "zoned", "index", "categorical_nullable"])
def test_parquet_dates_of_every_kind(tmp_path, kind):
    pytest.importorskip("pyarrow")
    import pandas as pd

    write_grid(tmp_path)
    write_tidy_sites(tmp_path)
    rows = gauge_rows()[::-1]  # unsorted: newest first
    dates = pd.to_datetime([str(FIRST + d) for _, d, _, _ in rows])
    column = {"datetime64": dates, "string": [str(FIRST + d) for _, d, _, _ in rows],
              "date32": [t.date() for t in dates], "zoned": dates.tz_localize("Europe/Berlin"),
              "index": dates, "categorical_nullable": dates}[kind]
    frame = pd.DataFrame({"site_id": [r[0] for r in rows], "date": column, "flow": [r[2] for r in rows],
                          "evap": [r[3] for r in rows]})
    if kind == "index":
        frame = frame.set_index(["site_id", "date"])
    if kind == "categorical_nullable":  # ids as a dictionary column, values as nullable floats with pd.NA
        frame["site_id"] = frame["site_id"].astype("category")
        frame["flow"] = frame["flow"].astype("Float64")
        frame.loc[frame.index[:3], "flow"] = pd.NA
    frame.to_parquet(tmp_path / "gauges.parquet")
    ds = open_region(tmp_path, data_section(tmp_path, {"format": "parquet", "path": "gauges.parquet"}))
    got, want = physical(ds), expected()
    if kind == "categorical_nullable":  # the table's first rows: site c's last days
        want["c"][-3:, 0] = np.nan
    for site, values in want.items():
        np.testing.assert_allclose(got[site], values, rtol=1e-6)


# -- site ids and which sites are used ----------------------------------------------------------------------
def test_numeric_looking_ids_keep_their_leading_zeros(tmp_path):
    write_grid(tmp_path)
    ids = {"01022500": SITES["a"], "01030500": SITES["b"], "10000": SITES["c"]}
    write_tidy_sites(tmp_path, ids)
    lines = ["site_id,date,flow,evap"] + [f"{s},{FIRST + d},{q},{e}" for s, d, q, e in gauge_rows(tuple(ids))]
    (tmp_path / "gauges.csv").write_text("\n".join(lines) + "\n")
    ds = open_region(tmp_path, data_section(tmp_path, {}))
    assert sorted(ds.site_layouts["gauges"].site_ids) == ["01022500", "01030500", "10000"]
    saved = [s for group in ds.norm_stats["site_layouts"]["gauges"]["ids"] for s in group if s is not None]
    assert sorted(saved) == ["01022500", "01030500", "10000"]
    got = physical(ds)
    for site, values in expected(tuple(ids)).items():
        np.testing.assert_allclose(got[site], values, rtol=1e-6)


def test_ids_whose_leading_zeros_a_parquet_integer_column_lost_match_by_number(tmp_path, caplog):
    pytest.importorskip("pyarrow")
    import pandas as pd

    write_grid(tmp_path)
    ids = {"01022500": SITES["a"], "01030500": SITES["b"], "10000": SITES["c"]}
    write_tidy_sites(tmp_path, ids)
    rows = gauge_rows(tuple(ids))
    pd.DataFrame({"site_id": [int(r[0]) for r in rows], "date": [str(FIRST + r[1]) for r in rows],
                  "flow": [r[2] for r in rows], "evap": [r[3] for r in rows]}).to_parquet(tmp_path / "gauges.parquet")
    with caplog.at_level(logging.WARNING, logger="crossmae.data.region"):
        ds = open_region(tmp_path, data_section(tmp_path, {"format": "parquet", "path": "gauges.parquet"}))
    assert "leading zeros" in caplog.text and "1022500" in caplog.text
    assert sorted(ds.site_layouts["gauges"].site_ids) == ["01022500", "01030500", "10000"]
    # two site-table ids of the same number: no guessing, the row is named
    write_tidy_sites(tmp_path, {**ids, "001022500": SITES["b"]})
    with pytest.raises(DataFileError, match=r"gauges.parquet' names site '1022500' on row 0, which is not in the "
                                            r"site table"):
        open_region(tmp_path, data_section(tmp_path, {"format": "parquet", "path": "gauges.parquet"}))


def test_sites_without_rows_are_left_out_and_sites_without_values_kept(tmp_path, caplog):
    """A site table of more gauges than the gauge table: the extra ones are left out (logged); a site whose
    rows are all missing stays in the layout but is never a token; a variable missing at one site altogether
    reads as missing there only."""
    write_grid(tmp_path)
    write_tidy_sites(tmp_path, {**SITES, "x": (49.6, 7.1, 10.0), "y": (49.7, 7.2, 12.0)})
    lines = ["site_id,date,flow,evap"]
    for s, d, q, e in gauge_rows(("a", "b", "c", "y")):
        lines.append(f"{s},{FIRST + d},{'' if s == 'y' else q},{'NA' if s in 'cy' else e}")
    (tmp_path / "gauges.csv").write_text("\n".join(lines) + "\n")
    data = data_section(tmp_path, {"per_site": ["flow", "evap"]})
    with caplog.at_level(logging.WARNING, logger="crossmae.data.region"):
        train = open_region(tmp_path, data)
    assert "1 sites of the site table have no row in the gauge data: left out (['x'])" in caplog.text
    assert "1 sites of the site table have rows but no value: kept, never a token (['y'])" in caplog.text
    assert sorted(train.site_layouts["gauges"].site_ids) == ["a", "b", "c", "y"]
    assert "c" not in train.norm_stats["modalities"]["gauges"]["per_site"]["evap"]
    val = open_region(tmp_path, data, "val", norm_stats=train.norm_stats)
    for ds in (train, val):
        assert_no_infinity(ds)
        layout = ds.site_layouts["gauges"]
        order = {s: i for i, s in enumerate(layout.site_ids)}
        per_site = ungroup_values(ds[0].sites["gauges"], layout)  # [T, S, F]
        assert torch.isnan(per_site[:, order["y"]]).all() and torch.isnan(per_site[:, order["c"], 1]).all()
        assert torch.isfinite(per_site[:, order["c"], 0]).all() and torch.isfinite(per_site[:, order["a"]]).all()


def test_a_national_site_table_serves_a_regional_gauge_table(tmp_path):
    """Sites of the site table that the gauge data does not name may lie outside the grid or lack coordinates:
    they are left out, not refused."""
    write_grid(tmp_path)
    write_tidy_sites(tmp_path, {**SITES, "far": (40.0, -3.0, 1.0), "unplaced": (float("nan"), 7.2, 1.0)})
    lines = ["site_id,date,flow,evap"] + [f"{s},{FIRST + d},{q},{e}" for s, d, q, e in gauge_rows()]
    (tmp_path / "gauges.csv").write_text("\n".join(lines) + "\n")
    ds = open_region(tmp_path, data_section(tmp_path, {}))
    assert sorted(ds.site_layouts["gauges"].site_ids) == ["a", "b", "c"]
    (tmp_path / "gauges.csv").write_text("\n".join(lines) + f"\nfar,{FIRST},1.0,1.0\n")
    with pytest.raises(DataFileError, match=r"site 'far' of '.*sites.csv' \(lat=40, lon=-3\) lies outside"):
        open_region(tmp_path, data_section(tmp_path, {}))


def test_per_site_files_of_some_sites_only(tmp_path, caplog):
    """mHM gauge files for two of three sites: the third is left out (logged); none at all names the path."""
    write_grid(tmp_path)
    write_tidy_sites(tmp_path)
    for s, site in enumerate("ab"):
        lines = [f"gauge {site}", "nodata -9999", "n 1", "start 2001 01 01 00 00", "end 2001 03 01 00 00"]
        lines += [f"{(FIRST + d).astype(object):%Y %m %d} 00 00 {flow(s, d)}" for d in range(DAYS)]
        (tmp_path / f"q_{site}.txt").write_text("\n".join(lines) + "\n")
    data = data_section(tmp_path, {"format": "mhm_gauge", "path": "q_{site}.txt", "variables": ["flow"]})
    with caplog.at_level(logging.WARNING, logger="crossmae.data.region"):
        ds = open_region(tmp_path, data)
    assert "1 sites of the site table have no file" in caplog.text and "q_c.txt" in caplog.text
    assert sorted(ds.site_layouts["gauges"].site_ids) == ["a", "b"]
    np.testing.assert_allclose(physical(ds)["b"][:, 0], expected()["b"][:, 0], rtol=1e-6)
    data["region"]["site_sets"][0]["path"] = "flow_{site}.txt"
    with pytest.raises(FileNotFoundError, match=r"site 'a'.*flow_a.txt' does not exist"):
        open_region(tmp_path, data)


def test_a_gauge_table_of_no_observation_is_refused(tmp_path):
    write_grid(tmp_path)
    write_tidy_sites(tmp_path)
    (tmp_path / "gauges.csv").write_text("site_id,date,flow,evap\na,2001-01-01,NA,\n")
    with pytest.raises(DataFileError, match=r"no site of the site table '.*sites.csv' has a value in the gauge data"):
        open_region(tmp_path, data_section(tmp_path, {}))


def test_unsorted_rows_and_extra_columns_read_as_the_tidy_table(tmp_path):
    write_grid(tmp_path)
    write_tidy_sites(tmp_path)
    rows = gauge_rows()
    order = np.random.default_rng(3).permutation(len(rows))
    lines = ["station name,site_id,flag,date,flow,evap,comment"]
    lines += [f"\"River {rows[i][0]}, at X\",{rows[i][0]},A,{FIRST + rows[i][1]},{rows[i][2]},{rows[i][3]},ok"
              for i in order]
    (tmp_path / "gauges.csv").write_text("\n".join(lines) + "\n")
    got = physical(open_region(tmp_path, data_section(tmp_path, {})))
    for site, values in expected().items():
        np.testing.assert_allclose(got[site], values, rtol=1e-6)


# -- placing sites on the grid ------------------------------------------------------------------------------
def test_longitudes_in_0_360_and_descending_or_ascending_latitudes(tmp_path):
    """A grid across the prime meridian in -180..180 with a site table in 0..360 (and the other way round);
    north-first and south-first latitudes place a site in the same geographic cell."""
    lons = -0.2 + np.arange(5) * 0.1  # -0.2 .. 0.2
    table = {"a": (49.96, 359.81, 1.0), "b": (49.51, 0.19, 2.0), "c": (49.73, 359.99, 3.0)}
    positions = {}
    for order, lat in (("north_first", 50.0 - np.arange(6) * 0.1), ("south_first", 49.5 + np.arange(6) * 0.1)):
        for convention, grid_lon, sites in (("site_0_360", lons, table),
                                            ("grid_0_360", np.mod(lons, 360.0),
                                             {s: (la, lo - 360.0 if lo > 180 else lo, a)
                                              for s, (la, lo, a) in table.items()})):
            folder = tmp_path / f"{order}_{convention}"
            folder.mkdir()
            write_grid(folder, lat=lat, lon=grid_lon)
            write_tidy_sites(folder, sites)
            lines = ["site_id,date,flow,evap"] + [f"{s},{FIRST + d},{q},{e}" for s, d, q, e in gauge_rows()]
            (folder / "gauges.csv").write_text("\n".join(lines) + "\n")
            ds = open_region(folder, data_section(folder, {}))
            positions[order, convention] = {s: site_position(ds, s) for s in table}
    north = np.array([positions["north_first", "site_0_360"][s] for s in "abc"])  # [S, 2]
    np.testing.assert_allclose(north, [(0.9, 0.6), (5.4, 4.4), (3.2, 2.4)], atol=1e-9)
    for (order, convention), placed in positions.items():
        got = np.array([placed[s] for s in "abc"])
        if order == "south_first":  # rows counted from the south: row r becomes 6 - r
            got[:, 0] = 6 - got[:, 0]
        np.testing.assert_allclose(got, north, atol=1e-9, err_msg=f"{order} {convention}")


def test_a_grid_stored_longitude_first(tmp_path):
    """Dims (time, lon, lat): the frame's rows run along longitude, and sites are placed accordingly."""
    import xarray as xr

    lat, lon = 50.0 - np.arange(6) * 0.1, 7.0 + np.arange(5) * 0.1
    xr.Dataset({"pre": (("time", "lon", "lat"), np.ones((DAYS, 5, 6), dtype=np.float32)),
                "mask": (("lon", "lat"), np.ones((5, 6)))},
               coords={"time": (FIRST + np.arange(DAYS)).astype("datetime64[ns]"),
                       "lat": ("lat", lat, {"units": "degrees_north"}),
                       "lon": ("lon", lon, {"units": "degrees_east"})}).to_netcdf(tmp_path / "grid.nc",
                                                                                  engine="h5netcdf")
    write_tidy_sites(tmp_path)
    lines = ["site_id,date,flow,evap"] + [f"{s},{FIRST + d},{q},{e}" for s, d, q, e in gauge_rows()]
    (tmp_path / "gauges.csv").write_text("\n".join(lines) + "\n")
    ds = open_region(tmp_path, data_section(tmp_path, {}))
    assert ds.spec.grid_shape == (5, 6)
    np.testing.assert_allclose(site_position(ds, "a"), (0.6, 0.9), atol=1e-9)
    np.testing.assert_allclose(site_position(ds, "b"), (4.6, 5.4), atol=1e-9)


def test_projected_grid_with_2d_latitude_longitude_and_sites_in_0_360(tmp_path):
    import xarray as xr

    rows, cols = np.meshgrid(np.arange(6), np.arange(5), indexing="ij")
    lat2d = 50.0 - 0.1 * rows + 0.01 * cols  # slightly rotated
    lon2d = -0.2 + 0.1 * cols + 0.01 * rows
    rain = np.ones((DAYS, 6, 5), dtype=np.float32)
    xr.Dataset({"pre": (("time", "y", "x"), rain), "mask": (("y", "x"), np.ones((6, 5))),
                "lat": (("y", "x"), lat2d), "lon": (("y", "x"), lon2d)},
               coords={"time": (FIRST + np.arange(DAYS)).astype("datetime64[ns]")}).to_netcdf(
        tmp_path / "grid.nc", engine="h5netcdf")
    site_lat, site_lon = lat2d[3, 1], lon2d[3, 1]  # cell (3, 1)'s centre, west of the meridian
    write_tidy_sites(tmp_path, {"a": (site_lat, site_lon + 360.0, 1.0), "b": (lat2d[1, 4], lon2d[1, 4], 2.0)})
    lines = ["site_id,date,flow,evap"] + [f"{s},{FIRST + d},{q},{e}" for s, d, q, e in gauge_rows(("a", "b"))]
    (tmp_path / "gauges.csv").write_text("\n".join(lines) + "\n")
    ds = open_region(tmp_path, data_section(tmp_path, {}))
    assert site_position(ds, "a") == pytest.approx((3.5, 1.5), abs=1e-6)
    assert site_position(ds, "b") == pytest.approx((1.5, 4.5), abs=1e-6)


@pytest.mark.parametrize("lat,lon,cell", [
    (50.05, 7.0, (0, 0)),    # the northern edge
    (49.45, 7.2, (5, 2)),    # the southern edge: in the last row, not outside
    (49.7, 6.95, (3, 0)),    # the western edge
    (49.7, 7.45, (3, 4)),    # the eastern edge
    (49.45, 7.45, (5, 4)),   # the south-eastern corner
    (49.7, 6.96, (3, 0)),    # inside the first column's western half
])
def test_a_site_on_the_grid_edge_is_in_the_edge_cell(tmp_path, lat, lon, cell):
    write_grid(tmp_path)
    write_tidy_sites(tmp_path, {"a": (lat, lon, 1.0), "b": SITES["b"]})
    lines = ["site_id,date,flow,evap"] + [f"{s},{FIRST + d},{q},{e}" for s, d, q, e in gauge_rows(("a", "b"))]
    (tmp_path / "gauges.csv").write_text("\n".join(lines) + "\n")
    row, col = site_position(open_region(tmp_path, data_section(tmp_path, {})), "a")
    assert (int(np.floor(row)), int(np.floor(col))) == cell


def test_a_site_past_the_edge_is_outside(tmp_path):
    write_grid(tmp_path)
    write_tidy_sites(tmp_path, {"a": (49.449, 7.2, 1.0), "b": SITES["b"]})
    (tmp_path / "gauges.csv").write_text("site_id,date,flow,evap\na,2001-01-01,1,1\n")
    with pytest.raises(DataFileError, match=r"site 'a' of '.*sites.csv' \(lat=49.449, lon=7.2\) lies outside the 6x5 "
                                            r"grid \(at row 6.01, col 2.50 of the grid frame, line 2\)"):
        open_region(tmp_path, data_section(tmp_path, {}))


def test_site_table_errors_name_the_line_and_value(tmp_path):
    write_grid(tmp_path)
    (tmp_path / "gauges.csv").write_text("site_id,date,flow,evap\na,2001-01-01,1,1\nb,2001-01-01,1,1\n")
    for table, message in [
        ("site_id;lat;lon;area\na;49,96;7,01;100\nb;49.5.1;7,41;220\n",
         r"column 'lat' of '.*sites.csv' holds '49.5.1' on line 3; expected a number"),
        ("site_id;lat;lon;area\na;49,96;7,01;100\n;49,51;7,41;220\n",
         r"column 'site_id' of '.*sites.csv' holds '' on line 3; expected a site id"),
        ("site_id;lat;lon;area\na;49,96;7,01;100\nb;NA;7,41;220\n",
         r"column 'lat' of '.*sites.csv' has no value for site 'b' on line 3; expected the coordinates of every "
         r"site the gauge data names"),
    ]:
        (tmp_path / "sites.csv").write_text(table)
        with pytest.raises(DataFileError, match=message):
            open_region(tmp_path, data_section(tmp_path, {}, {"delimiter": ";"}))


def test_the_table_readers_directly(tmp_path):
    """read_site_table and read_gauge_table as a user's script would call them."""
    (tmp_path / "sites.csv").write_text("gauge_id\tLAT\tLONG\n01022500\t49,96\t7,01\n")
    table = read_site_table(str(tmp_path / "sites.csv"), SiteTableSource(delimiter="\t"), "sites")
    assert table.ids == ["01022500"] and table.where == ["line 2"] and table.attrs.shape == (1, 0)
    assert table.coords["lat"][0] == 49.96 and table.coords["lon"][0] == 7.01
    ids, coords, attrs = table
    assert ids is table.ids and coords is table.coords and attrs is table.attrs
    (tmp_path / "g.csv").write_text("Station;Time;Q\n01022500;05.01.2001 12:00;3,5\n1022500;06.01.2001 12:00;-9999\n")
    src = SiteSetSource(path="g.csv", delimiter=";", variables=["Q"], sites=SiteTableSource(path="sites.csv"))
    index, days, values = read_gauge_table(str(tmp_path / "g.csv"), src, {"01022500": 0}, "gauges")
    assert index.tolist() == [0, 0] and days.tolist() == [iso_to_day("2001-01-05"), iso_to_day("2001-01-06")]
    assert values[0, 0] == 3.5 and np.isnan(values[1, 0])


# -- statistics: constant and absent variables -------------------------------------------------------------
def test_a_constant_training_variable_at_one_site_gives_no_infinity(tmp_path):
    """Per-site normalisation of a site whose flow is constant in the training period (and one with a single
    training value) falls back to the all-site statistics; a variable constant at every site gets std 1."""
    write_grid(tmp_path)
    write_tidy_sites(tmp_path)
    lines = ["site_id,date,flow,evap"]
    for s, d, q, e in gauge_rows():
        train = d < 31
        q = 0.0 if (s == "b" and train) else q
        q = "" if (s == "c" and train and d != 4) else q
        lines.append(f"{s},{FIRST + d},{q},{0.0 if train else e}")
    (tmp_path / "gauges.csv").write_text("\n".join(lines) + "\n")
    data = data_section(tmp_path, {"per_site": ["flow", "evap"], "transforms": {"flow": "log1p"}})
    train = open_region(tmp_path, data)
    stats = train.norm_stats["modalities"]["gauges"]
    assert sorted(stats["per_site"]["flow"]) == ["a"] and not stats["per_site"].get("evap")
    assert stats["std"][1] == 1.0 and np.isfinite(stats["std"]).all()
    val = open_region(tmp_path, data, "val", norm_stats=train.norm_stats)
    for ds in (train, val):
        assert_no_infinity(ds)
        _, values = ds._site_values["gauges"]
        assert np.isfinite(values[~np.isnan(values)]).all() and np.nanmax(np.abs(values)) < 1e3
    layout = val.site_layouts["gauges"]
    order = {s: i for i, s in enumerate(layout.site_ids)}
    back = ungroup_values(val.denormalize("gauges", val[1].sites["gauges"]), layout)  # [T, S, F]
    np.testing.assert_allclose(back[:, order["b"], 0], [flow(1, d) for d in range(41, 51)], rtol=1e-5)


def test_the_synthetic_region_with_per_site_statistics_has_no_infinity():
    config = resolve_config("regional_small", None, ["data.region.per_site=[riverflow, evaporation]"])
    train = RegionDataset(config.data, "train")
    _, values = train._site_values["gauges"]
    assert not np.isinf(values).any() and np.isfinite(values).any()
    for i in (0, len(train) - 1):
        assert not torch.isinf(train[i].sites["gauges"]).any()


# -- a long table -------------------------------------------------------------------------------------------
LONG_TABLE_SCRIPT = textwrap.dedent("""
    import resource, sys, time
    import numpy as np
    from crossmae.config import SiteSetSource, SiteTableSource
    from crossmae.data.region import read_gauge_table
    path, sites, days = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    src = SiteSetSource(path=path, delimiter=";", variables=["Q", "evap"], sites=SiteTableSource(path="sites.csv"))
    known = {f"{s:08d}": s for s in range(sites)}
    t0 = time.perf_counter()
    index, day, values = read_gauge_table(path, src, known, "gauges")
    seconds = time.perf_counter() - t0
    assert index.size == sites * days and np.isnan(values).sum() == sites * days // 10
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"{seconds:.2f} {(peak - before) / 1024:.0f} {before / 1024:.0f}")
""")


@pytest.mark.slow
def test_a_table_of_a_million_rows_reads_in_reasonable_time_and_memory(tmp_path):
    """300 gauges x 3650 days (1,095,000 rows, `;`, decimal commas, ids with leading zeros, dd.mm.yyyy dates,
    missing markers), read in a fresh process: time and peak memory bounded."""
    sites, days = 300, 3650
    dates = (np.datetime64("2000-01-01") + np.arange(days)).astype("datetime64[D]").astype(str)
    dotted = np.array([f"{d[8:10]}.{d[5:7]}.{d[:4]}" for d in dates])
    rng = np.random.default_rng(0)
    q = rng.gamma(2.0, 3.0, (sites, days)).round(3).astype(str)
    flat = q.reshape(-1)
    flat[::10] = "-9999"
    q = np.char.replace(flat.reshape(sites, days), ".", ",")
    with open(tmp_path / "gauges.csv", "w") as handle:
        handle.write("site_id;date;Q [m3/s];evap [mm]\n")
        for s in range(sites):
            ids = np.full(days, f"{s:08d}")
            handle.write("\n".join(np.char.add(np.char.add(np.char.add(np.char.add(ids, ";"), dotted), ";"),
                                               np.char.add(q[s], ";0,5"))) + "\n")
    result = subprocess.run([sys.executable, "-c", LONG_TABLE_SCRIPT, str(tmp_path / "gauges.csv"), str(sites),
                             str(days)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    seconds, grown_mib, _ = (float(v) for v in result.stdout.split())
    assert seconds < 60, seconds
    assert grown_mib < 1500, grown_mib


def test_a_groups_file_as_a_spreadsheet_writes_it(tmp_path):
    """`;`, a byte-order mark, spaced header names, a blank line, ids with leading zeros."""
    write_grid(tmp_path)
    ids = {"01022500": SITES["a"], "01030500": SITES["b"], "10000": SITES["c"]}
    write_tidy_sites(tmp_path, ids)
    lines = ["site_id,date,flow,evap"] + [f"{s},{FIRST + d},{q},{e}" for s, d, q, e in gauge_rows(tuple(ids))]
    (tmp_path / "gauges.csv").write_text("\n".join(lines) + "\n")
    (tmp_path / "groups.csv").write_text("\ufeff Site_ID ; Group \n01022500;north\n\n01030500;south\n10000;north\n")
    data = data_section(tmp_path, {"grouping": {"method": "file", "file": "groups.csv"}})
    assert open_region(tmp_path, data).site_layouts["gauges"].ids == (("01022500", "10000"), ("01030500", None))
    (tmp_path / "groups.csv").write_text("site_id;group\n01022500;north\n\n1030500;south\n10000;north\n")
    with pytest.raises(ValueError, match=r"groups.csv' line 4: site '1030500' is not in the site table"):
        open_region(tmp_path, data)


@pytest.mark.parametrize("style", ["rdb", "aligned"])
def test_comment_lines_tabs_a_format_line_and_aligned_columns(tmp_path, style):
    """USGS RDB-like (`#` comments above a tab-separated header, a format line under it) and a table aligned
    with spaces, both with the config's default delimiter."""
    write_grid(tmp_path)
    write_tidy_sites(tmp_path)
    if style == "rdb":
        lines = ["\ufeff# U.S. Geological Survey", "# retrieved: 2024-05-01", "#", "site_id\tdate\tflow\tevap",
                 "5s\t10d\t14n\t14n"]
        lines += [f"{s}\t{FIRST + d}\t{q}\t{e}" for s, d, q, e in gauge_rows()]
        bad_line = 12  # a, day 6: after 3 comments, the header and the format line
    else:
        lines = ["site_id   date         flow     evap"]
        lines += [f"{s:<9} {FIRST + d}  {q:<8} {e}" for s, d, q, e in gauge_rows()]
        bad_line = 8
    (tmp_path / "gauges.csv").write_text("\n".join(lines) + "\n")
    got = physical(open_region(tmp_path, data_section(tmp_path, {})))
    for site, values in expected().items():
        np.testing.assert_allclose(got[site], values, rtol=1e-6)
    lines[bad_line - 1] = lines[bad_line - 1].replace("2001-01-07", "2001-01-77")
    (tmp_path / "gauges.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataFileError, match=rf"holds '2001-01-77' on line {bad_line}, which does not parse"):
        open_region(tmp_path, data_section(tmp_path, {}))


def test_sub_daily_rows_and_float_written_ids(tmp_path):
    """Two rows of one day (hourly data) are named with their time stamps; ids written from a float column
    (`1022500.0`) find their zero-padded site."""
    write_grid(tmp_path)
    write_tidy_sites(tmp_path, {"01022500": SITES["a"], "b": SITES["b"]})
    lines = ["site_id,date,flow,evap"] + [f"{s},{FIRST + d},{q},{e}" for s, d, q, e in gauge_rows(("a", "b"))]
    lines = [line.replace("a,", "1022500.0,", 1) for line in lines]
    (tmp_path / "gauges.csv").write_text("\n".join(lines) + "\n")
    ds = open_region(tmp_path, data_section(tmp_path, {}))
    assert sorted(ds.site_layouts["gauges"].site_ids) == ["01022500", "b"]
    lines[3:3] = ["b,2001-01-01 06:00,1.0,0.1", "b,2001-01-01 12:00,1.0,0.1"]
    lines = lines[:1] + [line for line in lines[1:] if not line.startswith(f"b,{FIRST},")]
    (tmp_path / "gauges.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataFileError, match=r"gives site 'b' on 2001-01-01 twice \(line 4 and line 5\) \(at "
                                            r"'2001-01-01 06:00' and '2001-01-01 12:00': daily values are expected"):
        open_region(tmp_path, data_section(tmp_path, {}))


def test_a_messy_region_trains_with_finite_losses(tmp_path):
    """All at once, end to end: `;` and decimal commas, units lines, ids with leading zeros, unsorted rows, a
    site table in 0..360 with latitude/longitude columns and a site without rows, a site constant in the
    training period under per-site statistics, a site with no value: five training steps, every loss finite."""
    write_grid(tmp_path)
    ids = {"01022500": SITES["a"], "01030500": SITES["b"], "00100": SITES["c"], "09999": (49.6, 7.1, 5.0)}
    lines = ["Site ID;Latitude;Longitude;Area [km2]", ";°N;°E;km2"]
    lines += [f"{s};{str(la).replace('.', ',')};{str(lo + 360).replace('.', ',')};{ar}"
              for s, (la, lo, ar) in ids.items()]
    (tmp_path / "sites.csv").write_text("\n".join(lines) + "\n")
    rows = gauge_rows(("01022500", "01030500", "00100"))
    rows = [rows[i] for i in np.random.default_rng(1).permutation(len(rows))]
    lines = ["site_id;date;Q [m3/s];evap [mm]", ";;m3/s;mm"]
    for s, d, q, e in rows:
        q = 2.0 if (s == "01030500" and d < 31) else q
        lines.append(f"{s};{(FIRST + d).astype(object):%d.%m.%Y};{str(q).replace('.', ',')};"
                     f"{'NA' if s == '00100' else str(e).replace('.', ',')}")
    (tmp_path / "gauges.csv").write_text("\n".join(lines) + "\n")
    data = data_section(tmp_path, {"delimiter": ";", "variables": ["Q", "evap"], "flow": ["Q"],
                                   "per_site": ["Q", "evap"], "transforms": {"Q": "log1p"}},
                        {"delimiter": ";", "attributes": ["area"]})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"data": data}))
    config = resolve_config(None, str(path), [
        "train.warmup_steps=1", "train.max_steps=5", "train.ckpt_every=5", "train.log_every=1",
        "train.device=cpu", "train.val_every=0", f"train.out_dir={tmp_path / 'run'}", "model.enc_dim=32",
        "model.enc_depth=1", "model.enc_heads=2", "model.dec_dim=32", "model.dec_depth=1", "model.dec_heads=2"])
    config.train.fused = True
    trainer = Trainer(config)
    assert sorted(trainer.train_set.site_layouts["gauges"].site_ids) == ["00100", "01022500", "01030500"]
    trainer.fit()
    with open(tmp_path / "run" / "metrics.csv", newline="") as handle:
        losses = [float(r["loss"]) for r in csv.DictReader(handle)]
    assert len(losses) == 5 and all(np.isfinite(losses)), losses


def test_a_value_that_overflows_once_standardised_is_named(tmp_path):
    write_grid(tmp_path)
    write_tidy_sites(tmp_path)
    lines = ["site_id,date,flow,evap"]
    for s, d, q, e in gauge_rows():
        q = 0.1 * (d % 2) if s == "a" else q
        lines.append(f"{s},{FIRST + d},{3e37 if (s == 'a' and d == 40) else q},{e}")
    (tmp_path / "gauges.csv").write_text("\n".join(lines) + "\n")
    data = data_section(tmp_path, {"per_site": ["flow"]})
    train = open_region(tmp_path, data)
    with pytest.raises(DataFileError, match=r"site set 'gauges' \(.*gauges.csv\): 'flow' of site 'a' on 2001-02-10 is "
                                            r"3e\+37, beyond float32 once standardised \(mean 0.048\d*, std 0.049"):
        open_region(tmp_path, data, "val", norm_stats=train.norm_stats)


def test_a_variable_without_a_training_value_names_the_file(tmp_path):
    write_grid(tmp_path)
    write_tidy_sites(tmp_path)
    lines = ["site_id,date,flow,evap"] + [f"{s},{FIRST + d},{q},{e if d > 31 else 'NA'}"
                                          for s, d, q, e in gauge_rows()]
    (tmp_path / "gauges.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataFileError, match=r"sites 'gauges' \(.*gauges.csv\): 'evap' has no valid value in the "
                                            r"training period 2001-01-01..2001-01-31"):
        open_region(tmp_path, data_section(tmp_path, {}))


def test_a_groups_file_of_the_whole_site_table(tmp_path):
    """A groups file made for the national site table: rows of sites the gauge data does not use are skipped;
    a site unknown to the site table is still named."""
    write_grid(tmp_path)
    write_tidy_sites(tmp_path, {**SITES, "far": (40.0, -3.0, 1.0)})
    lines = ["site_id,date,flow,evap"] + [f"{s},{FIRST + d},{q},{e}" for s, d, q, e in gauge_rows()]
    (tmp_path / "gauges.csv").write_text("\n".join(lines) + "\n")
    (tmp_path / "groups.csv").write_text("site_id,group\na,1\nfar,3\nb,2\nc,1\n")
    data = data_section(tmp_path, {"grouping": {"method": "file", "file": "groups.csv"}})
    assert open_region(tmp_path, data).site_layouts["gauges"].ids == (("a", "c"), ("b", None))
    (tmp_path / "groups.csv").write_text("site_id,group\na,1\nfar,3\nb,2\nc,1\nzz,2\n")
    with pytest.raises(ValueError, match=r"groups.csv' line 6: site 'zz' is not in the site table"):
        open_region(tmp_path, data)


def test_a_compressed_table_and_a_spreadsheet(tmp_path):
    import gzip

    write_grid(tmp_path)
    write_tidy_sites(tmp_path)
    lines = ["# comment", "site_id;date;flow;evap"] + [f"{s};{FIRST + d};{str(q).replace('.', ',')};{e}"
                                                      for s, d, q, e in gauge_rows()]
    with gzip.open(tmp_path / "gauges.csv.gz", "wt") as handle:
        handle.write("\n".join(lines) + "\n")
    got = physical(open_region(tmp_path, data_section(tmp_path, {"path": "gauges.csv.gz"})))
    for site, values in expected().items():
        np.testing.assert_allclose(got[site], values, rtol=1e-6)
    (tmp_path / "gauges.xlsx").write_bytes(b"PK\x03\x04")
    with pytest.raises(DataFileError, match=r"gauges.xlsx' is a spreadsheet; expected a CSV"):
        open_region(tmp_path, data_section(tmp_path, {"path": "gauges.xlsx"}))


def test_trailing_separators_and_lines_of_extra_fields(tmp_path):
    """A separator at the end of every data line (not the header) must not shift the columns; a line with an
    extra value is named."""
    write_grid(tmp_path)
    write_tidy_sites(tmp_path)
    lines = ["site_id,date,flow,evap"] + [f"{s},{FIRST + d},{q},{e}," for s, d, q, e in gauge_rows()]
    (tmp_path / "gauges.csv").write_text("\n".join(lines) + "\n")
    got = physical(open_region(tmp_path, data_section(tmp_path, {})))
    for site, values in expected().items():
        np.testing.assert_allclose(got[site], values, rtol=1e-6)
    lines[6] = lines[6] + "0.3"
    (tmp_path / "gauges.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataFileError, match=r"line 7 of '.*gauges.csv' holds 5 fields, the header 4: extra \['0.3'\]"):
        open_region(tmp_path, data_section(tmp_path, {"skip_rows": []}))


def test_two_columns_of_one_name_once_spaces_are_stripped(tmp_path):
    write_grid(tmp_path)
    write_tidy_sites(tmp_path)
    lines = ["site_id,date,flow, flow ,evap"] + [f"{s},{FIRST + d},{q},{q},{e}" for s, d, q, e in gauge_rows()]
    (tmp_path / "gauges.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataFileError, match=r"gauges.csv' names the columns \['flow'\] more than once"):
        open_region(tmp_path, data_section(tmp_path, {}))
