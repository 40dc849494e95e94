"""The synthetic water data set: determinism, basin masks, shapes, gaps, normalisation, splits, learnability."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from crossmae.config import DataConfig, SyntheticConfig
from crossmae.data.synthetic import SPIN_UP_DAYS, SyntheticWaterDataset, count_valid_patches, make_basin_mask


def small_config(**synthetic) -> DataConfig:
    """4 basins on a 16×16 grid in 4-cell patches (16 patches), 200 days, 16-day windows."""
    fields = dict(num_basins=4, record_days=200, grid_size=16, basin_patches=[6, 12])
    fields.update(synthetic)
    return DataConfig(steps=16, stride=8, patch_size=4, val_fraction=0.25, seed=3,
                      synthetic=SyntheticConfig(**fields))


def assert_samples_equal(a, b) -> None:
    assert a.meta == b.meta and a.noise_seed == b.noise_seed
    for group in ("grids", "basin_masks", "series"):
        da, db = getattr(a, group), getattr(b, group)
        assert da.keys() == db.keys()
        for name in da:
            np.testing.assert_array_equal(da[name].numpy(), db[name].numpy(), err_msg=f"{group}[{name}]")
    if a.static is None:
        assert b.static is None
    else:
        np.testing.assert_array_equal(a.static.numpy(), b.static.numpy())


def nan_runs(row: np.ndarray) -> list[tuple[int, int]]:
    """(start, length) of each run of NaN in a 1-D array."""
    isnan = np.r_[False, np.isnan(row), False].astype(np.int8)
    edges = np.flatnonzero(np.diff(isnan))
    return [(int(s), int(e - s)) for s, e in zip(edges[::2], edges[1::2], strict=True)]


# -- determinism ---------------------------------------------------------------------------------
def test_two_constructions_give_identical_samples():
    config = small_config(missing_frames=0.3, series_gap_rate=3.0)
    a, b = SyntheticWaterDataset(config), SyntheticWaterDataset(config)
    assert len(a) == len(b) > 0
    assert a.norm_stats == b.norm_stats
    for i in range(len(a)):
        assert_samples_equal(a[i], b[i])


def test_samples_do_not_depend_on_request_order():
    config = small_config()
    a, b = SyntheticWaterDataset(config), SyntheticWaterDataset(config)
    forward = [a[i] for i in range(len(a))]
    backward = [b[i] for i in reversed(range(len(b)))][::-1]
    for x, y in zip(forward, backward, strict=True):
        assert_samples_equal(x, y)
    assert_samples_equal(a[3], a[3])


def test_key_tuple_sets_noise_seed():
    data = SyntheticWaterDataset(small_config())
    assert data[5].noise_seed == 5
    sample = data[(5, 1234)]
    assert sample.noise_seed == 1234
    np.testing.assert_array_equal(sample.grids["precip"].numpy(), data[5].grids["precip"].numpy())
    assert data[-1].meta["index"] == len(data) - 1
    with pytest.raises(IndexError):
        data[len(data)]


def test_a_different_seed_gives_a_different_world():
    config = small_config()
    other = copy.deepcopy(config)
    other.seed = config.seed + 1
    a, b = SyntheticWaterDataset(config), SyntheticWaterDataset(other)
    assert not np.array_equal(a.basin_masks, b.basin_masks)
    assert not np.allclose(a.records["precip"], b.records["precip"])


# -- basin masks ---------------------------------------------------------------------------------
def test_masks_are_irregular_and_differ_between_basins():
    data = SyntheticWaterDataset(small_config(num_basins=6))
    masks = data.basin_masks
    for i in range(len(masks)):
        rows, cols = np.nonzero(masks[i])
        box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        assert masks[i].sum() < box, f"basin {i} fills its bounding box"
        for j in range(i):
            assert not np.array_equal(masks[i], masks[j]), f"basins {i} and {j} share a mask"
    sample = data[0]
    for name in data.grid_names:
        mask = sample.basin_masks[name]
        assert mask.dtype == torch.bool and mask.shape == (16, 16)
        np.testing.assert_array_equal(mask.numpy(), masks[sample.meta["basin"]])


@pytest.mark.parametrize("grid_size, patch_size, bounds", [
    (16, 4, [6, 12]),
    (30, 8, [3, 16]),  # partial edge patches (6 cells wide)
    (20, 1, [40, 90]),
    (100, 10, [94, 94]),  # the `seed` preset's basins
    (100, 10, [60, 94]),  # the `ragged` preset's basins
])
def test_valid_patch_counts_are_exact(grid_size, patch_size, bounds):
    counts = []
    for seed in range(12):
        count = int(np.random.default_rng(seed).integers(bounds[0], bounds[1] + 1))
        mask = make_basin_mask(np.random.default_rng(100 + seed), grid_size, patch_size, count)
        assert mask.shape == (grid_size, grid_size) and mask.dtype == bool
        assert count_valid_patches(mask, patch_size) == count
        counts.append(count)
    assert bounds[0] <= min(counts) <= max(counts) <= bounds[1]


def test_seed_like_dataset_has_94_valid_patches_per_basin():
    config = DataConfig(steps=10, stride=10, patch_size=10, seed=0, synthetic=SyntheticConfig(
        num_basins=4, record_days=40, grid_size=100, basin_patches=[94, 94], grids=["precip"], series=[],
        static=False))
    data = SyntheticWaterDataset(config)
    assert [count_valid_patches(m, 10) for m in data.basin_masks] == [94] * 4


def test_collator_sees_the_basin_patches_as_valid_tokens():
    from crossmae.config import MaskConfig
    from crossmae.data.collate import MaskingCollator

    config = small_config(basin_patches=[7, 7], missing_frames=0.0)
    data = SyntheticWaterDataset(config)
    batch = MaskingCollator(data.spec, MaskConfig(grid_ratio=0.5), config.patch_size, config.steps)(
        [data[i] for i in range(4)])
    precip = batch.modalities["precip"]
    n_valid = precip.encoder.visible.total + precip.hidden.packed.total
    assert n_valid == 4 * config.steps * 7


# -- shapes and spec -----------------------------------------------------------------------------
def test_spec_order_shapes_and_dtypes():
    config = small_config(grids=["soil_moisture", "precip"], series=["evaporation", "streamflow"])
    data = SyntheticWaterDataset(config)
    assert [m.name for m in data.spec.modalities] == ["soil_moisture", "precip", "evaporation", "streamflow"]
    assert [m.kind for m in data.spec.modalities] == ["grid", "grid", "series", "series"]
    assert data.spec.static_dim == len(data.static_raw[0]) >= 4
    sample = data[0]
    for m in data.spec.grids:
        x = sample.grids[m.name]
        assert x.dtype == torch.float32 and x.shape == (config.steps, m.channels, m.height, m.width)
    for m in data.spec.series:
        x = sample.series[m.name]
        assert x.dtype == torch.float32 and x.shape == (config.steps, m.channels)
    assert sample.static.dtype == torch.float32 and sample.static.shape == (data.spec.static_dim,)
    outside = ~sample.basin_masks["precip"]
    assert torch.all(sample.grids["precip"][:, :, outside] == 0)  # outside cells carry no information
    json.dumps(data.norm_stats)


def test_without_static_the_sample_has_none():
    data = SyntheticWaterDataset(small_config(static=False, series=[]))
    assert data.spec.static_dim == 0 and data[0].static is None and data[0].series == {}


def test_static_attributes_include_unknown_values_and_normalise():
    data = SyntheticWaterDataset(small_config(num_basins=12))
    assert np.isnan(data.static_raw).any() and np.isfinite(data.static_raw[:, :-1]).all()
    statics = torch.stack([data[i].static for i in range(0, len(data), len(data) // 12)])
    known = statics[torch.isfinite(statics)]
    assert known.abs().max() < 5
    back = data.denormalize("static", data[0].static)
    np.testing.assert_allclose(back.numpy(), data.static_raw[data[0].meta["basin"]], rtol=1e-5)


@pytest.mark.parametrize("key, names", [("grids", ["precip", "rain"]), ("series", ["discharge"])])
def test_bad_variable_names_raise(key, names):
    config = small_config(**{key: names})
    with pytest.raises(ValueError, match=rf"data\.synthetic\.{key}") as info:
        SyntheticWaterDataset(config)
    allowed = ["precip", "temperature", "soil_moisture"] if key == "grids" else ["streamflow", "evaporation"]
    assert all(name in str(info.value) for name in allowed)


def test_bad_split_raises():
    with pytest.raises(ValueError, match="split"):
        SyntheticWaterDataset(small_config(), split="test")


# -- missing values ------------------------------------------------------------------------------
def test_series_gaps_are_runs_of_3_to_30_days():
    data = SyntheticWaterDataset(small_config(record_days=600, series_gap_rate=4.0))
    for name in ("streamflow", "evaporation"):
        record = data.records[name]
        assert 0.02 < np.isnan(record).mean() < 0.6
        for row in record:
            for start, length in nan_runs(row):
                if start + length < len(row):  # a run at the end of the record may be cut short
                    assert 3 <= length <= 30, (name, start, length)
    assert not np.array_equal(np.isnan(data.records["streamflow"]), np.isnan(data.records["evaporation"]))
    assert any(torch.isnan(data[i].series["streamflow"]).any() for i in range(len(data)))
    no_gaps = SyntheticWaterDataset(small_config(series_gap_rate=0.0))
    assert not np.isnan(no_gaps.records["streamflow"]).any()


def test_missing_frames_blank_every_grid_on_the_same_days():
    config = small_config(missing_frames=0.5)
    data = SyntheticWaterDataset(config)
    fractions = []
    for i in range(len(data)):
        sample = data[i]
        blank = {name: torch.isnan(x).flatten(1).all(1) for name, x in sample.grids.items()}  # [T]
        partial = {name: torch.isnan(x).flatten(1).any(1) for name, x in sample.grids.items()}
        first = blank["precip"]
        for name in blank:
            assert torch.equal(blank[name], first) and torch.equal(partial[name], first)
        fractions.append(first.float().mean().item())
    assert max(fractions) <= 0.5 + 1e-6 and max(fractions) > 0.1 and min(fractions) < max(fractions)
    clean = SyntheticWaterDataset(small_config(missing_frames=0.0))
    assert all(torch.isfinite(x).all() for i in range(len(clean)) for x in clean[i].grids.values())


# -- splits and normalisation --------------------------------------------------------------------
def test_windows_never_straddle_the_split():
    config = small_config(record_days=203)
    config.stride, config.val_fraction = 5, 0.3
    train, val = SyntheticWaterDataset(config), SyntheticWaterDataset(config, "val")
    n_val = round(0.3 * 203)
    assert train.n_train == val.n_train == 203 - n_val
    per_basin_train = len(range(0, train.n_train - config.steps + 1, config.stride))
    per_basin_val = len(range(train.n_train, 203 - config.steps + 1, config.stride))
    assert len(train) == 4 * per_basin_train and len(val) == 4 * per_basin_val > 0
    for i in range(len(train)):
        assert train[i].meta["start"] + config.steps <= train.n_train
    for i in range(len(val)):
        assert val.n_train <= val[i].meta["start"] and val[i].meta["start"] + config.steps <= 203


def test_norm_stats_come_from_the_training_period_only():
    short = small_config(record_days=400)  # 300 training days, 100 validation days
    longer = small_config(record_days=600)
    longer.val_fraction = 0.5  # the same 300 training days, 300 validation days
    a, b = SyntheticWaterDataset(short), SyntheticWaterDataset(longer)
    assert a.n_train == b.n_train == 300
    assert len(SyntheticWaterDataset(short, "val")) < len(SyntheticWaterDataset(longer, "val"))
    assert a.norm_stats == b.norm_stats
    assert_samples_equal(a[len(a) - 1], b[len(a) - 1])
    val = SyntheticWaterDataset(short, "val")  # no stats given: computed from the training period
    assert val.norm_stats == a.norm_stats


class WetValidation(SyntheticWaterDataset):
    """Storms in the validation period are ten times as deep."""

    def _build_weather(self) -> None:
        super()._build_weather()
        for storms in self._storms:
            storms["depth"][storms["day"] >= SPIN_UP_DAYS + self.n_train] *= 10.0


def test_norm_stats_ignore_changed_validation_data():
    config = small_config(record_days=300)
    plain, wet = SyntheticWaterDataset(config), WetValidation(config)
    n = plain.n_train
    assert np.allclose(plain.records["precip"][:, :n], wet.records["precip"][:, :n])
    assert wet.records["precip"][:, n:].mean() > 5 * plain.records["precip"][:, n:].mean()
    assert wet.norm_stats == plain.norm_stats
    assert WetValidation(config, "val").norm_stats == plain.norm_stats


def test_val_split_uses_the_given_stats():
    config = small_config()
    train = SyntheticWaterDataset(config)
    stats = json.loads(json.dumps(train.norm_stats))  # what a run folder stores
    val = SyntheticWaterDataset(config, "val", stats)
    shifted = copy.deepcopy(stats)
    shifted["modalities"]["temperature"]["mean"][0] += 1.0
    shifted["modalities"]["streamflow"]["mean"][0] += 1.0
    val_shifted = SyntheticWaterDataset(config, "val", shifted)
    a, b = val[0], val_shifted[0]
    inside = a.basin_masks["temperature"]
    std_t = stats["modalities"]["temperature"]["std"][0]
    std_q = stats["modalities"]["streamflow"]["std"][0]
    np.testing.assert_allclose(b.grids["temperature"][:, :, inside].numpy(),
                               a.grids["temperature"][:, :, inside].numpy() - 1 / std_t, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(b.series["streamflow"].numpy(), a.series["streamflow"].numpy() - 1 / std_q,
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="norm_stats"):
        SyntheticWaterDataset(config, "val", {"modalities": {}})


def test_training_windows_are_standardised():
    data = SyntheticWaterDataset(small_config(record_days=400, series_gap_rate=0.0))
    values = {name: [] for name in data.grid_names + data.series_names}
    for i in range(len(data)):
        s = data[i]
        for name in data.grid_names:
            values[name].append(s.grids[name][:, 0][:, s.basin_masks[name]].flatten())
        for name in data.series_names:
            values[name].append(s.series[name].flatten())
    for name, parts in values.items():
        x = torch.cat(parts)
        assert abs(x.mean().item()) < 0.25 and 0.75 < x.std().item() < 1.25, name


def test_denormalize_returns_physical_units():
    data = SyntheticWaterDataset(small_config(series_gap_rate=0.0))
    for i in (0, 3, len(data) - 1):
        s = data[i]
        basin, start = s.meta["basin"], s.meta["start"]
        window = slice(start, start + data.steps)
        inside = s.basin_masks["precip"]
        for name in data.grid_names:
            field = data.denormalize(name, s.grids[name])[:, 0][:, inside]  # [T, cells]
            np.testing.assert_allclose(field.mean(1).numpy(), data.records[name][basin, window],
                                       rtol=1e-4, atol=1e-4, err_msg=name)
        for name in data.series_names:
            series = data.denormalize(name, s.series[name].numpy())[:, 0]
            np.testing.assert_allclose(series, data.records[name][basin, window], rtol=1e-5, err_msg=name)
    assert data.denormalize("precip", data[0].grids["precip"]).min() >= 0


def test_overlapping_windows_agree_on_shared_days():
    config = small_config(record_days=240)
    config.stride = 5  # window starts fall at different offsets from the soil-moisture checkpoints
    data = SyntheticWaterDataset(config)
    by_start = {key: i for i, key in enumerate(data.starts)}  # (basin, first day) → index
    for start in range(0, 60, 5):
        a, b = data[by_start[(1, start)]], data[by_start[(1, start + 5)]]
        for name in data.grid_names:
            np.testing.assert_allclose(a.grids[name][5:].numpy(), b.grids[name][:-5].numpy(), atol=1e-6, rtol=1e-6)


# -- learnability --------------------------------------------------------------------------------
def test_streamflow_follows_lagged_basin_precipitation():
    """Rises of streamflow follow basin precipitation a day or two before (seen through the samples), far
    above a shuffled control, and precipitation explains what the streamflow's own neighbours can't."""
    config = small_config(num_basins=8, record_days=730, series_gap_rate=0.0, grids=["precip"],
                          series=["streamflow"])
    config.stride = config.steps
    data = SyntheticWaterDataset(config)
    rain, flow = [], []
    for i in range(len(data)):
        s = data[i]
        inside = s.basin_masks["precip"].numpy()
        rain.append(data.denormalize("precip", s.grids["precip"].numpy())[:, 0][:, inside].mean(1))  # [T]
        flow.append(data.denormalize("streamflow", s.series["streamflow"].numpy())[:, 0])  # [T]
    rain, flow = np.stack(rain), np.stack(flow)  # [N, T]
    rise = np.diff(flow, axis=1)  # [N, T-1], rise[:, t-1] = Q_t − Q_{t−1}

    def lagged_corr(p: np.ndarray, lag: int) -> float:
        # Q_t − Q_{t−1} against P_{t−lag}, for t ≥ max(lag, 1)
        first = max(lag, 1)
        return float(np.corrcoef(rise[:, first - 1:].ravel(), p[:, first - lag:p.shape[1] - lag].ravel())[0, 1])

    best = max(lagged_corr(rain, lag) for lag in (1, 2, 3))
    shuffled = np.random.default_rng(0).permutation(rain)
    control = max(abs(lagged_corr(shuffled, lag)) for lag in (1, 2, 3))
    assert best > 0.5 and control < 0.15, (best, control)

    # interpolation from the visible neighbours Q_{t−1}, Q_{t+1} vs. the same plus P_{t−3..t}
    q = np.log1p(flow)
    y = q[:, 3:-1].ravel()
    own = np.stack([q[:, 2:-2].ravel(), q[:, 4:].ravel(), np.ones_like(y)], 1)
    lags = [np.log1p(rain[:, 3 - k:rain.shape[1] - 1 - k]).ravel() for k in range(4)]
    both = np.concatenate([own, np.stack(lags, 1)], 1)
    residual = [np.var(y - x @ np.linalg.lstsq(x, y, rcond=None)[0]) for x in (own, both)]
    assert residual[1] < 0.75 * residual[0], residual


def test_evaporation_follows_temperature():
    data = SyntheticWaterDataset(small_config(series_gap_rate=0.0, record_days=400))
    e, t = data.records["evaporation"], data.records["temperature"]
    assert np.corrcoef(e.ravel(), t.ravel())[0, 1] > 0.7
