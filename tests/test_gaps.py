"""Span masks (runs of hidden days) and gap evaluation: N-day streamflow gaps scored for the model and the
interpolation, climatology and lagged-precipitation regression baselines."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from crossmae.config import ConfigError, MaskConfig, resolve_config
from crossmae.data.collate import MaskingCollator, hidden_count
from crossmae.data.sample import DatasetSpec, ModalitySpec, Sample
from crossmae.evaluate import main as evaluate_main
from crossmae.gaps import climatology, fit_regression, precipitation_features
from tests.gap_data import make_data, train_run

SPEC = DatasetSpec((ModalitySpec("pre", "grid", 1, 4, 4), ModalitySpec("flow", "series", 1)))


def span_batch(seeds, span=(3, 10), ratio=0.5, steps=60):
    collator = MaskingCollator(SPEC, MaskConfig(grid_ratio=ratio, series_ratio=ratio, mode="span",
                                                span_days=list(span)), patch_size=2, steps=steps)
    samples = [Sample(grids={"pre": torch.rand(steps, 1, 4, 4)}, basin_masks={"pre": torch.ones(4, 4, dtype=bool)},
                      series={"flow": torch.rand(steps, 1)}, noise_seed=s) for s in seeds]
    return collator(samples)


def hidden_days(batch, name, b, steps=60):
    index = batch.modalities[name].hidden.index
    out = torch.zeros(steps, 4 if name == "pre" else 1, dtype=torch.bool)
    rows = index[index[:, 0] == b]
    out[rows[:, 1], rows[:, 2]] = True
    return out  # [T, P]


def runs(days: torch.Tensor) -> list[int]:
    edges = np.flatnonzero(np.diff(np.r_[0, days.numpy().astype(np.int8), 0]))
    return list(edges[1::2] - edges[::2])


def test_span_masks_hide_runs_of_whole_days_with_the_hidden_count():
    batch = span_batch([1, 2, 3])
    for b in range(3):
        flow = hidden_days(batch, "flow", b)[:, 0]  # [T]
        assert int(flow.sum()) == int(hidden_count(torch.tensor(60), 0.5))
        assert len(runs(flow)) <= 30 // 3 + 1  # uniform masking gives about 15 runs of 2 days
        grid = hidden_days(batch, "pre", b)  # [T, P]: a hidden day hides every patch
        assert bool((grid.all(1) == grid.any(1)).all()) and int(grid.sum()) >= 2 * 60 // 2 * 2
    again = span_batch([1, 2, 3])
    assert torch.equal(batch.modalities["flow"].hidden.index, again.modalities["flow"].hidden.index)
    other = span_batch([4, 5, 6])
    assert not torch.equal(batch.modalities["flow"].hidden.index, other.modalities["flow"].hidden.index)


def test_span_days_are_checked():
    with pytest.raises(ConfigError, match=r"mask.span_days must be \[shortest, longest\]"):
        resolve_config(None, None, ["mask.span_days=[5, 3]"])


def test_climatology_and_regression_recover_what_they_model():
    days = np.arange(3 * 365)  # from 1970-01-01
    doy = (days.astype("datetime64[D]") - days.astype("datetime64[D]").astype("datetime64[Y]")).astype(int)
    clim = climatology(days, np.full(days.size, 2.5))
    assert np.allclose(clim, 2.5)
    rng = np.random.default_rng(0)
    rain = rng.gamma(0.5, 4.0, days.size)
    flow = 1.0 + 0.6 * np.r_[0.0, rain[:-1]] + 0.2 * np.sin(2 * np.pi * doy / 365.25)
    x = precipitation_features(days, rain)
    assert x.shape == (days.size, 13) and np.isnan(x[:119]).any(1).all() and np.isfinite(x[119:]).all()
    coef = fit_regression(x, flow)
    assert np.allclose(x[200:210] @ coef[:-1] + coef[-1], flow[200:210], atol=1e-6)


def test_gaps_score_the_model_and_three_baselines_on_the_gap_days(tmp_path, capsys):
    config = make_data(tmp_path / "data", basins=("a", "b"))
    run = train_run(config, tmp_path / "run", 3, "mask.mode=span", "mask.span_days=[2, 6]")
    assert evaluate_main(["--run", str(run), "--gaps", "5", "--split", "val"]) == 0
    out = capsys.readouterr().out
    for method in ("model", "interp", "climatology", "regression"):
        assert f"  {method:<12} NSE" in out, out
    metrics = json.loads((run / "eval" / "gaps5_val.json").read_text())
    flow = metrics["flow"]["flow"]
    assert metrics["precipitation"] == "pre:pre" and metrics["windows"] == 6
    assert {b: v["days"] for b, v in flow["per_basin"].items()} == {"a": 15, "b": 15}  # 3 windows x 5 days each
    assert flow["best_baseline"] in ("interp", "climatology", "regression")
    assert evaluate_main(["--run", str(run), "--gaps", "15"]) == 2
    assert "--gaps must be between 1 and data.steps - 2 = 14" in capsys.readouterr().err


def test_swapped_forcing_changes_the_model_alone(tmp_path):
    from crossmae.gaps import evaluate_gaps

    config = make_data(tmp_path / "data", basins=("a", "b"))
    run = train_run(config, tmp_path / "run", 3, "mask.mode=span", "mask.span_days=[2, 6]")
    own = evaluate_gaps(run, 5, "val")
    swapped = evaluate_gaps(run, 5, "val", swap_forcing=True)
    assert swapped["swap_forcing"] and (run / "eval" / "gaps5_val_swapped.json").is_file()
    mine, theirs = own["flow"]["flow"]["per_basin"], swapped["flow"]["flow"]["per_basin"]
    for basin in ("a", "b"):
        for method in ("interp", "climatology", "regression"):  # the baselines read the true forcing
            assert theirs[basin][method] == mine[basin][method]
    assert any(theirs[b]["model"]["nse"] != mine[b]["model"]["nse"] for b in ("a", "b"))
    one = train_run(make_data(tmp_path / "one", basins=("a",)), tmp_path / "one_run", 1)
    with pytest.raises(ValueError, match=r"the val split needs at least 2 windows \(it has 1\)"):
        evaluate_gaps(one, 5, "val", stride=1000, swap_forcing=True)


def test_a_constant_prediction_scores_as_computed_by_hand(tmp_path, monkeypatch):
    """A model that predicts 0 (normalised) everywhere fills every gap day with expm1(the training mean of
    log1p(flow)); its NSE, recomputed here from the CSV files, the gap draws and the saved statistics, must be
    what the evaluation reports (windows, gap days, denormalisation and pooling per basin)."""
    import types

    import crossmae.gaps as gaps

    config = make_data(tmp_path / "data", basins=("a", "b"))
    run = train_run(config, tmp_path / "run", 1)

    class Zero(gaps.MultimodalCrossMAE):
        def forward(self, batch, normalizers=None):
            return types.SimpleNamespace(predictions={
                n: torch.zeros(m.queries.index.shape[0], self.token_dims[n]) for n, m in batch.modalities.items()})

    monkeypatch.setattr(gaps, "MultimodalCrossMAE", Zero)
    metrics = gaps.evaluate_gaps(run, 5, "val")
    stats = json.loads((run / "norm_stats.json").read_text())["modalities"]["flow"]
    constant = np.expm1(stats["mean"][0])
    for i, basin in enumerate(("a", "b")):
        text = (tmp_path / "data" / f"{basin}.csv").read_text().splitlines()[1:]
        flow = np.array([float(line.split(",")[2]) for line in text])  # [240] from 2001-01-01
        val_start = 181  # 2001-07-01; 59 val days hold 3 windows of 16 days
        obs = []
        for w in range(3):
            start = int(np.random.default_rng([0, 3 * i + w]).integers(1, 16 - 5))
            first = val_start + 16 * w + start
            obs += flow[first:first + 5].tolist()
        obs = np.array(obs)
        by_hand = 1.0 - ((constant - obs) ** 2).sum() / ((obs - obs.mean()) ** 2).sum()
        assert np.isclose(metrics["flow"]["flow"]["per_basin"][basin]["model"]["nse"], by_hand, rtol=1e-5)
