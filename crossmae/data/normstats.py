"""Normalisation statistics: one type for the synthetic and file data sets and for evaluation.

A data set standardises each channel after its transform: ``(transform(x) − mean) / std``, with the
transform ``none`` or ``log1p``; static attributes are standardised without a transform. The statistics
come from the training split and are saved with the run as JSON (``RUN/norm_stats.json`` and every
checkpoint) in the form the data set wrote them, which :meth:`NormStats.to_dict` gives back unchanged:

    {"modalities": {name: {"transform": "log1p" | [per channel], "mean": [C], "std": [C],
                           "kind": "grid" | "series", "channels": [names], ...}},
     "static": {"names": [S], "mean": [S], "std": [S], ...}, ...}

(``kind`` and ``channels`` are written by the file data set; the synthetic one gives one transform for
all of a modality's channels. Other keys, such as a grid's ``reading``, are kept as they are.)
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

TRANSFORMS = ("none", "log1p")


def apply_transform(x: np.ndarray, transform: str) -> np.ndarray:
    """Physical values → the transform's space: ``log1p`` (a value ≤ -1 is NaN) or ``none`` (unchanged)."""
    if transform == "log1p":
        with np.errstate(invalid="ignore"):
            return np.log1p(np.where(x > -1.0, x, np.nan))
    return x


@dataclass(frozen=True)
class ModalityStats:
    """One modality's statistics.

    Attributes:
        kind: ``grid`` (channels on axis -3 of ``[..., C, H, W]``) or ``series`` (axis -1 of ``[..., F]``); None
            when neither the saved form nor the caller said (treated as a series).
        transforms: per channel, ``none`` or ``log1p``.
        mean, std: per channel, of the transformed values.
        channels: the channel names, when the statistics name them.
    """

    kind: str | None
    transforms: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    channels: tuple[str, ...] | None = None

    @property
    def axis(self) -> int:
        return -3 if self.kind == "grid" else -1


