"""fill, embed and evaluate --gaps on gauge files as users write them: a BOM, a units row, ``;`` delimiters,
``nan``/``-9999``/empty markers, an extra unused column, unsorted rows, a leap day, gaps on the first and last
day, a basin whose flow is entirely missing, one with a single observed day (a gap longer than a window) and
one shorter than a window. Bad outputs and arguments stop before any work, naming the argument and the value."""

from __future__ import annotations

import os
import signal

import numpy as np
import pandas as pd
import pytest
import xarray as xr
import yaml

import crossmae.fill as fill
from crossmae.config import config_from_dict
from crossmae.data.files import FilesDataset
from crossmae.data.readers import GridOptions, GridReader, iso_to_day, read_csv_series
from crossmae.embed import embed_run
from crossmae.embed import main as embed_main
from crossmae.fill import fill_run, main
from crossmae.gaps import evaluate_gaps
from tests.gap_data import MODEL, make_data, train_run

FIRST = np.datetime64("2003-12-01")
DAYS = 120  # 2003-12-01 … 2004-03-29: holds 29 February 2004
STEPS = 16
HOLE = (40, 70)  # the "bom" basin's flow: empty, -9999 and nan markers on these days
COLUMNS = {"flow": "Abfluss", "rain": "Niederschlag"}


def _flow_text(basin: str, day: int, value: float) -> str:
    if basin == "empty":
        return "-9999"
    if basin == "single":
        return f"{value:.4f}" if day == 60 else "nan"
    if basin == "bom" and (day in (0, DAYS - 1) or HOLE[0] <= day < HOLE[1]):
        return ("", "-9999", "nan")[day % 3]
    return f"{value:.4f}"


def write_gauge(folder, basin: str, seed: int, days: int = DAYS) -> None:
    """A daily gauge CSV: BOM, header ``Datum;Niederschlag;Abfluss;Bemerkung``, a units row, dd.mm.yyyy dates,
    rows in random order."""
    rng = np.random.default_rng(seed)
    rain = rng.gamma(0.6, 4.0, days) * (rng.random(days) < 0.5)  # [days] mm/day
    flow = np.convolve(rain, 0.3 * 0.8 ** np.arange(20))[:days] + 0.5  # [days] m3/s
    rows = [f"{(FIRST + d).astype(object):%d.%m.%Y};{rain[d]:.3f};{_flow_text(basin, d, flow[d])};ok"
            for d in rng.permutation(days)]
    text = "\n".join(["Datum;Niederschlag;Abfluss;Bemerkung", ";mm/d;m3/s;-", *rows]) + "\n"
    (folder / f"{basin}.csv").write_bytes(b"\xef\xbb\xbf" + text.encode())


def gauge_section(root, basins, path: str = "{basin}.csv") -> dict:
    series = [{"name": name, "path": path, "columns": [column], "delimiter": ";", "skip_rows": [1],
               "date_column": "Datum", "date_format": "%d.%m.%Y", "transform": "log1p" if name == "flow" else "none",
               "flow": name == "flow"} for name, column in COLUMNS.items()]
    return {"source": "files", "steps": STEPS, "stride": 8, "patch_size": 2, "batch_size": 4,
            "files": {"root": str(root), "basins": list(basins), "series": series,
                      "split": {"by": "period", "train": ["2003-12-01", "2004-02-15"],
                                "val": ["2004-02-16", "2004-03-29"], "test": ["2004-02-16", "2004-03-29"]}}}


BASINS = ("bom", "empty", "single", "plain", "short")


@pytest.fixture(scope="module")
def gauges(tmp_path_factory):
    root = tmp_path_factory.mktemp("gauges")
    data = root / "data"
    data.mkdir()
    for i, basin in enumerate(BASINS):
        write_gauge(data, basin, i, days=10 if basin == "short" else DAYS)
    config = data / "data.yaml"
    config.write_text(yaml.safe_dump({"data": gauge_section(data, BASINS), "model": MODEL}))
    return data, train_run(config, root / "run")


