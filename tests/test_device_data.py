"""The device-resident data path (``crossmae/data/device.py``): for the same window keys it makes the batch the host
path makes (``dataset[key]`` then the collator), bit for bit, in every mask mode, from the synthetic and the files
sources; training with ``data.on_device`` follows the host path's run step for step."""

from types import SimpleNamespace

import pytest
import torch
from gap_data import make_data
from test_data_speed import assert_identical
from test_train import read_metrics, tiny_config

from crossmae.config import DataConfig, MaskConfig, SyntheticConfig, resolve_config
from crossmae.data.collate import MaskingCollator
from crossmae.data.device import DeviceCollator, DeviceDataset
from crossmae.data.loader import GlobalBatchOrder, build_dataset
from crossmae.data.synthetic import SyntheticWaterDataset
from crossmae.engine import Trainer

MASKS = {
    "free": MaskConfig(),
    "frame": MaskConfig(mode="frame"),
    "unified_kept": MaskConfig(mode="unified", kept_mask_ratio=0.4),
    "kept": MaskConfig(grid_ratio=0.6, series_ratio=0.5, kept_mask_ratio=0.25),
    "span": MaskConfig(mode="span"),
    "span_kept": MaskConfig(mode="span", kept_mask_ratio=0.5),
}


@pytest.fixture(scope="module")
def synthetic():
    """Every grid and series, static attributes, missing frames, series gaps, 18-cell grids in 4-cell patches
    (padded patches)."""
    config = DataConfig(steps=16, stride=8, patch_size=4, seed=3, synthetic=SyntheticConfig(
        num_basins=4, record_days=200, grid_size=18, basin_patches=[6, 12], missing_frames=0.3,
        series_gap_rate=3.0))
    return SyntheticWaterDataset(config, split="train")


def assert_same_batches(dataset, collator, steps=3, batch_size=6):
    device = DeviceCollator(collator, DeviceDataset(dataset, "cpu", collator.patch_size))
    order = GlobalBatchOrder(len(dataset), batch_size, seed=1)
    for step in range(steps):
        keys = order.batch(step)
        assert_identical(device(keys), collator([dataset[k] for k in keys]), f"step {step}")


@pytest.mark.parametrize("mask", list(MASKS.values()), ids=list(MASKS))
def test_device_batches_equal_the_host_path_on_the_synthetic_source(synthetic, mask):
    collator = MaskingCollator(synthetic.spec, mask, 4, 16, calendar=True, standard_decoder=True)
    assert_same_batches(synthetic, collator)


@pytest.mark.parametrize("memory", ["joint", "own"])
def test_device_batches_equal_the_host_path_with_static_tokens_and_a_partial_memory(synthetic, memory):
    names = [m.name for m in synthetic.spec.modalities]
    collator = MaskingCollator(synthetic.spec, MaskConfig(kept_mask_ratio=0.3), 4, 16, memory=memory,
                               standard_decoder=True, static_tokens=names[:2],
                               memory_modalities=names if memory == "own" else names[1:])
    assert_same_batches(synthetic, collator)


@pytest.mark.parametrize("mask", [MASKS["free"], MASKS["span_kept"]], ids=["free", "span_kept"])
def test_device_batches_equal_the_host_path_on_the_files_source(tmp_path, mask):
    """NetCDF grids with NaN cells and a mask with a hole, log1p transforms, CSV series with a gap, two basins."""
    config = resolve_config(None, make_data(tmp_path), [])
    dataset = build_dataset(config.data, "train")
    collator = MaskingCollator(dataset.spec, mask, config.data.patch_size, config.data.steps, calendar=True)
    assert_same_batches(dataset, collator, steps=4, batch_size=4)


def test_other_kinds_and_sources_are_refused_with_the_setting_named():
    sites = SimpleNamespace(spec=SimpleNamespace(modalities=[SimpleNamespace(name="wells", kind="sites")]))
    with pytest.raises(ValueError, match="data.on_device.*'wells': 'sites'"):
        DeviceDataset(sites, "cpu", 4)
    grid_only = SimpleNamespace(spec=SimpleNamespace(modalities=[SimpleNamespace(name="p", kind="grid")]),
                                steps=4)
    with pytest.raises(ValueError, match="synthetic and files sources"):
        DeviceDataset(grid_only, "cpu", 4)


def test_training_on_device_batches_follows_the_host_path(tmp_path):
    host = Trainer(tiny_config(tmp_path / "host", "train.val_every=0", steps=4))
    device = Trainer(tiny_config(tmp_path / "device", "train.val_every=0", "data.on_device=true", steps=4))
    assert device.device_batches is not None
    host.fit()
    device.fit()
    rows = [read_metrics(run / "metrics.csv") for run in (tmp_path / "host", tmp_path / "device")]
    assert [r["loss"] for r in rows[0]] == [r["loss"] for r in rows[1]]
    for a, b in zip(host.model.parameters(), device.model.parameters()):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("mask", [MASKS["free"], MASKS["unified_kept"], MASKS["span"]], ids=["free", "unified", "span"])
def test_cuda_device_batches_equal_the_host_path(synthetic, mask):
    """On CUDA (masks ranked by the GPU's argsort: equal unless a tie of noise values straddles a hidden count)."""
    collator = MaskingCollator(synthetic.spec, mask, 4, 16, calendar=True, standard_decoder=True)
    device = DeviceCollator(collator, DeviceDataset(synthetic, "cuda", 4))
    order = GlobalBatchOrder(len(synthetic), 6, seed=1)
    for step in range(3):
        keys = order.batch(step)
        batch = device(keys).to("cpu")
        torch.cuda.synchronize()  # the copies to the host are asynchronous
        assert_identical(batch, collator([synthetic[k] for k in keys]), f"step {step}")
