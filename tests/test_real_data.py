"""Real data through the files loaders: the shared Moselle and CAMELS-US sets (../shared/data), their shapes,
basin masks, missing values, normalisation, splits, the errors a user hits, and a short training on each."""

from __future__ import annotations

import copy
import csv
import math
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from crossmae.config import ConfigError, SeriesSource, resolve_config
from crossmae.data.collate import MaskingCollator
from crossmae.data.files import FilesDataset
from crossmae.data.loader import build_dataset, make_collator
from crossmae.data.readers import DataFileError, read_csv_series

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
MOSELLE = SHARED / "moselle"
CAMELS = SHARED / "camels_us"
BASINS = ["01022500", "01547700", "02064000", "03015500"]

pytestmark = pytest.mark.skipif(not (MOSELLE.is_dir() and CAMELS.is_dir()),
                                reason="the shared data sets are not at ../shared/data")

SMALL = ["data.steps=16", "data.stride=8", "data.batch_size=4", "model.enc_dim=32", "model.enc_depth=1",
         "model.enc_heads=2", "model.dec_dim=32", "model.dec_depth=1", "model.dec_heads=2"]


def moselle(*overrides: str):
    return resolve_config(None, str(ROOT / "configs" / "moselle.yaml"), [*SMALL, *overrides])


def camels(*overrides: str):
    return resolve_config(None, str(ROOT / "configs" / "camels_us.yaml"), [*SMALL, *overrides])


def xr_open(path):
    import xarray as xr

    return xr.open_dataset(path, engine="h5netcdf")