def read_original(path, column):
    return read_csv_series(str(path), "Datum", "%d.%m.%Y", [column], ";", [1], [-9999.0, -999.0], "original")


def test_user_gauge_files_fill_round_trip_with_observed_values_exact(gauges, tmp_path):
    data, run = gauges
    report = fill_run(run, tmp_path / "out", members=2)
    assert report.skipped == {"short": f"its record has 10 days, fewer than one window ({STEPS})",
                              "flow/empty": "no observed value in the whole record"}
    assert not (tmp_path / "out" / "flow" / "empty.csv").exists()
    assert not (tmp_path / "out" / "flow" / "short.csv").exists()
    days = iso_to_day("2003-12-01") + np.arange(DAYS)
    for name, column in COLUMNS.items():
        for basin in ("bom", "single", "plain"):
            path = tmp_path / "out" / name / f"{basin}.csv"
            back = read_csv_series(str(path), "date", "", [column], ",", [0, 1, 2], [], "filled")
            original = read_original(data / f"{basin}.csv", column)
            assert np.array_equal(back.days, days) and np.array_equal(original.days, days)  # sorted, 29 Feb kept
            seen = np.isfinite(original.values[:, 0])
            assert np.array_equal(back.values[seen, 0], original.values[seen, 0])  # exactly as read
            assert np.isfinite(back.values[:, 0]).all()  # every missing day filled
            flags = pd.read_csv(path, skiprows=3)[f"{column}_flag"].to_numpy()
            inside = np.arange(DAYS) >= np.argmax(seen)  # from the first observed day ...
            inside &= np.arange(DAYS) <= DAYS - 1 - np.argmax(seen[::-1])  # ... to the last
            assert np.array_equal(flags, np.where(seen, "observed", np.where(inside, "filled", "extended")))
    missing = np.zeros(DAYS, dtype=bool)
    missing[[0, DAYS - 1]] = True
    missing[HOLE[0]:HOLE[1]] = True
    bom = read_original(data / "bom.csv", "Abfluss")
    assert np.array_equal(np.isnan(bom.values[:, 0]), missing)  # "", -9999 and nan all read as missing
    assert report.filled["flow/bom"] == missing.sum() and report.filled["flow/single"] == DAYS - 1
    assert report.filled["rain/empty"] == 0 and (tmp_path / "out" / "rain" / "empty.csv").is_file()

    # the filled files as a data source of their own (format csv, skip_rows [0, 1, 2]): no value missing now
    section = gauge_section(tmp_path / "out", ["bom", "single", "plain"])
    for source in section["files"]["series"]:
        source.update(path=f"{source['name']}/{{basin}}.csv", delimiter=",", skip_rows=[0, 1, 2], date_column="date",
                      date_format="")
    refilled = FilesDataset(config_from_dict({"data": section}).data, "train")
    assert all(np.isfinite(refilled.physical_record(name, b)).all() for name in COLUMNS for b in range(3))


