"""Region files the first tests did not write, as hydrologists' tools write them: a spreadsheet's CSV export
(CRLF, a byte-order mark, trailing empty columns, every field quoted, thousands separators, day numbers), a wide
table, dates with seconds, `Z` or summer-time offsets, infinities and fill values (netCDF's, GDAL's), values
that log1p can't take, ids written as floats or in another case, swapped or impossible coordinates, split
periods that share days or lie outside the record, windows beyond the grids' days, a grid with a _FillValue,
and a messy region trained through `train.py`. Each either reads as the tidy table does or stops naming the
file, the line (or site) and the value."""

import logging
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from test_region_files_adversarial import (
    DAYS,
    FIRST,
    ROOT,
    SITES,
    data_section,
    expected,
    gauge_rows,
    open_region,
    physical,
    write_grid,
    write_tidy_sites,
)

from crossmae.config import ConfigError
from crossmae.data.readers import DataFileError, iso_to_day


def write_gauges(folder, lines, newline="\n", name="gauges.csv") -> None:
    (folder / name).write_bytes((newline.join(lines) + newline).encode("utf-8"))


def tidy_lines(sites=("a", "b", "c")) -> list[str]:
    return ["site_id,date,flow,evap"] + [f"{s},{FIRST + d},{q},{e}" for s, d, q, e in gauge_rows(sites)]


def assert_reads_the_tidy_values(ds) -> None:
    got = physical(ds)
    for site, values in expected().items():
        np.testing.assert_allclose(got[site], values, rtol=1e-6, err_msg=site)


# -- a spreadsheet's CSV export ----------------------------------------------------------------------------
def test_a_spreadsheet_export_with_crlf_a_bom_trailing_empty_columns_and_quotes(tmp_path):
    """Excel's "CSV UTF-8": a byte-order mark, Windows line ends, the empty columns right of the data as `,,`
    on every line (the header too), every field quoted, empty lines of separators at the end."""
    write_grid(tmp_path)
    sites = ["\ufeff\"site_id\",\"lat\",\"lon\",\"area\",,"]
    sites += [f"\"{s}\",\"{la}\",\"{lo}\",\"{ar}\",," for s, (la, lo, ar) in SITES.items()] + [",,,,,"] * 2
    write_gauges(tmp_path, sites, "\r\n", "sites.csv")
    lines = ["\ufeff\"site_id\",\"date\",\"flow\",\"evap\",,"]
    lines += [f"\"{s}\",\"{FIRST + d}\",\"{q}\",\"{e}\",," for s, d, q, e in gauge_rows()] + [",,,,,"]
    write_gauges(tmp_path, lines, "\r\n")
    assert_reads_the_tidy_values(open_region(tmp_path, data_section(tmp_path, {})))


def test_thousands_separators_read_when_unambiguous_and_asked_when_not(tmp_path):
    """`"1,234.5"` in a comma-separated file and `1.234,5` in a `;` file are 1234.5; a bare `"1,234"` in a
    comma-separated file could be a thousands separator or a decimal comma, and is named."""
    write_grid(tmp_path)
    write_tidy_sites(tmp_path)
    lines = tidy_lines()
    lines[3] = 'a,2001-01-03,"1,234.5",0.1'
    lines[4] = 'a,2001-01-04,"-12,000.",0.1'
    write_gauges(tmp_path, lines)
    got = physical(open_region(tmp_path, data_section(tmp_path, {})))["a"]
    np.testing.assert_array_equal(got[2:4, 0], [1234.5, -12000.0])
    semicolons = [line.replace(",", ";") for line in tidy_lines()]
    semicolons[3] = "a;2001-01-03;1.234,5;0,1"
    write_gauges(tmp_path, semicolons)
    got = physical(open_region(tmp_path, data_section(tmp_path, {"delimiter": ";"})))["a"]
    np.testing.assert_array_equal(got[2, :], np.float32([1234.5, 0.1]))
    lines[3] = 'a,2001-01-03,"1,234",0.1'
    write_gauges(tmp_path, lines)
    with pytest.raises(DataFileError, match=r"column 'flow' of '.*gauges.csv' holds '1,234' on line 4; expected a "
                                            r"number \(a thousands separator or a decimal comma\?"):
        open_region(tmp_path, data_section(tmp_path, {}))


