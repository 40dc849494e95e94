"""Data sets by name, a resumable sharded batch order, and the DataLoaders built on them."""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from crossmae.config import Config, DataConfig
from crossmae.data.collate import MaskingCollator
from crossmae.model import static_conditioning

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def keep_batch_memory_mapped(trim_bytes: int = 1 << 30, mmap_bytes: int = 32 << 20) -> bool:
    """Ask glibc's malloc to keep the memory of freed batches for the next ones.

    With glibc's defaults, a batch's large buffers (tens of MB at the ``seed`` preset) are handed back to the
    OS when freed and mapped and page-faulted anew for the next batch, which costs more than the collate itself
    (``bench/results/data_speed.md``). Buffers under ``mmap_bytes`` then come from the heap, which is trimmed
    only past ``trim_bytes`` free at its top. Does nothing (returns False) off glibc or when ``GLIBC_TUNABLES``
    already sets malloc parameters (the user's choice wins); True when both settings were taken. Forked
    DataLoader workers inherit them.
    """
    if not sys.platform.startswith("linux") or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(_M_MMAP_THRESHOLD, mmap_bytes) == 1 and mallopt(_M_TRIM_THRESHOLD, trim_bytes) == 1


def build_dataset(data: DataConfig, split: str, norm_stats: dict | None = None) -> Dataset:
    """The data set of ``data.source`` for ``split`` (``train``, ``val``; ``files`` and ``region`` also ``test``);
    val and test reuse train's statistics (and, for ``region``, its site groups)."""
    if data.source == "synthetic":
        from crossmae.data.synthetic import SyntheticWaterDataset

        return SyntheticWaterDataset(data, split=split, norm_stats=norm_stats)
    if data.source == "files":
        from crossmae.data.files import FilesDataset

        return FilesDataset(data, split=split, norm_stats=norm_stats)
    if data.source == "region":
        from crossmae.data.region import RegionDataset

        return RegionDataset(data, split=split, norm_stats=norm_stats)
    raise ValueError(f"data.source must be 'synthetic', 'files' or 'region', got {data.source!r}")


class GlobalBatchOrder:
    """The batches of a run as a pure function of the step: resumable and shardable.

    Global batch ``k`` holds positions ``k·G … k·G + G - 1`` of epoch ``k // per_epoch``'s
    permutation of the data set (seeded by ``seed`` and the epoch), with ``G`` = per-rank batch
    × world size; rank r takes its contiguous slice of ``batch_size`` items. Each item is
    ``(index, noise_seed)``; the noise seed depends on the epoch and position only, so a sample's
    mask is the same whatever the number of processes.

    Args:
        size: items in the data set.
        batch_size: items per rank per step.
        seed: run seed.
        rank, world: this process and the number of processes.
        shuffle: permute each epoch (False: in order, for validation).
        start_step: the first global batch to yield (resume).
    """

    def __init__(self, size: int, batch_size: int, seed: int, rank: int = 0, world: int = 1,
                 shuffle: bool = True, start_step: int = 0):
        self.global_batch = batch_size * world
        if size < self.global_batch:
            raise ValueError(
                f"the data set has {size} windows, fewer than one global batch ({batch_size} per process "
                f"x {world} processes): lower data.batch_size or provide more data"
            )
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.rank, self.world, self.shuffle = rank, world, shuffle
        self.per_epoch = size // self.global_batch
        self.start_step = start_step

    def batch(self, step: int) -> list[tuple[int, int]]:
        epoch, k = divmod(step, self.per_epoch)
        if self.shuffle:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))
        else:
            order = torch.arange(self.size)
        first = k * self.global_batch + self.rank * self.batch_size
        positions = range(first, first + self.batch_size)
        return [(int(order[i]), (self.seed * 1_000_003 + epoch) * 1_000_003 + i) for i in positions]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = self.start_step
        while True:
            yield self.batch(step)
            step += 1


class FixedBatches(GlobalBatchOrder):
    """The first ``count`` batches, in order, every time (validation)."""

    def __init__(self, size: int, batch_size: int, count: int, seed: int, rank: int = 0, world: int = 1):
        super().__init__(size, batch_size, seed, rank, world, shuffle=False)
        self.count = min(count, self.per_epoch)

    def __iter__(self):
        return (self.batch(k) for k in range(self.count))

    def __len__(self) -> int:
        return self.count


def make_collator(config: Config, dataset) -> MaskingCollator:
    """The collator a model built from ``config`` expects (its settings are what the model checks)."""
    static_tokens, _ = static_conditioning(dataset.spec, config.model)
    return MaskingCollator(
        dataset.spec, config.mask, config.data.patch_size, config.data.steps,
        memory=config.model.memory, standard_decoder=not config.model.use_cross_attn,
        static_tokens=static_tokens, calendar=config.model.day_of_year,
        memory_modalities=[m.name for m in dataset.spec.modalities if m.name not in config.model.memory_drop],
    )


def make_loader(dataset, batches, collator: MaskingCollator, num_workers: int, pin_memory: bool) -> DataLoader:
    return DataLoader(
        dataset, batch_sampler=batches, collate_fn=collator, num_workers=num_workers,
        pin_memory=pin_memory, persistent_workers=False,
    )
