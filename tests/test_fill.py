"""crossmae.fill: a 30-day hole gets finite values, observed values pass through exactly, the files read back
through the project's own readers, a basin without observations is skipped, a config that differs from the
run's stops before any work, and nothing is half-written."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import xarray as xr
import yaml

from crossmae.data.readers import GridOptions, GridReader, read_csv_series
from crossmae.fill import fill_run, main
from tests.gap_data import DAYS, HOLE, data_section, make_data, train_run


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("fill")
    config = make_data(root / "data", basins=("a", "b", "c"), empty=("c",))
    return config, train_run(config, root / "run")


def grid(path, variables=("pre",)):
    reader = GridReader([str(path)], "netcdf", GridOptions(variables=list(variables)), "test grid")
    return reader, reader.read(int(reader.days[0]), int(reader.days[-1]) + 1)  # [N, C, h, w]


def test_a_30_day_hole_is_filled_and_observed_values_pass_through(trained, tmp_path):
    config, run = trained
    report = fill_run(run, tmp_path / "out", members=3)
    data = config.parent

    filled = read_csv_series(str(tmp_path / "out" / "flow" / "a.csv"), "date", "", ["flow"], ",", [0, 1, 2], [],
                             "filled flow")
    original = read_csv_series(str(data / "a.csv"), "date", "", ["flow"], ",", [], [], "flow")
    assert np.array_equal(filled.days, original.days) and filled.values.shape == (DAYS, 1)
    hole = np.zeros(DAYS, dtype=bool)
    hole[HOLE[0]:HOLE[1]] = True
    assert np.isnan(original.values[hole]).all() and np.isfinite(filled.values).all()
    assert np.array_equal(filled.values[~hole], original.values[~hole])  # exactly, not approximately
    assert report.filled["flow/a"] == 30 and report.filled["flow/b"] == 0

    table = pd.read_csv(tmp_path / "out" / "flow" / "a.csv", skiprows=3)
    assert (table["flow_flag"] == np.where(hole, "filled", "observed")).all()
    assert table.loc[hole, ["flow_q10", "flow_q90"]].notna().all().all()
    assert table.loc[~hole, ["flow_q10", "flow_q90"]].isna().all().all()
    head = (tmp_path / "out" / "flow" / "a.csv").read_text().splitlines()[:3]
    assert head[0] == f"# run: {run.resolve()}" and "step_00000003 (step 3)" in head[1]
    assert head[2].startswith("# written: ")

    reader, before = grid(data / "grid_a.nc")
    out_reader, after = grid(tmp_path / "out" / "pre" / "a.nc", ("pre", "filled"))
    assert np.array_equal(out_reader.days, reader.days)
    with xr.open_dataset(data / "grid_a.nc", engine="h5netcdf") as ds:
        inside = np.isfinite(ds["mask"].values)  # [h, w]
    holes = np.isnan(before[:, 0]) & inside  # [N, h, w]
    assert holes.sum() == 12 and report.filled["pre/a"] == 12
    assert np.array_equal(after[:, 1] == 1, holes)
    assert np.isfinite(after[:, 0][holes]).all()
    seen = np.isfinite(before[:, 0])
    assert np.array_equal(after[:, 0][seen], before[:, 0][seen])
    with xr.open_dataset(tmp_path / "out" / "pre" / "a.nc", engine="h5netcdf") as out:  # a 2-D coordinate kept
        assert np.array_equal(out["easting"].values, 1000.0 * np.arange(16.0).reshape(4, 4))
        assert out["easting"].dims == ("lat", "lon") and out["easting"].attrs["units"] == "m"

    assert report.skipped == {"flow/c": "no observed value in the whole record"}
    assert not (tmp_path / "out" / "flow" / "c.csv").exists()


def test_a_config_whose_channels_differ_stops_before_any_work(trained, tmp_path, capsys):
    config, run = trained
    other = yaml.safe_load(config.read_text())
    other["data"]["files"]["series"][0]["columns"] = ["precip"]
    other["data"]["files"]["root"] = str(config.parent)
    path = tmp_path / "other.yaml"
    path.write_text(yaml.safe_dump(other))
    out = tmp_path / "out"
    assert main(["--run", str(run), "--config", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "'flow' channels: the run has ['flow']" in err and "['precip']" in err, err
    assert not out.exists()

    section = data_section(["a"])
    section["steps"] = 8
    section["files"]["root"] = str(config.parent)
    path.write_text(yaml.safe_dump({"data": section}))
    assert main(["--run", str(run), "--config", str(path), "--out", str(out)]) == 2
    assert "data.steps: the run has 16" in capsys.readouterr().err
    assert not out.exists()


def test_a_failed_write_leaves_no_file(trained, tmp_path, monkeypatch):
    _, run = trained
    calls = {"n": 0}
    import crossmae.fill as fill

    real = fill.day_to_iso

    def failing(day):
        calls["n"] += 1
        if calls["n"] > 50:
            raise OSError("disk full")
        return real(day)

    monkeypatch.setattr(fill, "day_to_iso", failing)
    with pytest.raises(OSError, match="disk full"):
        fill_run(run, tmp_path / "out")
    assert not [p for p in (tmp_path / "out").rglob("*") if p.is_file() and p.suffix == ".csv"]
    assert not list((tmp_path / "out").rglob(".*tmp*"))


def test_a_moved_data_folder_is_named_and_data_root_finds_it(tmp_path):
    from crossmae.evaluate import evaluate_run

    config = make_data(tmp_path / "data", basins=("a",))
    run = train_run(config, tmp_path / "run", 2)
    (tmp_path / "data").rename(tmp_path / "moved")
    with pytest.raises(FileNotFoundError, match="does not exist \\(moved\\?\\); pass --data-root"):
        evaluate_run(run, "val", plots=False)
    metrics = evaluate_run(run, "val", plots=False, data_root=str(tmp_path / "moved"))
    assert metrics["windows"] > 0 and "flow" in metrics["flow"]


def test_data_root_moves_a_region_runs_files_and_a_missing_region_root_is_named(tmp_path):
    from crossmae.config import Config
    from crossmae.fill import resolve_data

    config = Config()
    config.data.source = "region"
    config.data.region.synthetic = ""
    config.data.region.root = str(tmp_path / "gone")
    with pytest.raises(FileNotFoundError, match="data.region.root .* does not exist \\(moved\\?\\)"):
        resolve_data(config)
    (tmp_path / "here").mkdir()
    assert resolve_data(config, data_root=str(tmp_path / "here")).region.root == str(tmp_path / "here")
    config.data.source = "synthetic"
    with pytest.raises(ValueError, match="reads no files"):
        resolve_data(config, data_root=str(tmp_path / "here"))


def test_a_gauge_file_with_only_its_header_is_a_basin_without_flow_reported_by_fill(tmp_path, caplog):
    """A flow CSV that holds its header and no row (a gauge exported before it had data) does not stop the data
    set: the basin trains on its other files, its flow is missing throughout, and fill reports and skips it. A
    basin with no day of data in any file is named."""
    import logging

    config_path = make_data(tmp_path / "data", basins=("a", "b"))
    data = yaml.safe_load(config_path.read_text())
    data["data"]["files"]["series"][0]["path"] = "{basin}_flow.csv"
    config_path.write_text(yaml.safe_dump(data))
    for basin in ("a", "b"):
        table = pd.read_csv(tmp_path / "data" / f"{basin}.csv")
        flow = table[["date", "flow"]] if basin == "a" else table[["date", "flow"]].iloc[:0]
        flow.to_csv(tmp_path / "data" / f"{basin}_flow.csv", index=False)
    with caplog.at_level(logging.WARNING, logger="crossmae.data.files"):
        run = train_run(config_path, tmp_path / "run")
    assert "b_flow.csv' holds no data row: basin 'b' has no flow value" in caplog.text
    report = fill_run(run, tmp_path / "out")
    assert report.skipped == {"flow/b": "no observed value in the whole record"}
    assert (tmp_path / "out" / "flow" / "a.csv").is_file() and not (tmp_path / "out" / "flow" / "b.csv").exists()

    from crossmae.config import resolve_config
    from crossmae.data.loader import build_dataset
    from crossmae.data.readers import DataFileError

    data["data"]["files"]["grids"] = []
    data["data"]["files"]["series"] = data["data"]["files"]["series"][:1]  # b's only file is the empty one
    config_path.write_text(yaml.safe_dump(data))
    with pytest.raises(DataFileError, match=r"no file of basin\(s\) \['b'\] holds a day of data"):
        build_dataset(resolve_config(None, str(config_path), []).data, "train")


def test_days_beyond_a_gauges_own_record_are_flagged_extended(tmp_path):
    """Basin b's gauge file starts 40 days after its grid and ends 10 days before it: those days are filled (the
    record is the union of the basin's files) but flagged `extended`; a gap inside the gauge's record is
    `filled`."""
    config_path = make_data(tmp_path / "data", basins=("a", "b"))
    data = yaml.safe_load(config_path.read_text())
    data["data"]["files"]["series"][0]["path"] = "{basin}_flow.csv"
    config_path.write_text(yaml.safe_dump(data))
    for basin in ("a", "b"):
        flow = pd.read_csv(tmp_path / "data" / f"{basin}.csv")[["date", "flow"]]
        if basin == "b":
            flow = flow.iloc[40:DAYS - 10].copy()
            flow.loc[flow.index[100:105], "flow"] = np.nan  # a 5-day gap inside the gauge's record
        flow.to_csv(tmp_path / "data" / f"{basin}_flow.csv", index=False)
    run = train_run(config_path, tmp_path / "run")
    fill_run(run, tmp_path / "out")
    table = pd.read_csv(tmp_path / "out" / "flow" / "b.csv", skiprows=3)
    assert len(table) == DAYS
    expected = np.array(["extended"] * 40 + ["observed"] * (DAYS - 50) + ["extended"] * 10, dtype=object)
    expected[140:145] = "filled"
    assert (table["flow_flag"].to_numpy() == expected).all()
    assert table["flow"].notna().all()
