"""What a water data set yields: one window of every modality for one basin or region.

A data set describes its modalities once (:class:`ModalitySpec`) and yields :class:`Sample`
objects. Values are already normalised (training-split statistics); NaN marks a missing value.
Grid cells outside the basin (or off the region's land) are not data: the basin mask says which cells are real.

A site set (kind ``sites``) is S gauges at irregular points of a region, each with a daily series of F
variables and A static attributes, grouped into G groups of at most K sites; its tokens are (group, day)
and hold the K·F values of the group's sites on that day (slot-major: value index = k·F + f).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class ModalitySpec:
    """One modality's kind and shape.

    Attributes:
        name: modality name (``precip``, ``streamflow`` ...).
        kind: ``grid`` (a field over the basin, ``[T, C, H, W]``), ``series`` (``[T, F]``) or ``sites``
            (a site set, ``[T, G, K, F]``).
        channels: C for grids, F for series and site sets (variables per site).
        height, width: grid cells (grids only).
        groups: G, site groups (site sets only).
        group_size: K, slots per group (site sets only).
        locations: G ``(row, col)`` group centres in cells of the region's grid frame (cell i covers
            ``[i, i + 1)``, so row 0.5 is the centre of the grids' first row; may lie between cells)
            (site sets only).
        site_attrs: A, static attributes per site (site sets only; 0 = none).
    """

    name: str
    kind: str
    channels: int
    height: int = 0
    width: int = 0
    groups: int = 0
    group_size: int = 0
    locations: tuple[tuple[float, float], ...] = ()
    site_attrs: int = 0

    def __post_init__(self):
        if self.kind not in ("grid", "series", "sites"):
            raise ValueError(f"ModalitySpec.kind must be 'grid', 'series' or 'sites', got {self.kind!r}")
        if self.kind == "sites":
            if self.groups < 1 or self.group_size < 1:
                raise ValueError(
                    f"ModalitySpec {self.name!r}: a site set needs groups >= 1 and group_size >= 1, "
                    f"got groups={self.groups}, group_size={self.group_size}"
                )
            if len(self.locations) != self.groups:
                raise ValueError(
                    f"ModalitySpec {self.name!r}: locations has {len(self.locations)} entries, "
                    f"groups={self.groups}"
                )
            if self.site_attrs < 0:
                raise ValueError(f"ModalitySpec {self.name!r}: site_attrs must be >= 0, got {self.site_attrs}")


@dataclass(frozen=True)
class DatasetSpec:
    """The modalities of a data set, in a fixed order, and the number of static attributes.

    ``grid_shape`` is ``(H, W)`` of the region's grid frame that site-set locations refer to
    (``(0, 0)``: none).
    """

    modalities: tuple[ModalitySpec, ...]
    static_dim: int = 0
    grid_shape: tuple[int, int] = (0, 0)

    @property
    def grids(self) -> tuple[ModalitySpec, ...]:
        return tuple(m for m in self.modalities if m.kind == "grid")

    @property
    def series(self) -> tuple[ModalitySpec, ...]:
        return tuple(m for m in self.modalities if m.kind == "series")

    @property
    def sites(self) -> tuple[ModalitySpec, ...]:
        return tuple(m for m in self.modalities if m.kind == "sites")

    def __getitem__(self, name: str) -> ModalitySpec:
        for m in self.modalities:
            if m.name == name:
                return m
        raise KeyError(name)


@dataclass
class Sample:
    """One window of one basin (or one region).

    Attributes:
        grids: name → float32 ``[T, C, H, W]``; NaN = missing.
        basin_masks: name → bool ``[H, W]``; True = the cell lies inside the basin.
        series: name → float32 ``[T, F]``; NaN = missing.
        sites: name → float32 ``[T, G, K, F]``; NaN = missing; an empty slot is all NaN.
        site_masks: name → bool ``[G, K]``; True = a real site fills that slot.
        site_static: name → float32 ``[G, K, A]`` standardised site attributes, NaN = unknown
            (only for site sets with A > 0).
        static: float32 ``[S]`` static attributes (NaN = unknown), or None.
        noise_seed: seeds this sample's mask draw (so masks depend on the sample, not the batch).
        first_day: the window's first day as days since 1970-01-01 (None: the data set has no calendar).
        meta: anything for evaluation and plots (basin id, first day ...).
    """

    grids: dict[str, torch.Tensor] = field(default_factory=dict)
    basin_masks: dict[str, torch.Tensor] = field(default_factory=dict)
    series: dict[str, torch.Tensor] = field(default_factory=dict)
    sites: dict[str, torch.Tensor] = field(default_factory=dict)
    site_masks: dict[str, torch.Tensor] = field(default_factory=dict)
    site_static: dict[str, torch.Tensor] = field(default_factory=dict)
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
