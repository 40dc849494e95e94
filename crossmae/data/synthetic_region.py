"""The built-in synthetic region: grids over one region and hundreds of gauges inside it, deterministic by seed.

Two sizes (:data:`SHAPES`): ``full``, the seed's national setting (a 290 × 180 grid of 1 km cells whose land
touches 94 of the 522 10 × 10-cell patches; 604 gauges; 41 years, 1979–2019) and ``small``, a CPU-sized variant
for tests (60 × 40 cells, 14 land patches of 24; 40 gauges; 3 years). Notation: cell x, day t, site s; ζ are
smooth standard-normal random fields of the region, ε_t iid N(0, 1) noise.

Generative model
    Land. A 4-connected set of exactly ``land_patches`` patches of the patch grid, grown from one patch (a
    smooth preference field + chosen neighbours + Gumbel noise); inside it the coast is eroded at cell level by
    a random depth (smooth plus cell noise); a chosen patch that lost all its cells gets its deepest one back,
    so exactly ``land_patches`` patches hold land. Elevation z(x) = max(0, 40 + 12 d(x) + 180 ζ₁(x)) m, d the
    distance to the coast in cells (capped at 30); orographic factor o(x) = exp(0.2 ζ₁(x)); soil capacity
    W(x) = 60 exp(0.35 ζ₂(x)) mm. Georeference: 1 km cells, row 0 at 58° N, column 0 at 5° W.

    Precipitation P (mm/day). N_t ~ Poisson(2.5 (1 + 0.4 cos 2π(t − 15)/365)) storms a day, each an isotropic
    Gaussian bump with centre uniform over the grid and a margin of 0.15√(H·W), radius r log-uniform in
    [0.03, 0.25]·√(H·W) cells, depth a ~ Exp(30 mm)·(0.08√(HW) / r)^0.4. P_t(x) = o(x) Σ a
    exp(−|x − c|² / 2r²), 0 below 0.1 mm.

    Temperature T (°C). T_t(x) = 11 − 0.0065 z(x) + 7 sin 2π(t − 105)/365 + η_t + g_t · (x − centre)/√(HW),
    η_t = 0.8 η_{t−1} + 1.2 ε_t, g_t = 0.9 g_{t−1} + 0.8 ε_t (a 2-vector, °C across the region).

    Soil moisture θ (m³/m³). A_t(x) = exp(−1/τ_t(x)) A_{t−1}(x) + P_t(x), τ_t = 25 exp(−max(T_t, 0)/15) days,
    w_t = 1 − exp(−A_t / W(x)), θ_t = 0.05 + 0.40 w_t.

    Sites. Each gauge drains a catchment: the land cells within radius √(area/π) of a centre set back from the
    gauge (its outlet, a land cell), area log-uniform in ``area_km2``; the outlet cell always belongs to it.
    P̄, w̄ are catchment means of P and w, T̄ the catchment mean of T. Attributes (:data:`ATTRIBUTES`, 11):
    latitude, longitude, gauge altitude (m), catchment mean elevation (m), log10 area (km²), relief (std of
    elevation, m), mean precipitation of the record (mm/day), soil capacity (mean W, mm), forest, permeability
    and urban fractions (catchment means of smooth fields in [0, 1]). They set each site's response:
        runoff coefficient c_s = clip(0.22 + 0.35 urban + 0.25 (1 − W̄/120) − 0.15 forest, 0.08, 0.85),
        baseflow index β_s = 0.08 + 0.55 permeability,
        unit-hydrograph time constant k_s = clip((0.5 + √area / 12)(1 + 0.6 forest) / (1 + relief / 150), 0.4, 12)
            days: the quick response is a gamma unit hydrograph of shape 2 and scale k_s,
        R_t = c_s P̄_t (0.2 + 0.8 w̄_{t−1}),  Q_t = ((1 − β_s) h_{k_s} ∗ R + β_s h_slow ∗ R)_t exp(0.05 ε_t) (mm/day),
            h_slow a linear reservoir of 60 days;
        E_t = 0.2 max(T̄_t + 4, 0)(0.35 + 0.65 w̄_t)(1 − 0.4 min(P̄_t / 10, 1)) exp(0.12 ε_t) (mm/day).

Missing data
    Each site's record: 25 % of sites open in a random later year, 15 % close in a random earlier one (no data
    outside, so whole windows without a site occur); gaps of 3–60 days of NaN at 0.4 (riverflow) and 1.0
    (evaporation) per 100 days (Poisson). Grids are complete.

Record and memory
    The simulation starts :data:`SPIN_UP_DAYS` before the first day. Construction sweeps the record once, in
    blocks, keeping only: storms (day, centre, radius, depth), the daily temperature parameters, the soil store
    of every land cell every :data:`CHECKPOINT_DAYS` days, the sites' daily values (float32 ``[days, S, 2]``)
    and the grids' training-period moments. A window's grids are rendered from these on request (soil moisture
    rolled forward from the last checkpoint). :attr:`SyntheticRegion.nbytes` is the world's size in memory.

Splits: the periods of :data:`SHAPES` (full: train 1979–2008, val 2009–2013, test 2014–2019), unless
``data.region.split`` sets others. Transforms: log1p for precipitation and riverflow.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from crossmae.config import GroupingConfig, RegionConfig
from crossmae.data.readers import iso_to_day

GRID_NAMES = ("precip", "temperature", "soil_moisture")
GRID_TRANSFORMS = {"precip": "log1p", "temperature": "none", "soil_moisture": "none"}
SITE_SET = "gauges"
VARIABLES = ("riverflow", "evaporation")
VARIABLE_TRANSFORMS = ("log1p", "none")
ATTRIBUTES = ("lat", "lon", "altitude_m", "mean_elevation_m", "log10_area_km2", "relief_m", "mean_precip_mm",
              "soil_capacity_mm", "forest", "permeability", "urban")
SPIN_UP_DAYS = 365
CHECKPOINT_DAYS = 32
BLOCK_DAYS = 256
SLOW_DAYS = 60.0
KERNEL_DAYS = 365
SITE_CHUNK = 64
LAT0, LON0, KM_PER_DEGREE = 58.0, -5.0, 111.2

# random streams
_LAND, _FIELDS, _STORMS, _WEATHER, _SITES, _NOISE, _GAPS = range(1, 8)


@dataclass(frozen=True)
class RegionShape:
    """A synthetic region's size: grid cells, land patches, gauges, record and split periods (ISO dates)."""

    height: int
    width: int
    patch: int
    land_patches: int
    sites: int
    area_km2: tuple[float, float]
    storms_per_day: float
    first: str
    last: str
    train: tuple[str, str]
    val: tuple[str, str]
    test: tuple[str, str]