def test_a_spreadsheets_unicode_text_export_utf16_and_tabs(tmp_path):
    """Excel's "Unicode Text (*.txt)": UTF-16 with a byte-order mark, separated by tabs, CRLF."""
    write_grid(tmp_path)
    write_tidy_sites(tmp_path)
    text = "\r\n".join(line.replace(",", "\t") for line in tidy_lines()) + "\r\n"
    (tmp_path / "gauges.txt").write_bytes(text.encode("utf-16"))
    assert_reads_the_tidy_values(open_region(tmp_path, data_section(tmp_path, {"path": "gauges.txt"})))


def test_dates_with_month_names(tmp_path):
    """`05-Jan-2001` (a spreadsheet's dd-mmm-yyyy) and `5 Jan 2001`."""
    write_grid(tmp_path)
    write_tidy_sites(tmp_path)
    for fmt in ("%d-%b-%Y", "%-d %b %Y"):
        lines = ["site_id,date,flow,evap"] + [f"{s},{(FIRST + d).astype(object):{fmt}},{q},{e}"
                                              for s, d, q, e in gauge_rows()]
        write_gauges(tmp_path, lines)
        assert_reads_the_tidy_values(open_region(tmp_path, data_section(tmp_path, {})))


def test_unicode_minus_signs_are_minus_signs(tmp_path):
    """`−` (U+2212) from typeset or localised exports, in the site table's coordinates (its first row, which
    must not pass for a units line) and in gauge values."""
    write_grid(tmp_path, lat=-50.0 + np.arange(6) * 0.1, lon=-7.4 + np.arange(5) * 0.1)
    sites = {"a": (-49.96, -7.01, 100.0), "b": (-49.51, -7.41 + 0.02, 220.0), "c": (-49.73, -7.22, 150.0)}
    lines = ["site_id,lat,lon"] + [f"{s},{la},{lo}".replace("-", "\u2212") for s, (la, lo, _) in sites.items()]
    (tmp_path / "sites.csv").write_text("\n".join(lines) + "\n")
    gauges = tidy_lines()
    gauges[3] = "a,2001-01-03,\u22120.5,0.1"
    write_gauges(tmp_path, gauges)
    ds = open_region(tmp_path, data_section(tmp_path, {}, {"attributes": []}))
    assert sorted(ds.site_layouts["gauges"].site_ids) == ["a", "b", "c"]
    assert physical(ds)["a"][2, 0] == -0.5


def test_files_are_known_by_their_bytes_whatever_their_names(tmp_path):
    """A Parquet site table named `.pqt` and a partitioned Parquet gauge data set (a folder of parts) read as
    Parquet; a spreadsheet renamed `.csv` and a Feather file are refused with what to do."""
    pytest.importorskip("pyarrow")
    import pandas as pd

    write_grid(tmp_path)
    pd.DataFrame({"site_id": list(SITES), "lat": [v[0] for v in SITES.values()],
                  "lon": [v[1] for v in SITES.values()], "area": [v[2] for v in SITES.values()]}
                 ).to_parquet(tmp_path / "sites.pqt")
    rows = gauge_rows()
    frame = pd.DataFrame({"site_id": [r[0] for r in rows], "date": [str(FIRST + r[1]) for r in rows],
                          "flow": [r[2] for r in rows], "evap": [r[3] for r in rows]})
    (tmp_path / "gauges.parquet").mkdir()
    frame.iloc[:100].to_parquet(tmp_path / "gauges.parquet" / "part-0.parquet")
    frame.iloc[100:].to_parquet(tmp_path / "gauges.parquet" / "part-1.parquet")
    assert_reads_the_tidy_values(open_region(tmp_path, data_section(
        tmp_path, {"format": "parquet", "path": "gauges.parquet"}, {"path": "sites.pqt"})))
    (tmp_path / "gauges.csv").write_bytes(b"PK\x03\x04" + bytes(60))  # an .xlsx renamed
    with pytest.raises(DataFileError, match=r"gauges.csv' is a spreadsheet; expected a CSV \(or Parquet\) file: save "
                                            r"the sheet as CSV \(or, if it is a zip archive, unpack it\)"):
        open_region(tmp_path, data_section(tmp_path, {}, {"path": "sites.pqt"}))
    frame.to_feather(tmp_path / "gauges.feather")
    with pytest.raises(DataFileError, match=r"gauges.feather' is an Arrow \(Feather\) file; expected a CSV or Parquet"):
        open_region(tmp_path, data_section(tmp_path, {"path": "gauges.feather"}, {"path": "sites.pqt"}))


