"""Collate + masking: tokens, validity, masks, packed indices."""

import pytest
import torch
from model_cases import PATCH, SPEC, STEPS, collate, random_samples

from crossmae.config import MaskConfig
from crossmae.data.collate import MaskingCollator, draw_masks, patchify, unpatchify


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