SHAPES = {
    "full": RegionShape(290, 180, 10, 94, 604, (8.0, 1500.0), 2.5, "1979-01-01", "2019-12-31",
                        ("1979-01-01", "2008-12-31"), ("2009-01-01", "2013-12-31"), ("2014-01-01", "2019-12-31")),
    "small": RegionShape(60, 40, 10, 14, 40, (4.0, 250.0), 2.5, "2000-01-01", "2002-12-31",
                         ("2000-01-01", "2001-06-30"), ("2001-07-01", "2001-12-31"), ("2002-01-01", "2002-12-31")),
}


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([k % (1 << 63) for k in key]))


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], length: float) -> np.ndarray:
    """A smooth standard-normal random field ``shape`` with correlation length ``length`` cells."""
    noise = rng.standard_normal(shape)
    ky, kx = np.fft.fftfreq(shape[0]), np.fft.fftfreq(shape[1])
    k2 = ky[:, None] ** 2 + kx[None, :] ** 2
    field = np.fft.ifft2(np.fft.fft2(noise) * np.exp(-2.0 * (math.pi * length) ** 2 * k2)).real
    return (field - field.mean()) / max(field.std(), 1e-12)


def _grow_patches(rng: np.random.Generator, shape: tuple[int, int], count: int) -> np.ndarray:
    """A 4-connected, irregular set of exactly ``count`` patches of a patch grid ``shape``: bool ``shape``."""
    preference = _smooth_field(rng, shape, max(min(shape) / 4.0, 0.5))
    chosen = np.zeros(shape, dtype=bool)
    neighbours = np.zeros((shape[0] + 2, shape[1] + 2), dtype=np.int64)
    for step in range(count):
        if step == 0:
            i, j = shape[0] // 2, shape[1] // 2
        else:
            score = preference + 0.8 * neighbours[1:-1, 1:-1] + 0.7 * rng.gumbel(size=shape)
            score[chosen | (neighbours[1:-1, 1:-1] == 0)] = -np.inf
            i, j = np.unravel_index(int(np.argmax(score)), shape)
        chosen[i, j] = True
        for di, dj in ((-1, 0), (1, 0), (0, -1), (0, 1)):
            neighbours[i + 1 + di, j + 1 + dj] += 1
    return chosen