def writable_copy(src: Path, dst: Path) -> Path:
    """A copy of a (read-only) shared folder that the test may change."""
    shutil.copytree(src, dst)
    for path in [dst, *dst.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return dst


# -- Moselle: grids, basin mask, discharge -----------------------------------------------------------------
def test_moselle_shapes_basin_mask_and_windows():
    config = moselle()
    assert config.data.files.root == str(MOSELLE)  # relative to configs/, stored absolute
    train = build_dataset(config.data, "train")
    assert [(m.name, m.kind, m.channels, m.height, m.width) for m in train.spec.modalities] == [
        ("pre", "grid", 1, 9, 6), ("tavg", "grid", 1, 9, 6), ("pet", "grid", 1, 9, 6), ("discharge", "series", 1, 0, 0)]
    assert train.spec.static_dim == 0
    expected_mask = np.isfinite(xr_open(MOSELLE / "mask.nc")["mask"].values[0])
    assert expected_mask.sum() == 34 and expected_mask.size == 54
    sample = train[3]
    for name in ("pre", "tavg", "pet"):
        assert sample.grids[name].shape == (16, 1, 9, 6) and sample.grids[name].dtype == torch.float32
        assert torch.equal(sample.basin_masks[name], torch.from_numpy(expected_mask))
        assert torch.isfinite(sample.grids[name]).all()  # the E-OBS grids have no gap
        assert (sample.grids[name][:, :, ~expected_mask] == 0).all()  # outside: finite, no information
    assert sample.series["discharge"].shape == (16, 1)
    assert sample.meta == {"basin": "perl", "start": "1989-01-25", "start_day": 6964, "split": "train", "index": 3}
    # windows stay inside their split: train 1989-1991, val 1992, test 1993
    val = build_dataset(config.data, "val", norm_stats=train.norm_stats)
    test = build_dataset(config.data, "test", norm_stats=train.norm_stats)
    for ds, first, last in ((train, "1989-01-01", "1991-12-31"), (val, "1992-01-01", "1992-12-31"),
                            (test, "1993-01-01", "1993-12-31")):
        days = [(b, s) for b, s in ds.starts]
        assert np.datetime64(ds[0].meta["start"]) == np.datetime64(first)
        assert all(np.datetime64(first) <= np.datetime64(ds[i].meta["start"]) and
                   np.datetime64(ds[i].meta["start"]) + 15 <= np.datetime64(last) for i in range(len(ds)))
        assert len(days) == (np.datetime64(last) - np.datetime64(first) + 1 - 16).astype(int) // 8 + 1
    # the time axis is the file's: window 0 of val is 1992-01-01 of pre.nc
    pre = xr_open(MOSELLE / "pre.nc")["pre"].sel(time=slice("1992-01-01", "1992-01-16")).values
    got = val.denormalize("pre", val[0].grids["pre"]).numpy()[:, 0]
    np.testing.assert_allclose(got[:, expected_mask], pre[:, expected_mask], rtol=1e-4, atol=1e-4)
    flow = [float(line.split()[-1]) for line in (MOSELLE / "discharge_perl_00398.txt").read_text().splitlines()[5:]]
    np.testing.assert_allclose(val.denormalize("discharge", val[0].series["discharge"]).numpy()[:, 0],
                               flow[730:746], rtol=1e-4)  # 1992-01-01 is day 730 of the gauge record


def test_a_window_without_discharge_trains_on_the_grids_and_batches_hold_no_nan():
    config = moselle()
    train = build_dataset(config.data, "train")
    early = train[0]  # 1989: the gauge record starts in 1990
    assert torch.isnan(early.series["discharge"]).all()
    collator = make_collator(config, train)
    batch = collator([early, train[len(train) - 1]])
    mb = batch.modalities["discharge"]
    assert mb.encoder.visible.lengths.tolist()[0] == 0 and mb.queries.packed.lengths.tolist()[0] == 0
    assert mb.encoder.visible.lengths.tolist()[1] > 0
    assert batch.modalities["pre"].encoder.visible.lengths.tolist()[0] > 0
    for m in batch.modalities.values():
        assert torch.isfinite(m.encoder.values).all() and torch.isfinite(m.targets.values).all()


def test_normalisation_comes_from_the_training_split_only(tmp_path):
    config = moselle()
    train = build_dataset(config.data, "train")
    stats = train.norm_stats
    # pre: log1p, then mean/std over the inside cells of 1989-01-01..1991-12-31
    mask = np.isfinite(xr_open(MOSELLE / "mask.nc")["mask"].values[0])
    pre = xr_open(MOSELLE / "pre.nc")["pre"].sel(time=slice("1989-01-01", "1991-12-31")).values[:, mask]
    assert stats["modalities"]["pre"]["transform"] == ["log1p"]
    assert stats["modalities"]["pre"]["mean"][0] == pytest.approx(np.log1p(pre).mean(), rel=1e-6)
    assert stats["modalities"]["pre"]["std"][0] == pytest.approx(np.log1p(pre).std(), rel=1e-6)
    flow = np.array([float(v.split()[-1]) for v in (MOSELLE / "discharge_perl_00398.txt").read_text().splitlines()[5:]])
    assert stats["modalities"]["discharge"]["mean"][0] == pytest.approx(np.log1p(flow[:730]).mean(), rel=1e-6)
    # changing the validation period's data leaves the statistics alone
    root = writable_copy(MOSELLE, tmp_path / "moselle")
    lines = (root / "discharge_perl_00398.txt").read_text().splitlines()
    lines[5 + 800] = "1992 03 11 00 00 99999.000"
    (root / "discharge_perl_00398.txt").write_text("\n".join(lines) + "\n")
    other = copy.deepcopy(config)
    other.data.files.root = str(root)
    changed = build_dataset(other.data, "train")
    assert changed.norm_stats == stats
    val = build_dataset(other.data, "val", norm_stats=stats)
    assert val.norm_stats is stats
    # and a data set of another split computes the training statistics when given none
    assert build_dataset(config.data, "val").norm_stats == stats


def test_missing_markers_become_invalid_tokens(tmp_path):
    root = writable_copy(MOSELLE, tmp_path / "moselle")
    ds = xr_open(MOSELLE / "pre.nc").load()
    values = ds["pre"].values.copy()
    day = int(np.flatnonzero(ds["time"].values == np.datetime64("1992-01-03"))[0])
    values[day, 3, 2] = -9999.0  # one inside cell: its patch is invalid that day
    values[day + 1] = np.nan  # a whole day missing
    ds["pre"].values[:] = values
    ds.to_netcdf(root / "pre.nc", engine="h5netcdf")
    lines = (root / "discharge_perl_00398.txt").read_text().splitlines()
    lines[5 + 731] = "1992 01 02 00 00 -9999.000"  # day 731 of the gauge record is 1992-01-02
    (root / "discharge_perl_00398.txt").write_text("\n".join(lines) + "\n")
    config = moselle()
    config.data.files.root = str(root)
    train = build_dataset(config.data, "train")
    val = build_dataset(config.data, "val", norm_stats=train.norm_stats)
    sample = val[0]  # 1992-01-01 ..
    assert torch.isnan(sample.grids["pre"][2, 0, 3, 2]) and torch.isfinite(sample.grids["pre"][2, 0, 3, 3])
    assert torch.isnan(sample.grids["pre"][3, 0][sample.basin_masks["pre"]]).all()
    assert torch.isnan(sample.series["discharge"][1]).all() and torch.isfinite(sample.series["discharge"][0]).all()
    collator = MaskingCollator(val.spec, config.mask, config.data.patch_size, config.data.steps)
    batch = collator([sample])
    pre, flow = batch.modalities["pre"], batch.modalities["discharge"]
    tokens = {(int(t), int(p)) for _, t, p in torch.cat([pre.encoder.index, pre.hidden.index])}
    assert (2, 1 * 3 + 1) not in tokens  # cell (3, 2) is in patch (1, 1) of the 5 x 3 patch grid
    assert (2, 1 * 3 + 0) in tokens
    assert not any(t == 3 for t, _ in tokens)
    flow_days = set(torch.cat([flow.encoder.index, flow.hidden.index])[:, 1].tolist())
    assert 1 not in flow_days and 0 in flow_days
    for m in batch.modalities.values():
        assert torch.isfinite(m.encoder.values).all() and torch.isfinite(m.targets.values).all()


def test_two_variables_from_zarr_with_a_crop_match_netcdf(tmp_path):
    import xarray as xr

    pytest.importorskip("zarr")
    both = xr.merge([xr_open(MOSELLE / "pre.nc"), xr_open(MOSELLE / "tavg.nc")], compat="override")
    both.to_zarr(tmp_path / "forcing.zarr", zarr_format=2)
    config = moselle()
    config.data.files.grids = config.data.files.grids[:2]
    netcdf = build_dataset(config.data, "train")
    cropped = copy.deepcopy(config)
    grid = cropped.data.files.grids[0]
    grid.name, grid.variables, grid.transform, grid.transforms = "forcing", ["pre", "tavg"], "none", {"pre": "log1p"}
    grid.format, grid.path, grid.mask_path, grid.mask_variable = "zarr", str(tmp_path / "forcing.zarr"), "", ""
    grid.crop = [1, 7, 1, 5]
    cropped.data.files.grids = [grid]
    zarr = FilesDataset(cropped.data, "train")
    assert [(m.name, m.channels, m.height, m.width) for m in zarr.spec.grids] == [("forcing", 2, 6, 4)]
    assert zarr.norm_stats["modalities"]["forcing"]["transform"] == ["log1p", "none"]
    assert zarr[5].basin_masks["forcing"].all()  # no mask variable: every cell is inside
    got = zarr.denormalize("forcing", zarr[5].grids["forcing"])  # [T, 2, 6, 4]
    inside = netcdf[5].basin_masks["pre"][1:7, 1:5]
    for c, name in enumerate(("pre", "tavg")):
        want = netcdf.denormalize(name, netcdf[5].grids[name])[:, 0, 1:7, 1:5]
        torch.testing.assert_close(got[:, c][:, inside], want[:, inside], rtol=1e-4, atol=1e-4)


def test_data_set_pickles_without_open_files_and_reads_in_workers():
    config = moselle()
    train = build_dataset(config.data, "train")
    first = train[7]
    state = pickle.dumps(train)
    assert len(state) < 200_000  # no grid arrays travel to the workers
    copy_ = pickle.loads(state)
    torch.testing.assert_close(copy_[7].grids["tavg"], first.grids["tavg"])
    loader = torch.utils.data.DataLoader(train, batch_size=None, sampler=[7, 9], num_workers=1)
    got = list(loader)
    torch.testing.assert_close(got[0].grids["pre"], first.grids["pre"])


# -- CAMELS-US: forcing, streamflow, static attributes ----------------------------------------------------
def test_camels_series_and_static_attributes():
    config = camels()
    train = build_dataset(config.data, "train")
    assert train.basins == BASINS
    assert [(m.name, m.channels) for m in train.spec.series] == [("forcing", 6), ("streamflow", 1)]
    assert train.channel_names["forcing"] == ["prcp", "srad", "tmax", "tmin", "vp", "dayl"]
    assert train.spec.static_dim == 17 and train.flow_modalities == ["streamflow"]
    s = train[0]
    assert s.series["forcing"].shape == (16, 6) and s.series["streamflow"].shape == (16, 1) and s.static.shape == (17,)
    # 2000-01-01 of 01022500: prcp 0.00, tmax -2.36; Q 255 cfs
    forcing = train.denormalize("forcing", s.series["forcing"]).numpy()
    assert forcing[0, 0] == pytest.approx(0.0, abs=1e-4) and forcing[0, 2] == pytest.approx(-2.36, abs=1e-4)
    assert train.denormalize("streamflow", s.series["streamflow"])[0, 0].item() == pytest.approx(255.0, rel=1e-5)
    # static: standardised over the 4 training basins; p_mean of 01022500 is 3.6081...
    static = train.denormalize("static", s.static)
    assert static[0].item() == pytest.approx(3.60812594113621, rel=1e-5)
    per_basin = torch.stack([train[i].static for i in range(len(train))]).unique(dim=0)
    assert per_basin.shape[0] == 4
    assert per_basin.mean(0).abs().max() < 1e-5  # the same 4 basins weigh equally here


def test_camels_constant_and_missing_static_columns(tmp_path):
    table = tmp_path / "attrs.txt"
    rows = [["gauge_id", "zero_q_freq", "root_depth_50", "elev_mean", "label"]]
    for i, b in enumerate(BASINS):
        rows.append([b, "0", "NA" if i == 0 else str(0.2 + 0.01 * i), str(100 * (i + 1)), "text"])
    table.write_text("\n".join(";".join(r) for r in rows) + "\n")
    config = camels()
    st = config.data.files.static
    st.paths, st.columns = [str(table)], ["zero_q_freq", "root_depth_50", "elev_mean"]
    train = build_dataset(config.data, "train")
    assert train.norm_stats["static"]["names"] == ["root_depth_50", "elev_mean"]
    assert train.norm_stats["static"]["dropped"] == ["zero_q_freq"]
    assert train.spec.static_dim == 2
    by_basin = {train[i].meta["basin"]: train[i].static for i in range(len(train))}
    assert torch.isnan(by_basin["01022500"][0]) and torch.isfinite(by_basin["01547700"]).all()
    assert train.norm_stats["static"]["mean"][0] == pytest.approx(np.mean([0.21, 0.22, 0.23]))
    batch = make_collator(config, train)([train[0], train[1]])
    assert torch.isfinite(batch.static.values).all()
    unknown = [torch.isnan(train[i].static).tolist() for i in (0, 1)]
    assert batch.static.missing.tolist() == unknown  # an unknown attribute is flagged, not silently 0
    st.columns = ["label"]
    with pytest.raises(DataFileError, match=r"column 'label' of .*attrs.txt.* holds 'text' for basin 01022500; "
                                            r"expected a number"):
        build_dataset(config.data, "train")


def test_streamflow_missing_marker_and_split_by_basin(tmp_path):
    root = writable_copy(CAMELS, tmp_path / "camels")
    path = root / "usgs_streamflow" / "02064000_streamflow_qc.txt"
    lines = path.read_text().splitlines()
    lines[2] = "02064000 2000 01 03  -999.00 M"
    path.write_text("\n".join(lines) + "\n")
    config = camels("data.files.split={by: basin, train: [], val: ['03015500'], test: ['02064000']}")
    config.data.files.root = str(root)
    train = build_dataset(config.data, "train")
    assert sorted({train[i].meta["basin"] for i in range(len(train))}) == ["01022500", "01547700"]
    assert train.basins == ["01022500", "01547700"]
    val = build_dataset(config.data, "val", norm_stats=train.norm_stats)
    test = build_dataset(config.data, "test", norm_stats=train.norm_stats)
    assert {val[i].meta["basin"] for i in range(len(val))} == {"03015500"}
    sample = test[0]
    assert sample.meta["basin"] == "02064000" and sample.meta["start"] == "2000-01-01"
    assert torch.isnan(sample.series["streamflow"][2]).all() and torch.isfinite(sample.series["streamflow"][1]).all()
    batch = make_collator(config, test)([sample])
    flow = batch.modalities["streamflow"]
    assert 2 not in torch.cat([flow.encoder.index, flow.hidden.index])[:, 1].tolist()
    # the basins outside training never touch the statistics
    assert train.norm_stats == build_dataset(config.data, "train").norm_stats
    assert val.spec == train.spec


def test_fraction_split_when_no_period_is_named():
    config = camels("data.files.split={by: period, train: [], val: [], test: []}", "data.val_fraction=0.25")
    train = build_dataset(config.data, "train")
    val = build_dataset(config.data, "val", norm_stats=train.norm_stats)
    last_train = max(np.datetime64(train[i].meta["start"]) + 15 for i in range(len(train)) if
                     train[i].meta["basin"] == "01547700")
    first_val = min(np.datetime64(val[i].meta["start"]) for i in range(len(val)) if val[i].meta["basin"] == "01547700")
    assert last_train < first_val == np.datetime64("2002-12-31") - 274 + 1  # round(0.25 * 1096) = 274 days
    with pytest.raises(DataFileError, match="no test split"):
        build_dataset(config.data, "test", norm_stats=train.norm_stats)


def test_csv_series_with_units_line_date_format_and_markers(tmp_path):
    path = tmp_path / "flow.csv"
    path.write_text("datum;abfluss;temp\n;m3/s;C\n01.01.2020;1.5;3\n02.01.2020;-999;4\n03.01.2020;NA;5\n"
                    "04.01.2020;2.5;-9999\n")
    table = read_csv_series(str(path), "datum", "%d.%m.%Y", ["abfluss", "temp"], ";", [1], [-9999.0, -999.0], "t")
    assert table.columns == ["abfluss", "temp"]
    assert np.datetime64("1970-01-01") + table.days[0] == np.datetime64("2020-01-01") and len(table.days) == 4
    np.testing.assert_array_equal(table.values, [[1.5, 3], [np.nan, 4], [np.nan, 5], [2.5, np.nan]])
    # as a modality of a data set, with {basin} in the path
    (tmp_path / "b1.csv").write_text(path.read_text())
    config = moselle()
    config.data.files.series = [SeriesSource(name="flow", format="csv", path=str(tmp_path / "{basin}.csv"),
                                             columns=["abfluss"], date_column="datum", date_format="%d.%m.%Y",
                                             delimiter=";", skip_rows=[1])]
    config.data.files.grids, config.data.files.basins = [], ["b1"]
    config.data.files.split.train, config.data.files.split.val = ["2020-01-01", "2020-01-04"], ["2020-01-01",
                                                                                                 "2020-01-04"]
    config.data.files.split.test = []
    config.data.steps = 4
    ds = FilesDataset(config.data, "train")
    np.testing.assert_allclose(ds.denormalize("flow", ds[0].series["flow"]).numpy()[:, 0], [1.5, np.nan, np.nan, 2.5])


def test_relative_root_resolves_against_the_config_folder(tmp_path):
    folder = tmp_path / "cfg"
    folder.mkdir()
    text = (ROOT / "configs" / "moselle.yaml").read_text().replace("../../shared/data/moselle",
                                                                   str(Path("..") / "data"))
    (folder / "m.yaml").write_text(text)
    (tmp_path / "data").symlink_to(MOSELLE)
    config = resolve_config(None, str(folder / "m.yaml"), [])
    assert config.data.files.root == str(tmp_path / "data")


def test_the_readme_worked_config_reads_its_files(tmp_path):
    """The "Your own data" config of the README, on small generated files of its layout."""
    import pandas as pd
    import xarray as xr

    text = (ROOT / "README.md").read_text().split("A worked config")[1].split("```yaml\n")[1].split("```")[0]
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "run.yaml").write_text(text)
    data = tmp_path / "data"
    for folder in ("grids", "masks", "gauges"):
        (data / folder).mkdir(parents=True)
    time = pd.date_range("2000-01-01", "2000-12-31", freq="D")
    rng = np.random.default_rng(0)
    basins = ["6335020", "6335045"]
    for i, basin in enumerate(basins):
        xr.Dataset({"pr": (("time", "lat", "lon"), rng.gamma(0.5, 4.0, (len(time), 7, 8)))},
                   coords={"time": time}).to_netcdf(data / "grids" / f"{basin}_forcing.nc", engine="h5netcdf")
        mask = np.full((7, 8), np.nan)
        mask[1:6, 2 + i:7] = 1.0
        xr.Dataset({"basin_mask": (("lat", "lon"), mask)}).to_netcdf(data / "masks" / f"{basin}.nc", engine="h5netcdf")
        flow = np.round(rng.gamma(2.0, 10.0, len(time)), 2).astype(str)
        flow[10:20] = "-999"
        rows = [f"{d:%d.%m.%Y};{q}" for d, q in zip(time, flow)]
        (data / "gauges" / f"{basin}.csv").write_text("date;Q\n;m3/s\n" + "\n".join(rows) + "\n")
    xr.Dataset({"tas": (("time", "y", "x"), rng.normal(10, 5, (len(time), 6, 9)))},
               coords={"time": time}).to_zarr(data / "grids" / "tas.zarr", zarr_format=2)
    (data / "attributes.csv").write_text("basin,area_km2,mean_elevation,forest_fraction\n"
                                         "6335020,1200,450,0.4\n6335045,800,380,0.55\n")
    config = resolve_config(None, str(tmp_path / "cfg" / "run.yaml"), [
        "data.files.split={by: period, train: [2000-01-01, 2000-08-31], val: [2000-09-01, 2000-10-31], "
        "test: [2000-11-01, 2000-12-31]}"])
    assert config.data.files.root == str(data)
    config.data.files.grids[1].crop = [0, 4, 1, 6]
    train = build_dataset(config.data, "train")
    test = build_dataset(config.data, "test", norm_stats=train.norm_stats)
    assert [(m.name, m.channels, m.height, m.width) for m in train.spec.modalities] == [
        ("precip", 1, 7, 8), ("temp", 1, 4, 5), ("flow", 1, 0, 0)]
    assert train.spec.static_dim == 3 and train.flow_modalities == ["flow"]
    sample = train[0]
    assert int(sample.basin_masks["precip"].sum()) == 25 and bool(sample.basin_masks["temp"].all())
    assert torch.isnan(sample.series["flow"][10:20]).all() and torch.isfinite(sample.series["flow"][:10]).all()
    assert {test[i].meta["basin"] for i in range(len(test))} == set(basins)
    batch = make_collator(config, train)([train[i] for i in range(4)])
    assert all(torch.isfinite(m.encoder.values).all() for m in batch.modalities.values())


