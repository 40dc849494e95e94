"""The vectorised collator against a reference of the straightforward one (same masks, same packed indices, same
values bit for bit), and the data benchmark's smoke run."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from model_cases import PATCH, SPEC, STEPS, random_samples

from crossmae.config import DataConfig, MaskConfig, SyntheticConfig
from crossmae.data.collate import (
    GridCells,
    MaskingCollator,
    PackedBatch,
    _lowest,
    hidden_count,
    patchify,
    predicted_count,
)
from crossmae.data.loader import GlobalBatchOrder
from crossmae.data.synthetic import SyntheticWaterDataset
from crossmae.packed import Packed


# -- the reference: full token tensors, ranks by a double argsort --------------------------------------------------
def _rank_within(scores):
    return torch.argsort(torch.argsort(scores, dim=-1), dim=-1)


def _reference_predicted(masked, noise, n_valid, kept):
    b, t, p = masked.shape
    kept_rank = _rank_within(torch.where(masked, noise, 2.0).reshape(b, t * p)).reshape(b, t, p)
    n_pred = predicted_count(n_valid, masked.sum((1, 2)), kept).view(b, 1, 1)
    return masked & (kept_rank < n_pred)


def reference_draw_masks(valid, noise, ratio, kept, per_frame):
    b, t, p = valid.shape
    score = torch.where(valid, noise[0], 2.0)
    if per_frame:
        rank = _rank_within(score)
        n_mask = hidden_count(valid.sum(-1, keepdim=True), ratio)
    else:
        rank = _rank_within(score.reshape(b, t * p)).reshape(b, t, p)
        n_mask = hidden_count(valid.sum((1, 2)), ratio).view(b, 1, 1)
    masked = valid & (rank < n_mask)
    return masked, _reference_predicted(masked, noise[1], valid.sum((1, 2)), kept)


def reference_span_masks(valid, generators, kept_noise, ratio, kept, span_days):
    b, t, p = valid.shape
    n_valid = valid.sum((1, 2))
    target = hidden_count(n_valid, ratio)
    per_day = valid.sum(-1)
    masked = torch.zeros_like(valid)
    for i in range(b):
        hidden_days = torch.zeros(t, dtype=torch.bool)
        count, goal = 0, int(target[i])
        for _ in range(4 * t):
            if count >= goal:
                break
            length = int(torch.randint(span_days[0], span_days[1] + 1, (1,), generator=generators[i]))
            start = int(torch.randint(1 - length, t, (1,), generator=generators[i]))
            for day in range(max(start, 0), min(start + length, t)):
                if count >= goal:
                    break
                if not hidden_days[day]:
                    hidden_days[day] = True
                    count += int(per_day[i, day])
        masked[i] = valid[i] & hidden_days[:, None]
        if n_valid[i] >= 2 and int(masked[i].sum()) == int(n_valid[i]):
            masked[i].view(-1)[valid[i].flatten().nonzero()[0, 0]] = False
    return masked, _reference_predicted(masked, kept_noise, n_valid, kept)


class _Gather:
    def __init__(self, values):
        self.values = values

    def rows(self, b, t, p):
        return self.values[b, t, p]

    def gather(self, *selections):
        return [self.rows(*s) for s in selections]


class ReferenceCollator(MaskingCollator):
    """Every token patchified and cleaned up front, masks ranked by a double argsort."""

    def _tokens(self, m, samples):
        if m.kind == "grid":
            grid = torch.stack([s.grids[m.name] for s in samples])
            basin = torch.stack([s.basin_masks[m.name] for s in samples]).bool()
            values, inside = patchify(grid.float(), basin, self.patch_size)
            valid = (torch.isfinite(values) | ~inside[:, None]).all(-1) & inside.any(-1)[:, None]
            weight = inside.float()
        else:
            values = torch.stack([s.series[m.name] for s in samples]).float()[:, :, None, :]
            valid = torch.isfinite(values).all(-1)
            weight = torch.ones(values.shape[0], 1, values.shape[-1])
        values = torch.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0) * (weight[:, None] > 0)
        return _Gather(values), valid, weight

    def _masks(self, samples, valid):
        out = {}
        for group in self.groups:
            union = torch.stack([valid[m.name] for m in group]).any(0)
            first = group[0]
            stream = self.spec.modalities.index(first) + (1000 if len(group) > 1 else 0)
            noise = self._noise(samples, stream, tuple(union.shape[1:]))
            ratio = self.mask.ratio(first.name, first.kind)
            if self.mask.mode == "span":
                gens = [torch.Generator().manual_seed(int(s.noise_seed) * 1009 + stream + 500) for s in samples]
                masked, predicted = reference_span_masks(union, gens, noise[1], ratio, self.mask.kept_mask_ratio,
                                                         self.mask.span_days)
            else:
                masked, predicted = reference_draw_masks(union, noise, ratio, self.mask.kept_mask_ratio,
                                                         self.mask.mode == "frame" and first.kind == "grid")
            out.update({m.name: (masked & valid[m.name], predicted & valid[m.name]) for m in group})
        return out


@pytest.mark.parametrize("levels", [None, 7, 2], ids=["continuous", "ties", "many_ties"])
def test_lowest_selects_the_argsort_ranks_below_the_count(levels):
    """The selection path, and the argsort fallback when ties straddle the count (quantised scores)."""
    gen = torch.Generator().manual_seed(0)
    for shape in [(5, 40), (3, 4, 9)]:
        scores = torch.rand(shape, generator=gen)
        if levels is not None:
            scores = torch.floor(scores * levels) / levels
        count = torch.randint(0, shape[-1] + 1, (*shape[:-1], 1), generator=gen)
        count.view(-1)[0] = 0  # a row that selects nothing
        assert torch.equal(_lowest(scores, count), _rank_within(scores) < count)
        half = scores.to(torch.bfloat16)  # ranked by argsort (no numpy bfloat16)
        assert torch.equal(_lowest(half, count), _rank_within(half) < count)


def assert_identical(a, b, where="batch"):
    """Every tensor equal bit for bit (the sign of zero included), every Packed and number equal."""
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        if a.is_floating_point():
            assert torch.equal(a.view(torch.int32 if a.dtype == torch.float32 else torch.int64),
                               b.view(torch.int32 if b.dtype == torch.float32 else torch.int64)), where
        else:
            assert torch.equal(a, b), where
    elif isinstance(a, Packed):
        assert torch.equal(a.cu_seqlens, b.cu_seqlens) and a.max_seqlen == b.max_seqlen and a.total == b.total, where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_identical(a[k], b[k], f"{where}.{k}")
    elif dataclasses.is_dataclass(a) and not isinstance(a, type):
        for f in dataclasses.fields(a):
            assert_identical(getattr(a, f.name), getattr(b, f.name), f"{where}.{f.name}")
    else:
        assert a == b, where


def both(spec, mask, patch, steps, samples, **kw) -> tuple[PackedBatch, PackedBatch]:
    return (MaskingCollator(spec, mask, patch, steps, **kw)(samples),
            ReferenceCollator(spec, mask, patch, steps, **kw)(samples))


@pytest.mark.parametrize("mask", [
    MaskConfig(), MaskConfig(mode="frame"), MaskConfig(mode="unified", kept_mask_ratio=0.4),
    MaskConfig(grid_ratio=0.6, series_ratio=0.5, kept_mask_ratio=0.25), MaskConfig(mode="span", kept_mask_ratio=0.5),
    MaskConfig(mode="span"),
], ids=["free", "frame", "unified_kept", "kept", "span_kept", "span"])
def test_collator_matches_the_reference_on_ragged_samples(mask):
    """Random samples with NaN cells, missing frames, an all-missing series and padded patches (7×9 cells)."""
    for seed in range(3):
        samples = random_samples(5, seed=seed)
        new, ref = both(SPEC, mask, PATCH, STEPS, samples, standard_decoder=True)
        assert_identical(new, ref)


@pytest.mark.parametrize("mask", [
    MaskConfig(), MaskConfig(mode="frame", kept_mask_ratio=0.3), MaskConfig(mode="unified", kept_mask_ratio=0.4),
], ids=["free", "frame_kept", "unified"])
def test_collator_matches_the_reference_on_finite_unpadded_grids(mask):
    """Grids of whole patches without a missing value: the rows are copied straight from the grids (GridCells),
    one grid with 2 channels, H != W."""
    for seed in range(2):
        samples = random_samples(5, seed=seed)
        for s in samples:
            s.grids = {name: torch.nan_to_num(g, nan=0.5) for name, g in s.grids.items()}
        collator = MaskingCollator(SPEC, mask, 2, STEPS)
        assert all(isinstance(collator._tokens(m, samples)[0], GridCells) for m in SPEC.grids)
        new, ref = both(SPEC, mask, 2, STEPS, samples, standard_decoder=True)
        assert_identical(new, ref, f"seed {seed}")


def test_grids_taken_for_finite_give_the_reference_batch_when_one_is_not():
    """The collator takes grids for finite until a batch shows a non-finite one (then made again, every grid
    checked first: also a NaN outside the basin, which a basin multiply keeps), and again after a batch whose
    grids were all finite; every batch equals the reference's."""
    def finite(seed):
        samples = random_samples(4, seed=seed)
        for s in samples:
            s.grids = {name: torch.nan_to_num(g, nan=0.5) for name, g in s.grids.items()}
        return samples

    outside = finite(5)
    basin = outside[2].basin_masks["temp"]
    row, col = (~basin).nonzero()[0].tolist()
    outside[2].grids["temp"][3, 1, row, col] = float("inf")
    collator = MaskingCollator(SPEC, MaskConfig(kept_mask_ratio=0.4), 2, STEPS)
    reference = ReferenceCollator(SPEC, MaskConfig(kept_mask_ratio=0.4), 2, STEPS)
    steps = [(finite(3), True), (random_samples(4, seed=4), False), (outside, False), (finite(6), True),
             (outside, False)]
    for i, (samples, assume_finite) in enumerate(steps):
        assert_identical(collator(samples), reference(samples), f"batch {i}")
        assert collator.assume_finite == assume_finite, i


