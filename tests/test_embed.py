"""crossmae.embed: one row per basin and window with pooled per-modality and joint embeddings, the same numbers
on a second run, the layout documented in its module docstring, and bad outputs refused before any work."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from crossmae.embed import embed_run, main
from tests.gap_data import DAYS, MODEL, make_data, train_run


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("embed")
    config = make_data(root / "data", basins=("a", "b"))
    return config, train_run(config, root / "run")


def test_embeddings_have_one_row_per_basin_and_window_and_are_deterministic(trained, tmp_path):
    _, run = trained
    first = embed_run(run, tmp_path / "one.nc")
    assert main(["--run", str(run), "--out", str(tmp_path / "two.nc")]) == 0
    steps, dim = 16, MODEL["enc_dim"]
    per_basin = DAYS // steps  # windows every 16 days, the last one ending on the last day
    with xr.open_dataset(tmp_path / "one.nc", engine="h5netcdf") as one, \
            xr.open_dataset(tmp_path / "two.nc", engine="h5netcdf") as two:
        assert dict(one.sizes) == {"window": 2 * per_basin, "feature": dim}
        for name in ("joint", "pre", "flow", "rain"):
            assert one[name].dims == ("window", "feature") and one[name].dtype == np.float32
            assert np.array_equal(one[name].values, two[name].values, equal_nan=True)
        assert list(one["basin"].values) == ["a"] * per_basin + ["b"] * per_basin
        assert str(one["window_start"].values[1])[:10] == "2001-01-17"
        assert one.attrs["crossmae_step"] == 3 and one.attrs["window_days"] == steps
        hole = list(one["tokens_flow"].values[:per_basin])
        assert hole[6] == 4 and hole[7] == 0 and hole[0] == steps  # days 100-129: flow missing
        assert np.isnan(one["flow"].values[7]).all() and np.isfinite(one["joint"].values).all()
        assert np.isfinite(one["flow"].values[0]).all()
    assert first.pooled["joint"].shape == (2 * per_basin, dim)
    assert not np.allclose(first.pooled["joint"][0], first.pooled["joint"][1])  # windows differ


def test_bad_output_names_stop_before_any_work(trained, tmp_path, capsys):
    _, run = trained
    assert main(["--run", str(run), "--out", str(tmp_path / "e.csv")]) == 2
    assert "must end in .nc (NetCDF) or .parquet" in capsys.readouterr().err
    assert not (tmp_path / "e.csv").exists()