def test_a_spreadsheet_day_number_as_a_date_is_named(tmp_path):
    write_grid(tmp_path)
    write_tidy_sites(tmp_path)
    lines = ["site_id,date,flow,evap"] + [f"{s},{36892 + d},{q},{e}" for s, d, q, e in gauge_rows()]
    write_gauges(tmp_path, lines)
    with pytest.raises(DataFileError, match=r"column 'date' of '.*gauges.csv' holds '36892' on line 2, which does "
                                            r"not parse \(a spreadsheet's day number\?"):
        open_region(tmp_path, data_section(tmp_path, {}))


def test_a_wide_gauge_table_is_named_as_one(tmp_path):
    """One column per site (as many agencies publish flows) is not the long table: the message says so and
    names the columns that are sites."""
    write_grid(tmp_path)
    write_tidy_sites(tmp_path)
    lines = ["date,a,b,c"] + [f"{FIRST + d},{1 + 0.1 * d},{2 + 0.1 * d},{3 + 0.1 * d}" for d in range(DAYS)]
    write_gauges(tmp_path, lines)
    with pytest.raises(DataFileError, match=r"gauges.csv' has no site id column 'site_id' \(columns there: \['date', "
                                            r"'a', 'b', 'c'\]\); expected a long table, one row per site and day, "
                                            r".*its columns \['a', 'b', 'c'\] are sites of the site table: a wide "
                                            r"table"):
        open_region(tmp_path, data_section(tmp_path, {}))


# -- dates ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("style", ["seconds", "utc_z", "milliseconds_z", "summer_time", "am_pm"])
def test_dates_with_seconds_zones_and_summer_time(tmp_path, style):
    """Each reads as its local date; a column whose offset changes in spring (+01:00, then +02:00) too."""
    write_grid(tmp_path)
    write_tidy_sites(tmp_path)

    def stamp(d: int) -> str:
        day = (FIRST + d).astype(object)
        return {"seconds": f"{day:%Y-%m-%d} 00:00:00", "utc_z": f"{day:%Y-%m-%d}T00:00:00Z",
                "milliseconds_z": f"{day:%Y-%m-%d}T00:00:00.000Z",
                "summer_time": f"{day:%Y-%m-%d}T00:00:00{'+01:00' if d < 30 else '+02:00'}",
                "am_pm": f"{day:%m/%d/%Y} 12:00:00 AM"}[style]

    write_gauges(tmp_path, ["site_id,date,flow,evap"] + [f"{s},{stamp(d)},{q},{e}" for s, d, q, e in gauge_rows()])
    ds = open_region(tmp_path, data_section(tmp_path, {}))
    assert ds.region.site_sets[0].first_day == iso_to_day("2001-01-01")
    assert_reads_the_tidy_values(ds)


# -- values that are no measurement -------------------------------------------------------------------------
def test_infinities_are_missing_and_a_huge_missing_value_marker_is_honoured(tmp_path):
    """`inf`, `-Infinity` (a division by zero upstream) are missing, as documented; a value beyond float32 stops
    the reading unless it is one of missing_values, as the message asks."""
    write_grid(tmp_path)
    write_tidy_sites(tmp_path)
    lines = tidy_lines()
    lines[3] = "a,2001-01-03,inf,-Infinity"
    lines[5] = "a,2001-01-05,1e39,0.1"
    write_gauges(tmp_path, lines)
    with pytest.raises(DataFileError, match=r"holds '1e39' on line 6, beyond float32"):
        open_region(tmp_path, data_section(tmp_path, {}))
    ds = open_region(tmp_path, data_section(tmp_path, {"missing_values": [1e39, -9999]}))
    got = physical(ds)["a"]
    assert np.isnan(got[2]).all() and np.isnan(got[4, 0]) and got[4, 1] == np.float32(0.1)
    for i in range(len(ds)):
        assert torch.isfinite(ds[i].sites["gauges"].nan_to_num(0.0)).all()


@pytest.mark.parametrize("value", ["9.96921e+36", "-3.4028235e+38", "3.4028234663852886e+38", "1e+20"])
def test_fill_values_in_a_gauge_table_stop_with_the_line(tmp_path, value):
    """netCDF's default fill (9.97e36), GDAL's float NoData (±float32 max) and CF's 1e20 would pass as
    measurements and wreck the statistics silently."""
    write_grid(tmp_path)
    write_tidy_sites(tmp_path)
    lines = tidy_lines()
    lines[3] = f"a,2001-01-03,{value},0.1"
    write_gauges(tmp_path, lines)
    with pytest.raises(DataFileError, match=rf"column 'flow' of '.*gauges.csv' holds '{value.replace('+', '[+]')}' "
                                            r"on line 4, (a fill value for no data|beyond float32); expected a "
                                            r"measurement \(or add the value to missing_values\)"):
        open_region(tmp_path, data_section(tmp_path, {}))