@pytest.mark.parametrize("kept", [None, 0.3])
def test_predicted_rows_and_counts_follow_the_hidden_tokens(kept):
    """The predicted tokens are hidden ones at ``predicted_rows``; the target count is the weights' sum."""
    for samples in (random_samples(5, seed=7), random_samples(4, seed=8)):
        batch = MaskingCollator(SPEC, MaskConfig(kept_mask_ratio=kept), 2, STEPS)(samples)
        for name, mb in batch.modalities.items():
            assert torch.equal(mb.hidden.index[mb.hidden.predicted_rows], mb.queries.index), name
            assert mb.targets.count == float(mb.targets.weight.sum()), name
            if kept is None:
                assert torch.equal(mb.queries.index, mb.hidden.index), name
                assert torch.equal(mb.queries.packed.cu_seqlens, mb.hidden.packed.cu_seqlens), name
            else:
                assert 0 < mb.queries.packed.total < mb.hidden.packed.total, name


@pytest.mark.parametrize("grids", [["precip"], ["precip", "temperature"]], ids=["precip", "precip_temperature"])
def test_synthetic_windows_normalise_every_day_as_the_record_does(grids):
    """``__getitem__`` renders and normalises precipitation's storm days only (one plane for the dry days): bit for
    bit the whole rendered window transformed, standardised and masked, missing frames NaN."""
    config = DataConfig(steps=40, stride=20, patch_size=4, seed=5, synthetic=SyntheticConfig(
        num_basins=3, record_days=200, grid_size=12, basin_patches=[4, 8], grids=grids, missing_frames=0.2))
    dataset = SyntheticWaterDataset(config, split="train")
    entry = dataset.stats.modalities["precip"]
    dry_days = 0
    for index in range(len(dataset)):
        basin, start = dataset.starts[index]
        x = dataset.render_window(basin, start)["precip"]
        dry_days += int((x.reshape(len(x), -1) == 0).all(1).sum())
        x = ((np.log1p(x) - np.float32(entry.mean[0])) * np.float32(1.0 / entry.std[0])) * dataset.basin_masks[basin]
        x[dataset._outage_days(basin, start)] = np.nan
        got = dataset[index].grids["precip"][:, 0].numpy()
        assert np.array_equal(got.view(np.int32), x.astype(np.float32).view(np.int32)), index
    assert dry_days > 0


