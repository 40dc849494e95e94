"""Evaluation: NSE/KGE against hand-computed values, and `crossmae.evaluate` on tiny trained runs (synthetic
data and the shared Moselle set) writing metrics JSON and PNG plots."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from crossmae.config import resolve_config
from crossmae.engine import Trainer
from crossmae.evaluate import evaluate_run, interpolate_masked, kge, main, nse

ROOT = Path(__file__).resolve().parents[1]
MOSELLE = ROOT.parent / "shared" / "data" / "moselle"
TINY_MODEL = ["model.enc_dim=32", "model.enc_depth=1", "model.enc_heads=2", "model.dec_dim=32", "model.dec_depth=1",
              "model.dec_heads=2", "train.warmup_steps=2", "train.val_every=0", "train.ckpt_every=0", "train.lr=3e-3"]


# -- scores ----------------------------------------------------------------------------------------------------
def test_nse_against_hand_computed_values():
    obs = np.array([1.0, 2.0, 3.0, 4.0])
    assert nse(obs, [1.0, 2.0, 3.0, 5.0]) == pytest.approx(1 - 1 / 5)  # Σ(sim-obs)² = 1, Σ(obs-2.5)² = 5
    assert nse(obs, obs) == 1.0
    assert nse(obs, np.full(4, 2.5)) == pytest.approx(0.0)  # the mean of the observations scores 0
    assert nse(obs, [2.0, 3.0, 4.0, 5.0]) == pytest.approx(1 - 4 / 5)
    assert nse([1.0, np.nan, 3.0, 4.0], [1.0, 2.0, np.nan, 5.0]) == pytest.approx(1 - 1 / 4.5)  # pairs (1,1), (4,5)
    assert math.isnan(nse([2.0, 2.0], [1.0, 3.0])) and math.isnan(nse([1.0], [1.0]))


def test_kge_against_hand_computed_values():
    obs, sim = [1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 5.0]
    # by hand: μ_obs 2.5, μ_sim 2.75, σ_obs √1.25, σ_sim √2.1875, cov 1.625
    r = 1.625 / math.sqrt(1.25 * 2.1875)
    alpha, beta = math.sqrt(2.1875 / 1.25), 2.75 / 2.5
    got = kge(obs, sim)
    assert got["r"] == pytest.approx(r) and got["alpha"] == pytest.approx(alpha) and got["beta"] == pytest.approx(beta)
    assert got["kge"] == pytest.approx(1 - math.sqrt((r - 1) ** 2 + (alpha - 1) ** 2 + (beta - 1) ** 2))
    assert got["kge"] == pytest.approx(0.66155, abs=1e-5)
    assert kge(obs, obs)["kge"] == pytest.approx(1.0)
    doubled = kge(obs, [2.0, 4.0, 6.0, 8.0])  # r 1, α 2, β 2
    assert doubled["kge"] == pytest.approx(1 - math.sqrt(2.0))
    assert math.isnan(kge([1.0, 1.0, 1.0], [1.0, 2.0, 3.0])["kge"])


def test_interpolation_baseline_fills_masked_days_from_visible_ones():
    values = np.array([1.0, 9.0, 3.0, 9.0, 9.0, 6.0, 9.0])
    visible = np.array([True, False, True, False, False, True, False])
    np.testing.assert_allclose(interpolate_masked(values, visible), [1, 2, 3, 4, 5, 6, 6])
    assert np.isnan(interpolate_masked(values, np.zeros(7, dtype=bool))).all()


# -- end to end ----------------------------------------------------------------------------------------------
def _train(out: Path, config_file: str | None, *overrides: str, steps: int = 6) -> Path:
    config = resolve_config(None, config_file, [*TINY_MODEL, *overrides, f"train.max_steps={steps}",
                                                f"train.out_dir={out}"])
    config.train.fused = True
    Trainer(config).fit()
    return out


def test_evaluate_synthetic_run_writes_metrics_and_plots(tmp_path):
    run = _train(tmp_path / "run", None, "data.synthetic.num_basins=3", "data.synthetic.record_days=160",
                 "data.synthetic.grid_size=12", "data.synthetic.basin_patches=[4, 9]", "data.patch_size=4",
                 "data.steps=8", "data.stride=4", "data.batch_size=4")
    metrics = evaluate_run(run, "val")
    assert set(metrics["modalities"]) == {"precip", "temperature", "soil_moisture", "streamflow", "evaporation"}
    for entry in metrics["modalities"].values():
        assert math.isfinite(entry["masked_mse"]) and math.isfinite(entry["rmse"]) and entry["values"] > 0
    flow = metrics["flow"]["streamflow"]
    assert set(flow["per_basin"]) == {"0", "1", "2"}
    assert math.isfinite(flow["median_nse"]) and math.isfinite(flow["baseline_interp"]["median_kge"])
    saved = json.loads((run / "eval" / "metrics_val.json").read_text())
    assert saved["modalities"]["precip"]["masked_mse"] == pytest.approx(metrics["modalities"]["precip"]["masked_mse"])
    pngs = sorted(p.name for p in (run / "eval").glob("*.png"))
    assert pngs == sorted(["val_map_precip.png", "val_map_temperature.png", "val_map_soil_moisture.png",
                           "val_hydrograph_streamflow_0.png", "val_hydrograph_streamflow_1.png",
                           "val_hydrograph_streamflow_2.png"])
    assert all((run / "eval" / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    # fixed masks: the same seed gives the same numbers, another seed other masks
    again = evaluate_run(run, "val", plots=False)
    assert again["modalities"] == metrics["modalities"]
    other = evaluate_run(run, "val", seed=1, plots=False)
    assert other["modalities"]["precip"]["masked_mse"] != metrics["modalities"]["precip"]["masked_mse"]


@pytest.mark.skipif(not MOSELLE.is_dir(), reason="the shared data sets are not at ../shared/data")
def test_evaluate_moselle_run_from_the_command_line(tmp_path, capsys):
    run = _train(tmp_path / "moselle", str(ROOT / "configs" / "moselle.yaml"), "data.steps=16", "data.stride=8",
                 "data.batch_size=4")
    code = main(["--run", str(run), "--split", "test", "--mask.ratios.discharge=0.9"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "discharge: median NSE" in out and "perl" in out
    metrics = json.loads((run / "eval" / "metrics_test.json").read_text())
    assert metrics["split"] == "test" and metrics["mask"]["discharge"] == 0.9 and metrics["step"] == 6
    assert metrics["windows"] == 365 // 16  # non-overlapping windows of 1993
    scores = metrics["flow"]["discharge"]["per_basin"]["perl"]
    assert scores["days"] > 0.8 * 0.9 * metrics["windows"] * 16 and scores["nse"] is not None
    assert set(metrics["plots"]) == {"test_map_pre.png", "test_map_tavg.png", "test_map_pet.png",
                                     "test_hydrograph_discharge_perl.png"}
    assert all((run / "eval" / p).is_file() for p in metrics["plots"])
    tb = list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert tb, "evaluation logs to the run's TensorBoard folder"
    assert main(["--run", str(tmp_path / "nothing")]) == 2
    assert "has no checkpoint" in capsys.readouterr().err


def test_a_norm_pix_run_reports_no_physical_scores_for_its_normalised_modalities(tmp_path):
    run = _train(tmp_path / "run", None, "data.synthetic.num_basins=3", "data.synthetic.record_days=160",
                 "data.synthetic.grid_size=12", "data.synthetic.basin_patches=[4, 9]", "data.patch_size=4",
                 "data.steps=8", "data.stride=4", "data.batch_size=4", "model.norm_pix_loss=true",
                 "model.norm_pix_modalities=[precip, soil_moisture]", "model.fusion_depth=1", "model.static=both",
                 "model.day_of_year=true", "mask.mode=unified", steps=3)
    metrics = evaluate_run(run, "val", plots=False)
    for name in ("precip", "soil_moisture"):
        entry = metrics["modalities"][name]
        assert not entry["physical_units"] and math.isnan(entry["rmse"]) and math.isfinite(entry["masked_mse"])
    for name in ("temperature", "streamflow"):
        entry = metrics["modalities"][name]
        assert entry["physical_units"] and math.isfinite(entry["rmse"])
    assert set(metrics["flow"]) == {"streamflow"}
    saved = json.loads((run / "eval" / "metrics_val.json").read_text())
    assert saved["modalities"]["precip"]["rmse"] is None


def test_evaluate_regional_run_scores_every_site_with_csv_and_maps(tmp_path):
    config = resolve_config("regional_small", None, ["train.val_every=0", "train.ckpt_every=0", "train.max_steps=4",
                                                     f"train.out_dir={tmp_path / 'region'}"])
    config.train.fused = True
    Trainer(config).fit()
    run = tmp_path / "region"
    metrics = evaluate_run(run, "val")
    layout_sites = 0
    for key in ("gauges:riverflow", "gauges:evaporation"):
        entry = metrics["sites"][key]
        layout_sites = len(entry["per_basin"])
        assert layout_sites > 10 and math.isfinite(entry["median_nse"])
        assert math.isfinite(entry["baseline_interp"]["median_nse"])
        days = [s["days"] for s in entry["per_basin"].values()]
        assert sum(d > 0 for d in days) > 0.8 * len(days)  # a site without data in the split has 0 days and no score
        assert all(math.isnan(s["nse"]) for s in entry["per_basin"].values() if s["days"] == 0)
    rows = (run / "eval" / "val_sites_gauges.csv").read_text().splitlines()
    assert rows[0].split(",")[:3] == ["site", "group", "slot"] and len(rows) == 1 + 2 * layout_sites
    first = rows[1].split(",")
    assert float(first[7]) == pytest.approx(metrics["sites"]["gauges:riverflow"]["per_basin"][first[0]]["nse"])
    for name in ("val_sites_gauges_riverflow_nse.png", "val_sites_gauges_evaporation_nse.png"):
        assert name in metrics["plots"] and (run / "eval" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