# -- errors a user hits ----------------------------------------------------------------------------------
def test_missing_file_names_the_source_and_the_path():
    config = moselle()
    config.data.files.grids[1].path = "no_such_tavg.nc"
    with pytest.raises(FileNotFoundError, match=r"data.files.grids\[1\] 'tavg': file '.*no_such_tavg.nc' does not "
                                                r"exist"):
        build_dataset(config.data, "train")
    config = camels()
    config.data.files.series[1].path = "usgs_streamflow/{basin}_flow.txt"
    with pytest.raises(FileNotFoundError, match=r"'streamflow': file '.*01022500_flow.txt' does not exist"):
        build_dataset(config.data, "train")


def test_variable_not_in_the_file_lists_what_is_there():
    config = moselle()
    config.data.files.grids[0].variables = ["precip"]
    with pytest.raises(DataFileError, match=r"'pre': variable 'precip' is not in '.*pre.nc' \(variables there: "
                                            r"\['pre'\]\)"):
        build_dataset(config.data, "train")
    config = moselle()
    config.data.files.grids[0].mask_variable = "basin"
    with pytest.raises(DataFileError, match=r"mask variable 'basin' is not in '.*mask.nc'"):
        build_dataset(config.data, "train")
    config = camels()
    config.data.files.series[0].columns = ["prcp", "tmean"]
    with pytest.raises(DataFileError, match=r"'forcing': column 'tmean' is not in '.*01022500_lump_cida_forcing_leap"
                                            r".txt' \(columns there: .*tmax"):
        build_dataset(config.data, "train")


