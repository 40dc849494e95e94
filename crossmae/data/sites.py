"""Site sets: which gauge sits in which (group, slot), and how per-site values map to group tokens.

A site set holds S sites (gauges) at irregular points of a region. Its tokens are (group, day): the sites
are put into G groups of at most K slots each, and a token holds the K·F values of its group's sites on one
day. :class:`SiteLayout` records the assignment; :func:`group_values` and :func:`ungroup_values` move values
between the per-site form ``[T, S, F]`` and the grouped form ``[T, G, K, F]`` (exact inverses).

Coordinates are in the region's grid frame, in cells: cell (i, j) covers rows ``[i, i + 1)`` and columns
``[j, j + 1)``, so row 0.5 is the centre of the grids' first row, and a site at (r, c) lies in cell
``(floor(r), floor(c))`` and in patch ``(floor(r / P), floor(c / P))`` of P-cell patches.

Groupings (:func:`build_layout`):
    ``site``: one site per group (G = S, K = 1), in site order.
    ``file``: a CSV table ``site_id,group`` assigns every site a group label (rows of site-table sites that
        the data does not use are skipped); groups are ordered by label (numerically when all labels are
        integers), sites inside a group by their order in the site table; K is the largest group.
    ``kmeans``: G = ceil(S / K) groups of at most K sites each, by k-means on the coordinates with a capacity
        of K per centre; deterministic for a given seed (k-means++ start from a seeded generator, then Lloyd
        iterations in which sites are assigned greedily, nearest site-centre pair first, to centres with room).

A layout is computed once, on the training split, and saved with the run (:meth:`SiteLayout.to_dict` inside
the run's normalisation statistics), so validation, evaluation and resumed runs use the same groups.
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

GROUPINGS = ("site", "file", "kmeans")


@dataclass(frozen=True)
class SiteLayout:
    """Which site sits in which (group, slot) of a site set, and where.

    Attributes:
        ids: ``[G][K]`` site id per slot, None = an empty slot (empty slots come after a group's sites).
        rows: float64 ``[G, K]`` site row in the grid frame (NaN for an empty slot).
        cols: float64 ``[G, K]`` site column in the grid frame (NaN for an empty slot).

    The layout's flat order of sites is its filled slots read group by group, slot by slot
    (:attr:`site_ids`); per-site arrays ``[T, S, F]`` are in that order.
    """

    ids: tuple[tuple[str | None, ...], ...]
    rows: np.ndarray
    cols: np.ndarray

    def __post_init__(self):
        groups = len(self.ids)
        size = len(self.ids[0]) if groups else 0
        if groups == 0 or size == 0:
            raise ValueError("SiteLayout.ids must hold at least one group of at least one slot")
        if any(len(g) != size for g in self.ids):
            raise ValueError(f"SiteLayout.ids must hold {size} slots in every group, got "
                             f"{[len(g) for g in self.ids]}")
        for name in ("rows", "cols"):
            value = getattr(self, name)
            if not isinstance(value, np.ndarray) or value.shape != (groups, size):
                raise ValueError(f"SiteLayout.{name} must be a float array of shape ({groups}, {size}), got "
                                 f"{getattr(value, 'shape', type(value).__name__)}")
        filled = self.slot_mask
        flat = [i for g in self.ids for i in g if i is not None]
        if len(set(flat)) != len(flat):
            raise ValueError("SiteLayout.ids names a site in more than one slot")
        if not filled.any(axis=1).all():
            raise ValueError(f"SiteLayout.ids holds empty groups: {np.flatnonzero(~filled.any(axis=1)).tolist()}")
        if np.isnan(self.rows[filled]).any() or np.isnan(self.cols[filled]).any():
            raise ValueError("SiteLayout.rows and cols must be finite for every filled slot")

    @property
    def groups(self) -> int:
        """G."""
        return len(self.ids)

    @property
    def group_size(self) -> int:
        """K."""
        return len(self.ids[0])

    @property
    def slot_mask(self) -> np.ndarray:
        """bool ``[G, K]``: True = a site fills the slot."""
        return np.array([[i is not None for i in g] for g in self.ids], dtype=bool)

    @property
    def site_ids(self) -> tuple[str, ...]:
        """The S site ids in the layout's flat order."""
        return tuple(i for g in self.ids for i in g if i is not None)

    @property
    def flat_slots(self) -> np.ndarray:
        """int64 ``[S]``: the flat slot index ``g·K + k`` of each site, in the layout's flat order."""
        return np.flatnonzero(self.slot_mask.reshape(-1))

    def locations(self) -> tuple[tuple[float, float], ...]:
        """The G group centres ``(row, col)`` (mean of the group's sites), as ``ModalitySpec.locations``."""
        mask = self.slot_mask
        rows = np.where(mask, self.rows, 0.0).sum(axis=1) / mask.sum(axis=1)
        cols = np.where(mask, self.cols, 0.0).sum(axis=1) / mask.sum(axis=1)
        return tuple((float(r), float(c)) for r, c in zip(rows, cols, strict=True))

    def to_dict(self) -> dict:
        """JSON-serialisable form (:meth:`from_dict` reads it back exactly)."""
        def coord(x: float) -> float | None:
            return None if math.isnan(x) else float(x)

        return {"ids": [list(g) for g in self.ids],
                "rows": [[coord(x) for x in r] for r in self.rows.tolist()],
                "cols": [[coord(x) for x in r] for r in self.cols.tolist()]}

    @classmethod
    def from_dict(cls, data: Mapping) -> SiteLayout:
        """A layout from :meth:`to_dict`'s form; raises ValueError naming what is malformed."""
        if not isinstance(data, Mapping) or not all(k in data for k in ("ids", "rows", "cols")):
            raise ValueError(f"a site layout must be a mapping with 'ids', 'rows' and 'cols', got {data!r}")
        ids = tuple(tuple(None if i is None else str(i) for i in g) for g in data["ids"])

        def array(name: str) -> np.ndarray:
            try:
                return np.array([[np.nan if x is None else float(x) for x in r] for r in data[name]],
                                dtype=np.float64).reshape(len(ids), -1)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"site layout {name!r} must be a [G][K] list of numbers or null: {exc}") from None

        return cls(ids, array("rows"), array("cols"))

    def __eq__(self, other) -> bool:
        return (isinstance(other, SiteLayout) and self.ids == other.ids
                and np.array_equal(self.rows, other.rows, equal_nan=True)
                and np.array_equal(self.cols, other.cols, equal_nan=True))

    __hash__ = None


