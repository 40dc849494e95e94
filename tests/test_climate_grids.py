"""Gridded climate data in the shapes it comes in: model calendars, many files, CF units, sub-daily steps,
coordinates that differ between files and masks, and files larger than what a window needs. Every file is
written by the test into tmp_path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from crossmae.config import Config, ConfigError, DataConfig, FilesConfig, GridSource, SplitConfig, validate_config
from crossmae.data.files import FilesDataset
from crossmae.data.readers import DataFileError, GridOptions, GridReader, iso_to_day, read_basin_mask

ROOT = Path(__file__).resolve().parents[1]


def write_grid(path: Path, values: np.ndarray, times, units: str = "days since 1999-01-01", calendar: str | None =
               "standard", variable: str = "v", var_units: str | None = None, lat=None, lon=None,
               dims=("time", "lat", "lon"), extra: dict | None = None) -> Path:
    """``values [S, H, W]`` at CF ``times`` (numbers in ``units``) as a NetCDF file; ``lat``/``lon`` become
    1-D coordinates of the y/x dims when given."""
    import xarray as xr

    time_attrs = {"units": units, **({"calendar": calendar} if calendar else {})}
    coords = {dims[0]: (dims[0], np.asarray(times, dtype=np.float64), time_attrs)}
    if lat is not None:
        coords[dims[1]] = (dims[1], np.asarray(lat, dtype=np.float64), {"units": "degrees_north"})
    if lon is not None:
        coords[dims[2]] = (dims[2], np.asarray(lon, dtype=np.float64), {"units": "degrees_east"})
    data = {variable: (dims, np.asarray(values, dtype=np.float32), {"units": var_units} if var_units else {})}
    for name, array in (extra or {}).items():
        data[name] = (dims, np.asarray(array, dtype=np.float32), {})
    xr.Dataset(data, coords=coords).to_netcdf(path, engine="h5netcdf")
    return path


def reader(paths, **options) -> GridReader:
    paths = [str(p) for p in (paths if isinstance(paths, list) else [paths])]
    options.setdefault("variables", ["v"])
    return GridReader(paths, "netcdf", GridOptions(**options), "grid 'v'")


def day(text: str) -> int:
    return iso_to_day(text)


def steps(n: int, h: int = 2, w: int = 3) -> np.ndarray:
    """``[n, h, w]`` whose cell (i, j) of step s holds s + 0.01 * (i * w + j)."""
    return np.arange(n)[:, None, None] + 0.01 * np.arange(h * w).reshape(1, h, w)


# -- model calendars ------------------------------------------------------------------------------------------
def test_noleap_calendar_leaves_29_february_missing(tmp_path):
    grid = reader(write_grid(tmp_path / "g.nc", steps(730), np.arange(730), calendar="noleap"))
    assert grid.calendar == "noleap" and grid.steps_per_day == 1
    assert grid.days[0] == day("1999-01-01") and grid.days[-1] == day("2000-12-31") and len(grid.days) == 730
    assert day("2000-02-29") not in grid.days
    x = grid.read(day("2000-02-27"), day("2000-03-03"))[:, 0, 0, 0]  # [5]
    # model day 365 + 57 is 2000-02-27; 29 February has no field; 1 March is model day 365 + 59
    np.testing.assert_array_equal(x, [365 + 57, 365 + 58, np.nan, 365 + 59, 365 + 60])
    assert "29 February of leap years has no field" in grid.facts()["calendar_rule"]
    same = reader(write_grid(tmp_path / "h.nc", steps(730), np.arange(730), calendar="365_day"))
    np.testing.assert_array_equal(same.days, grid.days)


def test_all_leap_calendar_drops_29_february_of_other_years(tmp_path):
    grid = reader(write_grid(tmp_path / "g.nc", steps(732), np.arange(732), calendar="all_leap"))
    assert grid.dropped_steps == 1 and grid.facts()["dropped_steps"] == 1  # 1999-02-29
    assert len(grid.days) == 731 and grid.days[-1] == day("2000-12-31")
    x = grid.read(day("1999-02-28"), day("1999-03-02"))[:, 0, 0, 0]
    np.testing.assert_array_equal(x, [58, 60])  # model day 59 is 1999-02-29: no real day
    assert grid.read(day("2000-02-29"), day("2000-03-01"))[0, 0, 0, 0] == 366 + 59


def test_360_day_calendar_is_refused_unless_a_rule_is_chosen(tmp_path):
    path = write_grid(tmp_path / "g.nc", steps(720), np.arange(720), calendar="360_day")
    with pytest.raises(DataFileError, match=r"grid 'v': '.*g.nc' uses the 360_day calendar .* set calendar_360: "
                                            r"rescale_year .* or calendar_360: keep_date"):
        reader(path)
    grid = reader(path, calendar_360="rescale_year")
    assert len(grid.days) == 720 and grid.dropped_steps == 0
    first_year = grid.days[grid.days < day("2000-01-01")] - day("1999-01-01")
    assert first_year[0] == 0 and first_year[-1] == 364  # 1 January .. 31 December
    missing = sorted(set(range(365)) - set(first_year.tolist()))
    assert len(missing) == 5 and np.all(np.diff(missing) > 60)  # spread over the year
    assert len(set(range(366)) - set((grid.days[grid.days >= day("2000-01-01")] - day("2000-01-01")).tolist())) == 6
    x = grid.read(day("1999-01-01"), day("2000-01-01"))[:, 0, 0, 0]
    np.testing.assert_array_equal(x[np.isfinite(x)], np.arange(360))  # every model day kept, in order
    dated = reader(path, calendar_360="keep_date")
    assert day("1999-01-31") not in dated.days and day("1999-03-30") in dated.days
    assert dated.dropped_steps == 3  # 29 and 30 February of 1999, 30 February of 2000
    assert dated.read(day("2000-02-29"), day("2000-03-02"))[:, 0, 0, 0].tolist() == [360 + 58, 360 + 60]
    assert "keep_date" in dated.facts()["calendar_rule"]


def test_unknown_calendar_and_undecodable_times_are_named(tmp_path):
    with pytest.raises(DataFileError, match=r"uses the calendar 'julian'; expected one of \['standard'"):
        reader(write_grid(tmp_path / "j.nc", steps(3), np.arange(3), calendar="julian"))
    with pytest.raises(DataFileError, match=r"has units 'days'; expected CF time units such as 'days since"):
        reader(write_grid(tmp_path / "u.nc", steps(3), np.arange(3), units="days"))
    with pytest.raises(DataFileError, match=r"has a time step of 30 days; expected daily or sub-daily steps"):
        reader(write_grid(tmp_path / "m.nc", steps(3), [0, 30, 60]))


# -- many files -----------------------------------------------------------------------------------------------
def yearly_files(folder: Path, years, calendar="standard", gap_year=None, stem="v") -> list[Path]:
    folder.mkdir(exist_ok=True)
    paths = []
    start = 0
    for year in years:
        n = 365 + (calendar == "standard" and year % 4 == 0)
        if year != gap_year:
            paths.append(write_grid(folder / f"{stem}_{year}.nc", steps(n) + start, start + np.arange(n),
                                    units="days since 1999-01-01", calendar=calendar))
        start += n
    return paths


def test_yearly_files_by_glob_read_as_one_series(tmp_path):
    yearly_files(tmp_path / "era", [1999, 2000, 2001])
    from crossmae.data.readers import resolve_grid_paths

    paths = resolve_grid_paths(str(tmp_path / "era" / "v_*.nc"), "grid 'v'")
    assert [Path(p).name for p in paths] == ["v_1999.nc", "v_2000.nc", "v_2001.nc"]
    grid = reader(paths[::-1])  # a list in any order is ordered by time
    assert [Path(p).name for p in grid.paths] == ["v_1999.nc", "v_2000.nc", "v_2001.nc"]
    assert len(grid.days) == 365 + 366 + 365 and grid.facts()["files"] == 3 and "gaps" not in grid.facts()
    x = grid.read(day("1999-12-30"), day("2000-01-03"))[:, 0, 1, 2]  # across the file boundary
    np.testing.assert_allclose(x, np.arange(363, 367) + 0.05, rtol=1e-6)
    grid.close()
    import crossmae.data.readers as readers

    old = readers.CACHE_BYTES, readers.MAX_OPEN_FILES
    readers.CACHE_BYTES = 0  # read only the window's steps, from the two files it spans
    try:
        np.testing.assert_allclose(grid.read(day("2000-12-30"), day("2001-01-02"))[:, 0, 0, 0], [729, 730, 731])
        assert sorted(grid._open) == [1, 2]
        readers.MAX_OPEN_FILES = 2
        x = grid.read(day("1999-12-31"), day("2001-01-02"))[:, 0, 0, 0]  # all three files, two open at a time
        np.testing.assert_allclose(x, np.arange(364, 732))
        assert sorted(grid._open) == [1, 2]
    finally:
        readers.CACHE_BYTES, readers.MAX_OPEN_FILES = old
    import pickle

    copy = pickle.loads(pickle.dumps(grid))  # as a DataLoader worker gets it: no open file, no array
    assert copy._open == {} and copy._cache is None
    np.testing.assert_array_equal(copy.read(day("1999-12-31"), day("2001-01-02")), grid.read(day("1999-12-31"),
                                                                                             day("2001-01-02")))
    noleap = reader(yearly_files(tmp_path / "cmip", [2000, 2001], calendar="noleap"))
    assert "gaps" not in noleap.facts() and day("2000-02-29") not in noleap.days  # 29 February is no gap


def test_overlapping_files_are_refused_and_gaps_reported(tmp_path, caplog):
    paths = yearly_files(tmp_path / "era", [1999, 2000, 2001], gap_year=2000)
    with caplog.at_level("WARNING"):
        grid = reader(paths)
    gap = grid.facts()["gaps"]
    assert len(gap) == 1 and gap[0]["last"].startswith("1999-12-31") and gap[0]["next"].startswith("2001-01-01")
    assert "no time step between 1999-12-31" in caplog.text and "v_2001.nc" in caplog.text
    assert np.isnan(grid.read(day("2000-01-01"), day("2001-01-01"))).all()
    write_grid(tmp_path / "era" / "v_extra.nc", steps(10), 360 + np.arange(10))  # 1999-12-27 .. 2000-01-05
    with pytest.raises(DataFileError, match=r"'.*v_1999.nc' \(1999-01-01.*1999-12-31.*\) and '.*v_extra.nc' "
                                            r"\(1999-12-27.*2000-01-05.*\) overlap; expected files that follow"):
        reader([*paths, tmp_path / "era" / "v_extra.nc"])
    write_grid(tmp_path / "era" / "v_noleap.nc", steps(3), 800 + np.arange(3), calendar="noleap")
    with pytest.raises(DataFileError, match=r"different calendars \['noleap', 'standard'\]"):
        reader([*paths, tmp_path / "era" / "v_noleap.nc"])
    write_grid(tmp_path / "other.nc", steps(3, 2, 4), 900 + np.arange(3))
    write_grid(tmp_path / "a.nc", steps(3), np.arange(3), lat=[50.0, 50.5], lon=[6.0, 6.5, 7.0])
    write_grid(tmp_path / "b.nc", steps(3), 3 + np.arange(3), lat=[50.0, 50.5], lon=[6.25, 6.75, 7.25])
    with pytest.raises(DataFileError, match=r"'.*b.nc' has lon 6.25..7.25 \(3 cells, spacing 0.5\), but '.*a.nc' "
                                            r"has lon 6..7 \(3 cells, spacing 0.5\); expected every file of a source "
                                            r"on one grid"):
        reader([tmp_path / "a.nc", tmp_path / "b.nc"])
    with pytest.raises(DataFileError, match=r"'.*other.nc' has a 2x4 grid \(lat x lon\) but '.*v_1999.nc' a 2x3"):
        reader([*paths, tmp_path / "other.nc"])


# -- CF units -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fill", [9.969209968386869e36, -3.4028234663852886e38, 1e20])
def test_an_undeclared_fill_value_is_named_and_a_declared_one_is_missing(tmp_path, fill):
    values = steps(4)
    values[2, 1, 0] = fill  # a tool's "no data" left in the file without a _FillValue attribute
    path = write_grid(tmp_path / "pr.nc", values, np.arange(4))
    with pytest.raises(DataFileError, match=r"pr\.nc.*variable 'v' at time step 2 \(cell 1, 0.*fill value"):
        reader(path).read(day("1999-01-01"), day("1999-01-05"))
    read = reader(path, markers=[fill]).read(day("1999-01-01"), day("1999-01-05"))  # [4, 1, 2, 3]
    assert np.isnan(read[2, 0, 1, 0]) and np.isfinite(read).sum() == read.size - 1
    np.testing.assert_allclose(read[3, 0], values[3], rtol=1e-6)


def test_units_convert_precipitation_and_temperature(tmp_path):
    flux = write_grid(tmp_path / "pr.nc", np.full((4, 2, 3), 2e-5), np.arange(4), variable="pr",
                      var_units="kg m-2 s-1", extra={"tas": np.full((4, 2, 3), 280.0)})
    import xarray as xr

    ds = xr.open_dataset(flux, engine="h5netcdf", decode_times=False).load()
    ds["tas"].attrs["units"] = "K"
    ds.to_netcdf(tmp_path / "both.nc", engine="h5netcdf")
    grid = reader(tmp_path / "both.nc", variables=["pr", "tas"], units_to={"pr": "mm/day", "tas": "degC"})
    x = grid.read(day("1999-01-01"), day("1999-01-05"))
    np.testing.assert_allclose(x[:, 0], 2e-5 * 86400, rtol=1e-5)
    np.testing.assert_allclose(x[:, 1], 280.0 - 273.15, rtol=1e-5)
    assert grid.facts()["units"] == {"pr": "kg m-2 s-1 -> mm/day", "tas": "K -> degC"}
    daily_m = reader(write_grid(tmp_path / "tp.nc", np.full((3, 2, 3), 0.004), np.arange(3), var_units="m"),
                     units_to={"v": "mm/day"})
    np.testing.assert_allclose(daily_m.read(day("1999-01-01"), day("1999-01-02")), 4.0, rtol=1e-5)
    with pytest.raises(DataFileError, match=r"can't convert variable 'v' of '.*w.nc' from 'W m-2' to 'mm/day' "
                                            r"\(units_to\); known conversions"):
        reader(write_grid(tmp_path / "w.nc", steps(3), np.arange(3), var_units="W m-2"), units_to={"v": "mm/day"})
    with pytest.raises(DataFileError, match=r"from 'K' to 'mm/day'"):
        reader(write_grid(tmp_path / "k.nc", steps(3), np.arange(3), var_units="K"), units_to={"v": "mm/day"})
    with pytest.raises(DataFileError, match=r"variable 'v' of '.*n.nc' has no 'units' attribute"):
        reader(write_grid(tmp_path / "n.nc", steps(3), np.arange(3)), units_to={"v": "degC"})


# -- sub-daily steps ------------------------------------------------------------------------------------------
def test_hourly_steps_aggregate_to_days(tmp_path):
    hours = np.arange(72)  # 1999-01-01T00 .. 1999-01-03T23
    values = np.broadcast_to(hours[:, None, None] % 24 + 1.0, (72, 2, 3)).copy()
    values[30, 1, 2] = np.nan  # one hour of 1999-01-02 missing at one cell
    path = write_grid(tmp_path / "h.nc", values, hours, units="hours since 1999-01-01 00:00:00", var_units="m")
    with pytest.raises(DataFileError, match=r"holds 24 steps a day; set the daily aggregate of variable 'v': "
                                            r"aggregate: one of \['sum', 'mean', 'min', 'max', 'last'\]"):
        reader(path)
    total = sum(range(1, 25))
    for how, want in (("sum", total), ("mean", total / 24), ("min", 1.0), ("max", 24.0)):
        grid = reader(path, aggregate={"v": how})
        assert grid.steps_per_day == 24 and list(grid.days) == [day("1999-01-01") + i for i in range(3)]
        x = grid.read(day("1999-01-01"), day("1999-01-04"))[:, 0]  # [3, 2, 3]
        np.testing.assert_allclose(x[[0, 2]], want, rtol=1e-6)
        assert np.isnan(x[1, 1, 2]) and np.allclose(x[1, 0, 0], want)  # a missing hour: missing day (default)
    lenient = reader(path, aggregate={"v": "sum"}, max_missing_steps=1)
    # the present 23 hours of 1999-01-02 at (1, 2) lack hour 6 (value 7): the sum is their mean times 24
    assert lenient.read(day("1999-01-02"), day("1999-01-03"))[0, 0, 1, 2] == pytest.approx((total - 7) / 23 * 24)
    # steps stamped at the end of their hour: the day runs 01:00 .. 00:00 of the next
    shifted = reader(path, aggregate={"v": "sum"}, day_start_hour=1)
    x = shifted.read(day("1998-12-31"), day("1999-01-04"))[:, 0, 0, 0]
    assert np.isnan(x[0]) and np.isnan(x[3])  # 1998-12-31 and 1999-01-03 have 1 and 23 of 24 hours
    assert x[1] == pytest.approx(total - 1 + 1)  # hours 01..23 of 1 January (2..24) and 00 of 2 January (1)
    mm = reader(path, aggregate={"v": "sum"}, units_to={"v": "mm/day"})
    assert mm.read(day("1999-01-01"), day("1999-01-02"))[0, 0, 0, 0] == pytest.approx(1000 * total)
    assert mm.facts()["aggregate"] == {"v": "sum"} and mm.facts()["steps_per_day"] == 24
    with pytest.raises(DataFileError, match=r"depth per step \('m'\); it becomes 'mm/day' only when the day's 24 "
                                            r"steps are summed .*: expected aggregate 'sum' or 'last', got 'mean'"):
        reader(path, aggregate={"v": "mean"}, units_to={"v": "mm/day"})


def test_accumulated_since_the_start_of_the_day_takes_the_last_step(tmp_path):
    """ERA5-Land's way: hourly steps stamped at the end of their hour, accumulated from 00 UTC, so the step
    stamped 00:00 holds the previous day's total."""
    stamps = np.arange(1, 3 * 24 + 1)  # 1999-01-01T01 .. 1999-01-04T00
    totals = np.array([5.0, 12.0, 0.5]) / 1000  # m of water a day
    hour = (stamps - 1) % 24 + 1  # 1 .. 24
    values = totals[(stamps - 1) // 24] * hour / 24
    values[47] = np.nan  # the last step of 1999-01-02
    grid = reader(write_grid(tmp_path / "tp.nc", np.broadcast_to(values[:, None, None], (72, 2, 3)), stamps,
                             units="hours since 1999-01-01", var_units="m"),
                  aggregate={"v": "last"}, day_start_hour=1, units_to={"v": "mm/day"})
    assert list(grid.days) == [day("1999-01-01"), day("1999-01-02"), day("1999-01-03")]
    x = grid.read(day("1999-01-01"), day("1999-01-04"))[:, 0, 0, 0]
    np.testing.assert_allclose(x, [5.0, np.nan, 0.5], rtol=1e-6)


def test_three_hourly_noleap_steps(tmp_path):
    stamps = np.arange(0, 2 * 365 * 24, 3)  # 1999-2000, noleap, every 3 hours
    values = np.broadcast_to((stamps // 24)[:, None, None].astype(float), (len(stamps), 2, 3))
    grid = reader(write_grid(tmp_path / "g.nc", values, stamps, units="hours since 1999-01-01", calendar="noleap"),
                  aggregate={"v": "mean"})
    assert grid.steps_per_day == 8 and len(grid.days) == 730 and day("2000-02-29") not in grid.days
    np.testing.assert_array_equal(grid.read(day("2000-02-28"), day("2000-03-02"))[:, 0, 0, 0], [423, np.nan, 424])


# -- coordinates ----------------------------------------------------------------------------------------------
LAT_DESC = [50.75, 50.25, 49.75, 49.25]
LON_360 = [354.25, 354.75, 355.25, 355.75, 356.25]  # -5.75 .. -3.75


def write_mask(path: Path, inside: np.ndarray, y, x, dims=("lat", "lon"), variable: str = "mask") -> Path:
    """``inside [len(y), len(x)]`` as a mask (1 inside, NaN outside) with 1-D coordinates ``y`` and ``x``
    (their units name which is the longitude: ``lon``/``longitude``, else the second)."""
    import xarray as xr

    lon_first = dims[0] in ("lon", "longitude")
    units = ("degrees_east", "degrees_north") if lon_first else ("degrees_north", "degrees_east")
    values = np.where(inside, 1.0, np.nan)
    xr.Dataset({variable: (dims, values)}, coords={dims[0]: (dims[0], np.asarray(y), {"units": units[0]}),
                                                 dims[1]: (dims[1], np.asarray(x), {"units": units[1]})}
               ).to_netcdf(path, engine="h5netcdf")
    return path


def test_mask_on_the_other_latitude_order_and_longitude_convention(tmp_path):
    grid = reader(write_grid(tmp_path / "g.nc", steps(3, 4, 5), np.arange(3), lat=LAT_DESC, lon=LON_360))
    inside = np.zeros((4, 5), dtype=bool)
    inside[0, 1:3] = True  # the northernmost row (lat 50.75), lon -5.25 and -4.75
    lat_up = LAT_DESC[::-1]
    lon_180 = (np.asarray(LON_360) - 360 + 1e-4).tolist()  # -180..180 and a rounding difference
    mask = write_mask(tmp_path / "m.nc", inside[::-1], lat_up, lon_180)
    got = read_basin_mask(str(mask), "netcdf", "mask", grid, "grid 'v'")
    np.testing.assert_array_equal(got, inside)
    larger = np.zeros((6, 7), dtype=bool)
    larger[1:5, 1:6] = inside[::-1]
    wide = write_mask(tmp_path / "wide.nc", larger, [48.75, *lat_up, 51.25], [-6.25, *lon_180, -3.25])
    np.testing.assert_array_equal(read_basin_mask(str(wide), "netcdf", "mask", grid, "grid 'v'"), inside)
    shifted = write_mask(tmp_path / "s.nc", inside, LAT_DESC, (np.asarray(LON_360) + 0.2).tolist())
    with pytest.raises(DataFileError, match=r"mask 'mask' in '.*s.nc' is on another grid: its lon 354.45..356.45 "
                                            r"\(5 cells, spacing 0.5\), the grid's in '.*g.nc' lon 354.25..356.25 "
                                            r"\(5 cells, spacing 0.5\); expected a mask cell within 0.01 cell"):
        read_basin_mask(str(shifted), "netcdf", "mask", grid, "grid 'v'")
    named = write_mask(tmp_path / "n.nc", inside.T, LON_360, LAT_DESC, dims=("longitude", "latitude"))
    np.testing.assert_array_equal(read_basin_mask(str(named), "netcdf", "mask", grid, "grid 'v'"), inside)
    loose = reader(tmp_path / "g.nc", coord_tolerance=0.5)
    np.testing.assert_array_equal(read_basin_mask(str(shifted), "netcdf", "mask", loose, "grid 'v'"), inside)


def test_crop_by_coordinate_bounds(tmp_path):
    path = write_grid(tmp_path / "g.nc", steps(3, 4, 5), np.arange(3), lat=LAT_DESC, lon=LON_360)
    grid = reader(path, crop_bounds=(49.5, 51.0, -5.3, -4.2))  # lon given in -180..180, file in 0..360
    assert grid.crop == (0, 3, 1, 4) and grid.shape == (3, 3)
    full = reader(path).read(day("1999-01-01"), day("1999-01-02"))
    np.testing.assert_array_equal(grid.read(day("1999-01-01"), day("1999-01-02")), full[:, :, 0:3, 1:4])
    inside = np.ones((4, 5), dtype=bool)
    mask = write_mask(tmp_path / "m.nc", inside, LAT_DESC, LON_360)
    assert read_basin_mask(str(mask), "netcdf", "mask", grid, "grid 'v'").shape == (3, 3)
    with pytest.raises(DataFileError, match=r"crop_bounds \[10, 20\] along 'lat' select no cell of '.*g.nc', whose "
                                            r"lat 50.75..49.25 \(4 cells, spacing 0.5\)"):
        reader(path, crop_bounds=(10, 20, 0, 360))
    seam = write_grid(tmp_path / "seam.nc", steps(3, 4, 5), np.arange(3), lat=LAT_DESC, lon=[0.5, 1, 1.5, 359, 359.5])
    with pytest.raises(DataFileError, match=r"not contiguous \(the bounds cross the file's longitude seam\)"):
        reader(seam, crop_bounds=(49, 51, -1.2, 1.2))
    plain = write_grid(tmp_path / "plain.nc", steps(3), np.arange(3))
    with pytest.raises(DataFileError, match=r"crop_bounds needs coordinate values along 'lat'"):
        reader(plain, crop_bounds=(0, 1, 0, 1))


# -- through the data set and the config ----------------------------------------------------------------------
def grid_config(root: Path, **source) -> DataConfig:
    src = GridSource(name="v", format="netcdf", **source)
    return DataConfig(source="files", steps=8, stride=4, patch_size=1, files=FilesConfig(
        root=str(root), basins=["b1"], grids=[src],
        split=SplitConfig(by="period", train=["1999-01-01", "2000-06-30"], val=["2000-07-01", "2000-12-31"])))


def test_data_set_records_the_calendar_and_keeps_29_february_out_of_every_sample(tmp_path):
    yearly_files(tmp_path, [1999, 2000], calendar="noleap")
    data = grid_config(tmp_path, path="v_*.nc")
    run = Config(data=data)
    validate_config(run)
    train = FilesDataset(data, "train")
    reading = train.norm_stats["modalities"]["v"]["reading"]
    assert reading["calendar"] == "noleap" and reading["files"] == 2 and "29 February" in reading["calendar_rule"]
    json.dumps(train.norm_stats)
    leap = [i for i, (_, s) in enumerate(train.starts) if s <= day("2000-02-29") < s + 8]
    assert leap
    for i in leap:
        sample = train[i]
        t = day("2000-02-29") - sample.meta["start_day"]
        assert np.isnan(sample.grids["v"][t].numpy()).all()  # an invalid day: no token, never in a loss
        others = np.delete(sample.grids["v"].numpy(), t, axis=0)
        assert np.isfinite(others).all()
    from crossmae.data.loader import make_collator

    batch = make_collator(run, train)([train[i] for i in leap])
    v = batch.modalities["v"]
    tokens = torch.cat([v.encoder.index, v.hidden.index])  # (b, t, p) of every token
    for b, i in enumerate(leap):
        t = day("2000-02-29") - train.starts[i][1]
        days = set(tokens[tokens[:, 0] == b, 1].tolist())
        assert t not in days and len(days) == 7  # every other day has tokens


def test_grid_config_errors_name_the_key():
    def check(message: str, **source):
        run = Config(data=grid_config(Path("/"), path="g.nc", **source))
        with pytest.raises(ConfigError, match=message):
            validate_config(run)

    check(r"data.files.grids\[0\].calendar_360 must be one of \['refuse', 'rescale_year', 'keep_date'\], got 'x'",
          calendar_360="x")
    check(r"data.files.grids\[0\].aggregate \(v\) must be one of \['sum', 'mean', 'min', 'max', 'last'\], got 'median'",
          aggregate="median")
    check(r"data.files.grids\[0\].units_to names 'tp', which is not one of its variables \['v'\]",
          units_to={"tp": "mm/day"})
    check(r"data.files.grids\[0\]: set crop \(cell indices\) or crop_bounds \(coordinates\), not both",
          crop=[0, 1, 0, 1], crop_bounds=[0, 1, 0, 1])
    check(r"data.files.grids\[0\].crop_bounds must be \[lat_min, lat_max, lon_min, lon_max\]", crop_bounds=[1, 0])
    check(r"data.files.grids\[0\].day_start_hour must be in \(-24, 24\)", day_start_hour=30.0)


def test_the_readme_era5_land_example_reads_its_files(tmp_path):
    """The README's "ERA5-Land yearly files + a gauge CSV" config on generated files of that layout: hourly
    fields stamped at the end of their hour, tp accumulated from 00 UTC (m), t2m (K), latitude descending,
    one file a year, a mask on a larger grid stored the other way up."""
    import xarray as xr

    from crossmae.config import resolve_config

    text = (ROOT / "README.md").read_text().split("ERA5-Land yearly files + a gauge CSV")[1]
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "run.yaml").write_text(text.split("```yaml\n")[1].split("```")[0])
    data = tmp_path / "data"
    for folder in ("era5land", "masks", "gauges"):
        (data / folder).mkdir(parents=True)
    lat = np.arange(51.25, 48.7, -0.25)  # 11 rows, north first
    lon = np.arange(5.25, 8.8, 0.25)  # 15 columns
    rng = np.random.default_rng(0)
    first, last = day("1999-12-31"), day("2001-02-28")
    totals = rng.gamma(0.6, 4.0, (last - first + 1, len(lat), len(lon)))  # mm on each day from 1999-12-31
    for year, (d0, d1) in {2000: ("2000-01-01", "2000-12-31"), 2001: ("2001-01-01", "2001-02-28")}.items():
        hours = np.arange(day(d0) * 24, (day(d1) + 1) * 24)  # CDS stamps: 00 .. 23 of each day of the request
        of_day, hour = hours // 24 - first, hours % 24
        tp = np.where((hour == 0)[:, None, None], totals[np.maximum(of_day - 1, 0)],
                      totals[of_day] * (hour / 24)[:, None, None]) / 1000
        t2m = 273.15 + 10 + np.broadcast_to((hour / 2.0)[:, None, None], tp.shape)
        time = {"units": "seconds since 1970-01-01", "calendar": "proleptic_gregorian"}
        xr.Dataset({"tp": (("valid_time", "latitude", "longitude"), tp.astype(np.float32), {"units": "m"}),
                    "t2m": (("valid_time", "latitude", "longitude"), t2m.astype(np.float32), {"units": "K"})},
                   coords={"valid_time": ("valid_time", hours * 3600.0, time),
                           "latitude": ("latitude", lat, {"units": "degrees_north"}),
                           "longitude": ("longitude", lon, {"units": "degrees_east"})},
                   ).to_netcdf(data / "era5land" / f"era5-land_{year}.nc", engine="h5netcdf")
    mask_lat, mask_lon = np.arange(48.0, 52.01, 0.25), np.arange(4.0, 10.01, 0.25)  # larger, south first
    inside = (np.abs(mask_lat[:, None] - 50.0) <= 0.6) & (np.abs(mask_lon[None, :] - 7.0) <= 1.1)
    write_mask(data / "masks" / "6335020.nc", inside, mask_lat, mask_lon, variable="basin")
    flow = np.round(rng.gamma(2.0, 10.0, last - first), 2).astype(str)
    flow[40:45] = "-999"
    dates = np.datetime64("2000-01-01") + np.arange(last - first)
    (data / "gauges" / "6335020.csv").write_text("date,Q\n" + "".join(f"{d},{q}\n" for d, q in zip(dates, flow)))
    config = resolve_config(None, str(tmp_path / "cfg" / "run.yaml"), [
        "data.steps=16", "data.files.split={by: period, train: [2000-01-01, 2000-09-30], "
        "val: [2000-10-01, 2000-12-31], test: [2001-01-01, 2001-02-28]}"])
    train = FilesDataset(config.data, "train")
    test = FilesDataset(config.data, "test", norm_stats=train.norm_stats)
    assert [(m.name, m.channels, m.height, m.width) for m in train.spec.modalities] == [
        ("era5land", 2, 9, 13), ("flow", 1, 0, 0)]
    reading = train.norm_stats["modalities"]["era5land"]["reading"]
    assert reading["files"] == 2 and reading["steps_per_day"] == 24 and reading["day_start_hour"] == 1
    assert reading["units"] == {"tp": "m -> mm/day", "t2m": "K -> degC"}
    assert reading["aggregate"] == {"tp": "last", "t2m": "mean"} and "gaps" not in reading
    sample = test[len(test) - 1]
    mask = sample.basin_masks["era5land"].numpy()  # [9, 13]: rows 51.0 .. 49.0, columns 5.5 .. 8.5
    np.testing.assert_array_equal(mask, inside[np.ix_(np.arange(12, 3, -1), np.arange(6, 19))])
    got = test.denormalize("era5land", sample.grids["era5land"]).numpy()  # [16, 2, 9, 13]
    t0 = sample.meta["start_day"] - first
    want = totals[t0:t0 + 16][:, 1:10, 1:14]
    np.testing.assert_allclose(got[:, 0][:, mask], want[:, mask], rtol=1e-4, atol=1e-3)
    t2m = np.mean(np.r_[np.arange(1, 24), 0] / 2.0) + 10  # the mean of 01:00 .. 00:00 in degC
    np.testing.assert_allclose(got[:, 1][:, mask], t2m, rtol=1e-4)
    grid = test._grids["era5land"][0]
    assert np.isfinite(grid.read(day("2000-12-31"), day("2001-01-01"))).all()  # its last step is in the 2001 file
    assert np.isnan(grid.read(day("2001-02-28"), day("2001-03-01"))).all()  # its 00:00 of 1 March is in none
    window = next(i for i, (_, s) in enumerate(train.starts) if s == day("2000-02-02"))
    q = train.denormalize("flow", train[window].series["flow"]).numpy()[:, 0]  # 2000-02-02 .. 2000-02-17
    assert np.isnan(q[8:13]).all() and np.isfinite(q[:8]).all()  # -999 on 2000-02-10 .. 2000-02-14


# -- scale ----------------------------------------------------------------------------------------------------
MEASURE = """
import importlib.util, sys, time

spec = importlib.util.spec_from_file_location("readers", sys.argv[4])  # the module alone: no torch to import
readers = sys.modules["readers"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(readers)
GridOptions, GridReader, iso_to_day = readers.GridOptions, readers.GridReader, readers.iso_to_day


def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith(key))


readers.CACHE_BYTES = int(sys.argv[2])
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to the current resident size: imports don't count
before = status("VmRSS")
start = time.perf_counter()
grid = GridReader([sys.argv[1]], "netcdf", GridOptions(variables=["v"]), "grid")
x = grid.read(iso_to_day("2000-01-10"), iso_to_day("2000-01-10") + int(sys.argv[3]))
print(status("VmHWM") - before, x.nbytes / 2**20, time.perf_counter() - start)
"""


def measure_window_read(path: Path, window_days: int, cache_bytes: int) -> tuple[float, float, float]:
    """Peak memory growth (MiB) of a fresh process that opens ``path`` and reads a window of ``window_days``
    (keeping a record of at most ``cache_bytes`` whole), the window's size (MiB) and the seconds it took."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    module = ROOT / "crossmae" / "data" / "readers.py"
    out = subprocess.run([sys.executable, "-c", MEASURE, str(path), str(cache_bytes), str(window_days), str(module)],
                         capture_output=True, text=True, env=env, check=True, cwd=ROOT)
    grown, window, seconds = (float(v) for v in out.stdout.split())
    return grown, window, seconds


def write_large_grid(path: Path, days: int, side: int) -> Path:
    """A daily float32 grid of ``days x side x side`` written a year at a time (never held whole)."""
    import h5netcdf

    with h5netcdf.File(path, "w") as f:
        f.dimensions = {"time": days, "lat": side, "lon": side}
        time = f.create_variable("time", ("time",), "f8")
        time.attrs.update(units="days since 2000-01-01", calendar="standard")
        time[:] = np.arange(days)
        v = f.create_variable("v", ("time", "lat", "lon"), "f4", chunks=(1, side, side))
        rng = np.random.default_rng(0)
        for t0 in range(0, days, 365):
            t1 = min(days, t0 + 365)
            v[t0:t1] = rng.random((t1 - t0, side, side), dtype=np.float32)
    return path


def test_window_reads_stay_small_for_a_grid_larger_than_the_cache(tmp_path):
    side = 300  # 0.34 MiB a day; the record (120 days, 41 MiB) is larger than the 4 MiB cache allowed here
    path = write_large_grid(tmp_path / "big.nc", 120, side)
    one_day, _, _ = measure_window_read(path, 1, 4 * 2**20)  # opening the file, decoding its times
    grown, window, _ = measure_window_read(path, 8, 4 * 2**20)
    assert window == pytest.approx(8 * side * side * 4 / 2**20)
    assert grown - one_day < 6 * window + 5, f"reading a {window:.1f} MiB window of a 41 MiB file grew the " \
                                             f"process by {grown - one_day:.0f} MiB more than reading one day"
    kept, _, _ = measure_window_read(path, 8, 2**30)  # the same file, kept whole: the measure sees it
    assert kept - one_day > 35, f"keeping a 41 MiB record whole grew the process by only {kept - one_day:.0f} MiB"


if __name__ == "__main__":  # python tests/test_climate_grids.py DAYS SIDE FOLDER: 1-day and 32-day window reads
    from crossmae.data.readers import CACHE_BYTES

    days, side, folder = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    big = write_large_grid(folder / f"grid_{days}x{side}x{side}.nc", days, side)
    print(f"file {big.stat().st_size / 2**20:.0f} MiB ({days} days of {side}x{side} float32)")
    for window_days in (1, 32):
        grown, window, seconds = measure_window_read(big, window_days, CACHE_BYTES)
        print(f"  open + read a {window_days}-day window ({window:.1f} MiB): peak memory growth {grown:.1f} MiB, "
              f"{seconds:.2f} s")