def test_fill_values_in_a_site_table_stop_with_the_site_and_line_unless_the_site_is_unused(tmp_path):
    write_grid(tmp_path)
    sites = {**SITES, "b": (49.51, 7.41, -3.4028234663852886e38), "unused": (49.6, 7.1, 9.96921e36)}
    write_tidy_sites(tmp_path, sites)
    write_gauges(tmp_path, tidy_lines())
    with pytest.raises(DataFileError, match=r"site table: column 'area' of '.*sites.csv' holds -3.40282e\+38 for site "
                                            r"'b' on line 3, a fill value for no data"):
        open_region(tmp_path, data_section(tmp_path, {}))
    write_tidy_sites(tmp_path, {**SITES, "unused": (49.6, 7.1, 9.96921e36)})  # a national table's other site
    assert sorted(open_region(tmp_path, data_section(tmp_path, {})).site_layouts["gauges"].site_ids) == ["a", "b", "c"]


def test_values_log1p_cannot_take_are_named_and_negative_flow_without_a_transform_is_kept(tmp_path):
    """-1 as a missing marker, or a negative flow, under log1p would silently become missing."""
    write_grid(tmp_path)
    write_tidy_sites(tmp_path)
    lines = tidy_lines()
    lines[3] = "a,2001-01-03,-1,0.1"
    lines[4] = "a,2001-01-04,-0.5,0.1"
    write_gauges(tmp_path, lines)
    with pytest.raises(DataFileError, match=r"column 'flow' of '.*gauges.csv' holds '-1' on line 4, which the "
                                            r"transform log1p can't take; expected values above -1"):
        open_region(tmp_path, data_section(tmp_path, {"transforms": {"flow": "log1p"}}))
    got = physical(open_region(tmp_path, data_section(tmp_path, {"transforms": {"flow": "log1p"},
                                                                 "missing_values": [-1]})))["a"]
    assert np.isnan(got[2, 0]) and got[3, 0] == -0.5
    assert physical(open_region(tmp_path, data_section(tmp_path, {})))["a"][2, 0] == -1.0


def test_a_per_site_file_value_log1p_cannot_take_names_the_file_site_and_date(tmp_path):
    write_grid(tmp_path)
    write_tidy_sites(tmp_path, {"a": SITES["a"]})
    days = [(FIRST + d).astype(object) for d in range(DAYS)]
    body = [f"{t:%Y %m %d} 00 00 {-2.0 if d == 5 else 1.0 + 0.1 * d:.3f}" for d, t in enumerate(days)]
    (tmp_path / "q_a.txt").write_text("\n".join(["00001 GAUGE", "nodata -9999", "n 1", "start", "end", *body]) + "\n")
    data = data_section(tmp_path, {"format": "mhm_gauge", "path": "q_{site}.txt", "variables": ["flow"],
                                   "flow": ["flow"], "transform": "log1p", "grouping": {"method": "site"}})
    with pytest.raises(DataFileError, match=r"'.*q_a.txt' gives site 'a' on 2001-01-06 the 'flow' value -2, which "
                                            r"the transform log1p can't take"):
        open_region(tmp_path, data)


# -- ids and coordinates -------------------------------------------------------------------------------------
def test_site_table_ids_written_as_floats_match_zero_padded_gauge_ids(tmp_path, caplog):
    """A site table exported from a float column (`1.0`) and a gauge table that keeps the agency's zeros
    (`0001`): matched by number, with a warning."""
    write_grid(tmp_path)
    lines = ["site_id,lat,lon,area"] + [f"{i + 1}.0,{la},{lo},{ar}" for i, (la, lo, ar) in enumerate(SITES.values())]
    (tmp_path / "sites.csv").write_text("\n".join(lines) + "\n")
    write_gauges(tmp_path, tidy_lines(("0001", "0002", "3")))
    with caplog.at_level(logging.WARNING, logger="crossmae.data.region"):
        ds = open_region(tmp_path, data_section(tmp_path, {}))
    assert sorted(ds.site_layouts["gauges"].site_ids) == ["1.0", "2.0", "3.0"]
    assert "matched by number" in caplog.text
    assert_reads_the_tidy_values_by(ds, {"1.0": "a", "2.0": "b", "3.0": "c"})


def assert_reads_the_tidy_values_by(ds, names: dict[str, str]) -> None:
    got, want = physical(ds), expected()
    for site, tidy in names.items():
        np.testing.assert_allclose(got[site], want[tidy], rtol=1e-6, err_msg=site)