def group_values(values: torch.Tensor | np.ndarray, layout: SiteLayout) -> torch.Tensor:
    """Per-site values ``[T, S, F]`` (sites in the layout's flat order) → grouped ``[T, G, K, F]``, empty slots NaN.

    Returns a float tensor of ``values``' dtype (float32 for an ndarray of another kind)."""
    values = torch.as_tensor(values)
    if not values.is_floating_point():
        values = values.float()
    sites = len(layout.site_ids)
    if values.dim() != 3 or values.shape[1] != sites:
        raise ValueError(f"values must be [T, S={sites}, F], got {tuple(values.shape)}")
    t, _, f = values.shape
    out = values.new_full((t, layout.groups * layout.group_size, f), float("nan"))
    out[:, torch.from_numpy(layout.flat_slots)] = values
    return out.view(t, layout.groups, layout.group_size, f)  # [T, G, K, F]


def ungroup_values(grouped: torch.Tensor | np.ndarray, layout: SiteLayout) -> torch.Tensor:
    """Grouped values ``[T, G, K, F]`` → per-site ``[T, S, F]`` in the layout's flat order (exact inverse of
    :func:`group_values`; empty slots are dropped)."""
    grouped = torch.as_tensor(grouped)
    shape = (layout.groups, layout.group_size)
    if grouped.dim() != 4 or tuple(grouped.shape[1:3]) != shape:
        raise ValueError(f"grouped must be [T, G={shape[0]}, K={shape[1]}, F], got {tuple(grouped.shape)}")
    t, g, k, f = grouped.shape
    return grouped.reshape(t, g * k, f)[:, torch.from_numpy(layout.flat_slots)]  # [T, S, F]


