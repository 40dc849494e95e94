"""bench/gap_noise.py's summary: medians over basins, the model averaged over its seeds, the best baseline and
the margin per gap seed, then mean and sd over gap seeds."""

import math

import pytest

from bench.gap_noise import summarize


def _row(seed, gap_seed, basin, model, interp, clim, reg, split="test"):
    return {"dataset": "d", "seed": seed, "split": split, "gap_seed": gap_seed, "basin": basin, "days": 30,
            "model": model, "interp": interp, "climatology": clim, "regression": reg}


def test_summary_takes_medians_over_basins_and_means_over_model_seeds():
    rows = [
        # gap seed 0: model seed 0 medians 0.2 (of 0.1, 0.2, 0.9), seed 1 medians 0.4; baselines identical
        _row(0, 0, "a", 0.1, 0.3, 0.0, -1.0), _row(0, 0, "b", 0.2, 0.5, 0.1, 0.6), _row(0, 0, "c", 0.9, 0.1, 0.2, 0.7),
        _row(1, 0, "a", 0.4, 0.3, 0.0, -1.0), _row(1, 0, "b", 0.3, 0.5, 0.1, 0.6), _row(1, 0, "c", 0.5, 0.1, 0.2, 0.7),
        # gap seed 1: interp is best
        _row(0, 1, "a", 0.5, 0.8, 0.0, 0.0), _row(0, 1, "b", 0.5, 0.8, 0.0, 0.0),
        _row(1, 1, "a", 0.7, 0.8, 0.0, 0.0), _row(1, 1, "b", 0.7, 0.8, 0.0, 0.0),
    ]
    out = summarize(rows, ["test"], [0, 1])["test"]
    g0, g1 = out["per_gap_seed"][0], out["per_gap_seed"][1]
    assert g0["model"] == pytest.approx(0.3)  # mean of the per-seed medians 0.2 and 0.4
    assert g0["interp"] == pytest.approx(0.3) and g0["regression"] == pytest.approx(0.6)
    assert g0["best_baseline"] == "regression" and g0["model_minus_best"] == pytest.approx(-0.3)
    assert g1["best_baseline"] == "interp" and g1["model_minus_best"] == pytest.approx(-0.2)
    assert out["mean"]["model_minus_best"] == pytest.approx(-0.25)
    assert out["sd"]["model_minus_best"] == pytest.approx(math.sqrt(2 * 0.05 ** 2))  # sample sd of -0.3, -0.2