def test_date_column_that_does_not_parse(tmp_path):
    (tmp_path / "g.csv").write_text("date,q\n2020-01-01,1\n2020-01-02,2\n2020-13-03,3\n")
    config = moselle()
    config.data.files.series = [SeriesSource(name="q", format="csv", path=str(tmp_path / "g.csv"), columns=["q"])]
    with pytest.raises(DataFileError, match=r"'q': column 'date' of '.*g.csv' holds '2020-13-03' on line 4, which "
                                            r"does not parse; expected ISO 8601 dates"):
        build_dataset(config.data, "train")
    config.data.files.series[0].date_format = "%d/%m/%Y"
    with pytest.raises(DataFileError, match=r"holds '2020-01-01' on line 2, which does not parse; expected dates "
                                            r"in the format '%d/%m/%Y'"):
        build_dataset(config.data, "train")


def test_window_longer_than_the_record():
    config = moselle("data.steps=2000")
    with pytest.raises(DataFileError, match=r"data.steps is 2000 days, longer than the record: .* basin 'perl', has "
                                            r"1826 days \(1989-01-01..1993-12-31\) in .*discharge_perl_00398.txt, "
                                            r".*pre.nc"):
        build_dataset(config.data, "train")
    config = moselle("data.steps=400")  # longer than the val year, shorter than the record
    train = build_dataset(config.data, "train")
    with pytest.raises(DataFileError, match=r"the val split holds no window of data.steps=400 days: .*perl': "
                                            r"'1992-01-01..1992-12-31 \(366 days\)'"):
        build_dataset(config.data, "val", norm_stats=train.norm_stats)


