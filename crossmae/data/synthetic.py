"""The built-in synthetic water data set: no files needed, deterministic by ``DataConfig.seed``.

Every basin lives on its own ``grid_size × grid_size`` grid of 5 km cells and is simulated day by day;
samples are windows of ``steps`` days cut from each basin's record (``record_days`` long). Notation: basin b,
day t, cell x; ζ₁, ζ₂ are smooth standard-normal random fields of the basin; ε_t is iid N(0, 1) noise.

Generative model
    Basin mask. A 4-connected set of exactly K_b ~ U{basin_patches[0] .. basin_patches[1]} patches of the
    patch grid (``ceil(grid_size / patch_size)²`` patches, partial edge patches included) is grown from one
    patch, each step taking the frontier patch with the best score (smooth field + chosen neighbours +
    Gumbel noise), so outlines are irregular and differ between basins. Inside those patches the outline
    (the grid edge counts as outside) is eroded by a random depth, smooth plus cell-level noise, so the
    boundary is ragged at cell level; a chosen patch that lost all its cells gets its deepest one back.
    Hence exactly K_b patches hold at least one inside cell.

    Terrain. Elevation z(x) = z̄_b + relief_b ζ₁(x) m; orographic factor o(x) = exp(0.25 ζ₁(x));
    soil storage capacity W(x) = W_b exp(0.3 ζ₂(x)) mm.

    Precipitation P (mm/day). N_t ~ Poisson(0.9 s_b (1 + 0.5 cos 2π(t − φ_b)/365)) storms a day, each an
    isotropic Gaussian bump: centre c uniform over the grid and a margin of a quarter grid, radius r
    log-uniform in [0.06, 0.5]·grid_size, depth a ~ Exp(20 mm)·(0.15·grid_size / r)^0.4 (small storms are
    intense). P_t(x) = o(x) Σ_storms a exp(−|x − c|² / 2r²), set to 0 below 0.1 mm.

    Temperature T (°C). T_t(x) = 16 − 0.0065 z(x) + A_b sin 2π(t − 105)/365 + η_t
    + g_t · (x − grid centre)/grid_size − 0.15 min(P_t(x), 20), with the basin anomaly η_t = 0.8 η_{t−1}
    + 1.2 ε_t and a 2-vector gradient g_t = 0.9 g_{t−1} + 0.8 ε_t (°C across the grid).

    Soil moisture θ (m³/m³). Per cell an antecedent-precipitation store that drains faster when warm:
        A_t(x) = exp(−1/τ_t(x)) A_{t−1}(x) + P_t(x),   τ_t(x) = 25 exp(−max(T_t(x), 0)/15) days,
        w_t(x) = 1 − exp(−A_t(x) / W(x))  (relative wetness),   θ_t(x) = 0.05 + 0.40 w_t(x).

    Streamflow Q (mm/day). From the basin means P̄_t, w̄_t over the inside cells: effective rain
    R_t = c_b P̄_t (0.2 + 0.8 w̄_{t−1}) reaches the outlet after a routing lag L_b ∈ {1, 2, 3} days (it
    grows with the basin area: round(√area / 70 km)), split between a quick and a slow linear reservoir:
        S^q_t = a_q S^q_{t−1} + (1 − β_b) R_{t−L_b},   S^s_t = a_s S^s_{t−1} + β_b R_{t−L_b},
        Q_t = ((1 − a_q) S^q_t + (1 − a_s) S^s_t) exp(0.05 ε_t),   a = exp(−1/k), k_q = k_b, k_s = 60 days.
    A storm thus shows as a sharp rise L_b days later and a recession with the basin's own constant k_b:
    the rise is predictable from the precipitation grid, not from the streamflow's own past.

    Evaporation E (mm/day). Follows the basin-mean temperature T̄_t with noise, limited by dry soil and
    damped on rainy days: E_t = 0.2 max(T̄_t + 4, 0) (0.35 + 0.65 w̄_t) (1 − 0.4 min(P̄_t/10, 1)) exp(0.12 ε_t).

    Static attributes (:data:`STATIC_NAMES`, all shape the responses): log10 basin area (km², sets L_b),
    mean elevation (m, shifts T), recession constant k_b (days, 2–12), runoff coefficient c_b (0.2–0.7),
    storminess s_b (0.5–1.5), baseflow index β_b (0.1–0.6) and soil capacity W_b (mm, 20–120), which is
    unknown (NaN) for about a quarter of the basins.

Missing data
    Series gaps: in each basin's record, independently per series, runs of 3–30 days of NaN starting at
    ``series_gap_rate`` gaps per 100 days (Poisson). Missing frames (sensor outages): in each window, a
    fraction drawn uniformly in ``[0, missing_frames]`` of its days has every grid modality entirely NaN;
    the draw depends only on (seed, basin, first day of the window).

Record and determinism
    The simulation starts :data:`SPIN_UP_DAYS` before day 0, so stores are spun up. Random draws come from
    generators keyed by (seed, stream, basin, block of :data:`BLOCK_DAYS` days), so the world does not
    depend on which modalities are requested, and a longer ``record_days`` appends days without changing
    earlier ones. Construction keeps only small things per basin: storms (day, centre, radius, depth),
    daily temperature parameters, basin-mean series and, when soil moisture is requested, the per-cell
    store every :data:`CHECKPOINT_DAYS` days; ``__getitem__`` renders a window's fields from these (soil
    moisture rolled forward from the last checkpoint before the window), with no mutable state.

Splits and normalisation
    Days ``[0, n_train)`` of every basin are the training period and ``[n_train, record_days)`` the
    validation period, ``n_val = round(val_fraction · record_days)``; windows start every ``stride`` days and
    never straddle the boundary. Precipitation and streamflow are transformed with log1p, then every
    modality is standardised per channel with mean/std over the training period only (inside cells of all
    basins for grids, non-gap days for series); static attributes with mean/std over the basins (NaN
    ignored). :meth:`SyntheticWaterDataset.denormalize` undoes both. In ``Sample.grids`` cells outside the
    basin hold 0.0 (finite, carrying no information); missing frames are NaN everywhere.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from crossmae.config import DataConfig
from crossmae.data.normstats import NormStats
from crossmae.data.sample import DatasetSpec, ModalitySpec, Sample, window_key

GRID_NAMES = ("precip", "temperature", "soil_moisture")
SERIES_NAMES = ("streamflow", "evaporation")
STATIC_NAMES = (
    "log10_area_km2", "mean_elevation_m", "recession_days", "runoff_coefficient",
    "storminess", "baseflow_index", "soil_capacity_mm",
)
LOG1P_NAMES = ("precip", "streamflow")  # modalities normalised after a log1p transform

SPIN_UP_DAYS = 128
BLOCK_DAYS = 64
CHECKPOINT_DAYS = 16
CELL_KM = 5.0
SLOW_RECESSION_DAYS = 60.0

# the largest float32 below 0.1: rendered precipitation at or below it is set to 0 (values ≥ float32(0.1) stay)
_BELOW_PRECIP = float(np.nextafter(np.float32(0.1), np.float32(0.0)))

# random streams: each generator is keyed by (seed, stream, basin, ...)
_MASK, _ATTRS, _FIELDS, _STORMS, _WEATHER, _FLOW_NOISE, _EVAP_NOISE, _GAPS, _OUTAGE = range(1, 10)


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([k % (1 << 63) for k in key]))


def _smooth_field(rng: np.random.Generator, size: int, length: float) -> np.ndarray:
    """A smooth, periodic, standard-normal random field ``[size, size]`` with correlation length ``length``."""
    noise = rng.standard_normal((size, size))
    k = np.fft.fftfreq(size)
    k2 = k[:, None] ** 2 + k[None, :] ** 2
    field = np.fft.ifft2(np.fft.fft2(noise) * np.exp(-2.0 * (math.pi * length) ** 2 * k2)).real
    return (field - field.mean()) / max(field.std(), 1e-12)


# -- basin masks -----------------------------------------------------------------------------------
def _grow_patches(rng: np.random.Generator, n: int, count: int) -> np.ndarray:
    """A 4-connected, irregular set of exactly ``count`` patches of an ``n × n`` patch grid: ``[n, n]`` bool."""
    preference = _smooth_field(rng, n, max(n / 4.0, 0.5))  # [n, n]
    chosen = np.zeros((n, n), dtype=bool)
    neighbours = np.zeros((n + 2, n + 2), dtype=np.int64)  # chosen 4-neighbours, with a 1-patch border
    lo, hi = n // 4, n - n // 4
    start = (int(rng.integers(lo, max(hi, lo + 1))), int(rng.integers(lo, max(hi, lo + 1))))
    for step in range(count):
        if step == 0:
            i, j = start
        else:
            score = preference + 0.8 * neighbours[1:-1, 1:-1] + 0.7 * rng.gumbel(size=(n, n))
            score[chosen | (neighbours[1:-1, 1:-1] == 0)] = -np.inf
            i, j = np.unravel_index(int(np.argmax(score)), (n, n))
        chosen[i, j] = True
        for di, dj in ((-1, 0), (1, 0), (0, -1), (0, 1)):
            neighbours[i + 1 + di, j + 1 + dj] += 1
    return chosen


def _depth(cells: np.ndarray, max_depth: int) -> np.ndarray:
    """4-neighbour erosion depth of each cell of ``cells [H, W]`` (1 = on the outline; outside the grid is
    outside), capped at ``max_depth``; 0 outside."""
    depth = np.zeros(cells.shape, dtype=np.int64)
    current = cells.copy()
    for d in range(1, max_depth + 1):
        depth[current] = d
        padded = np.pad(current, 1, constant_values=False)
        current = (current & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:])
        if not current.any():
            break
    return depth


def make_basin_mask(rng: np.random.Generator, grid_size: int, patch_size: int, patches: int) -> np.ndarray:
    """An irregular basin ``[H, W]`` bool whose cells touch exactly ``patches`` patches of the patch grid."""
    n = -(-grid_size // patch_size)
    if not 1 <= patches <= n * n:
        raise ValueError(f"patches must be in [1, {n * n}] for a {grid_size}-cell grid in {patch_size}-cell "
                         f"patches, got {patches}")
    chosen = _grow_patches(rng, n, patches)  # [n, n]
    size = n * patch_size
    cells = np.kron(chosen, np.ones((patch_size, patch_size), dtype=bool))[:grid_size, :grid_size]  # [H, W]
    depth = _depth(cells, patch_size + 2)
    recess = np.clip(0.5 + 0.35 * _smooth_field(rng, grid_size, max(patch_size / 1.5, 1.0)), 0.0, 1.0)  # [H, W]
    threshold = 0.8 * patch_size * recess + 1.5 * rng.random((grid_size, grid_size))  # [H, W]
    inside = cells & (depth > threshold)
    # every chosen patch keeps at least its deepest cell
    margin = np.full((size, size), -np.inf)
    margin[:grid_size, :grid_size] = np.where(cells, depth - threshold, -np.inf)
    padded = np.zeros((size, size), dtype=bool)
    padded[:grid_size, :grid_size] = inside
    per_patch = padded.reshape(n, patch_size, n, patch_size).any(axis=(1, 3))  # [n, n]
    for i, j in zip(*np.nonzero(chosen & ~per_patch), strict=True):
        block = margin[i * patch_size:(i + 1) * patch_size, j * patch_size:(j + 1) * patch_size]
        di, dj = np.unravel_index(int(np.argmax(block)), block.shape)
        inside[i * patch_size + di, j * patch_size + dj] = True
    return inside


def count_valid_patches(mask: np.ndarray, patch_size: int) -> int:
    """Patches of the patch grid (partial edge patches included) holding at least one inside cell."""
    h, w = mask.shape
    rows, cols = -(-h // patch_size), -(-w // patch_size)
    padded = np.zeros((rows * patch_size, cols * patch_size), dtype=bool)
    padded[:h, :w] = mask
    return int(padded.reshape(rows, patch_size, cols, patch_size).any(axis=(1, 3)).sum())


# -- fields -----------------------------------------------------------------------------------------
def _render_precip(storms: dict[str, np.ndarray], day_from: int, day_to: int, oro: np.ndarray) -> np.ndarray:
    """Precipitation ``[day_to − day_from, H, W]`` float32 (mm/day) of internal days [day_from, day_to): the storm
    days' fields (:func:`_render_storm_days`), every other day +0."""
    size = oro.shape[0]
    days, fields = _render_storm_days(storms, day_from, day_to, oro)
    out = np.zeros((day_to - day_from, size, size), dtype=np.float32)  # [L, H, W]
    out[days] = fields
    return out