def test_an_id_of_two_possible_sites_or_of_another_case_is_named_with_the_candidates(tmp_path):
    write_grid(tmp_path)
    write_tidy_sites(tmp_path, {"0001": SITES["a"], "1": SITES["b"], "Perl": SITES["c"]})
    write_gauges(tmp_path, tidy_lines(("01", "1", "Perl")))
    with pytest.raises(DataFileError, match=r"gauges.csv' names site '01' on line 2, which is not in the site table "
                                            r"'sites.csv' \(the site table has \['0001', '1'\] of that number"):
        open_region(tmp_path, data_section(tmp_path, {}))
    write_gauges(tmp_path, tidy_lines(("0001", "1", "perl")))
    with pytest.raises(DataFileError, match=r"names site 'perl' on line 122, which is not in the site table "
                                            r"'sites.csv' \(the site table writes 'Perl'\)"):
        open_region(tmp_path, data_section(tmp_path, {}))
    write_tidy_sites(tmp_path, {"01022500": SITES["a"], "01030500": SITES["b"], "Perl": SITES["c"]})
    write_gauges(tmp_path, tidy_lines(("USGS-01022500", "01030500", "Perl")))  # an agency prefix
    with pytest.raises(DataFileError, match=r"names site 'USGS-01022500' on line 2, which is not in the site table "
                                            r"'sites.csv' \(the site table writes '01022500'\)"):
        open_region(tmp_path, data_section(tmp_path, {}))


def test_a_groups_file_id_that_lost_its_zeros_names_the_site_table_id(tmp_path):
    write_grid(tmp_path)
    write_tidy_sites(tmp_path, {"0001": SITES["a"], "0002": SITES["b"], "0003": SITES["c"]})
    write_gauges(tmp_path, tidy_lines(("0001", "0002", "0003")))
    (tmp_path / "groups.csv").write_text("site_id,group\n0001,1\n2,1\n0003,2\n")
    with pytest.raises(ValueError, match=r"groups.csv' line 3: site '2' is not in the site table \(the site table "
                                         r"writes \['0002'\] for that number"):
        open_region(tmp_path, data_section(tmp_path, {"grouping": {"method": "file", "file": "groups.csv"}}))


def test_a_site_table_repeating_a_row_reads_it_once_and_a_conflicting_repeat_is_named(tmp_path, caplog):
    """Two downloads concatenated repeat rows: the same values are read once (logged); a site listed twice with
    other coordinates names both lines, the column and the two values."""
    write_grid(tmp_path)
    write_gauges(tmp_path, tidy_lines())
    lines = ["site_id,lat,lon,area"] + [f"{s},{la},{lo},{ar}" for s, (la, lo, ar) in SITES.items()]
    (tmp_path / "sites.csv").write_text("\n".join([*lines, lines[1], lines[2] + " "]) + "\n")
    with caplog.at_level(logging.WARNING, logger="crossmae.data.region"):
        ds = open_region(tmp_path, data_section(tmp_path, {}))
    assert "repeats 2 rows of sites listed before with the same values (the first on line 5): read once" in caplog.text
    assert sorted(ds.site_layouts["gauges"].site_ids) == ["a", "b", "c"]
    (tmp_path / "sites.csv").write_text("\n".join([*lines, "b,49.52,7.41,220.0"]) + "\n")
    with pytest.raises(DataFileError, match=r"sites.csv' lists site 'b' twice \(line 3 and line 5\), with other 'lat' "
                                            r"\('49.51' and '49.52'\); expected one row per site"):
        open_region(tmp_path, data_section(tmp_path, {}))


def test_swapped_impossible_and_marked_coordinates_are_named(tmp_path):
    write_grid(tmp_path)
    write_gauges(tmp_path, tidy_lines())
    write_tidy_sites(tmp_path, {**SITES, "b": (7.41, 49.51, 220.0)})
    with pytest.raises(DataFileError, match=r"site 'b' of '.*sites.csv' \(lat=7.41, lon=49.51\) lies outside the "
                                            r"6x5 grid \(.*line 3\); the grid's cell centres span latitude 49.5..50, "
                                            r"longitude 7..7.4 \(latitude and longitude swapped\?\)"):
        open_region(tmp_path, data_section(tmp_path, {}))
    write_tidy_sites(tmp_path, {**SITES, "b": (149.5, 7.41, 220.0)})
    with pytest.raises(DataFileError, match=r"site 'b' of '.*sites.csv' \(line 3\) has lat=149.5, which is no "
                                            r"latitude; expected -90..90"):
        open_region(tmp_path, data_section(tmp_path, {}))
    write_tidy_sites(tmp_path, {**SITES, "b": (5.5e6, 4.1e5, 220.0)})  # a projection's metres
    with pytest.raises(DataFileError, match=r"has lat=5.5e\+06, which is no latitude \(metres of a projection\? set "
                                            r"coords: xy\)"):
        open_region(tmp_path, data_section(tmp_path, {}))
    write_tidy_sites(tmp_path, {**SITES, "b": (-9999, 7.41, 220.0)})  # the table's missing-value marker
    with pytest.raises(DataFileError, match=r"column 'lat' of '.*sites.csv' has no value for site 'b' on line 3"):
        open_region(tmp_path, data_section(tmp_path, {}))