def _coast_distance(cells: np.ndarray, cap: int) -> np.ndarray:
    """4-neighbour erosion depth of each cell of ``cells [H, W]`` (1 = on the coast), capped at ``cap``; 0 at sea."""
    depth = np.zeros(cells.shape, dtype=np.int64)
    current = cells.copy()
    for d in range(1, cap + 1):
        depth[current] = d
        padded = np.pad(current, 1, constant_values=False)
        current = current & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
        if not current.any():
            break
    return depth


def make_land_mask(rng: np.random.Generator, shape: RegionShape) -> np.ndarray:
    """Land ``[H, W]`` bool whose cells touch exactly ``shape.land_patches`` patches."""
    p = shape.patch
    grid = (-(-shape.height // p), -(-shape.width // p))
    chosen = _grow_patches(rng, grid, shape.land_patches)
    cells = np.kron(chosen, np.ones((p, p), dtype=bool))[:shape.height, :shape.width]  # [H, W]
    depth = _coast_distance(cells, p + 2)
    recess = np.clip(0.5 + 0.35 * _smooth_field(rng, cells.shape, p / 1.5), 0.0, 1.0)
    threshold = 0.8 * p * recess + 1.5 * rng.random(cells.shape)  # [H, W]
    land = cells & (depth > threshold)
    margin = np.where(cells, depth - threshold, -np.inf)
    for i, j in zip(*np.nonzero(chosen), strict=True):
        block = (slice(i * p, (i + 1) * p), slice(j * p, (j + 1) * p))
        if not land[block].any():
            di, dj = np.unravel_index(int(np.argmax(margin[block])), margin[block].shape)
            land[i * p + di, j * p + dj] = True
    return land


def _gamma_kernel(k: np.ndarray, days: int) -> np.ndarray:
    """Daily unit hydrographs ``[days, S]`` of gamma shape 2 and scale ``k [S]`` (days), each summing to 1."""
    t = np.arange(days, dtype=np.float64)[:, None] + 0.5
    h = t / k ** 2 * np.exp(-t / k)
    return h / h.sum(axis=0)


class SyntheticGrid:
    """One grid of the synthetic region, rendered per window (:class:`crossmae.data.region.RegionGrid`)."""

    def __init__(self, world: SyntheticRegion, name: str):
        self.world, self.name = world, name
        self.variables = [name]
        self.shape = world.land.shape
        self.mask = world.land
        self.days = (world.first_day, world.last_day)

    def read(self, day0: int, day1: int) -> np.ndarray:
        out = np.zeros((day1 - day0, 1, *self.shape), dtype=np.float32)
        lo, hi = max(day0, self.days[0]), min(day1, self.days[1] + 1)
        out[:lo - day0] = np.nan
        out[max(hi, lo) - day0:] = np.nan
        if hi > lo:
            out[lo - day0:hi - day0, 0][:, self.world.land] = self.world.render(self.name, lo, hi)
        return out

    def moments(self, day0: int, day1: int, transforms) -> np.ndarray:
        key = (self.name, day0, day1, tuple(transforms))
        if key in self.world.moments:
            return self.world.moments[key]
        sums = np.zeros((3, 1))
        for start in range(day0, day1 + 1, BLOCK_DAYS):
            v = self.world.render(self.name, start, min(start + BLOCK_DAYS, day1 + 1)).astype(np.float64)
            v = np.log1p(v) if transforms[0] == "log1p" else v
            sums[:, 0] += (v.size, v.sum(), (v * v).sum())
        return sums


class SyntheticRegion:
    """The world of a synthetic region (module docstring): land, storms, weather, soil checkpoints, site series.

    Args:
        size: ``full`` or ``small``.
        seed: the world's seed.
        periods: split → (first day, last day); the training period's grid moments are taken in the sweep.

    Attributes:
        land: bool ``[H, W]``. first_day, last_day: the record (days since 1970-01-01).
        site_rows, site_cols: float64 ``[S]`` gauge positions (cell centres of the outlets).
        site_values: float32 ``[days, S, 2]`` riverflow and evaporation (mm/day), NaN = missing.
        site_attrs: float64 ``[S, 11]``. moments: the grids' training-period moments.
    """

    def __init__(self, size: str, seed: int, periods: dict[str, tuple[int, int]]):
        if size not in SHAPES:
            raise ValueError(f"size must be one of {list(SHAPES)}, got {size!r}")
        self.size, self.seed, self.shape = size, seed, SHAPES[size]
        sh = self.shape
        self.first_day, self.last_day = iso_to_day(sh.first), iso_to_day(sh.last)
        self.land = make_land_mask(_rng(seed, _LAND), sh)
        self._cells = np.argwhere(self.land)  # [L, 2] (row, col)
        h, w = sh.height, sh.width
        rng = _rng(seed, _FIELDS)
        z1, z2 = _smooth_field(rng, (h, w), 12.0), _smooth_field(rng, (h, w), 20.0)
        dist = _coast_distance(self.land, 30)
        self.elevation = np.maximum(0.0, 40.0 + 12.0 * dist + 180.0 * z1)[self.land]  # [L]
        self.oro = np.exp(0.2 * z1)[self.land].astype(np.float32)  # [L]
        self.capacity = (60.0 * np.exp(0.35 * z2))[self.land]  # [L]
        cover = {n: 1.0 / (1.0 + np.exp(-1.5 * _smooth_field(rng, (h, w), 15.0)))[self.land]
                 for n in ("forest", "permeability", "urban")}
        cover["urban"] = cover["urban"] ** 4
        self._make_storms()
        self._make_weather()
        self._make_catchments(cover)
        self.moments: dict[tuple, np.ndarray] = {}
        self._sweep(periods)

    # -- construction ---------------------------------------------------------------------------------------
    def _make_storms(self) -> None:
        sh = self.shape
        rng = _rng(self.seed, _STORMS)
        day0 = self.first_day - SPIN_UP_DAYS
        days = np.arange(day0, self.last_day + 1)
        rate = sh.storms_per_day * (1 + 0.4 * np.cos(2 * math.pi * (days - 15) / 365.25))
        count = rng.poisson(rate)
        n = int(count.sum())
        scale = math.sqrt(sh.height * sh.width)
        radius = np.exp(rng.uniform(math.log(0.03 * scale), math.log(0.25 * scale), n))
        margin = 0.15 * scale
        self.storm_day = np.repeat(days, count)
        self.storm_cy = rng.uniform(-margin, sh.height + margin, n)
        self.storm_cx = rng.uniform(-margin, sh.width + margin, n)
        self.storm_r = radius
        self.storm_a = rng.exponential(30.0, n) * (0.08 * scale / radius) ** 0.4

    def _make_weather(self) -> None:
        rng = _rng(self.seed, _WEATHER)
        n = self.last_day + 1 - (self.first_day - SPIN_UP_DAYS)
        eps = rng.standard_normal((n, 3))
        eta, grad = np.zeros(n), np.zeros((n, 2))
        for t in range(1, n):
            eta[t] = 0.8 * eta[t - 1] + 1.2 * eps[t, 0]
            grad[t] = 0.9 * grad[t - 1] + 0.8 * eps[t, 1:]
        self.eta, self.grad = eta, grad

    def _make_catchments(self, cover: dict[str, np.ndarray]) -> None:
        """Outlets, catchment cells (a weight matrix ``[L, S]`` of catchment means) and attributes."""
        sh = self.shape
        rng = _rng(self.seed, _SITES)
        cells = self._cells.astype(np.float64) + 0.5  # [L, 2] cell centres
        s_count = sh.sites
        outlet = rng.choice(len(cells), size=s_count, replace=False)
        area = np.exp(rng.uniform(math.log(sh.area_km2[0]), math.log(sh.area_km2[1]), s_count))
        radius = np.sqrt(area / math.pi)
        angle = rng.uniform(0, 2 * math.pi, s_count)
        centre = cells[outlet] + 0.8 * radius[:, None] * np.stack([np.sin(angle), np.cos(angle)], axis=1)  # [S, 2]
        d2 = ((cells[:, None, :] - centre[None]) ** 2).sum(-1)  # [L, S]
        member = d2 <= radius[None] ** 2
        member[outlet, np.arange(s_count)] = True
        weight = member / member.sum(axis=0, keepdims=True)  # [L, S]
        self._weight = torch.from_numpy(weight.T.astype(np.float32)).to_sparse().coalesce()  # [S, L]
        self._centroid = weight.T @ cells  # [S, 2]
        self.site_rows, self.site_cols = cells[outlet, 0], cells[outlet, 1]
        lat = LAT0 - self.site_rows / KM_PER_DEGREE
        lon = LON0 + self.site_cols / (KM_PER_DEGREE * np.cos(np.radians(lat)))
        n_cells = member.sum(axis=0)
        mean_z = weight.T @ self.elevation
        relief = np.sqrt(np.maximum(weight.T @ self.elevation ** 2 - mean_z ** 2, 0.0))
        self._mean_z = mean_z
        capacity = weight.T @ self.capacity
        forest, perm, urban = (weight.T @ cover[n] for n in ("forest", "permeability", "urban"))
        self._attrs = {"lat": lat, "lon": lon, "altitude_m": self.elevation[outlet], "mean_elevation_m": mean_z,
                       "log10_area_km2": np.log10(n_cells.astype(np.float64)), "relief_m": relief,
                       "soil_capacity_mm": capacity, "forest": forest, "permeability": perm, "urban": urban}
        self.runoff = np.clip(0.22 + 0.35 * urban + 0.25 * (1 - capacity / 120) - 0.15 * forest, 0.08, 0.85)
        self.baseflow = 0.08 + 0.55 * perm
        self.k_quick = np.clip((0.5 + np.sqrt(n_cells) / 12) * (1 + 0.6 * forest) / (1 + relief / 150), 0.4, 12.0)

    def catchment_mean(self, values: np.ndarray) -> np.ndarray:
        """Land-cell values ``[D, L]`` → each site's catchment mean ``[D, S]`` float32."""
        cells = torch.from_numpy(np.ascontiguousarray(values.T, dtype=np.float32))  # [L, D]
        return torch.sparse.mm(self._weight, cells).numpy().T

    def _precip(self, day0: int, day1: int) -> np.ndarray:
        """Precipitation of land cells, days ``[day0, day1)``: ``[D, L]`` float32 (mm/day)."""
        lo, hi = np.searchsorted(self.storm_day, [day0, day1])
        out = torch.zeros((day1 - day0, len(self._cells)), dtype=torch.float32)
        if hi > lo:
            rows = torch.from_numpy(self._cells[:, 0].astype(np.float32) + 0.5)
            cols = torch.from_numpy(self._cells[:, 1].astype(np.float32) + 0.5)
            cy, cx = (torch.from_numpy(a[lo:hi].astype(np.float32))[:, None] for a in (self.storm_cy, self.storm_cx))
            r = torch.from_numpy(self.storm_r[lo:hi].astype(np.float32))[:, None]
            a = torch.from_numpy(self.storm_a[lo:hi].astype(np.float32))[:, None]
            bumps = a * torch.exp(-((rows[None] - cy) ** 2 + (cols[None] - cx) ** 2) / (2 * r * r))  # [n, L]
            out.index_add_(0, torch.from_numpy(self.storm_day[lo:hi] - day0), bumps)
        out = out.numpy() * self.oro
        out[out < 0.1] = 0.0
        return out

    def _temperature_parts(self, day0: int, day1: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(region-wide part ``[D]``, gradient ``[D, 2]``, centre ``[2]``) of the temperature of days [day0, day1)."""
        i0 = day0 - (self.first_day - SPIN_UP_DAYS)
        days = np.arange(day0, day1)
        base = 11.0 + 7.0 * np.sin(2 * math.pi * (days - 105) / 365.25) + self.eta[i0:i0 + day1 - day0]
        centre = np.array([self.shape.height / 2, self.shape.width / 2])
        return base, self.grad[i0:i0 + day1 - day0] / math.sqrt(self.shape.height * self.shape.width), centre

    def _temperature(self, day0: int, day1: int) -> np.ndarray:
        """Temperature of land cells ``[D, L]`` float32 (°C)."""
        base, grad, centre = self._temperature_parts(day0, day1)
        offset = self._cells + 0.5 - centre  # [L, 2]
        return (base[:, None] - 0.0065 * self.elevation[None] + grad @ offset.T).astype(np.float32)

    def _store_step(self, store: np.ndarray, precip: np.ndarray, temp: np.ndarray) -> np.ndarray:
        """Soil stores ``[D, L]`` after each of the days of ``precip``/``temp`` ``[D, L]``, from ``store [L]``."""
        out = np.empty_like(precip)
        decay = np.exp(-1.0 / (25.0 * np.exp(-np.maximum(temp, 0.0) / 15.0)))  # [D, L]
        for d in range(precip.shape[0]):
            store = decay[d] * store + precip[d]
            out[d] = store
        return out

    def _sweep(self, periods: dict[str, tuple[int, int]]) -> None:
        """Simulate the record once: soil checkpoints, site series, training moments of the grids."""
        start = self.first_day - SPIN_UP_DAYS
        n = self.last_day + 1 - start
        s_count = self.shape.sites
        store = np.zeros(len(self._cells), dtype=np.float32)
        self._checkpoints = np.zeros((-(-n // CHECKPOINT_DAYS), len(self._cells)), dtype=np.float32)
        p_mean = np.zeros((n, s_count), dtype=np.float32)
        w_mean = np.zeros((n, s_count), dtype=np.float32)
        train = periods.get("train")
        sums = {name: np.zeros((3, 1)) for name in GRID_NAMES}
        for b0 in range(start, self.last_day + 1, BLOCK_DAYS):
            b1 = min(b0 + BLOCK_DAYS, self.last_day + 1)
            precip, temp = self._precip(b0, b1), self._temperature(b0, b1)
            stores = np.empty_like(precip)
            for c0 in range(b0, b1, CHECKPOINT_DAYS):
                c1 = min(c0 + CHECKPOINT_DAYS, b1)
                if (c0 - start) % CHECKPOINT_DAYS == 0:
                    self._checkpoints[(c0 - start) // CHECKPOINT_DAYS] = store
                stores[c0 - b0:c1 - b0] = self._store_step(store, precip[c0 - b0:c1 - b0], temp[c0 - b0:c1 - b0])
                store = stores[c1 - b0 - 1]
            wet = 1.0 - np.exp(-stores / self.capacity[None].astype(np.float32))  # [D, L]
            p_mean[b0 - start:b1 - start] = self.catchment_mean(precip)
            w_mean[b0 - start:b1 - start] = self.catchment_mean(wet)
            if train is not None and b1 > train[0] and b0 <= train[1]:
                lo, hi = max(b0, train[0]) - b0, min(b1, train[1] + 1) - b0
                for name, v in (("precip", np.log1p(precip[lo:hi].astype(np.float64))),
                                ("temperature", temp[lo:hi].astype(np.float64)),
                                ("soil_moisture", 0.05 + 0.40 * wet[lo:hi].astype(np.float64))):
                    sums[name][:, 0] += (v.size, v.sum(), (v * v).sum())
        if train is not None:
            for name in GRID_NAMES:
                self.moments[(name, train[0], train[1], (GRID_TRANSFORMS[name],))] = sums[name]
        self._site_series(start, p_mean, w_mean)

    def _site_series(self, start: int, p_mean: np.ndarray, w_mean: np.ndarray) -> None:
        """Riverflow and evaporation of every site over the record (module docstring), with gaps; computed
        :data:`SITE_CHUNK` sites at a time (each site's noise from its own generator)."""
        n, s_count = p_mean.shape
        t = np.arange(KERNEL_DAYS, dtype=np.float64)[:, None]
        slow = (1 - math.exp(-1 / SLOW_DAYS)) * np.exp(-t / SLOW_DAYS)  # [KERNEL_DAYS, 1]
        kernel = (1 - self.baseflow) * _gamma_kernel(self.k_quick, KERNEL_DAYS) + self.baseflow * slow  # [K, S]
        size = 1 << (n + KERNEL_DAYS - 1).bit_length()
        base, grad, centre = self._temperature_parts(start, self.last_day + 1)
        values = np.empty((n - SPIN_UP_DAYS, s_count, 2), dtype=np.float32)
        for s0 in range(0, s_count, SITE_CHUNK):
            s1 = min(s0 + SITE_CHUNK, s_count)
            p, w = p_mean[:, s0:s1].astype(np.float64), w_mean[:, s0:s1].astype(np.float64)  # [N, chunk]
            rain = self.runoff[None, s0:s1] * p * (0.2 + 0.8 * np.vstack([w[:1], w[:-1]]))
            spectrum = np.fft.rfft(rain, size, axis=0) * np.fft.rfft(kernel[:, s0:s1], size, axis=0)
            flow = np.maximum(np.fft.irfft(spectrum, size, axis=0)[:n], 0.0)
            t_mean = base[:, None] - 0.0065 * self._mean_z[None, s0:s1] + grad @ (self._centroid[s0:s1] - centre).T
            evap = 0.2 * np.maximum(t_mean + 4.0, 0.0) * (0.35 + 0.65 * w) * (1 - 0.4 * np.minimum(p / 10, 1))
            noise = np.stack([_rng(self.seed, _NOISE, s).standard_normal((n, 2)) for s in range(s0, s1)], axis=1)
            values[:, s0:s1, 0] = (flow * np.exp(0.05 * noise[..., 0]))[SPIN_UP_DAYS:]
            values[:, s0:s1, 1] = (evap * np.exp(0.12 * noise[..., 1]))[SPIN_UP_DAYS:]
        self._attrs["mean_precip_mm"] = p_mean[SPIN_UP_DAYS:].mean(axis=0).astype(np.float64)
        self.site_attrs = np.stack([self._attrs[a] for a in ATTRIBUTES], axis=1)  # [S, 11]
        self._add_gaps(values)
        self.site_values = values

    def _add_gaps(self, values: np.ndarray) -> None:
        """Records that open late or close early, and runs of missing days, in place."""
        rng = _rng(self.seed, _GAPS)
        days, s_count, _ = values.shape
        years = max(days // 365, 1)
        late = rng.random(s_count) < 0.25
        early = rng.random(s_count) < 0.15
        opens = np.where(late, rng.integers(0, years, s_count) * 365, 0)
        closes = np.where(early, days - rng.integers(0, years, s_count) * 365, days)
        for s in range(s_count):
            values[:opens[s], s] = np.nan
            values[max(closes[s], opens[s] + 1):, s] = np.nan
        for f, rate in enumerate((0.4, 1.0)):
            for s in range(s_count):
                count = rng.poisson(rate * days / 100)
                for first, length in zip(rng.integers(0, days, count), rng.integers(3, 61, count), strict=True):
                    values[first:first + length, s, f] = np.nan

    # -- rendering --------------------------------------------------------------------------------------------
    def render(self, name: str, day0: int, day1: int) -> np.ndarray:
        """Grid ``name`` on the land cells, days ``[day0, day1)`` of the record: ``[D, L]`` float32."""
        if name == "precip":
            return self._precip(day0, day1)
        if name == "temperature":
            return self._temperature(day0, day1)
        start = self.first_day - SPIN_UP_DAYS
        k = (day0 - start) // CHECKPOINT_DAYS
        c0 = start + k * CHECKPOINT_DAYS
        stores = self._store_step(self._checkpoints[k].copy(), self._precip(c0, day1), self._temperature(c0, day1))
        return (0.05 + 0.40 * (1.0 - np.exp(-stores[day0 - c0:] / self.capacity[None]))).astype(np.float32)

    @property
    def nbytes(self) -> int:
        """Bytes of the arrays the world keeps."""
        arrays = [self.land, self._cells, self.elevation, self.oro, self.capacity, self.storm_day, self.storm_cy,
                  self.storm_cx, self.storm_r, self.storm_a, self.eta, self.grad, self._checkpoints,
                  self.site_values, self.site_attrs]
        weight = [self._weight.indices(), self._weight.values()]
        return int(sum(a.nbytes for a in arrays) + sum(t.numel() * t.element_size() for t in weight))


@functools.lru_cache(maxsize=2)
def _world(size: str, seed: int, periods: tuple[tuple[str, int, int], ...]) -> SyntheticRegion:
    return SyntheticRegion(size, seed, {name: (d0, d1) for name, d0, d1 in periods})


def synthetic_region(size: str, seed: int, region: RegionConfig):
    """The synthetic region ``size`` as :class:`crossmae.data.region.RegionData` (one world per (size, seed,
    periods) is kept, so a run's train and val data sets share it)."""
    from crossmae.data.region import RegionData, SiteSetData

    sh = SHAPES[size] if size in SHAPES else None
    if sh is None:
        raise ValueError(f"data.region.synthetic must be one of {list(SHAPES)}, got {size!r}")
    split = region.split
    periods = {part: getattr(split if split.train else sh, part) for part in ("train", "val", "test")}
    days = tuple((part, iso_to_day(v[0]), iso_to_day(v[1])) for part, v in periods.items() if v)
    world = _world(size, seed, days)
    grids = {name: SyntheticGrid(world, name) for name in GRID_NAMES}
    sites = SiteSetData(
        name=SITE_SET, ids=[f"s{i:04d}" for i in range(sh.sites)], rows=world.site_rows, cols=world.site_cols,
        first_day=world.first_day, values=world.site_values, variables=list(VARIABLES),
        transforms=list(VARIABLE_TRANSFORMS), per_site=list(region.per_site), flow=["riverflow"],
        attr_names=list(ATTRIBUTES), attrs=world.site_attrs,
        grouping=GroupingConfig(**vars(region.grouping)))
    return RegionData(grids, {n: [t] for n, t in GRID_TRANSFORMS.items()},
                      [sites], (sh.height, sh.width), (world.first_day, world.last_day),
                      {name: (d0, d1) for name, d0, d1 in days}, [], f"synthetic region {size!r} (seed {seed})")