def test_collator_matches_the_reference_on_the_synthetic_world():
    """The synthetic data set with every grid and series, missing frames, static attributes: several batches."""
    config = DataConfig(steps=16, stride=8, patch_size=4, seed=3, synthetic=SyntheticConfig(
        num_basins=4, record_days=200, grid_size=18, basin_patches=[6, 12], missing_frames=0.3))
    dataset = SyntheticWaterDataset(config, split="train")
    order = GlobalBatchOrder(len(dataset), 6, seed=1)
    for step in range(4):
        samples = [dataset[k] for k in order.batch(step)]
        new, ref = both(dataset.spec, MaskConfig(), 4, 16, samples, calendar=True)
        assert_identical(new, ref, f"step {step}")
        assert any(not torch.isfinite(s.grids["precip"]).all() for s in samples)  # the slow validity path ran


def test_collator_matches_the_reference_at_the_seed_scale():
    """100×100 grids in 10-cell patches, 94 basin patches, no missing values (the one-read validity check)."""
    config = DataConfig(steps=12, stride=12, patch_size=10, seed=0, synthetic=SyntheticConfig(
        num_basins=3, record_days=120, grid_size=100, basin_patches=[94, 94], grids=["precip"], series=[],
        static=False))
    dataset = SyntheticWaterDataset(config, split="train")
    order = GlobalBatchOrder(len(dataset), 4, seed=0)
    for step in range(3):
        samples = [dataset[k] for k in order.batch(step)]
        new, ref = both(dataset.spec, MaskConfig(), 10, 12, samples)
        assert_identical(new, ref, f"step {step}")
        assert new.modalities["precip"].hidden.packed.total > 0


