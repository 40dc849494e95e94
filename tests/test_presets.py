"""The run presets build batches of the shapes docs/presets.md states (and crossmae.presets computes)."""

import pytest

from crossmae.config import preset_config
from crossmae.data.loader import GlobalBatchOrder, build_dataset, make_collator
from crossmae.presets import attention_lengths, get_preset


@pytest.mark.parametrize("name", ["cpu", "ragged"])
def test_preset_batches_have_the_stated_shape(name):
    config = preset_config(name)
    workload = get_preset(name)
    dataset = build_dataset(config.data, "train")
    batch = make_collator(config, dataset)([dataset[k] for k in GlobalBatchOrder(len(dataset), workload.batch, 0)
                                            .batch(0)])
    mb = batch.modalities["precip"]
    assert batch.batch_size == workload.batch and mb.targets.values.shape[1] == workload.patch_dim
    visible = mb.encoder.visible.lengths
    valid = visible + mb.hidden.packed.lengths  # [B] valid tokens per sample
    if name == "cpu":
        expected_q, expected_k = attention_lengths(workload)
        assert mb.queries.packed.lengths.tolist() == expected_q and visible.tolist() == expected_k
        assert valid.tolist() == [workload.steps * workload.patches] * workload.batch
    else:
        low = workload.steps * workload.min_patches * (1 - workload.max_missing_steps)
        assert ((valid >= low - 1) & (valid <= workload.steps * workload.patches)).all()
        assert len(set(valid.tolist())) > 1  # ragged: samples differ
    model = config.model
    assert (model.dec_dim // model.dec_heads, model.enc_dim) == (workload.dec_head_dim, workload.enc_dim)


def test_regional_attention_lengths_count_every_grid_and_the_site_set_in_the_memory():
    workload = get_preset("regional")
    queries, keys = attention_lengths(workload)
    grid = workload.steps * workload.patches  # 8460 valid tokens per grid
    sites = workload.site_groups * workload.steps - round(0.1 * workload.site_groups * workload.steps)  # 6156
    assert queries == [round(0.75 * grid)] * workload.batch == [6345] * workload.batch
    assert keys == [3 * (grid - 6345) + (sites - sites // 2)] * workload.batch == [9423] * workload.batch