# -- groupings ----------------------------------------------------------------------------------
def build_layout(ids: Sequence[str], rows: np.ndarray, cols: np.ndarray, grouping: str, *, group_size: int = 8,
                 groups_file: str | Path = "", seed: int = 0, iterations: int = 50,
                 unused: Sequence[str] = ()) -> SiteLayout:
    """Group S sites by ``grouping`` (``site``, ``file`` or ``kmeans``; see the module docstring).

    Args:
        ids: the S site ids, in site-table order.
        rows, cols: float ``[S]`` coordinates in the grid frame.
        grouping: ``site``, ``file`` or ``kmeans``.
        group_size: K for ``kmeans``.
        groups_file: the ``site_id,group`` CSV for ``file``.
        seed: seeds the k-means start.
        iterations: most Lloyd iterations of ``kmeans``.
        unused: ids of the site table that the data does not use: ``file`` skips their rows.
    """
    ids = [str(i) for i in ids]
    rows, cols = np.asarray(rows, dtype=np.float64), np.asarray(cols, dtype=np.float64)
    if rows.shape != (len(ids),) or cols.shape != (len(ids),):
        raise ValueError(f"rows and cols must be [S={len(ids)}], got {rows.shape} and {cols.shape}")
    if not ids:
        raise ValueError("ids must name at least one site")
    if grouping == "site":
        members = [[s] for s in range(len(ids))]
    elif grouping == "file":
        members = _file_groups(ids, Path(groups_file), set(map(str, unused)))
    elif grouping == "kmeans":
        if group_size < 1:
            raise ValueError(f"group_size must be at least 1, got {group_size}")
        members = _kmeans_groups(np.stack([rows, cols], axis=1), group_size, seed, iterations)
    else:
        raise ValueError(f"grouping must be one of {list(GROUPINGS)}, got {grouping!r}")
    size = max(len(m) for m in members)
    slot_ids = tuple(tuple([ids[s] for s in m] + [None] * (size - len(m))) for m in members)
    slot_rows = np.full((len(members), size), np.nan)
    slot_cols = np.full((len(members), size), np.nan)
    for g, m in enumerate(members):
        slot_rows[g, :len(m)] = rows[m]
        slot_cols[g, :len(m)] = cols[m]
    return SiteLayout(slot_ids, slot_rows, slot_cols)


def id_number(site: str) -> int | None:
    """The number a site id of digits writes (``01022500``, or ``1022500.0`` from a float column), else None."""
    digits = re.fullmatch(r"(\d+)(?:\.0*)?", site)
    return int(digits.group(1)) if digits else None