def test_data_speed_benchmark_writes_its_rows(tmp_path):
    from bench.data_speed import main

    out = tmp_path / "data_speed"
    assert main(["--preset", "cpu", "--workers", "0", "--reps", "2", "--warmup", "1", "--loader-batches", "2",
                 "--batches", "2", "--out", str(out)]) == 0
    data = json.loads(out.with_suffix(".json").read_text())
    rows = {r["stage"]: r for r in data["rows"]}
    assert set(rows) == {"getitem", "collate", "getitem+collate", "device", "loader/w0"}
    for row in rows.values():
        assert row["status"] == "ok" and row["ms_p50"] > 0 and row["cpu_ms_p50"] >= 0 and row["windows_per_s"] > 0
    assert rows["device"]["device_copy_mb"] > 0 and rows["device"]["data_device"] == "cpu"
    assert data["metadata"]["command"].startswith("python bench/data_speed.py")


def test_data_speed_large_files_rows_read_lazily_below_the_cache(tmp_path, monkeypatch):
    """A small grid (the benchmark's 180 x 290 shrunk to 20 x 30): a cache of 0 MiB reads window by window, one
    larger than the record keeps it; a second run keeps the written data."""
    from bench import data_speed

    monkeypatch.setattr(data_speed, "LARGE_SHAPE", (20, 30))
    out, folder = tmp_path / "large", tmp_path / "data"
    argv = ["--large-files", "--years", "1", "--gauges", "3", "--cache-mb", "0,64", "--data-dir", str(folder),
            "--reps", "2", "--warmup", "1", "--batches", "1", "--out", str(out)]
    assert data_speed.main(argv) == 0
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [(r["stage"], r["cache_mb"], r["cached"]) for r in rows] == [
        ("files/getitem", 0.0, False), ("files/getitem+collate", 0.0, False),
        ("files/getitem", 64.0, True), ("files/getitem+collate", 64.0, True)]
    for row in rows:
        assert row["status"] == "ok" and row["windows_per_s"] > 0 and row["format"] == "zarr"
        assert row["record_mb"] == pytest.approx(365 * 3 * 20 * 30 * 4 / 1e6)  # 1 year: round(365.25) days
    assert (folder / "grid.zarr").is_dir() and len(list((folder / "gauges").glob("*.csv"))) == 3
    written = (folder / "grid.zarr").stat().st_mtime_ns
    assert data_speed.main([*argv[:-2], "--out", str(tmp_path / "again")]) == 0
    assert (folder / "grid.zarr").stat().st_mtime_ns == written


def test_data_speed_large_files_stay_out_of_the_repository(capsys):
    from bench.data_speed import main

    with pytest.raises(SystemExit):
        main(["--large-files", "--data-dir", "bench/results/large"])
    assert "inside the repository" in capsys.readouterr().err


def test_data_speed_benchmark_rejects_bad_flags(capsys):
    from bench.data_speed import main

    with pytest.raises(SystemExit):
        main(["--workers", "0,-1"])
    assert "--workers" in capsys.readouterr().err


def test_the_trainers_allocator_setting_is_taken_on_glibc_and_yields_to_the_users_tunables(monkeypatch):
    import platform

    from crossmae.data.loader import keep_batch_memory_mapped

    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert keep_batch_memory_mapped() is True
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=0")
    assert keep_batch_memory_mapped() is False