# -- periods and grids ---------------------------------------------------------------------------------------
def test_a_gauge_record_outside_the_training_period_names_its_days(tmp_path):
    write_grid(tmp_path)
    write_tidy_sites(tmp_path)
    lines = ["site_id,date,flow,evap"] + [f"{s},{np.datetime64('1995-01-01') + d},{q},{e}"
                                          for s, d, q, e in gauge_rows()]
    write_gauges(tmp_path, lines)
    with pytest.raises(DataFileError, match=r"'flow' has no valid value in the training period 2001-01-01..2001-01-31 "
                                            r"\(its data run 1995-01-01..1995-03-01\)"):
        open_region(tmp_path, data_section(tmp_path, {}))


def test_a_grid_of_another_period_names_its_file_and_days(tmp_path):
    """Forcing of 1990 with gauges and split periods of 2001 (the wrong download)."""
    import xarray as xr

    write_grid(tmp_path)
    write_tidy_sites(tmp_path)
    write_gauges(tmp_path, tidy_lines())
    grid = xr.load_dataset(tmp_path / "grid.nc", engine="h5netcdf")
    grid = grid.assign_coords(time=grid.time.values - np.timedelta64(11 * 365 + 3, "D"))
    grid.to_netcdf(tmp_path / "grid.nc", engine="h5netcdf")
    with pytest.raises(DataFileError, match=r"grid 'pre' \(.*grid.nc\): 'pre' has no valid value in the training "
                                            r"period 2001-01-01..2001-01-31 \(its data run 1990-01-01..1990-03-01\)"):
        open_region(tmp_path, data_section(tmp_path, {}))


def test_a_split_outside_the_record_names_its_configured_period(tmp_path):
    write_grid(tmp_path)
    write_tidy_sites(tmp_path)
    write_gauges(tmp_path, tidy_lines())
    data = data_section(tmp_path, {})
    data["region"]["split"]["test"] = ["2006-01-01", "2006-12-31"]
    train = open_region(tmp_path, data)
    with pytest.raises(DataFileError, match=r"the test split holds no window of data.steps=10 days: its period is "
                                            r"2006-01-01..2006-12-31 \(data.region.split.test\), outside \(0 days\) "
                                            r"of the record 2001-01-01..2001-03-01"):
        open_region(tmp_path, data, "test", norm_stats=train.norm_stats)


def test_split_periods_that_share_days_are_refused(tmp_path):
    write_grid(tmp_path)
    write_tidy_sites(tmp_path)
    write_gauges(tmp_path, tidy_lines())
    data = data_section(tmp_path, {})
    data["region"]["split"] = {"train": ["2001-01-01", "2001-02-15"], "val": ["2001-02-01", "2001-03-01"]}
    with pytest.raises(ConfigError, match=r"data.region.split.train \(2001-01-01..2001-02-15\) and "
                                          r"data.region.split.val \(2001-02-01..2001-03-01\) share 15 days"):
        open_region(tmp_path, data)


def test_windows_beyond_the_grids_days_are_warned(tmp_path, caplog):
    """Gauges from December, grids from January: without split periods the record starts with the gauges, and
    the windows of December carry gauges only (legal, but the user should know); split periods inside the
    grids' days leave them out, and nothing is warned."""
    write_grid(tmp_path)
    write_tidy_sites(tmp_path)
    lines = ["site_id,date,flow,evap"] + [f"{s},{np.datetime64('2000-12-01') + d},{q},{e}"
                                          for s, d, q, e in gauge_rows()]
    write_gauges(tmp_path, lines)
    data = data_section(tmp_path, {})
    data["region"]["split"] = {}
    with caplog.at_level(logging.WARNING, logger="crossmae.data.region"):
        ds = open_region(tmp_path, data)
    assert ds.starts[0] == iso_to_day("2000-12-01")
    assert re.search(r"train split: 3 of \d+ windows \(from 2000-12-01\) hold no day of any grid \(the grids cover "
                     r"pre 2001-01-01..2001-03-01\)", caplog.text), caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="crossmae.data.region"):
        open_region(tmp_path, data_section(tmp_path, {}))
    assert "hold no day of any grid" not in caplog.text