class NormStats:
    """The statistics of every modality and of the static attributes, with their saved form.

    Build it with :meth:`from_dict` (a saved dict), :meth:`coerce` (a dict or a NormStats) or :meth:`load`
    (a run folder). ``modalities`` maps name → :class:`ModalityStats`; ``static_names``, ``static_mean``,
    ``static_std`` are the kept static attributes.
    """

    def __init__(self, raw: dict, modalities: dict[str, ModalityStats], static_names: tuple[str, ...],
                 static_mean: tuple[float, ...], static_std: tuple[float, ...]):
        self._raw = raw
        self.modalities = modalities
        self.static_names, self.static_mean, self.static_std = static_names, static_mean, static_std

    # -- construction and saving --
    @classmethod
    def from_dict(cls, data: Mapping, kinds: Mapping[str, str] | None = None) -> NormStats:
        """Parse a saved dict; ``kinds`` (name → ``grid``/``series``) gives the kind where the dict has none.

        Raises ValueError naming the entry that is malformed."""
        if not isinstance(data, Mapping) or not isinstance(data.get("modalities"), Mapping):
            raise ValueError(f"norm_stats must be a mapping with a 'modalities' mapping, got {type(data).__name__}")
        modalities = {}
        for name, entry in data["modalities"].items():
            where = f"norm_stats['modalities'][{name!r}]"
            if not isinstance(entry, Mapping):
                raise ValueError(f"{where} must be a mapping, got {entry!r}")
            mean, std = entry.get("mean"), entry.get("std")
            if not isinstance(mean, list) or not isinstance(std, list) or len(mean) != len(std) or not mean:
                raise ValueError(f"{where} must hold equal, non-empty lists 'mean' and 'std', got {entry!r}")
            transform = entry.get("transform", "none")
            transforms = [transform] * len(mean) if isinstance(transform, str) else list(transform)
            if len(transforms) != len(mean) or any(t not in TRANSFORMS for t in transforms):
                raise ValueError(f"{where} must hold a transform ({' or '.join(TRANSFORMS)}) for each of its "
                                 f"{len(mean)} channels, got {transform!r}")
            kind = entry.get("kind") or (kinds or {}).get(name)
            channels = entry.get("channels")
            modalities[name] = ModalityStats(kind, tuple(transforms), tuple(float(m) for m in mean),
                                             tuple(float(s) for s in std),
                                             tuple(channels) if channels is not None else None)
        static = data.get("static") or {}
        s_mean, s_std = list(static.get("mean", [])), list(static.get("std", []))
        names = list(static.get("names", []))
        if len(s_mean) != len(s_std) or (static.get("names") is not None and len(names) not in (0, len(s_mean))):
            raise ValueError(f"norm_stats['static'] must hold a mean and std per named attribute, got {static!r}")
        return cls(copy.deepcopy(dict(data)), modalities, tuple(names), tuple(map(float, s_mean)),
                   tuple(map(float, s_std)))

    @classmethod
    def coerce(cls, stats: NormStats | Mapping, kinds: Mapping[str, str] | None = None) -> NormStats:
        """A NormStats of ``stats`` (a saved dict or a NormStats), with ``kinds`` where the saved form has none."""
        return cls.from_dict(stats._raw if isinstance(stats, NormStats) else stats, kinds)

    @classmethod
    def load(cls, run_dir: str | Path, state: Mapping | None = None) -> NormStats:
        """A run's statistics: ``RUN/norm_stats.json``, else the checkpoint ``state``'s ``norm_stats``."""
        path = Path(run_dir) / "norm_stats.json"
        if path.is_file():
            return cls.from_dict(json.loads(path.read_text()))
        if state is None or "norm_stats" not in state:
            raise FileNotFoundError(f"run {str(run_dir)!r} has no norm_stats.json and no statistics in its checkpoint")
        return cls.from_dict(json.loads(state["norm_stats"]))

    def to_dict(self) -> dict:
        """The saved form, as it was read or computed (JSON-serialisable)."""
        return copy.deepcopy(self._raw)

    def __eq__(self, other) -> bool:
        return isinstance(other, NormStats) and self._raw == other._raw

    # -- checks --
    def check(self, expected: Mapping[str, tuple[str, int | list[str]]], static_names: list[str] | None = None
              ) -> None:
        """Raise ValueError naming each modality whose statistics do not fit: ``expected`` maps name → (kind,
        channel count or channel names); ``static_names`` the static attributes the statistics may name."""
        for name, (kind, channels) in expected.items():
            entry = self.modalities.get(name)
            count = channels if isinstance(channels, int) else len(channels)
            named = entry is not None and (isinstance(channels, int) or entry.channels is None
                                           or list(entry.channels) == list(channels))
            wrong_kind = entry is not None and entry.kind is not None and entry.kind != kind
            if entry is None or wrong_kind or len(entry.mean) != count or not named:
                what = f"the channels {channels}" if not isinstance(channels, int) else f"{channels} channel(s)"
                raise ValueError(f"norm_stats['modalities'][{name!r}] must hold {what} with a transform, mean "
                                 f"and std each, got {self._raw.get('modalities', {}).get(name)!r}")
        if static_names is not None:
            unknown = [n for n in self.static_names if n not in static_names]
            if unknown:
                raise ValueError(f"norm_stats['static'] names {unknown}, which are not among the static "
                                 f"attributes {static_names}")

    # -- applying them --
    def _entry(self, name: str) -> ModalityStats:
        if name not in self.modalities:
            raise ValueError(f"name must be one of {list(self.modalities) + ['static']}, got {name!r}")
        return self.modalities[name]

    def normalize(self, name: str, x: np.ndarray) -> np.ndarray:
        """Physical ``[..., C, H, W]`` (grid) or ``[..., F]`` (series) → transformed and standardised float32
        (``log1p`` of a value ≤ -1 is NaN)."""
        entry = self._entry(name)
        out = np.empty(x.shape, dtype=np.float32)
        for c, (tr, mean, std) in enumerate(zip(entry.transforms, entry.mean, entry.std, strict=True)):
            index = (Ellipsis, c, slice(None), slice(None)) if entry.axis == -3 else (Ellipsis, c)
            v = x[index]
            out[index] = (apply_transform(v, tr) - mean) / std
        return out

    def denormalize(self, name: str, values: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
        """Normalised values of modality ``name`` (grid ``[..., C, H, W]``, series ``[..., F]``) or ``static``
        (``[..., S]``) → physical units, undoing the standardisation and each channel's transform. Tensor or
        ndarray in, same type out."""
        if name == "static":
            mean, std, transforms, shape = self.static_mean, self.static_std, ("none",) * len(self.static_mean), (-1,)
        else:
            entry = self._entry(name)
            mean, std, transforms = entry.mean, entry.std, entry.transforms
            shape = (-1, 1, 1) if entry.axis == -3 else (-1,)
        if isinstance(values, torch.Tensor):
            out = values * torch.tensor(std, dtype=values.dtype, device=values.device).view(shape) \
                + torch.tensor(mean, dtype=values.dtype, device=values.device).view(shape)
            expm1 = torch.expm1
        else:
            out = np.asarray(values) * np.asarray(std).reshape(shape) + np.asarray(mean).reshape(shape)
            expm1 = np.expm1
        if all(t == "log1p" for t in transforms):
            return expm1(out)
        for c, tr in enumerate(transforms):
            if tr == "log1p":
                index = (Ellipsis, c, slice(None), slice(None)) if len(shape) == 3 else (Ellipsis, c)
                out[index] = expm1(out[index])
        return out
