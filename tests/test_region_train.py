"""Regional samples end to end: a region config trains 30 CPU steps with falling loss (the small synthetic region;
the Moselle grids with its gauge as a one-site set), a resumed run keeps its site groups, and evaluation reports
per-site scores."""

import csv
import json
import math
from pathlib import Path

import pytest

from crossmae.config import resolve_config
from crossmae.data.sites import SiteLayout
from crossmae.engine import Trainer
from crossmae.evaluate import evaluate_run

ROOT = Path(__file__).resolve().parents[1]
MOSELLE = ROOT.parent / "shared" / "data" / "moselle"
RUN = ["train.warmup_steps=3", "train.lr=3e-3", "train.log_every=1", "train.device=cpu", "train.val_every=0"]


def train_run(config) -> list[dict]:
    config.train.fused = True
    Trainer(config).fit()
    with open(Path(config.train.out_dir) / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def assert_loss_falls(rows: list[dict], names: list[str]) -> None:
    assert [int(r["step"]) for r in rows] == list(range(1, 31))
    for col in ["loss", *[f"loss_{n}" for n in names]]:
        assert all(math.isfinite(float(r[col])) for r in rows), col
    early = sum(float(r["loss"]) for r in rows[:5]) / 5
    late = sum(float(r["loss"]) for r in rows[-5:]) / 5
    assert late < 0.8 * early, f"loss did not fall: {early:.3f} -> {late:.3f}"


def test_small_synthetic_region_trains_resumes_with_its_groups_and_evaluates(tmp_path):
    out = tmp_path / "run"
    config = resolve_config("regional_small", None, [*RUN, "train.max_steps=30", "train.ckpt_every=30",
                                                     f"train.out_dir={out}"])
    rows = train_run(config)
    assert_loss_falls(rows, ["precip", "temperature", "soil_moisture", "gauges"])
    saved = json.loads((out / "norm_stats.json").read_text())
    layout = SiteLayout.from_dict(saved["site_layouts"]["gauges"])
    assert layout.group_size == 4 and len(layout.site_ids) == 40
    # a resumed run whose config now asks for other groups keeps the run's groups
    resumed = resolve_config("regional_small", None, [*RUN, "train.max_steps=31", "train.ckpt_every=31",
                                                      f"train.out_dir={out}", "data.region.grouping.size=8"])
    resumed.train.fused = True
    trainer = Trainer(resumed, resume=True)
    assert trainer.train_set.site_layouts["gauges"] == layout
    trainer.fit()
    metrics = evaluate_run(out, split="val", plots=False)
    scores = metrics["sites"]
    assert set(scores) == {"gauges:riverflow", "gauges:evaporation"}
    for name, entry in scores.items():  # per-site scores of the masked days, and the interpolation baseline's
        assert len(entry["per_basin"]) == 40, name
        assert math.isfinite(entry["median_nse"]) and math.isfinite(entry["baseline_interp"]["median_nse"]), name


@pytest.mark.skipif(not MOSELLE.is_dir(), reason="needs ../shared/data/moselle")
def test_moselle_region_with_its_gauge_as_a_one_site_set_trains(tmp_path):
    config = resolve_config(None, str(ROOT / "configs" / "moselle_region.yaml"),
                            [*RUN, "train.max_steps=30", "train.ckpt_every=30", f"train.out_dir={tmp_path}",
                             "model.enc_dim=32", "model.dec_dim=32", "model.dec_depth=1"])
    assert_loss_falls(train_run(config), ["pre", "tavg", "pet", "discharge"])