def _file_groups(ids: list[str], path: Path, unused: set[str]) -> list[list[int]]:
    """Site indices per group from a ``site_id,group`` table (every site of ``ids`` exactly once; rows of
    ``unused`` sites are skipped).

    The table is read as users write it: UTF-8 with or without a byte-order mark, separated by ``,``, ``;``,
    a tab or ``|`` (whichever the header holds), header names in any case and with spaces around them, blank
    lines skipped; messages give the file's line numbers."""
    if not path.is_file():
        raise ValueError(f"groups_file {str(path)!r} does not exist")
    with path.open(newline="", encoding="utf-8-sig") as handle:
        header = handle.readline()
        delimiter = max(",;\t|", key=header.count)
        handle.seek(0)
        reader = csv.reader(handle, delimiter=delimiter)
        columns = [n.strip().lower() for n in next(reader, [])]
        if not {"site_id", "group"} <= set(columns):
            raise ValueError(f"groups_file {str(path)!r} must have the header columns site_id and group, got "
                             f"{columns}")
        site_at, group_at = columns.index("site_id"), columns.index("group")
        known = set(ids)
        labels: dict[str, str] = {}
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            line = reader.line_num
            cells = row + [""] * (len(columns) - len(row))
            site, label = cells[site_at].strip(), cells[group_at].strip()
            if site in unused:
                continue
            if site not in known:
                number = id_number(site)
                same = [s for s in [*ids, *sorted(unused)] if number is not None and id_number(s) == number]
                hint = f" (the site table writes {same} for that number: write the id as it does)" if same else ""
                raise ValueError(f"groups_file {str(path)!r} line {line}: site {site!r} is not in the site table"
                                 f"{hint}")
            if site in labels:
                raise ValueError(f"groups_file {str(path)!r} line {line}: site {site!r} is listed twice")
            if not label:
                raise ValueError(f"groups_file {str(path)!r} line {line}: site {site!r} has an empty group")
            labels[site] = label
    missing = [s for s in ids if s not in labels]
    if missing:
        raise ValueError(f"groups_file {str(path)!r} gives no group to the sites {missing[:10]}"
                         f"{' ...' if len(missing) > 10 else ''}")
    names = sorted(set(labels.values()))
    if all(n.lstrip("-").isdigit() for n in names):
        names.sort(key=int)
    position = {n: g for g, n in enumerate(names)}
    members: list[list[int]] = [[] for _ in names]
    for s, site in enumerate(ids):
        members[position[labels[site]]].append(s)
    return members


def _kmeans_groups(points: np.ndarray, size: int, seed: int, iterations: int) -> list[list[int]]:
    """Capacity-constrained k-means: ceil(S / size) groups of at most ``size`` of the ``points`` ``[S, 2]``.

    Groups come out ordered by their centre (row, then column) and sites inside a group by index, so the
    result depends on the points and the seed only."""
    n = len(points)
    k = -(-n // size)
    rng = np.random.default_rng(seed)
    centres = [points[rng.integers(n)]]
    for _ in range(1, k):  # k-means++ start
        d2 = np.min(((points[:, None, :] - np.array(centres)[None]) ** 2).sum(-1), axis=1)
        total = d2.sum()
        centres.append(points[rng.choice(n, p=d2 / total)] if total > 0 else points[rng.integers(n)])
    centre = np.array(centres, dtype=np.float64)  # [k, 2]
    assign = None
    for _ in range(iterations):
        new = _capacity_assign(points, centre, size)
        if assign is not None and np.array_equal(new, assign):
            break
        assign = new
        centre = np.stack([points[assign == g].mean(axis=0) for g in range(k)])
    order = np.lexsort((centre[:, 1], centre[:, 0]))
    return [np.flatnonzero(assign == g).tolist() for g in order]


def _capacity_assign(points: np.ndarray, centre: np.ndarray, size: int) -> np.ndarray:
    """int ``[S]`` group of each point: site-centre pairs taken nearest first (ties by index), each site to the
    first centre with room; every centre keeps at least one site."""
    n, k = len(points), len(centre)
    d2 = ((points[:, None, :] - centre[None]) ** 2).sum(-1)  # [S, k]
    assign = np.full(n, -1)
    load = np.zeros(k, dtype=np.int64)
    for g in range(k):  # each centre first takes its nearest free point, so no group is empty
        free = np.flatnonzero(assign < 0)
        s = free[np.argmin(d2[free, g])]
        assign[s], load[g] = g, 1
    remaining = n - k
    for flat in np.argsort(d2, axis=None, kind="stable"):
        if remaining == 0:
            break
        s, g = divmod(int(flat), k)
        if assign[s] < 0 and load[g] < size:
            assign[s] = g
            load[g] += 1
            remaining -= 1
    return assign
