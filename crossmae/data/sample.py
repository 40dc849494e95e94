"""What a water data set yields: one window of every modality for one basin.

A data set describes its modalities once (:class:`ModalitySpec`) and yields :class:`Sample`
objects. Values are already normalised (training-split statistics); NaN marks a missing value.
Grid cells outside the basin are not data: the basin mask says which cells are real.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class ModalitySpec:
    """One modality's kind and shape.

    Attributes:
        name: modality name (``precip``, ``streamflow`` ...).
        kind: ``grid`` (a field over the basin, ``[T, C, H, W]``) or ``series`` (``[T, F]``).
        channels: C for grids, F for series.
        height, width: grid cells (grids only).
    """

    name: str
    kind: str
    channels: int
    height: int = 0
    width: int = 0

    def __post_init__(self):
        if self.kind not in ("grid", "series"):
            raise ValueError(f"ModalitySpec.kind must be 'grid' or 'series', got {self.kind!r}")


@dataclass(frozen=True)
class DatasetSpec:
    """The modalities of a data set, in a fixed order, and the number of static attributes."""

    modalities: tuple[ModalitySpec, ...]
    static_dim: int = 0

    @property
    def grids(self) -> tuple[ModalitySpec, ...]:
        return tuple(m for m in self.modalities if m.kind == "grid")

    @property
    def series(self) -> tuple[ModalitySpec, ...]:
        return tuple(m for m in self.modalities if m.kind == "series")

    def __getitem__(self, name: str) -> ModalitySpec:
        for m in self.modalities:
            if m.name == name:
                return m
        raise KeyError(name)


@dataclass
class Sample:
    """One window of one basin.

    Attributes:
        grids: name → float32 ``[T, C, H, W]``; NaN = missing.
        basin_masks: name → bool ``[H, W]``; True = the cell lies inside the basin.
        series: name → float32 ``[T, F]``; NaN = missing.
        static: float32 ``[S]`` static attributes (NaN = unknown), or None.
        noise_seed: seeds this sample's mask draw (so masks depend on the sample, not the batch).
        first_day: the window's first day as days since 1970-01-01 (None: the data set has no calendar).
        meta: anything for evaluation and plots (basin id, first day ...).
    """

    grids: dict[str, torch.Tensor] = field(default_factory=dict)
    basin_masks: dict[str, torch.Tensor] = field(default_factory=dict)
    series: dict[str, torch.Tensor] = field(default_factory=dict)
    static: torch.Tensor | None = None
    noise_seed: int = 0
    first_day: int | None = None
    meta: dict = field(default_factory=dict)


def window_key(key: int | tuple[int, int], length: int) -> tuple[int, int]:
    """A data set's ``__getitem__`` key as ``(window index, mask noise seed)``.

    ``key`` is a window index (its own noise seed) or ``(index, noise_seed)``, as the training loader passes
    it; negative indices count from the end. Raises IndexError outside ``[-length, length)``.
    """
    index, noise_seed = key if isinstance(key, tuple) else (key, key)
    index = int(index)
    if index < 0:
        index += length
    if not 0 <= index < length:
        raise IndexError(f"index {key} out of range for {length} windows")
    return index, int(noise_seed)
