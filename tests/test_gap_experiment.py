"""bench/gap_experiment.py: the per-seed medians over basins, their mean over seeds and the best baseline."""

from __future__ import annotations

import math

import pytest

from bench import gap_experiment
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


def test_options_are_checked(capsys):
    args = parse_args(["--configs", "camels_us=configs/gaps_camels_us.yaml", "--select-every", "5",
                       "--splits", "train,val,test"])
    assert args.configs["camels_us"] == "configs/gaps_camels_us.yaml" and args.configs["moselle"].endswith(
        "configs/moselle.yaml")
    assert args.select_every == 5 and args.splits == ["train", "val", "test"]
    for argv, message in ((["--configs", "rhine=x.yaml"], "--configs names ['rhine']"),
                          (["--splits", "val,dev"], "--splits names ['dev']"),
                          (["--select-every", "5", "--splits", "test"], "--splits must hold val"),
                          (["--select-every", "-1"], "--select-every must be 0 or a positive"),
                          (["--rescore"], "--rescore scores the runs of an earlier experiment")):
        with pytest.raises(SystemExit):
            parse_args(argv)
        assert message in capsys.readouterr().err


def test_the_checkpoint_is_chosen_on_val(tmp_path, monkeypatch):
    for step in (10, 20, 30):
        (tmp_path / "checkpoints" / f"step_{step:08d}").mkdir(parents=True)
    medians = {10: [0.1, 0.3, 0.2], 20: [0.5, 0.4, -2.0], 30: [0.4, 0.4, 0.9]}  # medians 0.2, 0.4, 0.4
    seen = []

    def fake_score(run, split, checkpoint, args, log_stem):
        step = int(checkpoint.name.split("_")[1])
        seen.append((split, step))
        return {"step": step, "flow": {"q": {"per_basin": {str(i): {"model": {"nse": v}}
                                                           for i, v in enumerate(medians[step])}}}}, 1.0

    monkeypatch.setattr(gap_experiment, "score", fake_score)
    checkpoint, by_step = gap_experiment.select_checkpoint(tmp_path, parse_args([]), tmp_path / "log")
    assert checkpoint.name == "step_00000020" and seen == [("val", 10), ("val", 20), ("val", 30)]
    assert by_step == {10: 0.2, 20: 0.4, 30: 0.4}


def test_the_swapped_column_appears_when_measured():
    rows = [row(0, "a", 0.5, 0.1, 0.0, 0.3) | {"swapped_nse": -0.5}, row(0, "b", 0.7, 0.3, 0.2, 0.5)]
    lines, summary = summarize(rows, ["test"])
    assert summary["test"]["mean"]["swapped"] == -0.5 and summary["test"]["best_baseline"] == "regression"
    assert lines[0].endswith("| -0.500 ± 0.000 | regression | +0.200 | 1 |")
    assert "swapped" not in summarize([row(0, "a", 0.5, 0.1, 0.0, 0.3)], ["test"])[1]["test"]["mean"]
