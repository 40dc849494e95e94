"""The packed layout helpers."""

import pytest
import torch

from crossmae.packed import (
    Packed,
    concat_segments,
    key_padding_mask,
    pad_packed,
    segment_ids,
    summarize_cu_seqlens,
    unpad,
)


def test_from_lengths_builds_boundaries():
    packed = Packed.from_lengths([3, 0, 5, 1])
    assert packed.cu_seqlens.dtype == torch.int32
    assert packed.cu_seqlens.tolist() == [0, 3, 3, 8, 9]
    assert (packed.max_seqlen, packed.total, packed.batch_size) == (5, 9, 4)
    assert packed.segment_ids().tolist() == [0, 0, 0, 2, 2, 2, 2, 2, 3]


def test_empty_batch():
    packed = Packed.from_lengths([])
    assert packed.cu_seqlens.tolist() == [0]
    assert (packed.max_seqlen, packed.total) == (0, 0)


def test_negative_length_is_rejected():
    with pytest.raises(ValueError, match="lengths must be non-negative"):
        Packed.from_lengths([2, -1])


def test_pad_and_unpad_round_trip():
    packed = Packed.from_lengths([2, 0, 3])
    x = torch.arange(5 * 2, dtype=torch.float32).view(5, 2)  # [total, C]
    padded = pad_packed(x, packed.cu_seqlens, packed.max_seqlen, value=-1.0)  # [B, 3, C]
    assert padded.shape == (3, 3, 2)
    assert padded[1].eq(-1).all() and padded[0, 2].eq(-1).all()
    assert torch.equal(padded[2], x[2:5])
    assert torch.equal(unpad(padded, packed.cu_seqlens, packed.total), x)
    assert key_padding_mask(packed.cu_seqlens, 3).tolist() == [[True, True, False], [False] * 3, [True] * 3]
    assert segment_ids(packed.cu_seqlens, packed.total).tolist() == [0, 0, 2, 2, 2]


def test_summary_is_cached_and_refreshed_after_in_place_change():
    cu = torch.tensor([0, 2, 7], dtype=torch.int32)
    assert summarize_cu_seqlens(cu) == (0, 7, 5, 2)
    cu[2] = 9
    assert summarize_cu_seqlens(cu).last == 9


def test_concat_segments_interleaves_per_sample():
    a = Packed.from_lengths([2, 0, 1])
    b = Packed.from_lengths([1, 2, 0])
    out, order, (dest_a, dest_b) = concat_segments([a, b])
    assert out.lengths.tolist() == [3, 2, 1]
    rows_a = torch.tensor([10, 11, 12])  # sample 0, 0, 2
    rows_b = torch.tensor([20, 21, 22])  # sample 0, 1, 1
    cat = torch.cat([rows_a, rows_b])[order]
    assert cat.tolist() == [10, 11, 20, 21, 22, 12]
    assert torch.equal(cat[dest_a], rows_a) and torch.equal(cat[dest_b], rows_b)