def test_embed_and_gaps_run_on_user_gauge_files(gauges, tmp_path):
    _, run = gauges
    emb = embed_run(run, tmp_path / "e.nc")
    assert emb.skipped == {"short": f"its record has 10 days, fewer than one window ({STEPS})"}
    with xr.open_dataset(tmp_path / "e.nc", engine="h5netcdf") as ds:
        empty = ds["basin"].values == "empty"
        assert ds.sizes["window"] == 4 * -(-DAYS // STEPS)
        assert (ds["tokens_flow"].values[empty] == 0).all() and np.isnan(ds["flow"].values[empty]).all()
        assert np.isfinite(ds["joint"].values).all()
    metrics = evaluate_gaps(run, 10, "val")
    per_basin = metrics["flow"]["flow"]["per_basin"]
    assert per_basin["empty"]["days"] == 0 and per_basin["plain"]["days"] > 0
    assert np.isfinite(per_basin["plain"]["model"]["nse"])


@pytest.mark.parametrize("kwargs, message", [
    ({"stride": 0}, "--stride must be at least 1, got 0"),
    ({"stride": -1}, "--stride must be at least 1, got -1"),
    ({"batch_size": 0}, "--batch-size must be at least 1, got 0"),
    ({"gap_days": STEPS}, f"--gaps must be between 1 and data.steps - 2 = {STEPS - 2}"),
])
def test_gap_arguments_out_of_range_are_named(gauges, kwargs, message):
    _, run = gauges
    gap_days = kwargs.pop("gap_days", 5)
    with pytest.raises(ValueError, match=message):
        evaluate_gaps(run, gap_days, "val", **kwargs)


@pytest.fixture
def no_work(monkeypatch):
    """Any prediction fails the test: the check must come before the work."""
    def refuse(*args, **kwargs):
        raise AssertionError("work started before the bad argument was found")

    monkeypatch.setattr(fill, "predict_record", refuse)
    monkeypatch.setattr("crossmae.embed.embed_windows", refuse)


def test_bad_outputs_stop_before_any_work_naming_them(gauges, tmp_path, capsys, no_work):
    _, run = gauges
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me\n")
    cases = [
        (["--out", str(a_file)], f"--out {str(a_file)!r} is a file; expected a folder"),
        (["--out", str(a_file / "sub")], f"{str(a_file)!r} is a file, not a folder"),
        (["--out", str(tmp_path / "o"), "--members", "1"], "--members must be 0 (no band) or at least 2 (a 10-90 % "
                                                            "band), got 1"),
        (["--out", str(tmp_path / "o"), "--stride", "0"], "--stride must be at least 1, got 0"),
        (["--out", str(tmp_path / "o"), "--extra-ratio", "1"], "--extra-ratio must be in (0, 1), got 1.0"),
        (["--out", str(tmp_path / "o"), "--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    ]
    for args, message in cases:
        assert main(["--run", str(run), *args]) == 2
        assert message in capsys.readouterr().err
    assert a_file.read_text() == "keep me\n"

    (tmp_path / "o1" / "flow" / "bom.csv").mkdir(parents=True)
    (tmp_path / "o2").mkdir()
    (tmp_path / "o2" / "rain").write_text("")
    for out, message in ((tmp_path / "o1", f"--out: {str(tmp_path / 'o1' / 'flow' / 'bom.csv')!r} is a folder"),
                         (tmp_path / "o2", f"--out: {str(tmp_path / 'o2' / 'rain')!r} is a file; expected a folder")):
        assert main(["--run", str(run), "--out", str(out)]) == 2
        assert message in capsys.readouterr().err

    for args, message in ((["--stride", "0"], "--stride must be at least 1, got 0"),
                          (["--batch-size", "-2"], "--batch-size must be at least 1, got -2")):
        assert embed_main(["--run", str(run), "--out", str(tmp_path / "e.nc"), *args]) == 2
        assert message in capsys.readouterr().err

    folder = tmp_path / "out.nc"
    folder.mkdir()
    for out, message in ((folder, f"out {str(folder)!r} is a folder; expected a file name"),
                         (a_file / "e.nc", f"{str(a_file)!r} is a file, not a folder")):
        assert embed_main(["--run", str(run), "--out", str(out)]) == 2
        assert message in capsys.readouterr().err


def test_an_output_over_the_input_files_stops_before_any_work(gauges, tmp_path, capsys, no_work):
    data, run = gauges
    (tmp_path / "flow").mkdir()
    for basin in BASINS:
        (tmp_path / "flow" / f"{basin}.csv").write_bytes((data / f"{basin}.csv").read_bytes())
    config = tmp_path / "other.yaml"
    config.write_text(yaml.safe_dump({"data": gauge_section(tmp_path, BASINS, "flow/{basin}.csv")}))
    before = (tmp_path / "flow" / "bom.csv").read_bytes()
    assert main(["--run", str(run), "--config", str(config), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"--out: writing {str(tmp_path / 'flow' / 'bom.csv')!r} would overwrite an input file" in err, err
    assert (tmp_path / "flow" / "bom.csv").read_bytes() == before


def test_an_unwritable_output_folder_stops_before_any_work(gauges, tmp_path, monkeypatch, no_work):
    _, run = gauges
    locked = tmp_path / "locked"
    locked.mkdir()
    if os.geteuid() == 0:  # root writes through permission bits: make the folder refuse root too
        real = os.access
        monkeypatch.setattr(fill.os, "access",
                            lambda p, mode, **kw: False if str(p) == str(locked) else real(p, mode, **kw))
    else:
        locked.chmod(0o555)
    try:
        with pytest.raises(ValueError, match=f"--out {str(locked / 'out')!r}: the folder {str(locked)!r} is not "
                                             "writable"):
            fill_run(run, locked / "out")
        with pytest.raises(ValueError, match="is not writable"):
            embed_run(run, locked / "e.nc")
    finally:
        locked.chmod(0o755)
    assert not (locked / "out").exists()


def test_a_config_whose_transforms_differ_stops_before_any_work(gauges, tmp_path, capsys, no_work):
    data, run = gauges
    section = gauge_section(data, BASINS)
    section["files"]["series"][0]["transform"] = "none"
    config = tmp_path / "other.yaml"
    config.write_text(yaml.safe_dump({"data": section}))
    for tool, out in ((main, tmp_path / "out"), (embed_main, tmp_path / "e.nc")):
        assert tool(["--run", str(run), "--config", str(config), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert "'flow': the run has transform 'log1p'" in err and "has transform 'none'" in err, err
        assert not out.exists()
    section["files"]["series"][0]["columns"] = ["Niederschlag"]
    config.write_text(yaml.safe_dump({"data": section}))
    assert embed_main(["--run", str(run), "--config", str(config), "--out", str(tmp_path / "e.nc")]) == 2
    assert "'flow' channels: the run has ['Abfluss']" in capsys.readouterr().err


def _grid_config(tmp_path, crop=None):
    config = make_data(tmp_path / "data", basins=("a",))
    content = yaml.safe_load(config.read_text())
    content["data"]["files"]["root"] = str(tmp_path / "data")
    if crop:
        content["data"]["files"]["grids"][0]["crop"] = crop
    path = tmp_path / f"data_{'crop' if crop else 'full'}.yaml"
    path.write_text(yaml.safe_dump(content))
    return path


def test_a_cropped_grid_is_filled_with_the_crops_coordinates(tmp_path):
    config = _grid_config(tmp_path, crop=[1, 3, 0, 4])
    run = train_run(config, tmp_path / "run", 2)
    fill_run(run, tmp_path / "out")
    with xr.open_dataset(tmp_path / "out" / "pre" / "a.nc", engine="h5netcdf") as out:
        assert list(out["lat"].values) == [1.0, 2.0] and list(out["lon"].values) == [10.0, 11.0, 12.0, 13.0]
    source = GridReader([str(tmp_path / "data" / "grid_a.nc")], "netcdf", GridOptions(["pre"], crop=(1, 3, 0, 4)),
                        "source")
    back = GridReader([str(tmp_path / "out" / "pre" / "a.nc")], "netcdf", GridOptions(["pre", "filled"]), "back")
    before = source.read(int(source.days[0]), int(source.days[-1]) + 1)  # [N, 1, 2, 4]
    after = back.read(int(back.days[0]), int(back.days[-1]) + 1)  # [N, 2, 2, 4]
    seen = np.isfinite(before[:, 0])
    assert np.array_equal(after[:, 0][seen], before[:, 0][seen])
    assert np.array_equal(after[:, 1] == 1, ~seen & np.isfinite(after[:, 0])) and (after[:, 1] == 1).sum() == 12

    grid_file = tmp_path / "data" / "grid_a.nc"
    before_bytes = grid_file.read_bytes()
    with pytest.raises(ValueError, match=f"out: writing {str(grid_file)!r} would overwrite an input file"):
        embed_run(run, grid_file)
    assert grid_file.read_bytes() == before_bytes


def test_a_grid_of_another_size_under_learned_space_is_named(tmp_path, capsys):
    run = train_run(_grid_config(tmp_path), tmp_path / "run", 1, "model.learned_space=true")
    cropped = _grid_config(tmp_path, crop=[0, 2, 0, 4])
    for tool, out in ((main, tmp_path / "out"), (embed_main, tmp_path / "e.nc")):
        assert tool(["--run", str(run), "--config", str(cropped), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert "grid 'pre' has 2 patch positions here (2x4 cells), the run learned 4 (model.learned_space)" in err
        assert not out.exists()


@pytest.mark.parametrize("device, message", [
    ("gpu0", "--device 'gpu0' is not a device; expected cpu, cuda, cuda:N or auto"),
    ("meta", "--device 'meta': expected cpu, cuda, cuda:N or auto"),
    ("cuda:64", "--device 'cuda:64': this machine has"),
])
def test_a_device_that_is_not_here_stops_before_any_work(gauges, tmp_path, device, message, no_work):
    _, run = gauges
    for call in (lambda: fill_run(run, tmp_path / "out", device=device),
                 lambda: embed_run(run, tmp_path / "e.nc", device=device),
                 lambda: evaluate_gaps(run, 5, "val", device=device)):
        with pytest.raises(ValueError, match=message):
            call()
    assert not (tmp_path / "out").exists() and not (tmp_path / "e.nc").exists()


def test_a_basin_id_that_leaves_the_output_folder_is_named(gauges, tmp_path, no_work):
    data, run = gauges
    (tmp_path / "data" / "sub").mkdir(parents=True)
    for name, basin in (("sub/plain.csv", "plain"), ("escape.csv", "bom")):
        (tmp_path / "data" / name).write_bytes((data / f"{basin}.csv").read_bytes())
    config = tmp_path / "other.yaml"
    config.write_text(yaml.safe_dump({"data": gauge_section(tmp_path / "data" / "sub", ["plain", "../escape"])}))
    with pytest.raises(ValueError, match="lies outside .*out/flow' \\(a basin id with '..'\\?\\)"):
        fill_run(run, tmp_path / "out", config_file=str(config))
    assert not (tmp_path / "out").exists()


def test_a_basin_with_nothing_observed_is_skipped_by_fill_and_named_by_embed(gauges, tmp_path, capsys):
    data, run = gauges
    lines = (data / "plain.csv").read_text(encoding="utf-8-sig").splitlines()
    void = [*lines[:2], *[f"{line.split(';')[0]};-9999;;x" for line in lines[2:]]]
    (tmp_path / "void.csv").write_text("\n".join(void) + "\n")
    (tmp_path / "plain.csv").write_bytes((data / "plain.csv").read_bytes())
    config = tmp_path / "other.yaml"
    config.write_text(yaml.safe_dump({"data": gauge_section(tmp_path, ["plain", "void"])}))
    report = fill_run(run, tmp_path / "out", config_file=str(config), members=2)
    assert report.skipped == {"flow/void": "no observed value in the whole record",
                              "rain/void": "no observed value in the whole record"}
    assert sorted(p.name for p in (tmp_path / "out").rglob("*.csv")) == ["plain.csv", "plain.csv"]
    assert embed_main(["--run", str(run), "--config", str(config), "--out", str(tmp_path / "e.nc")]) == 0
    assert "basin void: no observed value in any window; its modality embeddings are NaN" in capsys.readouterr().out


def ctrl_c():
    raise KeyboardInterrupt


class OutsideHandler(Exception):
    """Raised by the test's own SIGTERM handler: main did not install one."""


def test_sigterm_or_ctrl_c_in_the_middle_of_a_file_leaves_whole_files_or_none(gauges, tmp_path, monkeypatch,
                                                                              capsys):
    _, run = gauges
    for stop, code in ((lambda: os.kill(os.getpid(), signal.SIGTERM), 143), (ctrl_c, 130)):
        out = tmp_path / f"out{code}"
        real, calls = fill.day_to_iso, {"n": 0}

        def stopping(day, stop=stop, real=real, calls=calls):
            calls["n"] += 1
            if calls["n"] == DAYS + DAYS // 2:  # half-way through the second file
                stop()
            return real(day)

        monkeypatch.setattr(fill, "day_to_iso", stopping)

        def outside(signum, frame):
            raise OutsideHandler

        previous = signal.signal(signal.SIGTERM, outside)
        try:
            if code == 143:
                with pytest.raises(SystemExit) as stopped:
                    main(["--run", str(run), "--out", str(out)])
                assert stopped.value.code == code
            else:
                assert main(["--run", str(run), "--out", str(out)]) == code
                assert "interrupted: whole files or none were written" in capsys.readouterr().err
            assert signal.getsignal(signal.SIGTERM) is outside  # main put the caller's handler back
        finally:
            signal.signal(signal.SIGTERM, previous)
        written = [p for p in out.rglob("*") if p.is_file()]
        assert written == [out / "flow" / "bom.csv"]  # no temporary file, no half-written one


def test_days_that_only_windows_without_any_observation_cover_stay_missing(gauges, tmp_path, capsys):
    data, run = gauges
    lines = (data / "plain.csv").read_text(encoding="utf-8-sig").splitlines()
    outage = FIRST + np.arange(40, 80)  # every instrument off: rain and flow missing
    off = {f"{d.astype(object):%d.%m.%Y}" for d in outage}
    rows = [f"{line.split(';')[0]};nan;-9999;x" if line.split(";")[0] in off else line for line in lines[2:]]
    (tmp_path / "outage.csv").write_text("\n".join([*lines[:2], *rows]) + "\n")
    config = tmp_path / "other.yaml"
    config.write_text(yaml.safe_dump({"data": gauge_section(tmp_path, ["outage"])}))
    assert main(["--run", str(run), "--config", str(config), "--out", str(tmp_path / "out"), "--members", "2"]) == 0
    printed = capsys.readouterr().out
    # windows every 8 days; those starting on days 40, 48, 56 and 64 lie inside the outage: days 48-71 only in them
    left = np.zeros(DAYS, dtype=bool)
    left[48:72] = True
    for name, column in COLUMNS.items():
        table = pd.read_csv(tmp_path / "out" / name / "outage.csv", skiprows=3)
        assert np.array_equal(table[f"{column}_flag"] == "missing", left)
        assert table.loc[left, [column, f"{column}_q10", f"{column}_q90"]].isna().all().all()
        assert np.isfinite(table.loc[table[f"{column}_flag"] == "filled", column]).all()
        assert (table[f"{column}_flag"] == "filled").sum() == 16
        assert f"{name}/outage: 24 values left missing" in printed


def test_a_stride_longer_than_a_window_stops_before_any_work(gauges, tmp_path, no_work):
    _, run = gauges
    with pytest.raises(ValueError, match=f"--stride {STEPS + 1} is longer than a window \\(data.steps = {STEPS}\\)"):
        fill_run(run, tmp_path / "out", stride=STEPS + 1)
    assert not (tmp_path / "out").exists()


def test_gap_methods_are_scored_on_the_same_days(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    write_gauge(data, "plain", 3)
    lines = (data / "plain.csv").read_text(encoding="utf-8-sig").splitlines()
    # the first val window starts on day 77 (16 February); a 14-day gap in a 16-day window covers its days 1-14:
    # flow observed on record days 79-90 alone lies inside it, with no flow outside the gap to interpolate from
    kept = {f"{(FIRST + d).astype(object):%d.%m.%Y}" for d in range(79, 91)}
    rows = [line if line.split(";")[0] in kept else ";".join([*line.split(";")[:2], "nan", "x"]) for line in lines[2:]]
    (data / "island.csv").write_text("\n".join([*lines[:2], *rows]) + "\n")
    config = data / "data.yaml"
    config.write_text(yaml.safe_dump({"data": gauge_section(data, ["plain", "island"]), "model": MODEL}))
    run = train_run(config, tmp_path / "run", 1)
    island = evaluate_gaps(run, STEPS - 2, "val")["flow"]["flow"]["per_basin"]["island"]
    assert island["days"] == 0 and island["unscored_days"] == 12
    assert all(np.isnan(island[m]["nse"]) for m in ("model", "interp", "climatology", "regression"))


def test_a_column_never_observed_in_a_basin_is_reported_and_left_missing(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    for i, basin in enumerate(("plain", "dry")):
        write_gauge(data, basin, i)
    lines = (data / "dry.csv").read_text(encoding="utf-8-sig").splitlines()
    rows = [";".join([*line.split(";")[:2], "-9999", "x"]) for line in lines[2:]]  # no flow at all
    rows[10] = ";".join([rows[10].split(";")[0], "", "-9999", "x"])  # and one day without rain
    (data / "dry.csv").write_text("\n".join([*lines[:2], *rows]) + "\n")
    section = gauge_section(data, ["plain", "dry"])
    both = {**section["files"]["series"][0], "name": "gauge", "columns": ["Niederschlag", "Abfluss"]}
    section["files"]["series"] = [{**both, "transform": "none"}]
    config = data / "data.yaml"
    config.write_text(yaml.safe_dump({"data": section, "model": MODEL}))
    run = train_run(config, tmp_path / "run", 1)
    assert main(["--run", str(run), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "skipped gauge/dry:Abfluss: no observed value in the whole record" in printed
    # a series token is observed when all its columns are: without flow the model sees nothing of this basin,
    # so the day without rain is left missing rather than guessed
    assert "gauge/dry: 0 values filled" in printed and "gauge/dry: 1 values left missing" in printed
    table = pd.read_csv(tmp_path / "out" / "gauge" / "dry.csv", skiprows=3)
    assert table["Abfluss"].isna().all() and (table["Abfluss_flag"] == "missing").all()
    rain = read_original(data / "dry.csv", "Niederschlag").values[:, 0]
    assert np.array_equal(table["Niederschlag"].to_numpy(), rain, equal_nan=True)
    assert np.array_equal(table["Niederschlag_flag"] == "missing", np.isnan(rain)) and np.isnan(rain).sum() == 1


def test_duplicated_dates_and_decimal_commas_stop_naming_the_file_and_value(gauges, tmp_path, capsys, no_work):
    data, run = gauges
    lines = (data / "plain.csv").read_text(encoding="utf-8-sig").splitlines()
    config = tmp_path / "other.yaml"
    config.write_text(yaml.safe_dump({"data": gauge_section(tmp_path, ["plain"])}))
    day, rain, flow, note = lines[5].split(";")
    for rows, message in (
            ([*lines, lines[5]], f"{str(tmp_path / 'plain.csv')!r} holds day "
                                 f"{np.datetime64(pd.to_datetime(day, format='%d.%m.%Y'), 'D')} more than once"),
            ([*lines[:5], ";".join([day, rain, flow.replace(".", ","), note]), *lines[6:]],
             f"column 'Abfluss' of {str(tmp_path / 'plain.csv')!r} holds {flow.replace('.', ',')!r} on line 6")):
        (tmp_path / "plain.csv").write_text("\n".join(rows) + "\n")
        assert main(["--run", str(run), "--config", str(config), "--out", str(tmp_path / "out")]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_run_on_synthetic_data_is_named_as_such(tmp_path, capsys):
    from crossmae.train_cli import main as train_main
    from tests.test_cli import TINY

    run = tmp_path / "run"
    assert train_main(["--fused", "--max-steps", "1", *TINY, "--out-dir", str(run)]) == 0
    capsys.readouterr()
    for tool, out in ((main, tmp_path / "out"), (embed_main, tmp_path / "e.nc")):
        assert tool(["--run", str(run), "--out", str(out)]) == 2
        assert (f"--run {str(run)!r}: fill and embed read files (data.source: files); the run has data.source "
                "'synthetic'") in capsys.readouterr().err
