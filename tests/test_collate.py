"""Collate + masking: tokens, validity, masks, packed indices."""

import pytest
import torch
from model_cases import PATCH, SPEC, STEPS, collate, random_samples

from crossmae.config import MaskConfig
from crossmae.data.collate import MaskingCollator, draw_masks, patchify, unpatchify
from crossmae.data.sample import DatasetSpec, ModalitySpec, Sample


def test_patchify_round_trip_and_padding():
    grid = torch.randn(2, 3, 2, 10, 7)  # [B, T, C, H, W]
    basin = torch.ones(2, 10, 7, dtype=torch.bool)
    values, inside = patchify(grid, basin, 4)  # 3 x 2 patches, padded to 12 x 8
    assert values.shape == (2, 3, 6, 2 * 16) and inside.shape == (2, 6, 32)
    assert torch.equal(unpatchify(values, 10, 7, 2, 4), grid)
    assert not inside[:, -1].all()  # the corner patch holds padding cells


def test_invalid_positions_are_never_tokens():
    samples = random_samples(4)
    batch = collate(samples)
    for m in SPEC.grids:
        mb = batch.modalities[m.name]
        assert torch.isfinite(mb.encoder.values).all() and torch.isfinite(mb.targets.values).all()
        assert torch.equal(mb.encoder.index[:, 0], mb.encoder.visible.segment_ids())
        # every visible or predicted patch holds a basin cell and no NaN basin cell that day
        for b, t, p in torch.cat([mb.encoder.index, mb.queries.index]).tolist():
            s = samples[b]
            values, inside = patchify(s.grids[m.name][None], s.basin_masks[m.name][None], PATCH)
            cells = values[0, t, p][inside[0, p]]
            assert cells.numel() > 0 and torch.isfinite(cells).all()
        # and every patch with a basin cell and no NaN is a token (visible or masked)
        s = samples[0]
        values, inside = patchify(s.grids[m.name][None], s.basin_masks[m.name][None], PATCH)
        expected = ((torch.isfinite(values) | ~inside[:, None]).all(-1) & inside.any(-1)[:, None]).sum()
        assert mb.encoder.visible.lengths[0] + mb.hidden.packed.lengths[0] == expected
    flow = batch.modalities["flow"]
    assert flow.encoder.visible.lengths[1] == 0 and flow.queries.packed.lengths[1] == 0  # sample 1: all missing


def test_mask_counts_follow_the_ratios():
    mask = MaskConfig(grid_ratio=0.6, series_ratio=0.5, kept_mask_ratio=0.25)
    samples = random_samples(5)
    batch = collate(samples, mask)
    for name, mb in batch.modalities.items():
        ratio = mask.ratio(name, SPEC[name].kind)
        hidden = mb.hidden.packed.lengths
        valid = mb.encoder.visible.lengths + hidden
        expected = torch.floor(valid * ratio + 0.5).long()
        expected = torch.where(valid >= 2, expected.clamp(min=1).minimum(valid - 1), expected)
        assert torch.equal(hidden, expected)
        predicted = torch.minimum(torch.floor(valid * 0.25 + 0.5).long().clamp(min=1), hidden)
        assert torch.equal(mb.queries.packed.lengths, predicted)
        # predicted ⊆ hidden: each predicted row points at a hidden row with the same position
        assert torch.equal(mb.hidden.index[mb.hidden.predicted_rows], mb.queries.index)


def test_frame_masking_hides_the_ratio_of_each_frame():
    valid = torch.rand(3, 5, 20) < 0.8
    masked, predicted = draw_masks(valid, torch.rand(2, 3, 5, 20), ratio=0.5, kept=None, per_frame=True)
    n = valid.sum(-1)
    expected = torch.floor(n * 0.5 + 0.5).long()
    assert torch.equal(masked.sum(-1), torch.where(n >= 2, expected.clamp(min=1).minimum(n - 1), expected))
    assert torch.equal(masked, predicted) and not (masked & ~valid).any()


def test_masks_depend_on_the_sample_not_the_batch():
    samples = random_samples(4)
    whole = collate(samples)
    halves = [collate(samples[:2]), collate(samples[2:])]
    for name, mb in whole.modalities.items():
        parts = [h.modalities[name] for h in halves]
        assert torch.equal(mb.queries.index[:, 1:], torch.cat([p.queries.index[:, 1:] for p in parts]))
        assert torch.equal(mb.encoder.values, torch.cat([p.encoder.values for p in parts]))


def test_packed_boundaries_and_orders():
    batch = collate(random_samples(3), standard_decoder=True)
    for mb in batch.modalities.values():
        seq = mb.encoder.seq
        assert seq.cu_seqlens.dtype == torch.int32 and isinstance(seq.max_seqlen, int)
        assert torch.equal(seq.lengths, mb.encoder.visible.lengths + 1)  # the static token
        starts = seq.cu_seqlens[:-1].long()
        assert torch.equal(mb.encoder.order[starts], torch.arange(3))  # static token first
        assert torch.equal(torch.sort(mb.encoder.order).values, torch.arange(seq.total))
        assert mb.standard.seq.total == batch.memory.packed.total + mb.hidden.packed.total
    assert batch.memory.packed.total == sum(mb.encoder.seq.total for mb in batch.modalities.values())
    assert batch.num_tokens > 0


def test_targets_hold_the_original_values():
    samples = random_samples(2)
    batch = collate(samples)
    mb = batch.modalities["evap"]
    for row, (b, t, _) in enumerate(mb.queries.index.tolist()):
        assert torch.equal(mb.targets.values[row], samples[b].series["evap"][t])