def test_mask_that_does_not_match_the_grid(tmp_path):
    mask = xr_open(MOSELLE / "mask.nc").load().isel(x=slice(0, 5))
    mask.to_netcdf(tmp_path / "mask5.nc", engine="h5netcdf")
    config = moselle()
    config.data.files.grids[2].mask_path = str(tmp_path / "mask5.nc")
    with pytest.raises(DataFileError, match=r"'pet': mask 'mask' in '.*mask5.nc' has shape \(9, 5\) .* but the grid "
                                            r"in '.*pet.nc' is 9x6 \(yc x xc\); expected a mask on the same grid"):
        build_dataset(config.data, "train")


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"data.files.grids\[0\].format must be one of \['netcdf', 'zarr'\]"):
        moselle("data.files.grids=[{name: pre, format: grib, path: pre.nc}]")
    with pytest.raises(ConfigError, match=r"data.files.split.val must hold ISO dates"):
        moselle("data.files.split.val=[1992-01-01, 'soon']")
    with pytest.raises(ConfigError, match=r"data.files.split.train \(1990-01-01..1991-12-31\) and data.files.split.val "
                                          r"\(1991-12-01..1992-12-31\) share 31 days"):  # validated on trained days
        moselle("data.files.split.train=[1990-01-01, 1991-12-31]", "data.files.split.val=[1991-12-01, 1992-12-31]")
    with pytest.raises(ConfigError, match=r"data.files.basins\[0\] must be a string, got 271680 \(quote it"):
        camels("data.files.basins=[01022500]")