def test_a_mistyped_year_far_from_the_other_dates_is_warned_with_its_line(tmp_path, caplog):
    """`2101-01-05` among dates of 2001 stretches the record over a century (and the site values in memory):
    read, but the line is named."""
    write_grid(tmp_path)
    write_tidy_sites(tmp_path)
    lines = tidy_lines()
    write_gauges(tmp_path, lines)
    with caplog.at_level(logging.WARNING, logger="crossmae.data.region"):
        open_region(tmp_path, data_section(tmp_path, {}))
    assert "mistyped year" not in caplog.text
    lines[5] = "a,2101-01-05,1.0,0.5"
    write_gauges(tmp_path, lines)
    with caplog.at_level(logging.WARNING, logger="crossmae.data.region"):
        ds = open_region(tmp_path, data_section(tmp_path, {}))
    assert ds.region.record[1] == iso_to_day("2101-01-05")
    assert "gives 1 rows beyond a gap of more than 10 years from all other dates (the first on line 6, " \
           "2101-01-05): a mistyped year?" in caplog.text


def test_a_land_mask_of_another_shape_is_named(tmp_path):
    import xarray as xr

    write_grid(tmp_path)
    write_tidy_sites(tmp_path)
    write_gauges(tmp_path, tidy_lines())
    xr.Dataset({"land": (("y", "x"), np.ones((4, 4)))}).to_netcdf(tmp_path / "land.nc", engine="h5netcdf")
    data = data_section(tmp_path, {})
    data["region"]["grids"][0].update(mask_path="land.nc", mask_variable="land")
    with pytest.raises(DataFileError, match=r"mask 'land' in '.*land.nc' has shape \(4, 4\) \(dims \('y', 'x'\)\), but "
                                            r"the grid in '.*grid.nc' is 6x5"):
        open_region(tmp_path, data)


def test_a_grid_fill_value_is_missing_on_land(tmp_path):
    """A grid variable with a _FillValue: those cells are missing (NaN) in the sample, the rest finite."""
    import xarray as xr

    write_grid(tmp_path)
    write_tidy_sites(tmp_path)
    write_gauges(tmp_path, tidy_lines())
    grid = xr.load_dataset(tmp_path / "grid.nc", engine="h5netcdf")
    grid["pre"][3, 2, 2] = -9999.0
    grid.to_netcdf(tmp_path / "filled.nc", engine="h5netcdf", encoding={"pre": {"_FillValue": -9999.0}})
    data = data_section(tmp_path, {})
    data["region"]["grids"][0]["path"] = "filled.nc"
    sample = open_region(tmp_path, data)[0]
    x, land = sample.grids["pre"], sample.basin_masks["pre"]
    assert torch.isnan(x[3, 0, 2, 2]) and int(torch.isnan(x[:, 0][:, land]).sum()) == 1


# -- real files ------------------------------------------------------------------------------------------------
CAMELS = ROOT.parent / "shared" / "data" / "camels_us"