def test_bad_arguments():
    with pytest.raises(ValueError, match="memory must be"):
        MaskingCollator(SPEC, MaskConfig(), PATCH, STEPS, memory="both")
    with pytest.raises(ValueError, match="empty list"):
        collate([])


def test_counts_round_half_up_and_keep_one_visible_and_one_hidden():
    valid = torch.zeros(6, 1, 8, dtype=torch.bool)
    for b, n in enumerate([0, 1, 2, 3, 4, 8]):
        valid[b, 0, :n] = True
    noise = torch.rand(2, 6, 1, 8, generator=torch.Generator().manual_seed(0))
    masked, _ = draw_masks(valid, noise, ratio=0.75, kept=None, per_frame=False)
    # n = 0, 1, 2, 3, 4, 8 at 0.75: 0; round-half-up(0.75) = 1; 1.5 → 2, but one stays visible → 1;
    # 2.25 → 2; 3; 6
    assert masked.sum((1, 2)).tolist() == [0, 1, 1, 2, 3, 6]
    masked, _ = draw_masks(valid, noise, ratio=0.1, kept=None, per_frame=False)
    # 0.1 n rounds to 0 for n < 5, but n ≥ 2 hides at least one: 0, 0, 1, 1, 1, 1
    assert masked.sum((1, 2)).tolist() == [0, 0, 1, 1, 1, 1]
    masked, _ = draw_masks(valid, noise, ratio=0.5, kept=None, per_frame=False)
    assert masked.sum((1, 2)).tolist() == [0, 1, 1, 2, 2, 4]  # one token at 0.5: 0.5 rounds up


def test_kept_mask_ratio_is_a_fraction_of_all_valid_tokens():
    valid = torch.ones(1, 2, 8, dtype=torch.bool)  # 16 valid tokens
    noise = torch.rand(2, 1, 2, 8, generator=torch.Generator().manual_seed(1))
    masked, predicted = draw_masks(valid, noise, ratio=0.75, kept=0.5, per_frame=False)
    # CrossMAE's 0.75 / 0.5: 12 hidden, 0.5 · 16 = 8 predicted (not 0.5 · 12 = 6)
    assert int(masked.sum()) == 12 and int(predicted.sum()) == 8
    assert not (predicted & ~masked).any()
    _, predicted = draw_masks(valid, noise, ratio=0.75, kept=0.75, per_frame=False)
    assert torch.equal(predicted, masked)  # kept = ratio predicts every hidden token
    _, predicted = draw_masks(valid, noise, ratio=0.75, kept=0.01, per_frame=False)
    assert int(predicted.sum()) == 1  # something hidden: at least one predicted


def test_unified_masks_hide_the_same_positions_in_every_grid_and_every_series():
    spec = DatasetSpec(modalities=(
        ModalitySpec("a", "grid", 1, height=2, width=4), ModalitySpec("b", "grid", 1, height=2, width=4),
        ModalitySpec("q", "series", 1), ModalitySpec("e", "series", 1),
    ))
    # one frame, 2 patches of 2 x 2 cells; a is valid in both patches, b only in patch 1 (patch 0 has a NaN)
    a = torch.ones(4, 1, 2, 4)
    b = torch.ones(4, 1, 2, 4)
    b[:, 0, 0, 0] = float("nan")
    q = torch.ones(4, 1)
    e = torch.ones(4, 1)
    e[0] = float("nan")
    sample = Sample(grids={"a": a, "b": b}, basin_masks={"a": torch.ones(2, 4, dtype=torch.bool),
                                                         "b": torch.ones(2, 4, dtype=torch.bool)},
                    series={"q": q, "e": e}, noise_seed=3)
    for seed in range(6):
        sample.noise_seed = seed
        batch = MaskingCollator(spec, MaskConfig(grid_ratio=0.5, series_ratio=0.5, mode="unified"), 2, 4)([sample])
        hidden = {n: {tuple(r) for r in mb.hidden.index[:, 1:].tolist()} for n, mb in batch.modalities.items()}
        tokens = {n: hidden[n] | {tuple(r) for r in mb.encoder.index[:, 1:].tolist()}
                  for n, mb in batch.modalities.items()}
        # the union of a and b has 4 frames x 2 patches = 8 positions: 4 hidden in both where valid
        assert len(hidden["a"]) == 4 and hidden["b"] == {x for x in hidden["a"] if x[1] == 1}
        assert (0, 0) not in tokens["b"] and len(tokens["b"]) == 4  # b's patch 0 stays invalid
        # series: union of 4 days, 2 hidden; e's day 0 is not a token
        assert len(hidden["q"]) == 2 and hidden["e"] == hidden["q"] - {(0, 0)}
        assert (0, 0) not in tokens["e"]


def test_unified_masks_need_equal_ratios_and_one_patch_grid():
    spec = DatasetSpec(modalities=(ModalitySpec("a", "grid", 1, 4, 4), ModalitySpec("b", "grid", 1, 8, 4)))
    with pytest.raises(ValueError, match="needs grid modalities of one patch grid"):
        MaskingCollator(spec, MaskConfig(mode="unified"), 2, 4)
    with pytest.raises(ValueError, match="their mask ratios must be equal"):
        MaskingCollator(SPEC, MaskConfig(mode="unified", ratios={"precip": 0.9}), PATCH, STEPS)
