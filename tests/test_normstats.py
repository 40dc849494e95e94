"""NormStats: one type for the synthetic and file data sets and evaluation; the saved form is unchanged, values
round-trip through normalize/denormalize, and a malformed or mismatched entry is named."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from crossmae.config import resolve_config
from crossmae.data.loader import build_dataset
from crossmae.data.normstats import NormStats
from tests.gap_data import make_data

FILES_FORM = {"source": "files", "modalities": {
    "pre": {"kind": "grid", "channels": ["pre", "t"], "transform": ["log1p", "none"], "mean": [0.5, 10.0],
            "std": [0.8, 4.0], "reading": {"calendar": "standard"}},
    "flow": {"kind": "series", "channels": ["q"], "transform": ["log1p"], "mean": [1.0], "std": [0.5]}},
    "static": {"names": ["area"], "mean": [100.0], "std": [30.0], "dropped": []}}
SYNTHETIC_FORM = {"modalities": {"precip": {"transform": "log1p", "mean": [0.4], "std": [0.9]},
                                 "streamflow": {"transform": "none", "mean": [2.0], "std": [1.5]}},
                  "static": {"names": ["a", "b"], "mean": [1.0, 2.0], "std": [0.5, 0.25]}}


@pytest.mark.parametrize("form", [FILES_FORM, SYNTHETIC_FORM])
def test_the_saved_form_comes_back_unchanged(form):
    stats = NormStats.from_dict(json.loads(json.dumps(form)), {"precip": "grid", "streamflow": "series"})
    assert stats.to_dict() == form and json.dumps(stats.to_dict())
    assert NormStats.coerce(stats) == stats


def test_normalize_and_denormalize_invert_each_other_per_channel():
    stats = NormStats.from_dict(FILES_FORM)
    grid = np.random.default_rng(0).gamma(1.0, 3.0, (5, 2, 3, 4)).astype(np.float32)  # [T, C, H, W]
    z = stats.normalize("pre", grid)
    assert z.dtype == np.float32
    assert np.allclose(z[:, 0], (np.log1p(grid[:, 0]) - 0.5) / 0.8, atol=1e-6)
    assert np.allclose(z[:, 1], (grid[:, 1] - 10.0) / 4.0, atol=1e-6)
    assert np.allclose(stats.denormalize("pre", z), grid, rtol=1e-5, atol=1e-5)
    back = stats.denormalize("pre", torch.from_numpy(z))
    assert isinstance(back, torch.Tensor) and torch.allclose(back, torch.from_numpy(grid), rtol=1e-5, atol=1e-5)
    assert np.allclose(stats.denormalize("static", np.array([[1.0]])), [[130.0]])
    assert np.isnan(stats.normalize("flow", np.array([[-2.0]]))).all()  # log1p of a value <= -1 is missing


def test_malformed_or_mismatched_statistics_are_named():
    with pytest.raises(ValueError, match=r"norm_stats\['modalities'\]\['flow'\] must hold a transform"):
        NormStats.from_dict({"modalities": {"flow": {"transform": "sqrt", "mean": [1.0], "std": [1.0]}}})
    with pytest.raises(ValueError, match=r"'flow'\] must hold equal, non-empty lists"):
        NormStats.from_dict({"modalities": {"flow": {"mean": [1.0, 2.0], "std": [1.0]}}})
    stats = NormStats.from_dict(FILES_FORM)
    with pytest.raises(ValueError, match=r"\['flow'\] must hold the channels \['q', 'r'\]"):
        stats.check({"flow": ("series", ["q", "r"])})
    with pytest.raises(ValueError, match=r"\['pre'\] must hold 2 channel"):
        stats.check({"pre": ("series", 2)})
    with pytest.raises(ValueError, match=r"names \['area'\], which are not among the static attributes"):
        stats.check({}, ["slope"])
    with pytest.raises(ValueError, match="name must be one of"):
        stats.denormalize("nope", np.zeros(1))


def test_both_data_sets_and_evaluation_share_it(tmp_path):
    synthetic = resolve_config("cpu", None, ["data.synthetic.num_basins=2", "data.synthetic.record_days=120"])
    syn = build_dataset(synthetic.data, "train")
    assert isinstance(syn.stats, NormStats) and syn.stats.to_dict() == syn.norm_stats
    val = build_dataset(synthetic.data, "val", norm_stats=syn.stats)
    assert val.norm_stats == syn.norm_stats

    files = resolve_config(None, str(make_data(tmp_path / "data", basins=("a",))), [])
    train = build_dataset(files.data, "train")
    assert isinstance(train.stats, NormStats) and train.stats.to_dict() == train.norm_stats
    assert build_dataset(files.data, "val", norm_stats=train.stats).norm_stats == train.norm_stats
    x = train[0].series["flow"]
    assert torch.equal(train.denormalize("flow", x), train.stats.denormalize("flow", x))
    bad = json.loads(json.dumps(train.norm_stats))
    bad["modalities"]["flow"]["channels"] = ["discharge"]
    with pytest.raises(ValueError, match=r"\['flow'\] must hold the channels \['flow'\]"):
        build_dataset(files.data, "val", norm_stats=bad)