@pytest.mark.skipif(not CAMELS.is_dir(), reason="needs ../shared/data/camels_us")
def test_camels_gauges_with_the_national_attribute_table_over_a_grid(tmp_path, caplog):
    """The CAMELS-US layout as downloaded: one USGS streamflow file per gauge (four here) and the `;`-separated
    attribute table of all 671 basins as the site table (`gauge_id`, `gauge_lat`, `gauge_lon`, ids with leading
    zeros), placed on a 0.5° grid over the eastern US: the four gauges are the site set, the others left out."""
    import xarray as xr

    lat, lon = np.arange(46.0, 35.9, -0.5), np.arange(-82.0, -66.9, 0.5)
    days = np.datetime64("2000-01-01") + np.arange(1096)
    rain = np.random.default_rng(0).gamma(0.5, 4.0, (days.size, lat.size, lon.size)).astype(np.float32)
    xr.Dataset({"prcp": (("time", "lat", "lon"), rain)},
               coords={"time": days.astype("datetime64[ns]"), "lat": ("lat", lat, {"units": "degrees_north"}),
                       "lon": ("lon", lon, {"units": "degrees_east"})}).to_netcdf(tmp_path / "prcp.nc",
                                                                                 engine="h5netcdf")
    data = {"source": "region", "steps": 30, "stride": 30, "patch_size": 4, "batch_size": 2, "region": {
        "synthetic": "", "root": str(tmp_path), "grids": [{"name": "prcp", "path": "prcp.nc", "transform": "log1p"}],
        "site_sets": [{"name": "usgs", "format": "camels_streamflow", "variables": ["Q"], "transform": "log1p",
                       "path": str(CAMELS / "usgs_streamflow" / "{site}_streamflow_qc.txt"), "flow": ["Q"],
                       "sites": {"path": str(CAMELS / "camels_attributes_v2.0" / "camels_topo.txt"),
                                 "attributes": ["elev_mean", "area_gages2"]},
                       "grouping": {"method": "kmeans", "size": 2}}],
        "split": {"train": ["2000-01-01", "2001-06-30"], "val": ["2001-07-01", "2002-12-31"]}}}
    with caplog.at_level(logging.WARNING, logger="crossmae.data.region"):
        ds = open_region(tmp_path, data)
    assert "667 sites of the site table have no file, left out" in caplog.text
    assert "no row in the gauge data" not in caplog.text  # said once
    s = ds.region.site_sets[0]
    assert sorted(s.ids) == ["01022500", "01547700", "02064000", "03015500"]
    assert s.values[iso_to_day("2000-01-01") - s.first_day, s.ids.index("01022500"), 0] == 255.0  # its first line
    layout = ds.site_layouts["usgs"]
    g, k = (int(a[0]) for a in np.nonzero(np.array(layout.ids) == "01022500"))
    assert abs(layout.rows[g, k] - (46.25 - 44.60797) / 0.5) < 1e-6  # gauge_lat 44.60797, north-first rows
    assert abs(layout.cols[g, k] - (-67.93524 + 82.25) / 0.5) < 1e-6  # gauge_lon -67.93524
    sample = ds[0]
    assert sample.sites["usgs"].shape == (30, 2, 2, 1) and torch.isfinite(sample.sites["usgs"]).all()


# -- end to end -----------------------------------------------------------------------------------------------
def test_a_spreadsheet_exported_region_trains_through_train_py(tmp_path):
    """CRLF, a BOM and trailing empty columns in both tables, float-written ids against zero-padded ones,
    times after the dates, a site without rows, one with data in the validation period only, per-site flow
    statistics under log1p, k-means with groups larger than the site count: `train.py` runs 4 steps with
    validation, exit status 0, every loss finite."""
    import csv

    write_grid(tmp_path)
    ids = {"0001": SITES["a"], "0002": SITES["b"], "0003": SITES["c"], "0004": (49.6, 7.1, 5.0),
           "0005": (49.7, 7.3, 9.0)}
    sites = ["\ufeffsite_id,lat,lon,area,,"] + [f"{s},{la},{lo},{ar},," for s, (la, lo, ar) in ids.items()]
    write_gauges(tmp_path, sites, "\r\n", "sites.csv")
    lines = ["\ufeffsite_id,date,flow,evap,,"]
    lines += [f"{s},{FIRST + d} 00:00:00,{q},{e},," for s, d, q, e in gauge_rows(("1.0", "2.0", "3.0", "5.0"))
              if s != "5.0" or d >= 35]
    write_gauges(tmp_path, lines, "\r\n")
    data = data_section(tmp_path, {"per_site": ["flow"], "transforms": {"flow": "log1p"},
                                   "grouping": {"method": "kmeans", "size": 8}})
    config = {"data": data, "model": {"enc_dim": 32, "enc_depth": 1, "enc_heads": 2, "dec_dim": 32, "dec_depth": 1,
                                      "dec_heads": 2},
              "train": {"max_steps": 4, "warmup_steps": 1, "log_every": 1, "val_every": 2, "val_batches": 1,
                        "ckpt_every": 4}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    run = subprocess.run([sys.executable, str(ROOT / "train.py"), "--fused", "--config", str(tmp_path / "run.yaml"),
                          "--out-dir", str(tmp_path / "run"), "--device", "cpu"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    with open(tmp_path / "run" / "metrics.csv", newline="") as handle:
        losses = [float(r["loss"]) for r in csv.DictReader(handle)]
    assert len(losses) == 4 and all(np.isfinite(losses)), losses
    stats = yaml.safe_load((tmp_path / "run" / "norm_stats.json").read_text())
    assert sorted(i for g in stats["site_layouts"]["gauges"]["ids"] for i in g if i) == ["0001", "0002", "0003",
                                                                                         "0005"]
