"""A tiny gauged data set written into a test's folder: per basin a daily CSV (precipitation, flow) and a
precipitation grid NetCDF, and a trained tiny run on it (a few steps), for the fill, embed and gap tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml

from crossmae.config import resolve_config
from crossmae.engine import Trainer

DAYS = 240
FIRST = np.datetime64("2001-01-01")
HOLE = (100, 130)  # basin a's 30-day flow gap: days [100, 130)
MODEL = {"enc_dim": 16, "enc_depth": 1, "enc_heads": 2, "dec_dim": 16, "dec_depth": 1, "dec_heads": 2}


def write_basin(folder: Path, basin: str, seed: int, flow_missing: bool = False) -> None:
    import xarray as xr

    rng = np.random.default_rng(seed)
    rain = rng.gamma(0.6, 4.0, DAYS) * (rng.random(DAYS) < 0.5)  # [DAYS] mm/day
    flow = np.convolve(rain, 0.3 * 0.8 ** np.arange(20))[:DAYS] + 0.5  # [DAYS]
    flow_text = ["nan" if flow_missing or (basin == "a" and HOLE[0] <= d < HOLE[1]) else f"{flow[d]:.4f}"
                 for d in range(DAYS)]
    dates = FIRST + np.arange(DAYS)
    lines = ["date,precip,flow"] + [f"{dates[d]},{rain[d]:.3f},{flow_text[d]}" for d in range(DAYS)]
    (folder / f"{basin}.csv").write_text("\n".join(lines) + "\n")
    field = rain[:, None, None] * rng.uniform(0.5, 1.5, (1, 4, 4))  # [DAYS, 4, 4]
    field[50:53, 1:3, 1:3] = np.nan  # a few missing cells inside the basin
    mask = np.ones((4, 4))
    mask[0, 0] = np.nan
    xr.Dataset({"pre": (("time", "lat", "lon"), field.astype(np.float32)),
                "mask": (("lat", "lon"), mask)},
               coords={"time": dates.astype("datetime64[ns]"), "lat": np.arange(4.0), "lon": np.arange(4.0) + 10,
                       "easting": (("lat", "lon"), 1000.0 * np.arange(16.0).reshape(4, 4), {"units": "m"})},
               ).to_netcdf(folder / f"grid_{basin}.nc", engine="h5netcdf")


def data_section(basins: list[str]) -> dict:
    return {"source": "files", "steps": 16, "stride": 8, "patch_size": 2, "batch_size": 4, "files": {
        "root": ".", "basins": basins,
        "grids": [{"name": "pre", "path": "grid_{basin}.nc", "mask_variable": "mask", "transform": "log1p"}],
        "series": [{"name": "flow", "path": "{basin}.csv", "columns": ["flow"], "transform": "log1p", "flow": True},
                   {"name": "rain", "path": "{basin}.csv", "columns": ["precip"]}],
        "split": {"by": "period", "train": ["2001-01-01", "2001-06-30"], "val": ["2001-07-01", "2001-08-28"],
                  "test": ["2001-07-01", "2001-08-28"]}}}


def make_data(folder: Path, basins=("a", "b"), empty: tuple[str, ...] = ()) -> Path:
    """Write the basins' files and ``data.yaml`` into ``folder``; returns the YAML's path."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, basin in enumerate(basins):
        write_basin(folder, basin, i, flow_missing=basin in empty)
    path = folder / "data.yaml"
    path.write_text(yaml.safe_dump({"data": data_section(list(basins)), "model": MODEL}))
    return path


def train_run(config_path: Path, run_dir: Path, steps: int = 3, *overrides: str) -> Path:
    config = resolve_config(None, str(config_path), [f"train.max_steps={steps}", "train.val_every=0",
                                                     "train.warmup_steps=1", "train.ckpt_every=100",
                                                     f"train.out_dir={run_dir}", "train.fused=true", *overrides])
    Trainer(config).fit()
    return run_dir
