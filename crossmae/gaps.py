"""Gap evaluation: hide contiguous N-day streamflow gaps and score the model and three baselines on the gap days.

    python -m crossmae.evaluate --run runs/camels --gaps 30 [--split test] [--seed 0] [--stride DAYS]
                                [--precip forcing:prcp(mm/day)] [--data-root DIR]

What it does
    Every window of the split (``data.steps`` days every ``--stride`` days, default one window: no overlap)
    gets one gap of N days in each streamflow-like series (``flow: true``, ``--flow``, or a modality named
    ``streamflow``/``discharge``): its first day is drawn from ``numpy.random.default_rng([seed, window])``
    among the days that leave at least one day before and after it. The gap's values are removed from the
    sample; they, and any missing token, are the decoder's queries, and every other observed token (the flow
    around the gap, all other modalities) stays visible. Scores are taken over the gap days that hold an
    observation and a prediction of every method (``interp`` has none in a window whose flow outside the gap
    is all missing; ``climatology`` none for a basin without training flow), so that all methods are scored on
    the same days; per basin, in physical units, on the days of all gaps of the basin together. The other
    observed gap days are counted as ``unscored_days``.

Baselines, on the same days
    ``interp``: linear interpolation in time between the window's observed flow days outside the gap.
    ``climatology``: the basin's mean flow on each day of the year over the training split (a ±15-day
    circular moving mean of the daily means; days of the year without data get the basin's training mean).
    ``regression`` (when a precipitation channel exists, ``--precip`` or a channel or single-channel
    modality named ``pre``, ``precip``, ``precipitation``, ``prcp``, ``prcp(mm/day)``, ``rain``, ``tp``):
    least squares, per basin on its training split, of flow on the basin-mean precipitation of days
    t … t−6, its means over days t−7…t−13, t−14…t−29, t−30…t−59 and t−60…t−119, and sin/cos of the day of
    the year; where a feature is missing the climatology stands in.

Forcing swapped (``swap_forcing``, a diagnostic)
    Each window's model input keeps its own flow around the gap, static attributes and calendar, but takes
    every other modality (precipitation, temperature …) from the window half the split away (window
    ``(i + W // 2) mod W`` of W): a model that fills gaps from the forcing loses skill, one that fills them
    from the basin, the season and the flow around the gap does not. The baselines keep the true forcing.
    The metrics go to ``gaps<N>_<split>_swapped.json``.

Metrics (``RUN/eval/gaps<N>_<split>.json``): per flow channel, per basin ``days``, ``unscored_days`` and
``nse``/``kge`` of
``model``, ``interp``, ``climatology``, ``regression``; ``median_nse``/``median_kge`` of each over basins, and
``best_baseline`` (the baseline with the highest median NSE).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import torch

from crossmae.checkpoint import write_atomic_text
from crossmae.data.loader import build_dataset, make_collator
from crossmae.evaluate import _finite_or_none, _flow_names, _load, interpolate_masked, kge, nse
from crossmae.fill import GapCollator, check_device, resolve_data
from crossmae.model import MultimodalCrossMAE

PRECIP_NAMES = ("pre", "precip", "precipitation", "prcp", "prcp(mm/day)", "rain", "tp")
CLIMATOLOGY_HALF_WIDTH = 15
LAGS = 7
ANTECEDENT = ((7, 14), (14, 30), (30, 60), (60, 120))  # [from, to) days back
METHODS = ("model", "interp", "climatology", "regression")


def day_of_year(days: np.ndarray) -> np.ndarray:
    """Days since 1970-01-01 → day of the year, 0 = 1 January (0 … 365)."""
    dates = np.asarray(days).astype("datetime64[D]")
    return (dates - dates.astype("datetime64[Y]")).astype(np.int64)


def climatology(days: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """``[366]`` smoothed day-of-year means of ``flow [N]`` on ``days [N]`` (see the module docstring)."""
    keep = np.isfinite(flow)
    doy = day_of_year(days[keep])
    sums = np.bincount(doy, flow[keep], minlength=366)
    counts = np.bincount(doy, minlength=366).astype(np.float64)
    width = 2 * CLIMATOLOGY_HALF_WIDTH + 1
    kernel = np.ones(width)
    wrap = lambda x: np.concatenate([x[-CLIMATOLOGY_HALF_WIDTH:], x, x[:CLIMATOLOGY_HALF_WIDTH]])  # noqa: E731
    s = np.convolve(wrap(sums), kernel, mode="valid")  # [366]
    c = np.convolve(wrap(counts), kernel, mode="valid")  # [366]
    overall = float(flow[keep].mean()) if keep.any() else float("nan")
    return np.where(c > 0, s / np.maximum(c, 1), overall)


def precipitation_features(days: np.ndarray, precip: np.ndarray) -> np.ndarray:
    """``[N, 7 + 4 + 2]`` regression features of consecutive ``days [N]`` from precipitation ``[N]`` (NaN where
    a needed day is missing or before the record)."""
    n = precip.shape[0]
    padded = np.concatenate([np.full(ANTECEDENT[-1][1], np.nan), precip])  # [pad + N]
    pad = ANTECEDENT[-1][1]
    cols = [padded[pad - k:pad - k + n] for k in range(LAGS)]
    csum = np.concatenate([[0.0], np.cumsum(np.nan_to_num(padded))])
    cbad = np.concatenate([[0], np.cumsum(~np.isfinite(padded))])
    idx = np.arange(n) + pad
    for lo, hi in ANTECEDENT:
        a, b = idx - hi + 1, idx - lo + 1  # days t-hi+1 … t-lo
        mean = (csum[b] - csum[a]) / (hi - lo)
        cols.append(np.where(cbad[b] - cbad[a] > 0, np.nan, mean))
    angle = 2 * np.pi * day_of_year(days) / 365.25
    cols += [np.sin(angle), np.cos(angle)]
    return np.stack(cols, axis=1)


def fit_regression(features: np.ndarray, flow: np.ndarray) -> np.ndarray | None:
    """Least-squares coefficients ``[F + 1]`` (intercept last) on the rows where all is finite; None if too few."""
    keep = np.isfinite(features).all(1) & np.isfinite(flow)
    if keep.sum() < 2 * (features.shape[1] + 1):
        return None
    x = np.concatenate([features[keep], np.ones((int(keep.sum()), 1))], axis=1)
    coef, *_ = np.linalg.lstsq(x, flow[keep], rcond=None)
    return coef


def find_precipitation(dataset, precip: str | None) -> tuple[str, int] | None:
    """(modality, channel) of the precipitation: ``precip`` as ``modality[:channel]``, else by name."""
    channels = dataset.channel_names
    if precip:
        name, _, channel = precip.partition(":")
        if name not in channels:
            raise ValueError(f"--precip names modality {name!r}, not one of {list(channels)}")
        if not channel:
            return name, 0
        if channel not in channels[name]:
            raise ValueError(f"--precip names channel {channel!r}, not one of {name!r}'s {channels[name]}")
        return name, channels[name].index(channel)
    for name, names in channels.items():
        for c, channel in enumerate(names):
            if channel.lower() in PRECIP_NAMES or (len(names) == 1 and name.lower() in PRECIP_NAMES):
                return name, c
    return None


def basin_precipitation(dataset, name: str, channel: int, basin: int) -> np.ndarray:
    """``[N]`` physical basin-mean precipitation of basin position ``basin`` over its record (grids: the mean of
    the day's finite cells inside the basin)."""
    record = dataset.physical_record(name, basin).astype(np.float64)
    if record.ndim == 2:
        return record[:, channel]
    inside = dataset.basin_mask(name, basin)  # [h, w]
    cells = record[:, channel][:, inside]  # [N, cells]
    count = np.isfinite(cells).sum(1)
    return np.where(count > 0, np.nansum(cells, 1) / np.maximum(count, 1), np.nan)  # the mean of the finite cells


def evaluate_gaps(run_dir: str | Path, gap_days: int, split: str = "val", checkpoint: str | Path | None = None, *,
                  seed: int = 0, stride: int | None = None, flow: list[str] | None = None, precip: str | None = None,
                  batch_size: int | None = None, device: str = "cpu", data_root: str | None = None,
                  swap_forcing: bool = False) -> dict:
    """Score the model and the baselines on ``gap_days``-day gaps of ``split`` (see the module docstring);
    writes ``eval/gaps<N>_<split>.json`` (``swap_forcing``: ``…_swapped.json``) and returns the metrics."""
    for key, value in (("--stride", stride), ("--batch-size", batch_size)):
        if value is not None and value < 1:
            raise ValueError(f"{key} must be at least 1, got {value}")
    device = check_device(device)
    run_dir = Path(run_dir)
    config, weights, norm_stats, ckpt_path, step = _load(run_dir, Path(checkpoint) if checkpoint else None)
    config = copy.deepcopy(config)
    config.data = resolve_data(config, None, data_root)
    if config.data.source != "files":
        raise ValueError(f"--gaps reads files (data.source: files); the run has {config.data.source!r}")
    steps = config.data.steps
    if not 1 <= gap_days <= steps - 2:
        raise ValueError(f"--gaps must be between 1 and data.steps - 2 = {steps - 2} (a day of context on each "
                         f"side), got {gap_days}")
    data = copy.deepcopy(config.data)
    data.stride = stride or steps
    dataset = build_dataset(data, split, norm_stats=norm_stats)
    train = build_dataset(data, "train", norm_stats=norm_stats)
    spec = dataset.spec
    model = MultimodalCrossMAE(spec, config.model, patch_size=data.patch_size, steps=steps, fused=config.train.fused)
    model.load_state_dict(weights)
    model.to(device).eval()
    flow_names = [n for n in _flow_names(dataset, spec, flow) if n not in model.norm_pix_names]
    if not flow_names:
        raise ValueError("--gaps scores streamflow-like series, and the run has none it predicts in physical units "
                         "(mark one with flow: true or pass --flow)")
    rain = find_precipitation(dataset, precip)
    if swap_forcing and (len(dataset) < 2 or len(spec.modalities) == len(flow_names)):
        raise ValueError(f"swap_forcing takes the other modalities from another window: the {split} split needs at "
                         f"least 2 windows (it has {len(dataset)}) and a modality besides {flow_names}")
    collator = GapCollator.from_collator(make_collator(config, dataset))

    # -- the baselines' fits on the training split --
    train_ranges = train.split_ranges("train")
    fits: dict[tuple[str, str, int], dict] = {}
    for name in flow_names:
        for tb, basin in enumerate(train.basins):
            if tb not in train_ranges:
                continue
            d0, d1 = train_ranges[tb]
            first = train.records[tb][0]
            days = np.arange(d0, d1 + 1)
            record = train.physical_record(name, tb)[d0 - first:d1 - first + 1]  # [L, F]
            for c in range(spec[name].channels):
                fit = {"clim": climatology(days, record[:, c])}
                if rain is not None:
                    rec_days = np.arange(first, train.records[tb][1] + 1)
                    feats = precipitation_features(rec_days, basin_precipitation(train, *rain, tb))
                    fit["coef"] = fit_regression(feats[d0 - first:d1 - first + 1], record[:, c])
                fits[(name, basin, c)] = fit
    features = {}
    if rain is not None:
        for b in range(len(dataset.basins)):
            first, last = dataset.records[b]
            features[b] = precipitation_features(np.arange(first, last + 1), basin_precipitation(dataset, *rain, b))

    per_day: dict[tuple[str, str, int], dict[str, list[float]]] = {}
    bs = batch_size or data.batch_size
    for first_window in range(0, len(dataset), bs):
        indices = range(first_window, min(first_window + bs, len(dataset)))
        samples = [dataset[(i, seed * 1_000_003 + i)] for i in indices]
        if swap_forcing:
            for i, s in zip(indices, samples):
                _take_forcing(s, dataset[(i + len(dataset) // 2) % len(dataset)], flow_names)
        gaps = {}
        truth = {}
        for i, s in zip(indices, samples):
            start = int(np.random.default_rng([seed, i]).integers(1, steps - gap_days))
            gaps[i] = start
            for name in flow_names:
                truth[(i, name)] = s.series[name].clone()  # [T, F]
                s.series[name][start:start + gap_days] = float("nan")
        batch = collator(samples)
        with torch.no_grad():
            predictions = model(batch.to(device)).predictions
        for name in flow_names:
            mb = batch.modalities[name]
            pred = predictions[name].float().cpu()  # [total_pred, F]
            recon = torch.full((len(samples), steps, pred.shape[1]), float("nan"))
            b_i, t_i, _ = mb.queries.index.unbind(1)
            recon[b_i, t_i] = pred  # [B, T, F]
            recon = dataset.denormalize(name, recon.double()).numpy()
            for k, i in enumerate(indices):
                b, start_day = dataset.starts[i]
                basin = dataset.basins[b]
                first = dataset.records[b][0]
                obs = dataset.denormalize(name, truth[(i, name)].double()).numpy()  # [T, F]
                gap = np.zeros(steps, dtype=bool)
                gap[gaps[i]:gaps[i] + gap_days] = True
                days = start_day + np.arange(steps)
                for c in range(obs.shape[1]):
                    fit = fits.get((name, basin, c)) or _pooled_fit(fits, name, c)
                    clim = fit["clim"][day_of_year(days)]
                    reg = clim.copy()
                    if fit.get("coef") is not None:
                        x = features[b][days - first]  # [T, 13]
                        reg = np.where(np.isfinite(x).all(1), x @ fit["coef"][:-1] + fit["coef"][-1], clim)
                    interp = interpolate_masked(obs[:, c], np.isfinite(obs[:, c]) & ~gap)
                    observed = gap & np.isfinite(obs[:, c])
                    scored = observed & np.isfinite(recon[k, :, c]) & np.isfinite(interp) & np.isfinite(clim) \
                        & np.isfinite(reg)  # the days every method predicts
                    entry = per_day.setdefault((name, basin, c),
                                               {"obs": [], "unscored": 0, **{m: [] for m in METHODS}})
                    entry["unscored"] += int((observed & ~scored).sum())
                    entry["obs"] += obs[scored, c].tolist()
                    entry["model"] += recon[k, scored, c].tolist()
                    entry["interp"] += interp[scored].tolist()
                    entry["climatology"] += clim[scored].tolist()
                    entry["regression"] += reg[scored].tolist()

    methods = [m for m in METHODS if m != "regression" or rain is not None]
    metrics: dict = {"run": str(run_dir), "split": split, "checkpoint": str(ckpt_path), "step": step,
                     "gap_days": gap_days, "seed": seed, "windows": len(dataset), "window_days": steps,
                     "swap_forcing": swap_forcing,
                     "precipitation": None if rain is None else f"{rain[0]}:{dataset.channel_names[rain[0]][rain[1]]}",
                     "flow": {}}
    for name in flow_names:
        names = dataset.channel_names.get(name) or [str(c) for c in range(spec[name].channels)]
        for c in range(spec[name].channels):
            key = name if spec[name].channels == 1 else f"{name}:{names[c]}"
            result = {"per_basin": {}}
            for (n, basin, ch), entry in per_day.items():
                if n != name or ch != c:
                    continue
                obs = np.array(entry["obs"])
                result["per_basin"][basin] = {"days": int(obs.size), "unscored_days": entry["unscored"], **{
                    m: {"nse": nse(obs, np.array(entry[m])), "kge": kge(obs, np.array(entry[m]))["kge"]}
                    for m in methods}}
            for m in methods:
                for score in ("nse", "kge"):
                    values = [v[m][score] for v in result["per_basin"].values() if not math.isnan(v[m][score])]
                    result.setdefault(m, {})[f"median_{score}"] = float(np.median(values)) if values else float("nan")
            baselines = [m for m in methods if m != "model"]
            result["best_baseline"] = max(baselines, key=lambda m: _or_low(result[m]["median_nse"]))
            metrics["flow"][key] = result
    out_dir = run_dir / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    name = f"gaps{gap_days}_{split}{'_swapped' if swap_forcing else ''}.json"
    write_atomic_text(out_dir / name, json.dumps(_finite_or_none(metrics), indent=1))
    return metrics


def _take_forcing(sample, donor, flow_names: list[str]) -> None:
    """Give ``sample`` every modality of ``donor`` except the flow series (grids with their basin masks)."""
    for name in sample.series:
        if name not in flow_names:
            sample.series[name] = donor.series[name]
    for name in sample.grids:
        sample.grids[name], sample.basin_masks[name] = donor.grids[name], donor.basin_masks[name]


def _or_low(value: float) -> float:
    return value if math.isfinite(value) else -math.inf


def _pooled_fit(fits: dict, name: str, channel: int) -> dict:
    """The mean of the training basins' fits (a basin outside the training split, ``split.by: basin``)."""
    chosen = [f for (n, _, c), f in fits.items() if n == name and c == channel]
    coefs = [f["coef"] for f in chosen if f.get("coef") is not None]
    return {"clim": np.mean([f["clim"] for f in chosen], axis=0),
            "coef": np.mean(coefs, axis=0) if coefs else None}


def format_gaps(metrics: dict) -> str:
    """The gap metrics as a table: one line per method, then per basin."""
    lines = [f"{metrics['split']} split of {metrics['run']}: {metrics['gap_days']}-day gaps, one per window of "
             f"{metrics['window_days']} days ({metrics['windows']} windows), seed {metrics['seed']}, step "
             f"{metrics['step']}; precipitation {metrics['precipitation']}"]
    for key, result in metrics["flow"].items():
        methods = [m for m in METHODS if m in result]
        lines.append(f"{key}: median NSE / KGE over basins (best baseline: {result['best_baseline']})")
        for m in methods:
            lines.append(f"  {m:<12} NSE {result[m]['median_nse']:7.3f}  KGE {result[m]['median_kge']:7.3f}")
        for basin, scores in result["per_basin"].items():
            cells = "  ".join(f"{m} {scores[m]['nse']:.3f}" for m in methods)
            lines.append(f"  {basin:<12} {scores['days']:>5} days  NSE: {cells}")
    return "\n".join(lines)