def _render_storm_days(storms: dict[str, np.ndarray], day_from: int, day_to: int,
                       oro: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The days of internal days [day_from, day_to) with a storm (``[D]`` int64 from ``day_from``, sorted) and their
    precipitation ``[D, H, W]`` float32 (mm/day); every other day's precipitation is +0 everywhere.

    A day's storms are separable bumps, so the day's field is one small matmul: ``gyᵀ [H, S] @ gx [S, W]``,
    batched over the storm days with each day's storms padded to the busiest day's count.
    """
    size = oro.shape[0]
    lo, hi = np.searchsorted(storms["day"], [day_from, day_to])
    if hi == lo:
        return np.zeros(0, dtype=np.int64), np.zeros((0, size, size), dtype=np.float32)
    coord = np.arange(size, dtype=np.float32)
    inv = (-0.5 / storms["radius"][lo:hi] ** 2)[:, None]  # [S, 1]
    gy = np.exp(inv * (coord[None, :] - storms["cy"][lo:hi, None]) ** 2)  # [S, H]
    gx = np.exp(inv * (coord[None, :] - storms["cx"][lo:hi, None]) ** 2) * storms["depth"][lo:hi, None]  # [S, W]
    day = storms["day"][lo:hi] - day_from  # [S], sorted
    first = np.flatnonzero(np.r_[True, day[1:] != day[:-1]])  # first storm of each storm day
    per_day = np.diff(np.r_[first, day.size])  # [D] storms of each storm day
    slot = np.arange(day.size) - np.repeat(first, per_day)  # rank within its day
    rank = np.repeat(np.arange(first.size), per_day)  # [S] its day among the storm days
    gy_days = np.zeros((first.size, int(slot.max()) + 1, size), dtype=np.float32)  # [D, S_max, H]
    gx_days = np.zeros_like(gy_days)  # [D, S_max, W]
    gy_days[rank, slot] = gy
    gx_days[rank, slot] = gx
    fields = np.matmul(gy_days.transpose(0, 2, 1), gx_days)  # [D, H, W]
    fields *= oro
    torch.nn.functional.threshold_(torch.from_numpy(fields), _BELOW_PRECIP, 0.0)  # below 0.1 mm → +0
    return day[first].astype(np.int64), fields


def _storm_days(storms: dict[str, np.ndarray], day_from: int, day_to: int) -> np.ndarray:
    """The days of internal days [day_from, day_to) with a storm, sorted, as indices from ``day_from`` (the days
    :func:`_render_storm_days` renders)."""
    lo, hi = np.searchsorted(storms["day"], [day_from, day_to])
    return np.unique(storms["day"][lo:hi]).astype(np.int64) - day_from


def _render_temperature(base: np.ndarray, daily: np.ndarray, precip: np.ndarray, coord: np.ndarray) -> np.ndarray:
    """Temperature ``[..., L, H, W]`` float32 (°C).

    Args:
        base: ``[..., H, W]`` 16 − 0.0065 z(x).
        daily: ``[..., L, 3]`` per day: seasonal cycle + anomaly, gradient along rows, along columns.
        precip: ``[..., L, H, W]``.
        coord: ``[H]`` (cell − centre) / grid_size.
    """
    temp = np.minimum(precip, np.float32(20.0))  # [..., L, H, W]
    temp *= np.float32(-0.15)
    temp += base[..., None, :, :]
    temp += (daily[..., 0, None, None] + daily[..., 1, None, None] * coord[:, None]
             + daily[..., 2, None, None] * coord[None, :])  # [..., L, H, W]
    return temp


def _soil_decay(temp: np.ndarray) -> np.ndarray:
    """Daily retention exp(−1/τ) of the soil store, τ = 25 exp(−max(T, 0)/15) days (elementwise)."""
    return np.exp(np.exp(np.maximum(temp, np.float32(0.0)) * np.float32(1.0 / 15.0)) * np.float32(-1.0 / 25.0))


def _soil_stores(store: np.ndarray, decay: np.ndarray, precip: np.ndarray) -> np.ndarray:
    """The store after each day: ``A_t = decay_t A_{t−1} + P_t`` from ``store [..., H, W]``; days on axis −3."""
    out = np.empty_like(precip)  # [..., L, H, W]
    for d in range(precip.shape[-3]):
        store = decay[..., d, :, :] * store + precip[..., d, :, :]
        out[..., d, :, :] = store
    return out


def _wetness(stores: np.ndarray, capacity: np.ndarray) -> np.ndarray:
    """Relative wetness ``w = 1 − exp(−A/W)``; ``capacity [..., H, W]`` broadcast over the days axis."""
    return -np.expm1(-stores / capacity[..., None, :, :])


class SyntheticWaterDataset(torch.utils.data.Dataset):
    """Windows of the synthetic water world (see the module docstring for the generative model).

    Args:
        config: ``data`` section; everything derives from ``config.seed`` and ``config.synthetic``.
        split: ``train`` or ``val`` (the last ``val_fraction`` of every basin's record).
        norm_stats: statistics from the training split (``dataset.norm_stats`` or ``dataset.stats``); None
            computes them from the training period of this config (never from validation days).

    Attributes:
        spec: grid modalities in config order, then series in config order; ``static_dim``.
        norm_stats: JSON-serialisable ``{"modalities": {name: {"transform", "mean", "std"}},
            "static": {"names", "mean", "std"}}``.
        stats: the same as a :class:`crossmae.data.normstats.NormStats` (normalize, denormalize).
        basin_masks: ``[num_basins, H, W]`` bool.
        static_raw: ``[num_basins, S]`` float32 attributes in physical units (NaN = unknown).
        records: physical daily basin series ``[num_basins, record_days]`` float64 for evaluation:
            ``precip``, ``temperature``, ``soil_moisture`` (basin means of the fields), ``streamflow``,
            ``evaporation`` (with their gaps as NaN).
        n_train: days in the training period.
        starts: ``[(basin, first day)]`` of this split's windows, in index order.
    """

    def __init__(self, config: DataConfig, split: str = "train", norm_stats: dict | NormStats | None = None):
        syn = config.synthetic
        for key, names, allowed in (("grids", syn.grids, GRID_NAMES), ("series", syn.series, SERIES_NAMES)):
            unknown = [n for n in names if n not in allowed]
            if unknown or len(set(names)) != len(names):
                raise ValueError(f"data.synthetic.{key} must be distinct names from {list(allowed)}, got {names}")
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        for key, value, ok in (
            ("data.steps", config.steps, config.steps >= 1), ("data.stride", config.stride, config.stride >= 1),
            ("data.patch_size", config.patch_size, config.patch_size >= 1),
            ("data.val_fraction", config.val_fraction, 0.0 <= config.val_fraction < 1.0),
            ("data.synthetic.num_basins", syn.num_basins, syn.num_basins >= 1),
            ("data.synthetic.record_days", syn.record_days, syn.record_days >= 1),
            ("data.synthetic.grid_size", syn.grid_size, syn.grid_size >= 1),
            ("data.synthetic.missing_frames", syn.missing_frames, 0.0 <= syn.missing_frames < 1.0),
            ("data.synthetic.series_gap_rate", syn.series_gap_rate, syn.series_gap_rate >= 0.0),
        ):
            if not ok:
                raise ValueError(f"{key} is out of range: {value}")
        n_patch = -(-syn.grid_size // config.patch_size)
        bp = list(syn.basin_patches)
        if len(bp) != 2 or not 1 <= bp[0] <= bp[1] <= n_patch**2:
            raise ValueError(f"data.synthetic.basin_patches must be [min, max] with 1 <= min <= max <= "
                             f"{n_patch**2}, got {syn.basin_patches}")

        self.config = config
        self.split = split
        self.seed = int(config.seed)
        self.steps = config.steps
        self.grid_names = tuple(syn.grids)
        self.series_names = tuple(syn.series)
        self.num_basins = syn.num_basins
        self.size = syn.grid_size
        self.record_days = syn.record_days
        self.missing_frames = float(syn.missing_frames)
        n_val = int(round(config.val_fraction * syn.record_days))
        self.n_train = syn.record_days - n_val
        self.spec = DatasetSpec(
            modalities=tuple(ModalitySpec(n, "grid", 1, syn.grid_size, syn.grid_size) for n in self.grid_names)
            + tuple(ModalitySpec(n, "series", 1) for n in self.series_names),
            static_dim=len(STATIC_NAMES) if syn.static else 0,
        )
        self._coord = ((np.arange(self.size) + 0.5) / self.size - 0.5).astype(np.float32)  # [H]

        self._build_basins(config.patch_size, syn.basin_patches)
        self._build_weather()
        train_stats = self._simulate()
        self.stats = NormStats.coerce(norm_stats if norm_stats is not None else train_stats,
                                      {m.name: m.kind for m in self.spec.modalities})
        self.stats.check({m.name: (m.kind, m.channels) for m in self.spec.modalities})
        if self.spec.static_dim and len(self.stats.static_mean) != self.spec.static_dim:
            raise ValueError(f"norm_stats['static'] must hold {self.spec.static_dim} mean and std values")
        self.norm_stats = self.stats.to_dict()
        self._normalise_series_and_static()

        first, last = (0, self.n_train) if split == "train" else (self.n_train, self.record_days)
        window_starts = range(first, last - self.steps + 1, config.stride)
        self.starts = [(b, s) for b in range(self.num_basins) for s in window_starts]
        self._mask_tensors = [torch.from_numpy(m.copy()) for m in self.basin_masks]

    # -- construction ---------------------------------------------------------------------------
    def _build_basins(self, patch_size: int, basin_patches: list[int]) -> None:
        """Per basin: its mask, hidden parameters, static attributes and terrain fields."""
        nb, g = self.num_basins, self.size
        self.basin_masks = np.zeros((nb, g, g), dtype=bool)
        self.static_raw = np.zeros((nb, len(STATIC_NAMES)), dtype=np.float32)
        self._oro = np.zeros((nb, g, g), dtype=np.float32)
        self._temp_base = np.zeros((nb, g, g), dtype=np.float32)
        self._capacity = np.zeros((nb, g, g), dtype=np.float32)
        self._params = []
        for b in range(nb):
            rng = _rng(self.seed, _MASK, b)
            count = int(rng.integers(basin_patches[0], basin_patches[1] + 1))
            self.basin_masks[b] = mask = make_basin_mask(rng, g, patch_size, count)

            rng = _rng(self.seed, _ATTRS, b)
            p = {
                "elevation": rng.uniform(200.0, 2500.0), "relief": rng.uniform(100.0, 600.0),
                "recession": math.exp(rng.uniform(math.log(2.0), math.log(12.0))),
                "runoff": rng.uniform(0.2, 0.7), "storminess": rng.uniform(0.5, 1.5),
                "baseflow": rng.uniform(0.1, 0.6), "capacity": rng.uniform(20.0, 120.0),
                "capacity_known": rng.random() >= 0.25, "amplitude": rng.uniform(6.0, 14.0),
                "storm_phase": rng.uniform(0.0, 365.0),
            }
            rng = _rng(self.seed, _FIELDS, b)
            zeta1 = _smooth_field(rng, g, g / 6.0)  # [H, W]
            zeta2 = _smooth_field(rng, g, g / 5.0)  # [H, W]
            elevation = p["elevation"] + p["relief"] * zeta1  # [H, W]
            self._oro[b] = np.exp(0.25 * zeta1)
            self._temp_base[b] = 16.0 - 0.0065 * elevation
            self._capacity[b] = p["capacity"] * np.exp(0.3 * zeta2)
            area = float(mask.sum()) * CELL_KM**2
            p["lag"] = int(min(max(round(math.sqrt(area) / 70.0), 1), 3))
            self.static_raw[b] = [
                math.log10(area), float(elevation[mask].mean()), p["recession"], p["runoff"],
                p["storminess"], p["baseflow"], p["capacity"] if p["capacity_known"] else math.nan,
            ]
            self._params.append(p)

    def _build_weather(self) -> None:
        """Storms and daily temperature parameters of every internal day, block by block."""
        nb, g = self.num_basins, self.size
        self._days = SPIN_UP_DAYS + self.record_days  # internal days; user day u is internal u + SPIN_UP_DAYS
        n_blocks = -(-self._days // BLOCK_DAYS)
        self._storms = []
        self._temp_daily = np.zeros((nb, self._days, 3), dtype=np.float32)  # [B, I, 3]
        shock = np.zeros((nb, self._days, 3))  # [B, I, 3]
        for b in range(nb):
            p = self._params[b]
            parts = []
            for block in range(n_blocks):
                day = np.arange(block * BLOCK_DAYS, (block + 1) * BLOCK_DAYS)  # whole blocks: prefix-stable
                t = day - SPIN_UP_DAYS
                rng = _rng(self.seed, _STORMS, b, block)
                rate = 0.9 * p["storminess"] * (1.0 + 0.5 * np.cos(2.0 * math.pi * (t - p["storm_phase"]) / 365.0))
                sday = np.repeat(day, rng.poisson(rate))
                n = sday.size
                radius = g * np.exp(rng.uniform(math.log(0.06), math.log(0.5), n))
                parts.append({
                    "day": sday,
                    "cy": rng.uniform(-0.25 * g, 1.25 * g, n), "cx": rng.uniform(-0.25 * g, 1.25 * g, n),
                    "radius": radius,
                    "depth": rng.exponential(20.0, n) * (0.15 * g / radius) ** 0.4,
                })
            keep = np.concatenate([q["day"] for q in parts]) < self._days
            self._storms.append({
                k: np.concatenate([q[k] for q in parts])[keep].astype(np.int64 if k == "day" else np.float32)
                for k in parts[0]
            })
            shock[b] = self._block_normals(_WEATHER, b, 3)  # [I, 3]
        state = np.zeros((nb, 3))
        decay, scale = np.array([0.8, 0.9, 0.9]), np.array([1.2, 0.8, 0.8])
        for i in range(self._days):
            state = decay * state + scale * shock[:, i]
            self._temp_daily[:, i] = state
        t = np.arange(self._days) - SPIN_UP_DAYS
        amplitude = np.array([p["amplitude"] for p in self._params])[:, None]  # [B, 1]
        self._temp_daily[:, :, 0] += amplitude * np.sin(2.0 * math.pi * (t - 105.0) / 365.0)

    def _block_normals(self, stream: int, basin: int, *tail: int) -> np.ndarray:
        """Standard normals ``[I, *tail]``, one per internal day, drawn block by block (prefix-stable)."""
        blocks = range(-(-self._days // BLOCK_DAYS))
        return np.concatenate([_rng(self.seed, stream, basin, k).standard_normal((BLOCK_DAYS, *tail))
                               for k in blocks])[:self._days]

    def _simulate(self) -> dict:
        """Runs every basin through the record: basin-mean series, soil checkpoints, training statistics."""
        nb, g, days = self.num_basins, self.size, self._days
        inside = self.basin_masks.reshape(nb, g * g).astype(np.float32)  # [B, H·W]
        weights = inside / inside.sum(axis=1, keepdims=True)  # [B, H·W, 1]
        keep_soil = "soil_moisture" in self.grid_names
        n_ckpt = -(-days // CHECKPOINT_DAYS)
        self._soil_ckpt = np.zeros((nb, n_ckpt, g, g), dtype=np.float32) if keep_soil else None
        means = {k: np.zeros((nb, days)) for k in ("precip", "temperature", "wetness")}
        sums = {k: np.zeros(3) for k in GRID_NAMES}  # count, sum, sum of squares (training period)
        store = np.zeros((nb, g, g), dtype=np.float32)  # [B, H, W]
        for d0 in range(0, days, BLOCK_DAYS):
            d1 = min(d0 + BLOCK_DAYS, days)
            precip = np.stack([_render_precip(self._storms[b], d0, d1, self._oro[b])
                               for b in range(nb)])  # [B, L, H, W]
            temp = _render_temperature(self._temp_base, self._temp_daily[:, d0:d1], precip, self._coord)
            stores = _soil_stores(store, _soil_decay(temp), precip)  # [B, L, H, W]
            if keep_soil:
                for d in range(d0 + (-d0) % CHECKPOINT_DAYS, d1, CHECKPOINT_DAYS):
                    self._soil_ckpt[:, d // CHECKPOINT_DAYS] = stores[:, d - d0 - 1] if d > d0 else store
            store = stores[:, -1]
            wet = _wetness(stores, self._capacity)  # [B, L, H, W]
            for key, field in (("precip", precip), ("temperature", temp), ("wetness", wet)):
                means[key][:, d0:d1] = np.einsum("blk,bk->bl", field.reshape(nb, d1 - d0, g * g), weights)
            t0, t1 = max(d0, SPIN_UP_DAYS) - d0, min(d1, SPIN_UP_DAYS + self.n_train) - d0
            if t1 > t0:
                physical = {"precip": precip, "temperature": temp, "soil_moisture": wet}
                for name in self.grid_names:
                    field = physical[name][:, t0:t1].reshape(nb, t1 - t0, g * g)  # [B, L', H·W]
                    field = 0.05 + 0.40 * field if name == "soil_moisture" else field
                    field = np.log1p(field) if name in LOG1P_NAMES else field
                    s1 = np.einsum("blk,bk->bl", field, inside).sum(dtype=np.float64)
                    s2 = np.einsum("blk,bk->bl", field * field, inside).sum(dtype=np.float64)
                    sums[name] += [float(inside.sum()) * (t1 - t0), s1, s2]

        flow, evap = self._responses(means)
        user = slice(SPIN_UP_DAYS, days)
        self.records = {
            "precip": means["precip"][:, user], "temperature": means["temperature"][:, user],
            "soil_moisture": 0.05 + 0.40 * means["wetness"][:, user],
            "streamflow": flow[:, user], "evaporation": evap[:, user],
        }
        for name in SERIES_NAMES:
            self.records[name][self._gaps(name)] = np.nan

        stats = {"modalities": {}, "static": {"names": list(STATIC_NAMES)}}
        for name in self.grid_names:
            count, s1, s2 = sums[name]
            stats["modalities"][name] = self._moments(name, count, s1, s2)
        for name in self.series_names:
            x = self.records[name][:, :self.n_train]
            x = x[np.isfinite(x)]
            x = np.log1p(x) if name in LOG1P_NAMES else x
            stats["modalities"][name] = self._moments(name, x.size, x.sum(), (x**2).sum())
        mean, std = [], []
        for col in self.static_raw.T.astype(np.float64):
            col = col[np.isfinite(col)]
            mean.append(float(col.mean()) if col.size else 0.0)
            std.append(float(col.std()) if col.size > 1 and col.std() > 1e-6 else 1.0)
        stats["static"]["mean"], stats["static"]["std"] = mean, std
        return stats

    @staticmethod
    def _moments(name: str, count: float, s1: float, s2: float) -> dict:
        mean = s1 / count if count else 0.0
        var = s2 / count - mean**2 if count else 1.0
        std = math.sqrt(var) if var > 1e-12 else 1.0
        return {"transform": "log1p" if name in LOG1P_NAMES else "none", "mean": [float(mean)], "std": [float(std)]}

    def _responses(self, means: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Streamflow and evaporation ``[B, I]`` (mm/day) of every internal day from the basin means."""
        nb, days = self.num_basins, self._days
        prev_wet = np.concatenate([means["wetness"][:, :1], means["wetness"][:, :-1]], axis=1)  # [B, I]
        runoff = np.array([p["runoff"] for p in self._params])[:, None]
        rain = runoff * means["precip"] * (0.2 + 0.8 * prev_wet)  # [B, I] effective rain
        lag = np.array([p["lag"] for p in self._params])
        routed = np.zeros((nb, days))
        for b in range(nb):
            routed[b, lag[b]:] = rain[b, :days - lag[b]]
        base = np.array([p["baseflow"] for p in self._params])
        a_quick = np.exp(-1.0 / np.array([p["recession"] for p in self._params]))
        a_slow = math.exp(-1.0 / SLOW_RECESSION_DAYS)
        quick, slow = np.zeros(nb), np.zeros(nb)
        flow = np.zeros((nb, days))
        for i in range(days):
            quick = a_quick * quick + (1.0 - base) * routed[:, i]
            slow = a_slow * slow + base * routed[:, i]
            flow[:, i] = (1.0 - a_quick) * quick + (1.0 - a_slow) * slow
        flow_noise = np.stack([self._block_normals(_FLOW_NOISE, b) for b in range(nb)])  # [B, I]
        evap_noise = np.stack([self._block_normals(_EVAP_NOISE, b) for b in range(nb)])  # [B, I]
        flow = flow * np.exp(0.05 * flow_noise)
        evap = (0.2 * np.maximum(means["temperature"] + 4.0, 0.0) * (0.35 + 0.65 * means["wetness"])
                * (1.0 - 0.4 * np.minimum(means["precip"] / 10.0, 1.0)) * np.exp(0.12 * evap_noise))
        return flow, evap

    def _gaps(self, name: str) -> np.ndarray:
        """``[B, record_days]`` bool, True inside a gap of series ``name`` (fixed in the record).

        Gap starts and lengths are drawn per block of days; a gap that would start inside or right after
        an earlier gap is dropped, so every gap is a separate run of 3–30 days (cut short only by the end
        of the record).
        """
        n_days = self.record_days
        rate = self.config.synthetic.series_gap_rate / 100.0
        gaps = np.zeros((self.num_basins, n_days), dtype=bool)
        if rate <= 0:
            return gaps
        sid = SERIES_NAMES.index(name)
        for b in range(self.num_basins):
            free_from = 0  # first day a new gap may start
            for block in range(-(-n_days // BLOCK_DAYS)):
                rng = _rng(self.seed, _GAPS, sid, b, block)
                count = rng.poisson(rate * BLOCK_DAYS)
                starts = np.sort(rng.integers(block * BLOCK_DAYS, (block + 1) * BLOCK_DAYS, count))
                lengths = rng.integers(3, 31, count)
                for start, length in zip(starts, lengths, strict=True):
                    if start >= free_from and start < n_days:
                        gaps[b, start:start + length] = True
                        free_from = start + length + 1
        return gaps

    def _normalise_series_and_static(self) -> None:
        """Standardised series ``[B, record_days]`` and static attributes ``[B, S]``, kept for ``__getitem__``."""
        self._series = {}
        for name in self.series_names:
            x = self.records[name]
            x = np.log1p(x) if self.stats.modalities[name].transforms[0] == "log1p" else x
            self._series[name] = self._standardise(name, x).astype(np.float32)  # [B, record_days]
        self._static = None
        if self.spec.static_dim:
            self._static = ((self.static_raw - np.asarray(self.stats.static_mean))
                            / np.asarray(self.stats.static_std)).astype(np.float32)

    def _standardise(self, name: str, x: np.ndarray) -> np.ndarray:
        entry = self.stats.modalities[name]
        return (x - np.asarray(entry.mean[0], x.dtype)) * np.asarray(1.0 / entry.std[0], x.dtype)

    # -- samples ----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, key: int | tuple[int, int]) -> Sample:
        index, noise_seed = window_key(key, len(self))
        basin, start = self.starts[index]
        # precipitation alone (no field made from it requested): only its storm days are rendered
        fields = {} if self.grid_names == ("precip",) else self.render_window(basin, start)
        outage = self._outage_days(basin, start)
        sample = Sample(noise_seed=noise_seed, first_day=start,  # the record starts on 1970-01-01
                        meta={"basin": basin, "start": start, "split": self.split, "index": index})
        for name in self.grid_names:
            if name == "precip":
                x = self._precip_window(basin, start, fields.get(name))  # [T, H, W]
            else:
                x = fields[name]  # [T, H, W], a new array of this call: transformed in place
                self._normalise_grid(name, x, basin)
            x[outage] = np.nan
            sample.grids[name] = torch.from_numpy(x[:, None])  # [T, 1, H, W]
            sample.basin_masks[name] = self._mask_tensors[basin]
        for name in self.series_names:
            sample.series[name] = torch.from_numpy(self._series[name][basin, start:start + self.steps, None].copy())
        if self._static is not None:
            sample.static = torch.from_numpy(self._static[basin].copy())  # [S]
        return sample

    def _precip_window(self, basin: int, start: int, physical: np.ndarray | None) -> np.ndarray:
        """Normalised precipitation ``[T, H, W]`` of the window of ``basin`` from ``start``: the storm days
        normalised, every other day (+0 mm everywhere) one normalised plane. ``physical``: the window's
        precipitation ``[T, H, W]`` (mm/day) already rendered, normalised in place; None renders the storm days."""
        i0 = start + SPIN_UP_DAYS
        if physical is None:
            days, stormy = _render_storm_days(self._storms[basin], i0, i0 + self.steps, self._oro[basin])
            out = np.empty((self.steps, *stormy.shape[1:]), dtype=np.float32)  # [T, H, W]
        else:
            days, out = _storm_days(self._storms[basin], i0, i0 + self.steps), physical
            stormy = out[days]  # [D, H, W]
        if days.size == self.steps:
            self._normalise_grid("precip", stormy, basin)
            return stormy
        dry = np.zeros((1, *out.shape[1:]), dtype=out.dtype)  # [1, H, W]
        self._normalise_grid("precip", dry, basin)
        self._normalise_grid("precip", stormy, basin)
        is_dry = np.ones(self.steps, dtype=bool)
        is_dry[days] = False
        out[is_dry] = dry
        out[days] = stormy
        return out

    def _normalise_grid(self, name: str, x: np.ndarray, basin: int) -> None:
        """Grid modality ``name``'s days ``x [..., H, W]`` (physical units) transformed, standardised and multiplied by
        ``basin``'s mask, in place (as :meth:`_standardise`, without new arrays)."""
        entry = self.stats.modalities[name]
        if entry.transforms[0] == "log1p":
            np.log1p(x, out=x)
        np.subtract(x, np.asarray(entry.mean[0], x.dtype), out=x)
        np.multiply(x, np.asarray(1.0 / entry.std[0], x.dtype), out=x)
        torch.from_numpy(x).mul_(self._mask_tensors[basin])

    def render_window(self, basin: int, start: int, days: int | None = None) -> dict[str, np.ndarray]:
        """The requested grid modalities of days [start, start + days) in physical units: name → ``[T, H, W]``."""
        days = self.steps if days is None else days
        if not self.grid_names:
            return {}
        i0 = start + SPIN_UP_DAYS
        i1 = i0 + days
        soil = "soil_moisture" in self.grid_names
        first = (i0 // CHECKPOINT_DAYS) * CHECKPOINT_DAYS if soil else i0
        precip = _render_precip(self._storms[basin], first, i1, self._oro[basin])  # [L, H, W]
        out = {"precip": precip[i0 - first:]}
        if "temperature" in self.grid_names or soil:
            temp = _render_temperature(self._temp_base[basin], self._temp_daily[basin, first:i1], precip,
                                       self._coord)  # [L, H, W]
            out["temperature"] = temp[i0 - first:]
        if soil:
            store = self._soil_ckpt[basin, first // CHECKPOINT_DAYS]  # [H, W]
            stores = _soil_stores(store, _soil_decay(temp), precip)[i0 - first:]  # [T, H, W]
            out["soil_moisture"] = 0.05 + 0.40 * _wetness(stores, self._capacity[basin])
        return {name: out[name] for name in self.grid_names}

    def _outage_days(self, basin: int, start: int) -> np.ndarray:
        """Day indices (within the window) whose grids are entirely missing."""
        if self.missing_frames <= 0:
            return np.zeros(0, dtype=np.int64)
        rng = _rng(self.seed, _OUTAGE, basin, start)
        count = int(round(rng.uniform(0.0, self.missing_frames) * self.steps))
        return np.sort(rng.choice(self.steps, count, replace=False))

    def denormalize(self, name: str, values: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
        """Normalised values of modality ``name`` (grid ``[..., C, H, W]``, series ``[..., F]``) or ``static``
        (``[..., S]``) → physical units (:meth:`crossmae.data.normstats.NormStats.denormalize`)."""
        return self.stats.denormalize(name, values)
