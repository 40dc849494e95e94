"""The region data side of site sets: layouts and their exact (un)grouping, the region data set from files and
its bad input, the synthetic region, statistics and groups saved with the run, the Moselle as a one-site region."""

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from crossmae.config import ConfigError, resolve_config
from crossmae.data.readers import DataFileError, iso_to_day, read_mhm_gauge
from crossmae.data.region import RegionDataset
from crossmae.data.sites import SiteLayout, build_layout, group_values, ungroup_values
from crossmae.data.synthetic import count_valid_patches
from crossmae.data.synthetic_region import SHAPES, SyntheticRegion

ROOT = Path(__file__).resolve().parents[1]
MOSELLE = ROOT.parent / "shared" / "data" / "moselle"
DAYS = 120
FIRST = "2001-01-01"


# -- layouts ------------------------------------------------------------------------------------------------
def random_sites(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [f"g{i}" for i in range(n)], rng.uniform(0, 60, n), rng.uniform(0, 40, n)


@pytest.mark.parametrize("method,size", [("site", 1), ("kmeans", 4), ("kmeans", 8), ("kmeans", 1)])
@pytest.mark.parametrize("n", [1, 7, 37])
def test_group_and_ungroup_round_trip_exactly(method, size, n):
    ids, rows, cols = random_sites(n, seed=n)
    layout = build_layout(ids, rows, cols, method, group_size=size, seed=3)
    values = torch.randn(5, n, 3, dtype=torch.float64)
    values[0, 0, 1] = float("nan")  # a missing value stays where it was
    grouped = group_values(values, layout)  # [T, G, K, F]
    assert grouped.shape == (5, layout.groups, layout.group_size, 3)
    assert torch.equal(torch.isnan(ungroup_values(grouped, layout)), torch.isnan(values))
    assert torch.equal(ungroup_values(grouped, layout).nan_to_num(7.0), values.nan_to_num(7.0))
    assert torch.isnan(grouped[:, ~torch.from_numpy(layout.slot_mask)]).all()  # empty slots: all NaN
    assert torch.equal(group_values(ungroup_values(grouped, layout), layout).nan_to_num(7.0), grouped.nan_to_num(7.0))
    assert sorted(layout.site_ids) == sorted(ids)
    assert SiteLayout.from_dict(json.loads(json.dumps(layout.to_dict()))) == layout
    # each site's coordinates went with it into its slot
    position = {site: i for i, site in enumerate(ids)}
    for g, group in enumerate(layout.ids):
        for k, site in enumerate(group):
            if site is not None:
                assert (layout.rows[g, k], layout.cols[g, k]) == (rows[position[site]], cols[position[site]])


def test_kmeans_groups_are_deterministic_bounded_and_local():
    ids, rows, cols = random_sites(604, seed=1)
    a = build_layout(ids, rows, cols, "kmeans", group_size=8, seed=0)
    assert a == build_layout(ids, rows, cols, "kmeans", group_size=8, seed=0)
    assert a.groups == 76 and a.group_size == 8
    assert a.slot_mask.sum(axis=1).max() <= 8 and a.slot_mask.sum(axis=1).min() >= 1
    # groups are compact: mean distance to the group centre well below that to the region's centre
    centre = np.array(a.locations())  # [G, 2]
    within = np.nanmean(np.hypot(a.rows - centre[:, :1], a.cols - centre[:, 1:]))
    overall = np.mean(np.hypot(rows - rows.mean(), cols - cols.mean()))
    assert within < 0.3 * overall, (within, overall)


def test_groups_from_a_file(tmp_path):
    ids, rows, cols = random_sites(5)
    path = tmp_path / "groups.csv"
    path.write_text("site_id,group\ng0,10\ng1,2\ng2,10\ng3,2\ng4,3\n")
    layout = build_layout(ids, rows, cols, "file", groups_file=path)
    assert layout.ids == (("g1", "g3"), ("g4", None), ("g0", "g2"))  # labels in numeric order, sites in table order
    path.write_text("site_id,group\ng0,1\ng1,1\ng9,2\n")
    with pytest.raises(ValueError, match=r"groups.csv.*line 4.*'g9' is not in the site table"):
        build_layout(ids, rows, cols, "file", groups_file=path)
    path.write_text("site_id,group\ng0,1\ng1,1\n")
    with pytest.raises(ValueError, match=r"gives no group to the sites \['g2', 'g3', 'g4'\]"):
        build_layout(ids, rows, cols, "file", groups_file=path)


def test_group_values_checks_its_shapes():
    ids, rows, cols = random_sites(6)
    layout = build_layout(ids, rows, cols, "kmeans", group_size=4)
    with pytest.raises(ValueError, match=r"values must be \[T, S=6, F\]"):
        group_values(torch.zeros(3, 5, 1), layout)
    g, k = layout.groups, layout.group_size
    with pytest.raises(ValueError, match=rf"grouped must be \[T, G={g}, K={k}, F\]"):
        ungroup_values(torch.zeros(3, g, k + 1, 1), layout)


# -- a region from files -----------------------------------------------------------------------------------
def write_region(folder: Path, fmt: str = "csv") -> dict:
    """A 6 x 5 grid (1-D lat/lon, one sea cell), 4 sites, DAYS days of two variables; returns the data section."""
    import xarray as xr

    rng = np.random.default_rng(0)
    lat = 50.0 - np.arange(6) * 0.1  # north first
    lon = 7.0 + np.arange(5) * 0.1
    dates = np.datetime64(FIRST) + np.arange(DAYS)
    rain = rng.gamma(0.6, 4.0, (DAYS, 6, 5)).astype(np.float32)
    mask = np.ones((6, 5))
    mask[0, 0] = np.nan
    xr.Dataset({"pre": (("time", "lat", "lon"), rain), "mask": (("lat", "lon"), mask)},
               coords={"time": dates.astype("datetime64[ns]"), "lat": ("lat", lat, {"units": "degrees_north"}),
                       "lon": ("lon", lon, {"units": "degrees_east"})}).to_netcdf(folder / "grid.nc", engine="h5netcdf")
    sites = {"a": (49.96, 7.01, 100.0), "b": (49.51, 7.41, 220.0), "c": (49.73, 7.22, 150.0), "d": (49.8, 7.3, 90.0)}
    lines = ["site_id,lat,lon,area"] + [f"{s},{la},{lo},{ar}" for s, (la, lo, ar) in sites.items()]
    (folder / "sites.csv").write_text("\n".join(lines) + "\n")
    rows = ["site_id,date,flow,evap"]
    for s_i, site in enumerate(sites):
        for d in range(DAYS):
            if site == "d" and d >= 40:  # d's record ends early: later windows have no d
                break
            flow = "-9999" if (site == "a" and d == 5) else f"{1.0 + s_i + 0.01 * d:.3f}"
            rows.append(f"{site},{dates[d]},{flow},{0.5 * s_i + 0.001 * d:.4f}")
    (folder / "gauges.csv").write_text("\n".join(rows) + "\n")
    if fmt == "parquet":
        import pandas as pd

        pd.read_csv(folder / "gauges.csv", dtype={"site_id": str, "date": str}).to_parquet(folder / "gauges.parquet")
    return {"source": "region", "steps": 10, "stride": 10, "patch_size": 2, "batch_size": 2, "region": {
        "synthetic": "", "root": str(folder),
        "grids": [{"name": "pre", "path": "grid.nc", "mask_variable": "mask", "transform": "log1p"}],
        "site_sets": [{"name": "gauges", "format": fmt, "path": f"gauges.{fmt}", "variables": ["flow", "evap"],
                       "transforms": {"flow": "log1p"}, "flow": ["flow"],
                       "sites": {"path": "sites.csv", "attributes": ["area"]},
                       "grouping": {"method": "kmeans", "size": 3}}],
        "split": {"train": ["2001-01-01", "2001-02-28"], "val": ["2001-03-01", "2001-04-30"]}}}


def region_config(tmp_path, data: dict, *overrides):
    path = tmp_path / "run.yaml"
    import yaml

    path.write_text(yaml.safe_dump({"data": data}))
    return resolve_config(None, str(path), list(overrides))


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_region_from_files_places_sites_and_normalises_from_the_training_split(tmp_path, fmt):
    if fmt == "parquet":
        pytest.importorskip("pyarrow")
    config = region_config(tmp_path, write_region(tmp_path, fmt))
    train = RegionDataset(config.data, "train")
    val = RegionDataset(config.data, "val", norm_stats=train.norm_stats)
    assert len(train) == 5 and len(val) == 6  # 59 and 61 days in windows of 10
    layout = train.site_layouts["gauges"]
    assert val.site_layouts["gauges"] == layout and layout.groups == 2 and layout.group_size == 3
    position = dict(zip(layout.site_ids, zip(layout.rows[layout.slot_mask], layout.cols[layout.slot_mask],
                                            strict=True), strict=True))
    # lat 49.96 lies in the first row (cells centred on 50.0, 49.9, ...), lon 7.01 in the first column
    np.testing.assert_allclose(position["a"], (0.5 + 0.4, 0.5 + 0.1), atol=1e-9)
    np.testing.assert_allclose(position["b"], (0.5 + 4.9, 0.5 + 4.1), atol=1e-9)
    spec = train.spec
    assert spec.grid_shape == (6, 5) and spec["gauges"].kind == "sites" and spec["gauges"].site_attrs == 1
    sample = train[1]  # days 10..19
    assert sample.grids["pre"].shape == (10, 1, 6, 5) and not sample.basin_masks["pre"][0, 0]
    assert torch.equal(train.land_mask, sample.basin_masks["pre"])
    sites = sample.sites["gauges"]
    assert sites.shape == (10, 2, 3, 2)
    physical = train.denormalize("gauges", sites)  # [T, G, K, F]
    per_site = ungroup_values(physical, layout)  # [T, S, F]
    order = {s: i for i, s in enumerate(layout.site_ids)}
    for s_i, site in enumerate("abcd"):
        np.testing.assert_allclose(per_site[:, order[site], 0], 1.0 + s_i + 0.01 * np.arange(10, 20), rtol=1e-5)
    assert torch.equal(sample.site_masks["gauges"], torch.from_numpy(layout.slot_mask))
    # training statistics: log1p flow over the training days of all sites; a missing marker is no value
    stats = train.norm_stats["modalities"]["gauges"]
    flows = [np.log1p(1.0 + s_i + 0.01 * d) for s_i, site in enumerate("abcd") for d in range(59)
             if not (site == "a" and d == 5) and not (site == "d" and d >= 40)]
    np.testing.assert_allclose(stats["mean"][0], np.mean(flows), rtol=1e-9)
    np.testing.assert_allclose(stats["std"][0], np.std(flows), rtol=1e-6)
    assert torch.isnan(train[0].sites["gauges"][5, :, :, 0][torch.from_numpy(
        np.array([[s == "a" for s in g] for g in layout.ids]))]).all()
    # the static attribute, standardised over the sites
    static = sample.site_static["gauges"]  # [G, K, 1]
    areas = np.array([100.0, 220.0, 150.0, 90.0])
    got = ungroup_values(static[None], layout)[0, :, 0]
    np.testing.assert_allclose(got, ((areas - areas.mean()) / areas.std())[[order[s] for s in "abcd"]], rtol=1e-5)


def test_a_site_with_no_data_in_a_window_is_all_nan(tmp_path):
    config = region_config(tmp_path, write_region(tmp_path))
    val = RegionDataset(config.data, "val", norm_stats=RegionDataset(config.data, "train").norm_stats)
    layout = val.site_layouts["gauges"]
    g, k = next((g, k) for g, group in enumerate(layout.ids) for k, s in enumerate(group) if s == "d")
    for i in range(len(val)):
        sample = val[i]
        assert torch.isnan(sample.sites["gauges"][:, g, k]).all()  # d's record ended in February
        assert sample.site_masks["gauges"][g, k]  # the slot is d's; the collate makes no token of it
        assert torch.isfinite(sample.sites["gauges"]).any()


def test_per_site_normalisation_gives_each_site_its_own_statistics(tmp_path):
    data = write_region(tmp_path)
    data["region"]["site_sets"][0]["per_site"] = ["flow"]
    config = region_config(tmp_path, data)
    train = RegionDataset(config.data, "train")
    entry = train.norm_stats["modalities"]["gauges"]["per_site"]["flow"]
    assert sorted(entry) == ["a", "b", "c", "d"]
    layout = train.site_layouts["gauges"]
    _, values = train._site_values["gauges"]  # [days, S, F] normalised, layout order
    flow = values[:59, :, 0]
    np.testing.assert_allclose(np.nanmean(flow, axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(np.nanstd(flow, axis=0), 1.0, atol=1e-4)
    per_site = ungroup_values(train.denormalize("gauges", train[2].sites["gauges"]), layout)
    order = {s: i for i, s in enumerate(layout.site_ids)}
    np.testing.assert_allclose(per_site[:, order["c"], 0], 3.0 + 0.01 * np.arange(20, 30), rtol=1e-5)


def test_saved_groups_are_reused_whatever_the_grouping_now_says(tmp_path):
    data = write_region(tmp_path)
    config = region_config(tmp_path, data)
    train = RegionDataset(config.data, "train")
    saved = json.loads(json.dumps(train.norm_stats))  # as the run saves them
    data["region"]["site_sets"][0]["grouping"] = {"method": "site"}
    regrouped = region_config(tmp_path, data)
    assert RegionDataset(regrouped.data, "train").site_layouts["gauges"].group_size == 1
    resumed = RegionDataset(regrouped.data, "val", norm_stats=saved)
    assert resumed.site_layouts["gauges"] == train.site_layouts["gauges"]


@pytest.mark.parametrize("case,message", [
    ("unknown_site", r"gauges.csv' names site 'zz' on line 3, which is not in the site table"),
    ("duplicate", r"gauges.csv' gives site 'a' on 2001-01-02 twice \(line 3 and line 4\)"),
    ("bad_date", r"column 'date' of '.*gauges.csv' holds '2001-02-30' on line 4, which does not parse"),
    ("bad_value", r"column 'flow' of '.*gauges.csv' holds 'high' on line 3; expected a number"),
    ("outside", r"site 'b' of '.*sites.csv' \(lat=48.5, lon=7.41\) lies outside the 6x5 grid"),
])
def test_bad_gauge_and_site_tables_name_the_file_row_and_value(tmp_path, case, message):
    data = write_region(tmp_path)
    gauges = tmp_path / "gauges.csv"
    lines = gauges.read_text().splitlines()
    if case == "unknown_site":
        lines[2] = "zz" + lines[2][1:]
    elif case == "duplicate":
        lines.insert(3, lines[2])
    elif case == "bad_date":
        lines[3] = "a,2001-02-30,1.0,0.1"
    elif case == "bad_value":
        lines[2] = "a,2001-01-02,high,0.1"
    elif case == "outside":
        sites = tmp_path / "sites.csv"
        sites.write_text(sites.read_text().replace("49.51,7.41", "48.5,7.41"))
    gauges.write_text("\n".join(lines) + "\n")
    config = region_config(tmp_path, data)
    with pytest.raises(DataFileError, match=message):
        RegionDataset(config.data, "train")


def test_a_site_outside_the_grid_by_row_and_col_and_a_parquet_row(tmp_path):
    pytest.importorskip("pyarrow")
    import pandas as pd

    data = write_region(tmp_path)
    (tmp_path / "sites.csv").write_text("site_id,row,col\na,0.5,0.5\nb,5.9,4.99\nc,2,2\nd,6.0,1\n")
    data["region"]["site_sets"][0]["sites"] = {"path": "sites.csv", "coords": "rowcol"}
    with pytest.raises(DataFileError, match=r"site 'd' of '.*sites.csv' \(row=6, col=1\) lies outside the 6x5 grid"):
        RegionDataset(region_config(tmp_path, data).data, "train")
    frame = pd.read_csv(tmp_path / "gauges.csv", dtype=str)
    frame.loc[7, "site_id"] = "q"
    frame.to_parquet(tmp_path / "gauges.parquet")
    data = write_region(tmp_path)
    data["region"]["site_sets"][0].update(format="parquet", path="gauges.parquet")
    with pytest.raises(DataFileError, match=r"gauges.parquet' names site 'q' on row 7"):
        RegionDataset(region_config(tmp_path, data).data, "train")


def test_region_config_errors_name_the_key(tmp_path):
    data = write_region(tmp_path)
    bad = copy.deepcopy(data)
    bad["region"]["site_sets"][0]["per_site"] = ["rain"]
    with pytest.raises(ConfigError, match=r"data.region.site_sets\[0\].per_site names \['rain'\]"):
        region_config(tmp_path, bad)
    bad = copy.deepcopy(data)
    bad["region"]["site_sets"][0]["grouping"] = {"method": "file"}
    with pytest.raises(ConfigError, match=r"data.region.site_sets\[0\].grouping.file must name"):
        region_config(tmp_path, bad)
    bad = copy.deepcopy(data)
    bad["region"]["site_sets"][0]["format"] = "mhm_gauge"
    with pytest.raises(ConfigError, match=r"data.region.site_sets\[0\].path must hold \{site\}"):
        region_config(tmp_path, bad)
    with pytest.raises(ConfigError, match=r"data.region.synthetic must be one of \['full', 'small'\]"):
        resolve_config("regional_small", None, ["data.region.synthetic=medium"])
    with pytest.raises(ConfigError, match=r"data.region.split.by must be 'period'"):
        resolve_config("regional_small", None, ["data.region.split.by=basin"])


# -- the synthetic region ----------------------------------------------------------------------------------
def small_periods():
    sh = SHAPES["small"]
    return {"train": (iso_to_day(sh.train[0]), iso_to_day(sh.train[1]))}


def test_synthetic_region_is_deterministic_by_seed_and_at_its_shapes():
    a, b, c = (SyntheticRegion("small", seed, small_periods()) for seed in (0, 0, 1))
    assert np.array_equal(a.land, b.land) and np.array_equal(a.site_values, b.site_values, equal_nan=True)
    assert not np.array_equal(a.site_values, c.site_values, equal_nan=True)
    sh = SHAPES["small"]
    assert a.land.shape == (sh.height, sh.width) and count_valid_patches(a.land, sh.patch) == sh.land_patches
    assert a.site_values.shape == (iso_to_day(sh.last) - iso_to_day(sh.first) + 1, sh.sites, 2)
    assert a.site_attrs.shape == (sh.sites, 11) and np.isfinite(a.site_attrs).all()
    rows, cols = a.site_rows.astype(int), a.site_cols.astype(int)
    assert a.land[rows, cols].all()  # every gauge on land
    missing = np.isnan(a.site_values).mean(axis=(0, 1))
    assert 0.05 < missing[0] < 0.6 and 0.05 < missing[1] < 0.7  # gaps, late and early records
    day0 = a.first_day + 200
    precip = a.render("precip", day0, day0 + 30)
    assert np.array_equal(precip, b.render("precip", day0, day0 + 30)) and (precip >= 0).all()


def test_synthetic_soil_moisture_of_a_window_equals_the_sweep():
    world = SyntheticRegion("small", 0, small_periods())
    day0 = world.first_day + 77  # not on a checkpoint
    early = world.render("soil_moisture", day0, day0 + 20)
    late = world.render("soil_moisture", day0 + 10, day0 + 20)  # rolled from another checkpoint
    np.testing.assert_allclose(early[10:], late, rtol=1e-5)
    assert ((early > 0.05) & (early < 0.45)).all()


def test_synthetic_riverflow_follows_the_catchment_precipitation():
    """A site's flow correlates with its own catchment's recent rain more than with a far site's."""
    world = SyntheticRegion("small", 0, small_periods())
    rain = world.render("precip", world.first_day, world.last_day + 1)  # [N, L]
    catchment = world.catchment_mean(rain)  # [N, S]
    smooth = np.stack([np.convolve(catchment[:, s], np.ones(5) / 5)[:catchment.shape[0]]
                       for s in range(catchment.shape[1])], axis=1)
    flow = world.site_values[..., 0]
    own, other = [], []
    for s in range(flow.shape[1]):
        ok = np.isfinite(flow[:, s])
        far = int(np.argmax(np.hypot(world.site_rows - world.site_rows[s], world.site_cols - world.site_cols[s])))
        own.append(np.corrcoef(np.log1p(flow[ok, s]), smooth[ok, s])[0, 1])
        other.append(np.corrcoef(np.log1p(flow[ok, s]), smooth[ok, far])[0, 1])
    assert np.median(own) > 0.4 and np.median(own) > np.median(other) + 0.1, (np.median(own), np.median(other))


def test_synthetic_region_data_set_samples_and_statistics():
    config = resolve_config("regional_small")
    train = RegionDataset(config.data, "train")
    val = RegionDataset(config.data, "val", norm_stats=train.norm_stats)
    test = RegionDataset(config.data, "test", norm_stats=train.norm_stats)
    world = train.region.grids["precip"].world
    assert val.region.grids["precip"].world is world and test.region.grids["precip"].world is world  # one world
    assert len(train) > len(test) > len(val) > 0
    sh = SHAPES["small"]
    assert [m.name for m in train.spec.modalities] == ["precip", "temperature", "soil_moisture", "gauges"]
    gauges = train.spec["gauges"]
    assert gauges.groups == -(-sh.sites // 4) and gauges.group_size == 4 and gauges.site_attrs == 11
    assert len(gauges.locations) == gauges.groups
    sample = train[3]
    assert sample.grids["precip"].shape == (16, 1, sh.height, sh.width)
    assert (sample.grids["precip"][:, :, ~sample.basin_masks["precip"]] == 0).all()
    assert sample.sites["gauges"].shape == (16, gauges.groups, 4, 2)
    assert sample.site_static["gauges"].shape == (gauges.groups, 4, 11)
    assert sample.first_day == iso_to_day(sh.first) + 3 * config.data.stride
    # the grids' statistics are those of the training period: normalised training values have mean 0, std 1
    values = []
    for i in range(0, len(train), 2):  # windows every 16 days (stride 8): every training day once
        x = train[i].grids["temperature"][:, 0][:, train[i].basin_masks["temperature"]]
        values.append(x.numpy().ravel())
    values = np.concatenate(values)
    assert abs(values.mean()) < 0.1 and abs(values.std() - 1) < 0.1
    # denormalised site values are the world's physical values
    layout = train.site_layouts["gauges"]
    physical = ungroup_values(train.denormalize("gauges", sample.sites["gauges"]), layout)  # [T, S, F]
    gauges = train.region.site_sets[0]
    order = [gauges.ids.index(s) for s in layout.site_ids]
    start = sample.first_day - gauges.first_day
    np.testing.assert_allclose(physical.numpy(), gauges.values[start:start + 16][:, order], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_full_synthetic_region_has_the_seed_shapes():
    """The ``regional`` preset's region: 290 x 180 cells, 94 land patches of 522, 604 gauges in 76 groups of 8."""
    config = resolve_config("regional")
    train = RegionDataset(config.data, "train")
    world = train.region.grids["precip"].world
    assert count_valid_patches(world.land, 10) == 94 and world.land.shape == (290, 180)
    assert train.spec["gauges"].groups == 76 and train.spec["gauges"].group_size == 8
    assert world.nbytes < 200 * 2**20
    sample = train[0]
    assert sample.grids["soil_moisture"].shape == (90, 1, 290, 180) and sample.sites["gauges"].shape == (90, 76, 8, 2)


# -- the Moselle as a one-site region ------------------------------------------------------------------------
@pytest.mark.skipif(not MOSELLE.is_dir(), reason="needs ../shared/data/moselle")
def test_moselle_region_reads_its_gauge_as_a_one_site_set():
    config = resolve_config(None, str(ROOT / "configs" / "moselle_region.yaml"))
    train = RegionDataset(config.data, "train")
    assert train.spec.grid_shape == (9, 6) and int(train.land_mask.sum()) == 34
    layout = train.site_layouts["discharge"]
    assert layout.ids == (("perl",),)
    row, col = layout.locations()[0]
    assert 8.0 <= row < 9.0 and 3.0 <= col < 4.0  # the gauge lies in the grid's northern row
    gauge = read_mhm_gauge(str(MOSELLE / "discharge_perl_00398.txt"), [], "gauge")
    day = iso_to_day("1990-03-01")
    index = train.starts.index(day)
    values = train.denormalize("discharge", train[index].sites["discharge"])[:, 0, 0, 0]  # [T]
    first = int(np.searchsorted(gauge.days, day))
    np.testing.assert_allclose(values.numpy(), gauge.values[first:first + 32, 0], rtol=1e-4)
    assert torch.isnan(train[0].sites["discharge"]).all()  # 1989: the gauge record starts in 1990


def test_the_small_synthetic_region_written_to_files_reads_back_the_same_samples(tmp_path):
    """The files path (NetCDF grids with a land mask, a long gauge CSV, a row/col site table) gives the samples
    of the synthetic region it was written from."""
    import xarray as xr

    split = ["data.region.split.train=[2000-01-01, 2000-04-30]", "data.region.split.val=[2000-05-01, 2000-07-18]"]
    synthetic = resolve_config("regional_small", None, split)
    reference = RegionDataset(synthetic.data, "val", norm_stats=RegionDataset(synthetic.data, "train").norm_stats)
    region = reference.region
    world = region.grids["precip"].world
    days = iso_to_day("2000-07-18") - world.first_day + 1
    dates = (np.datetime64("2000-01-01") + np.arange(days)).astype("datetime64[ns]")
    for name, grid in region.grids.items():
        values = grid.read(world.first_day, world.first_day + days)[:, 0]  # [D, H, W]
        xr.Dataset({name: (("time", "y", "x"), values), "land": (("y", "x"), grid.mask.astype(np.float32))},
                   coords={"time": dates}).to_netcdf(tmp_path / f"{name}.nc", engine="h5netcdf")
    gauges = region.site_sets[0]
    lines = ["site_id,date,riverflow,evaporation"]
    for d in range(days):
        for s, site in enumerate(gauges.ids):
            flow, evap = (f"{v:.9g}" if np.isfinite(v) else "" for v in gauges.values[d, s])
            lines.append(f"{site},{dates[d].astype('datetime64[D]')},{flow},{evap}")
    (tmp_path / "gauges.csv").write_text("\n".join(lines) + "\n")
    table = ["site_id,row,col," + ",".join(gauges.attr_names)]
    table += [f"{site},{float(r)!r},{float(c)!r}," + ",".join(repr(float(a)) for a in gauges.attrs[s])
              for s, (site, r, c) in enumerate(zip(gauges.ids, gauges.rows, gauges.cols, strict=True))]
    (tmp_path / "sites.csv").write_text("\n".join(table) + "\n")
    data = {"source": "region", "steps": 16, "stride": 8, "patch_size": 10, "batch_size": 4, "region": {
        "synthetic": "", "root": str(tmp_path),
        "grids": [{"name": n, "path": f"{n}.nc", "mask_variable": "land", "transform": region.grid_transforms[n][0]}
                  for n in region.grids],
        "site_sets": [{"name": "gauges", "path": "gauges.csv", "variables": ["riverflow", "evaporation"],
                       "transforms": {"riverflow": "log1p"},
                       "sites": {"path": "sites.csv", "coords": "rowcol", "attributes": list(gauges.attr_names)},
                       "grouping": {"method": "kmeans", "size": 4}}],
        "split": {"train": ["2000-01-01", "2000-04-30"], "val": ["2000-05-01", "2000-07-18"]}}}
    config = region_config(tmp_path, data)
    files = RegionDataset(config.data, "val", norm_stats=RegionDataset(config.data, "train").norm_stats)
    assert files.site_layouts["gauges"] == reference.site_layouts["gauges"]
    assert len(files) == len(reference) and files.spec == reference.spec
    for i in (0, len(files) - 1):
        a, b = files[i], reference[i]
        for name in region.grids:
            torch.testing.assert_close(a.grids[name], b.grids[name], rtol=1e-4, atol=1e-4, equal_nan=True)
        torch.testing.assert_close(a.sites["gauges"], b.sites["gauges"], rtol=1e-4, atol=1e-4, equal_nan=True)
        torch.testing.assert_close(a.site_static["gauges"], b.site_static["gauges"], equal_nan=True)


@pytest.mark.skipif(not MOSELLE.is_dir(), reason="needs ../shared/data/moselle")
def test_sites_by_projected_x_y_and_a_site_table_naming_a_site_twice(tmp_path):
    """x/y in the grid's 1-D projected coordinates (the Moselle's yc, xc: cell centres 24 km apart, y falling)."""
    config = resolve_config(None, str(ROOT / "configs" / "moselle_region.yaml"))
    site_set = config.data.region.site_sets[0]
    table = tmp_path / "sites.csv"
    table.write_text("site_id,y,x\nperl,2759847.0,4081369.0\n")  # row 8's centre; half a cell east of column 4's
    site_set.sites.path, site_set.sites.coords = str(table), "xy"
    layout = RegionDataset(config.data, "train").site_layouts["discharge"]
    np.testing.assert_allclose(layout.locations()[0], (8.5, 5.0), atol=1e-6)
    table.write_text("site_id,y,x\nperl,2759847.0,4081369.0\nperl,2783847.0,4081369.0\n")
    with pytest.raises(DataFileError, match=r"sites.csv' lists site 'perl' twice \(line 2 and line 3\)"):
        RegionDataset(config.data, "train")


def test_region_groups_from_a_file_relative_to_the_root(tmp_path):
    data = write_region(tmp_path)
    (tmp_path / "groups.csv").write_text("site_id,group\na,north\nb,south\nc,north\nd,south\n")
    data["region"]["site_sets"][0]["grouping"] = {"method": "file", "file": "groups.csv"}
    train = RegionDataset(region_config(tmp_path, data).data, "train")
    assert train.site_layouts["gauges"].ids == (("a", "c"), ("b", "d"))
    assert str(tmp_path / "groups.csv") in train.data_paths
