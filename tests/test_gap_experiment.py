"""bench/gap_experiment.py: the per-seed medians over basins, their mean over seeds and the best baseline."""

from __future__ import annotations

import math

from bench.gap_experiment import parse_args, summarize


def row(seed, basin, model, interp, clim, reg):
    return {"dataset": "d", "seed": seed, "split": "test", "basin": basin, "model_nse": model, "interp_nse": interp,
            "climatology_nse": clim, "regression_nse": reg}


def test_summary_takes_the_median_over_basins_then_the_mean_over_seeds():
    rows = [row(0, "a", 0.5, 0.1, 0.0, 0.3), row(0, "b", 0.7, 0.3, 0.2, float("nan")), row(0, "c", 0.9, 0.2, 0.1, 0.4),
            row(1, "a", 0.3, 0.2, 0.0, 0.6), row(1, "b", 0.5, 0.4, 0.0, 0.6), row(1, "c", 0.1, 0.0, 0.0, 0.6)]
    lines, summary = summarize(rows, ["test"])
    test = summary["test"]
    assert test["per_seed"][0]["model"] == 0.7 and math.isclose(test["per_seed"][0]["regression"], 0.35)
    assert math.isclose(test["mean"]["model"], 0.5) and math.isclose(test["mean"]["regression"], 0.475)
    assert test["best_baseline"] == "regression" and math.isclose(test["model_minus_best"], 0.025)
    assert len(lines) == 1 and lines[0].startswith("| test | 0.500 ± 0.200")


def test_steps_per_data_set():
    assert parse_args(["--max-steps", "moselle=10,camels_us=20"]).max_steps == {"moselle": 10, "camels_us": 20}
    assert parse_args(["--datasets", "camels_us", "--max-steps", "7"]).max_steps == {"camels_us": 7}