# -- training ------------------------------------------------------------------------------------------------
def _train(config, tmp_path, steps: int):
    from crossmae.engine import Trainer

    config.train.out_dir = str(tmp_path)
    config.train.fused = True
    config.train.max_steps, config.train.val_every, config.train.val_batches = steps, steps // 3, 3
    config.train.warmup_steps, config.train.ckpt_every, config.train.lr = 3, 0, 3e-3
    trainer = Trainer(config)
    before = trainer.validate()["val_loss"]
    trainer.fit()
    with open(tmp_path / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    with open(tmp_path / "val_metrics.csv", newline="") as f:
        val = list(csv.DictReader(f))
    assert len(rows) == steps and all(math.isfinite(float(r["loss"])) and r["skipped"] == "0" for r in rows)
    assert all(math.isfinite(float(v)) for r in val for v in r.values())
    after = float(val[-1]["val_loss"])
    assert after < before, f"validation loss did not fall: {before:.4f} -> {after:.4f}"
    return trainer


def test_training_on_the_moselle_lowers_the_validation_loss(tmp_path):
    trainer = _train(moselle(), tmp_path, steps=30)
    assert (tmp_path / "norm_stats.json").is_file() and trainer.model.names == ["pre", "tavg", "pet", "discharge"]


def test_training_on_camels_lowers_the_validation_loss(tmp_path):
    trainer = _train(camels(), tmp_path, steps=30)
    assert trainer.model.static_embed is not None


def test_lines_ending_in_the_separator_shift_no_column(tmp_path):
    """Spreadsheet exports often end every data line with the separator: the values stay under their headers."""
    from crossmae.data.readers import read_attribute_tables, read_csv_series

    series = tmp_path / "s.csv"
    series.write_text("q;date;p\n1,5;2001-01-01;2,5;\n3,5;2001-01-02;4,5;\n".replace(",", "."))
    table = read_csv_series(str(series), "date", "", ["q", "p"], ";", [], [-9999.0], "test")
    assert list(table.columns) == ["q", "p"]
    np.testing.assert_array_equal(table.values, [[1.5, 2.5], [3.5, 4.5]])
    attributes = tmp_path / "a.csv"
    attributes.write_text("id,area,elev\na,10,100,\nb,20,200,\n")
    np.testing.assert_array_equal(read_attribute_tables([str(attributes)], "id", ",", ["elev", "area"], ["b", "a"],
                                                        [-9999.0], "test"), [[200, 20], [100, 10]])
