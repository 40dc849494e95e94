"""Evaluate a trained run: masked reconstruction per modality, NSE/KGE of streamflow, maps and hydrographs.

    python -m crossmae.evaluate --run runs/moselle [--split val|test] [--checkpoint PATH] [--seed 0]
                                [--mask.ratios.discharge=0.9 ...] [--data-root DIR]
    python -m crossmae.evaluate --run runs/moselle --gaps 30    # N-day streamflow gaps vs baselines
                                                                # (crossmae/gaps.py)

What it does
    Loads the run's configuration and checkpoint (the latest, or ``--checkpoint``), rebuilds the split's data
    set with the run's saved ``norm_stats.json`` and with non-overlapping windows (stride = ``data.steps``, so
    every day is reconstructed at most once), and runs the model over every window of the split with fixed
    masks: window i draws its mask from noise seed ``seed · 1_000_003 + i``, so two runs evaluated with the
    same seed see the same masks (``model.memory`` joint vs own is a fair comparison). Every hidden token is
    predicted (``mask.kept_mask_ratio`` empty); mask ratios are the run's unless overridden on the command line.

Metrics (``RUN/eval/metrics_<split>.json``, TensorBoard ``eval_<split>/…``)
    ``modalities.<m>.masked_mse``: mean squared error over the predicted values in normalised units (grid cells
        outside the basin carry no weight; with ``model.norm_pix_loss`` against the per-token standardised
        targets the model was trained on);
        ``rmse``: the same values' root mean squared error in physical units. A run trained with
        ``model.norm_pix_loss`` predicts each token up to its own (unknown) mean and scale, so for the modalities
        it applies to no physical-unit score exists: ``rmse`` is null, ``physical_units`` false, and they get no
        NSE/KGE.
    ``flow.<m>``: for streamflow-like series (``flow: true`` in a files config, ``--flow``, or a modality named
        ``streamflow``/``discharge``), per basin, over the masked days of the split in physical units: NSE and
        KGE (Gupta et al. 2009, with its r, α = σ_sim/σ_obs, β = μ_sim/μ_obs) and their medians over basins;
        ``baseline_interp``: the same for linear interpolation in time between the window's visible days, the
        score to beat.
    ``sites.<m>:<variable>``: for site sets (gauges grouped in (group, day) tokens), the same per site over its
        masked days (predictions ungrouped to sites by the data set's site layout), their medians over sites and
        the interpolation baseline per site; every variable of the site set.

Plots (PNG in ``RUN/eval/``, also logged to TensorBoard)
    ``<split>_map_<m>.png``: a grid modality's true and reconstructed maps for a few days of one window,
        with masked (reconstructed) patches hatched, cells outside the basin grey and missing cells white.
    ``<split>_hydrograph_<m>_<basin>.png``: a series' true and reconstructed values over the split, masked
        days shaded.
    ``<split>_sites_<m>_<variable>_nse.png``: a site set's per-site NSE as coloured points at the sites'
        (row, col) in the grid frame, over the region's land mask when the data set has one; the per-site
        scores of every variable are in ``<split>_sites_<m>.csv`` beside it.
"""

from __future__ import annotations

import argparse
import copy
import csv
import io
import json
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from crossmae.checkpoint import latest_checkpoint, load_checkpoint
from crossmae.config import Config, apply_overrides, config_from_dict
from crossmae.data.collate import unpatchify
from crossmae.data.loader import build_dataset, make_collator
from crossmae.data.normstats import NormStats
from crossmae.model import MultimodalCrossMAE

log = logging.getLogger(__name__)

FLOW_NAMES = ("streamflow", "discharge")
MAP_DAYS = 4


# -- scores -------------------------------------------------------------------------------------------------
def nse(obs: np.ndarray, sim: np.ndarray) -> float:
    """Nash–Sutcliffe efficiency ``1 − Σ(sim − obs)² / Σ(obs − mean obs)²`` over the finite pairs (NaN when
    fewer than 2 pairs or obs is constant)."""
    obs, sim = _pairs(obs, sim)
    if obs.size < 2:
        return float("nan")
    denom = float(((obs - obs.mean()) ** 2).sum())
    return 1.0 - float(((sim - obs) ** 2).sum()) / denom if denom > 0 else float("nan")


def kge(obs: np.ndarray, sim: np.ndarray) -> dict[str, float]:
    """Kling–Gupta efficiency (Gupta et al. 2009) ``1 − √((r − 1)² + (α − 1)² + (β − 1)²)`` with the Pearson
    correlation r, α = σ_sim / σ_obs and β = μ_sim / μ_obs, over the finite pairs. Returns kge, r, alpha, beta
    (NaN when undefined: fewer than 2 pairs, a constant series or a zero observed mean)."""
    obs, sim = _pairs(obs, sim)
    nan = float("nan")
    if obs.size < 2 or obs.std() == 0 or obs.mean() == 0:
        return {"kge": nan, "r": nan, "alpha": nan, "beta": nan}
    r = float(np.corrcoef(obs, sim)[0, 1]) if sim.std() > 0 else nan
    alpha = float(sim.std() / obs.std())
    beta = float(sim.mean() / obs.mean())
    value = 1.0 - math.sqrt((r - 1) ** 2 + (alpha - 1) ** 2 + (beta - 1) ** 2) if not math.isnan(r) else nan
    return {"kge": value, "r": r, "alpha": alpha, "beta": beta}


def _pairs(obs, sim) -> tuple[np.ndarray, np.ndarray]:
    obs, sim = np.asarray(obs, dtype=np.float64).ravel(), np.asarray(sim, dtype=np.float64).ravel()
    keep = np.isfinite(obs) & np.isfinite(sim)
    return obs[keep], sim[keep]


def interpolate_masked(values: np.ndarray, visible: np.ndarray) -> np.ndarray:
    """``values [T]`` linearly interpolated in time from its ``visible [T]`` days (ends held); NaN when none."""
    t = np.flatnonzero(visible & np.isfinite(values))
    if t.size == 0:
        return np.full(values.shape, np.nan)
    return np.interp(np.arange(values.shape[0]), t, values[t])


# -- collecting reconstructions ------------------------------------------------------------------------------
def site_tokens_to_values(pred: torch.Tensor, index: torch.Tensor, batch_size: int, steps: int, groups: int,
                          group_size: int, variables: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A site set's predicted tokens back to per-slot values.

    Args:
        pred: ``[n, K·F]`` predicted tokens (slot-major, value index ``k·F + f``).
        index: ``[n, 3]`` int64 (b, t, g) of each token.

    Returns:
        values ``[B, T, G, K, F]`` (NaN where not predicted) and predicted ``[B, T, G]`` bool.
    """
    values = torch.full((batch_size, steps, groups, group_size * variables), float("nan"), dtype=pred.dtype)
    predicted = torch.zeros(batch_size, steps, groups, dtype=torch.bool)
    b, t, g = index.unbind(1)
    values[b, t, g] = pred
    predicted[b, t, g] = True
    return values.view(batch_size, steps, groups, group_size, variables), predicted  # [B, T, G, K, F]


def collect_site_days(store: dict[str, list[_FlowDays]], truth: np.ndarray, recon: np.ndarray,
                      predicted: np.ndarray, slots: np.ndarray, ids: list[list[str | None]], starts: list[int]) -> None:
    """Add one batch's site values to ``store`` (site id → one :class:`_FlowDays` per variable).

    Args:
        truth, recon: ``[B, T, G, K, F]`` observed and reconstructed values (physical units; NaN = missing or not
            predicted).
        predicted: ``[B, T, G]`` bool, the tokens the model predicted.
        slots: ``[B, G, K]`` bool, True where a site fills the slot.
        ids: ``[G][K]`` site id per slot.
        starts: each window's first day.
    """
    b_count, steps, groups, size, variables = truth.shape
    for b in range(b_count):
        days = starts[b] + np.arange(steps)
        for g in range(groups):
            masked = predicted[b, :, g]  # [T]
            for k in range(size):
                if not slots[b, g, k]:
                    continue
                per_var = store.setdefault(str(ids[g][k]), [_FlowDays() for _ in range(variables)])
                for f in range(variables):
                    obs = truth[b, :, g, k, f]
                    entry = per_var[f]
                    seen = np.isfinite(obs)
                    entry.obs.update(zip(days[seen].tolist(), obs[seen].tolist()))
                    if not masked.any():
                        continue
                    interp = interpolate_masked(obs, ~masked)
                    for t in np.flatnonzero(masked):
                        entry.model.setdefault(int(days[t]), []).append(float(recon[b, t, g, k, f]))
                        entry.interp.setdefault(int(days[t]), []).append(float(interp[t]))


def site_ids(dataset, m) -> list[list[str | None]]:
    """``[G][K]`` site id per slot of site set ``m``: the data set's layout (``dataset.site_layouts``), else
    ``g<group>/<slot>``."""
    layout = getattr(dataset, "site_layouts", {}).get(m.name)
    if layout is not None:
        return [list(group) for group in layout.ids]
    return [[f"g{g}/{k}" for k in range(m.group_size)] for g in range(m.groups)]


def site_coordinates(dataset, m) -> dict[str, tuple[int, int, float, float]]:
    """Site id → (group, slot, row, col) in the grid frame: the layout's site coordinates, else the group
    centres of the spec."""
    layout = getattr(dataset, "site_layouts", {}).get(m.name)
    out = {}
    for g, group in enumerate(site_ids(dataset, m)):
        for k, site in enumerate(group):
            if site is None:
                continue
            row, col = (float(layout.rows[g, k]), float(layout.cols[g, k])) if layout is not None \
                else m.locations[g]
            out[str(site)] = (g, k, row, col)
    return out



@dataclass
class _FlowDays:
    """One basin's days of a series channel: observed value, and the model's and the baseline's reconstructions
    (lists, one entry per window that predicted the day)."""

    obs: dict[int, float] = field(default_factory=dict)
    model: dict[int, list[float]] = field(default_factory=dict)
    interp: dict[int, list[float]] = field(default_factory=dict)


def _start_day(meta: dict) -> int:
    value = meta.get("start_day", meta.get("start", 0))
    return int(value) if not isinstance(value, str) else int(np.datetime64(value, "D").astype(np.int64))


def _uses_dates(meta: dict) -> bool:
    return "start_day" in meta


def _day_label(day: int, dated: bool):
    return np.datetime64(int(day), "D") if dated else day


def _load(run_dir: Path, checkpoint: Path | None) -> tuple[Config, dict, NormStats, Path, int]:
    """(config, weights, normalisation statistics, checkpoint path, step) of a run."""
    path = Path(checkpoint) if checkpoint else latest_checkpoint(run_dir)
    if path is None:
        raise FileNotFoundError(f"run {str(run_dir)!r} has no checkpoint (expected {run_dir}/checkpoints/latest)")
    weights, state = load_checkpoint(path)
    config = config_from_dict(json.loads(state["config"]))
    norm_stats = NormStats.load(run_dir, state)
    return config, weights, norm_stats, path, int(state["step"])


def _flow_names(dataset, spec, flow: list[str] | None) -> list[str]:
    if flow:
        unknown = [n for n in flow if n not in [m.name for m in spec.series]]
        if unknown:
            raise ValueError(f"--flow names {unknown}, which are not series modalities of the run "
                             f"({[m.name for m in spec.series]})")
        return list(flow)
    marked = getattr(dataset, "flow_modalities", None)
    if marked is not None:
        return list(marked)
    return [m.name for m in spec.series if m.name in FLOW_NAMES]


def evaluate_run(run_dir: str | Path, split: str = "val", checkpoint: str | Path | None = None, *, seed: int = 0,
                 overrides: list[str] = (), flow: list[str] | None = None, batch_size: int | None = None,
                 plot_basins: int = 4, plots: bool = True, device: str = "cpu", data_root: str | None = None) -> dict:
    """Evaluate ``run_dir`` on ``split``; writes ``eval/metrics_<split>.json`` and the PNGs; returns the metrics.

    Args:
        run_dir: the run folder (``config.yaml``, ``norm_stats.json``, ``checkpoints/``).
        split: ``val`` or ``test`` (``train`` works too).
        checkpoint: a checkpoint folder; default the run's latest.
        seed: the mask seed (same seed, same masks).
        overrides: ``mask.*`` overrides such as ``mask.ratios.discharge=0.9``.
        flow: series modalities to score with NSE/KGE (default: see the module docstring).
        batch_size: windows per forward (default the run's ``data.batch_size``).
        plot_basins: hydrographs for at most this many basins per series modality.
        plots: draw the PNGs (False: metrics only).
        device: where the model runs.
        data_root: the folder that holds the run's data files now (replaces ``data.files.root``; without it
            a run whose data folder moved stops with an error saying so).
    """
    from crossmae.fill import resolve_data

    run_dir = Path(run_dir)
    config, weights, norm_stats, ckpt_path, step = _load(run_dir, Path(checkpoint) if checkpoint else None)
    for item in overrides:
        if not item.lstrip("-").startswith("mask."):
            raise ValueError(f"evaluation overrides may only change mask.*, got {item!r}")
    config = apply_overrides(copy.deepcopy(config), list(overrides))
    config.mask.kept_mask_ratio = None
    config.data = resolve_data(config, None, data_root)
    data = copy.deepcopy(config.data)
    data.stride = data.steps  # non-overlapping windows: each day is reconstructed at most once
    dataset = build_dataset(data, split, norm_stats=norm_stats)
    spec = dataset.spec
    model = MultimodalCrossMAE(spec, config.model, patch_size=data.patch_size, steps=data.steps,
                               fused=config.train.fused)
    model.load_state_dict(weights)
    model.to(device).eval()
    collator = make_collator(config, dataset)
    flow_names = [n for n in _flow_names(dataset, spec, flow) if n not in model.norm_pix_names]
    channel_names = getattr(dataset, "channel_names", {})

    sse = {m.name: 0.0 for m in spec.modalities}
    count = {m.name: 0.0 for m in spec.modalities}
    phys_se = {m.name: 0.0 for m in spec.modalities}
    phys_n = {m.name: 0 for m in spec.modalities}
    series_days: dict[str, dict[str, list[_FlowDays]]] = {m.name: {} for m in spec.series}
    site_days: dict[str, dict[str, list[_FlowDays]]] = {m.name: {} for m in spec.sites}
    map_window: dict[str, dict] = {}
    dated = True
    bs = batch_size or data.batch_size
    for first in range(0, len(dataset), bs):
        keys = [(i, seed * 1_000_003 + i) for i in range(first, min(first + bs, len(dataset)))]
        samples = [dataset[k] for k in keys]
        batch = collator(samples)
        with torch.no_grad():
            out = model(batch.to(device))
        for m in spec.modalities:
            mb = batch.modalities[m.name]
            pred = out.predictions[m.name].float().cpu()  # [total_pred, token_dim]
            weight = mb.targets.weight  # [total_pred, token_dim]
            target = model.normalized_targets(m.name, mb.targets.values, weight)
            sse[m.name] += float(((pred - target).square() * weight).sum())
            count[m.name] += float(weight.sum())
            if m.name in model.norm_pix_names:
                continue
            if m.kind == "sites":
                recon, predicted = site_tokens_to_values(pred, mb.queries.index, len(samples), data.steps,
                                                         m.groups, m.group_size, m.channels)  # [B, T, G, K, F]
                truth = torch.stack([s.sites[m.name] for s in samples])  # [B, T, G, K, F]
                slots = torch.stack([s.site_masks[m.name] for s in samples]).bool()  # [B, G, K]
                truth_phys = dataset.denormalize(m.name, truth).double().numpy()
                recon_phys = dataset.denormalize(m.name, recon).double().numpy()
                keep = np.isfinite(recon_phys) & np.isfinite(truth_phys) & slots.numpy()[:, None, :, :, None]
                phys_se[m.name] += float(((recon_phys - truth_phys)[keep] ** 2).sum())
                phys_n[m.name] += int(keep.sum())
                dated = dated and all(_uses_dates(s.meta) for s in samples)
                collect_site_days(site_days[m.name], truth_phys, recon_phys, predicted.numpy(), slots.numpy(),
                                  site_ids(dataset, m), [_start_day(s.meta) for s in samples])
                continue
            b_i, t_i, p_i = mb.queries.index.unbind(1)
            rows, cols = mb.patch_grid
            tokens = torch.full((len(samples), data.steps, rows * cols, pred.shape[1]), float("nan"))
            tokens[b_i, t_i, p_i] = pred  # [B, T, P, token_dim]
            predicted = torch.zeros(len(samples), data.steps, rows * cols, dtype=torch.bool)
            predicted[b_i, t_i, p_i] = True  # [B, T, P]
            if m.kind == "grid":
                recon = unpatchify(tokens, m.height, m.width, m.channels, data.patch_size)  # [B, T, C, H, W]
                truth = torch.stack([s.grids[m.name] for s in samples])  # [B, T, C, H, W]
                inside = torch.stack([s.basin_masks[m.name] for s in samples])[:, None, None]  # [B, 1, 1, H, W]
                cells = torch.isfinite(recon) & inside & torch.isfinite(truth)
                diff = dataset.denormalize(m.name, recon) - dataset.denormalize(m.name, truth)
                phys_se[m.name] += float(diff[cells].double().square().sum())
                phys_n[m.name] += int(cells.sum())
                # the map shows the window with the most spatial variation (inside the basin, normalised units)
                spread = torch.where(inside & torch.isfinite(truth), truth, float("nan"))
                spread = torch.nan_to_num(spread - spread.nanmean((-2, -1), keepdim=True)).square().flatten(1).sum(1)
                b = int(spread.argmax())
                if bool(predicted[b].any()) and float(spread[b]) > map_window.get(m.name, {}).get("spread", -1.0):
                    map_window[m.name] = {"truth": truth[b], "recon": recon[b], "inside": inside[b, 0, 0],
                                          "predicted": predicted[b], "meta": samples[b].meta,
                                          "spread": float(spread[b])}
            else:
                recon = tokens[:, :, 0]  # [B, T, F]
                truth = torch.stack([s.series[m.name] for s in samples])  # [B, T, F]
                truth_phys = dataset.denormalize(m.name, truth).double().numpy()
                recon_phys = dataset.denormalize(m.name, recon).double().numpy()
                visible = (torch.isfinite(truth).all(-1) & ~predicted[:, :, 0]).numpy()  # [B, T]
                keep = np.isfinite(recon_phys) & np.isfinite(truth_phys)
                phys_se[m.name] += float(((recon_phys - truth_phys)[keep] ** 2).sum())
                phys_n[m.name] += int(keep.sum())
                for b, s in enumerate(samples):
                    dated = dated and _uses_dates(s.meta)
                    start = _start_day(s.meta)
                    per_channel = series_days[m.name].setdefault(str(s.meta.get("basin")), [
                        _FlowDays() for _ in range(m.channels)])
                    for c in range(m.channels):
                        days = per_channel[c]
                        interp = interpolate_masked(truth_phys[b, :, c], visible[b])
                        for t in range(data.steps):
                            day = start + t
                            if np.isfinite(truth_phys[b, t, c]):
                                days.obs[day] = float(truth_phys[b, t, c])
                            if predicted[b, t, 0]:
                                days.model.setdefault(day, []).append(float(recon_phys[b, t, c]))
                                days.interp.setdefault(day, []).append(float(interp[t]))

    metrics: dict = {
        "run": str(run_dir), "split": split, "checkpoint": str(ckpt_path), "step": step, "windows": len(dataset),
        "window_days": data.steps, "mask_seed": seed, "mask_mode": config.mask.mode, "memory": config.model.memory,
        "mask": {m.name: config.mask.ratio(m.name, m.kind) for m in spec.modalities},
        "modalities": {}, "flow": {}, "sites": {},
    }
    for m in spec.modalities:
        metrics["modalities"][m.name] = {
            "masked_mse": sse[m.name] / count[m.name] if count[m.name] else float("nan"),
            "rmse": math.sqrt(phys_se[m.name] / phys_n[m.name]) if phys_n[m.name] else float("nan"),
            "physical_units": m.name not in model.norm_pix_names,
            "values": int(count[m.name]),
        }
    for name in flow_names:
        m = spec[name]
        names = channel_names.get(name) or [str(c) for c in range(m.channels)]
        for c in range(m.channels):
            key = name if m.channels == 1 else f"{name}:{names[c]}"
            metrics["flow"][key] = _flow_scores(series_days[name], c)
    out_dir = run_dir / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    for m in spec.sites:
        if m.name in model.norm_pix_names:
            continue
        names = channel_names.get(m.name) or [str(c) for c in range(m.channels)]
        coords = site_coordinates(dataset, m)
        for c in range(m.channels):
            metrics["sites"][f"{m.name}:{names[c]}"] = _flow_scores(site_days[m.name], c)
        write_site_csv(out_dir / f"{split}_sites_{m.name}.csv", {names[c]: metrics["sites"][f"{m.name}:{names[c]}"]
                                            for c in range(m.channels)}, coords)
    figures = _plots(dataset, spec, map_window, series_days, flow_names, split, dated, plot_basins,
                     data.patch_size) if plots else {}
    if plots:
        for m in spec.sites:
            names = channel_names.get(m.name) or [str(c) for c in range(m.channels)]
            for c in range(m.channels):
                entry = metrics["sites"].get(f"{m.name}:{names[c]}")
                if entry is not None:
                    figures[f"{split}_sites_{m.name}_{_safe(names[c])}_nse.png"] = site_nse_map(
                        entry, site_coordinates(dataset, m), getattr(dataset, "land_mask", None), spec.grid_shape,
                        f"{m.name} {names[c]}, {split} split: per-site NSE of the masked days")
    for fname, fig in figures.items():
        fig.savefig(out_dir / fname, dpi=110)
    metrics["plots"] = sorted(figures)
    (out_dir / f"metrics_{split}.json").write_text(json.dumps(_finite_or_none(metrics), indent=1))
    _log_tensorboard(run_dir, split, step, metrics, figures)
    if figures:
        import matplotlib.pyplot as plt

        for fig in figures.values():
            plt.close(fig)
    return metrics


def _flow_scores(per_basin: dict[str, list[_FlowDays]], channel: int) -> dict:
    result: dict = {"per_basin": {}, "baseline_interp": {"per_basin": {}}}
    for basin, channels in per_basin.items():
        days = channels[channel]
        predicted = sorted(d for d in days.model if d in days.obs)
        obs = np.array([days.obs[d] for d in predicted])
        sim = np.array([np.mean(days.model[d]) for d in predicted])
        base = np.array([np.mean(days.interp[d]) for d in predicted])
        result["per_basin"][basin] = {"days": len(predicted), "nse": nse(obs, sim), **kge(obs, sim)}
        result["baseline_interp"]["per_basin"][basin] = {"nse": nse(obs, base), **kge(obs, base)}
    for target in (result, result["baseline_interp"]):
        for score in ("nse", "kge"):
            values = [v[score] for v in target["per_basin"].values() if not math.isnan(v[score])]
            target[f"median_{score}"] = float(np.median(values)) if values else float("nan")
    result["scored"] = sum(not math.isnan(v["nse"]) for v in result["per_basin"].values())  # the median's count
    return result


SITE_CSV_FIELDS = ("site", "group", "slot", "row", "col", "variable", "days", "nse", "kge", "r", "alpha", "beta",
                   "baseline_nse", "baseline_kge")


def write_site_csv(path: Path, per_variable: dict[str, dict], coords: dict[str, tuple[int, int, float, float]]):
    """Per-site scores (one row per site and variable, ``SITE_CSV_FIELDS``) to ``path``, written atomically.

    Args:
        per_variable: variable → :func:`_flow_scores`' result for it.
        coords: site id → (group, slot, row, col).
    """
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(SITE_CSV_FIELDS)
    for variable, scores in per_variable.items():
        for site, s in scores["per_basin"].items():
            g, k, row, col = coords[site]
            base = scores["baseline_interp"]["per_basin"][site]
            writer.writerow([site, g, k, row, col, variable, s["days"], s["nse"], s["kge"], s["r"], s["alpha"],
                             s["beta"], base["nse"], base["kge"]])
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(buffer.getvalue())
    os.replace(tmp, path)


def site_nse_map(scores: dict, coords: dict[str, tuple[int, int, float, float]], land_mask,
                 grid_shape: tuple[int, int], title: str):
    """A figure of per-site NSE as coloured points at the sites' (row, col) in the grid frame (cell i covers
    ``[i, i + 1)``), over ``land_mask [H, W]`` (bool, or None); sites without a score are hollow grey circles."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    height, width = grid_shape
    if land_mask is not None:
        land = np.asarray(land_mask, dtype=bool)
        height, width = land.shape
    fig, ax = plt.subplots(figsize=(6.4, 6.4 * max(height, 1) / max(width, 1) + 0.8))
    if land_mask is not None:
        ax.imshow(np.where(land, 1.0, np.nan), cmap=ListedColormap(["#e4e0d4"]), interpolation="nearest",
                  extent=(0, width, height, 0))
    sites = list(scores["per_basin"])
    rows = np.array([coords[s][2] for s in sites])
    cols = np.array([coords[s][3] for s in sites])
    value = np.array([scores["per_basin"][s]["nse"] for s in sites], dtype=np.float64)
    scored = np.isfinite(value)
    ax.scatter(cols[~scored], rows[~scored], s=14, facecolors="none", edgecolors="grey", linewidths=0.6,
               label="no score")
    points = ax.scatter(cols[scored], rows[scored], c=np.clip(value[scored], -1.0, 1.0), cmap="RdYlBu", vmin=-1.0,
                        vmax=1.0, s=16, edgecolors="black", linewidths=0.3)
    fig.colorbar(points, ax=ax, shrink=0.8, label="NSE (clipped to [-1, 1])")
    if width and height:
        ax.set_xlim(0, width)
        ax.set_ylim(height, 0)
    ax.set_aspect("equal")
    ax.set_xlabel("grid column")
    ax.set_ylabel("grid row")
    median = scores.get("median_nse", float("nan"))
    ax.set_title(f"{title}\nmedian {median:.3f} over {int(scored.sum())} of {len(sites)} sites", fontsize=9)
    if (~scored).any():
        ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    return fig


def _safe(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in text)


def _finite_or_none(value):
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_or_none(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# -- plots ---------------------------------------------------------------------------------------------------
def _plots(dataset, spec, map_window, series_days, flow_names, split, dated, plot_basins, patch_size) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    figures = {}
    for name, window in map_window.items():
        figures[f"{split}_map_{name}.png"] = _map_figure(dataset, spec[name], window, patch_size, dated)
    plotted = flow_names or [m.name for m in spec.series[:1]]  # no streamflow: the first series' first channel
    for m in spec.series:
        if m.name not in plotted:
            continue
        for basin in list(series_days[m.name])[:plot_basins]:
            safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in basin)
            figures[f"{split}_hydrograph_{m.name}_{safe}.png"] = _hydrograph_figure(
                m.name, basin, series_days[m.name][basin][0], dated, m.name in flow_names)
    return figures


def _map_figure(dataset, m, window: dict, patch_size: int, dated: bool):
    import matplotlib.pyplot as plt
    from matplotlib.collections import PatchCollection
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Rectangle

    truth = dataset.denormalize(m.name, window["truth"]).numpy()[:, 0]  # [T, H, W] (first channel)
    recon = dataset.denormalize(m.name, window["recon"]).numpy()[:, 0]  # [T, H, W]
    inside = window["inside"].numpy()  # [H, W]
    predicted = window["predicted"].numpy()  # [T, P]
    steps = truth.shape[0]
    rows, cols = -(-m.height // patch_size), -(-m.width // patch_size)
    # the days with the most spatial variation among those with a reconstructed patch
    inside_truth = np.where(inside, truth, np.nan)  # [T, H, W]
    with np.errstate(invalid="ignore"):
        spread = np.nan_to_num(np.nanstd(inside_truth.reshape(steps, -1), axis=1), nan=-1.0)  # [T]
    spread[~predicted.any(1)] = -2.0
    days = np.sort(np.argsort(-spread, kind="stable")[:MAP_DAYS])
    finite = inside_truth[days][np.isfinite(inside_truth[days])]
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if vmax - vmin < 1e-6:
        vmin, vmax = vmin - 0.5, vmax + 0.5
    cmap = plt.get_cmap("viridis").with_extremes(bad=(0.0, 0.0, 0.0, 0.0))
    grey = ListedColormap(["#c8c8c8"])
    fig, axes = plt.subplots(2, len(days), figsize=(2.6 * len(days) + 1.2, 5.6), squeeze=False)
    start = _start_day(window["meta"])
    image = None
    for j, t in enumerate(days):
        predicted_cells = np.kron(predicted[t].reshape(rows, cols), np.ones((patch_size, patch_size)))
        predicted_cells = predicted_cells[:m.height, :m.width].astype(bool)
        rebuilt = np.where(predicted_cells, recon[t], truth[t])
        for i, (label, field_) in enumerate((("true", truth[t]), ("reconstructed", rebuilt))):
            ax = axes[i, j]
            ax.set_facecolor("white")
            ax.imshow(np.where(inside, np.nan, 1.0), cmap=grey, interpolation="nearest")
            image = ax.imshow(np.where(inside, field_, np.nan), cmap=cmap, vmin=vmin, vmax=vmax,
                              interpolation="nearest")
            rects = [Rectangle((pc * patch_size - 0.5, pr * patch_size - 0.5), patch_size, patch_size)
                     for pr, pc in zip(*np.nonzero(predicted[t].reshape(rows, cols)))]
            ax.add_collection(PatchCollection(rects, facecolor="none", edgecolor="black", hatch="///",
                                              linewidth=0.6))
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlim(-0.5, m.width - 0.5)
            ax.set_ylim(m.height - 0.5, -0.5)
            when = str(_day_label(start + int(t), dated)) if dated else f"day {start + int(t)}"
            ax.set_title(f"{label}\n{when}", fontsize=8)
    fig.colorbar(image, ax=axes, shrink=0.8, label=m.name)
    basin = window["meta"].get("basin")
    fig.suptitle(f"{m.name}, basin {basin}: hatched = masked and reconstructed, grey = outside the basin, "
                 "white = missing", fontsize=9)
    return fig


def _hydrograph_figure(name: str, basin: str, days: _FlowDays, dated: bool, is_flow: bool):
    import matplotlib.pyplot as plt

    all_days = sorted(set(days.obs) | set(days.model))
    if not all_days:
        fig, ax = plt.subplots(figsize=(10, 3.4))
        ax.set_title(f"{name}, basin {basin}: no data")
        return fig
    span = np.arange(all_days[0], all_days[-1] + 1)
    x = (span.astype("datetime64[D]") if dated else span)
    obs = np.array([days.obs.get(int(d), np.nan) for d in span])
    sim = np.array([np.mean(days.model[int(d)]) if int(d) in days.model else np.nan for d in span])
    masked = np.array([int(d) in days.model for d in span])
    fig, ax = plt.subplots(figsize=(11, 3.6))
    edges = np.flatnonzero(np.diff(np.r_[0, masked.astype(np.int8), 0]))  # runs of masked days: [start, end)
    half = np.timedelta64(12, "h") if dated else 0.5
    for k, (r0, r1) in enumerate(zip(edges[::2], edges[1::2])):
        ax.axvspan(x[r0] - half, x[r1 - 1] + half, color="tab:orange", alpha=0.18, linewidth=0,
                   label="masked days" if k == 0 else None)
    ax.plot(x, obs, color="black", linewidth=0.9, label="observed")
    ax.plot(x, sim, color="tab:red", linestyle="none", marker=".", markersize=3.5, label="reconstructed")
    obs_m = np.array([days.obs.get(int(d), np.nan) for d in span[masked]])
    title = f"{name}, basin {basin}"
    if is_flow and masked.any():
        title += f": masked days NSE {nse(obs_m, sim[masked]):.3f}, KGE {kge(obs_m, sim[masked])['kge']:.3f}"
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(name)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    return fig


def _log_tensorboard(run_dir: Path, split: str, step: int, metrics: dict, figures: dict) -> None:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.warning("tensorboard is not installed: evaluation goes to eval/ only")
        return
    writer = SummaryWriter(str(run_dir / "tensorboard"))
    try:
        for name, entry in metrics["modalities"].items():
            for key in ("masked_mse", "rmse"):
                if math.isfinite(entry[key]):
                    writer.add_scalar(f"eval_{split}/{key}_{name}", entry[key], step)
        for name, entry in [*metrics["flow"].items(), *metrics.get("sites", {}).items()]:
            for key in ("median_nse", "median_kge"):
                if math.isfinite(entry[key]):
                    writer.add_scalar(f"eval_{split}/{key}_{name}", entry[key], step)
        for fname, fig in figures.items():
            writer.add_figure(f"eval_{split}/{fname.removesuffix('.png')}", fig, step, close=False)
    finally:
        writer.close()


# -- command line --------------------------------------------------------------------------------------------
def _format_table(metrics: dict) -> str:
    lines = [f"{metrics['split']} split of {metrics['run']}: {metrics['windows']} windows of {metrics['window_days']} "
             f"days, step {metrics['step']}, memory={metrics['memory']}"]
    lines.append(f"{'modality':<16}{'mask':>6}{'masked MSE':>12}{'RMSE':>12}")
    for name, entry in metrics["modalities"].items():
        lines.append(f"{name:<16}{metrics['mask'][name]:>6.2f}{entry['masked_mse']:>12.4f}{entry['rmse']:>12.4g}")
    for name, entry in metrics["flow"].items():
        base = entry["baseline_interp"]
        lines.append(f"{name}: median NSE {entry['median_nse']:.3f}, KGE {entry['median_kge']:.3f} "
                     f"(interpolation baseline NSE {base['median_nse']:.3f}, KGE {base['median_kge']:.3f})")
        for basin, scores in entry["per_basin"].items():
            lines.append(f"  {basin:<12} {scores['days']:>5} days  NSE {scores['nse']:.3f}  KGE {scores['kge']:.3f} "
                         f"(r {scores['r']:.3f}, alpha {scores['alpha']:.3f}, beta {scores['beta']:.3f})")
    for name, entry in metrics.get("sites", {}).items():
        base = entry["baseline_interp"]
        lines.append(f"{name}: {len(entry['per_basin'])} sites ({entry['scored']} with masked days to score), "
                     f"median NSE {entry['median_nse']:.3f}, KGE "
                     f"{entry['median_kge']:.3f} (interpolation baseline NSE {base['median_nse']:.3f}, KGE "
                     f"{base['median_kge']:.3f}); per site in the CSV")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description="Evaluate a trained run: masked reconstruction, NSE/KGE, plots.",
                                     epilog="Options --mask.key=value override the run's mask settings.")
    parser.add_argument("--run", required=True, help="the run folder")
    parser.add_argument("--split", default="val", choices=("train", "val", "test"))
    parser.add_argument("--checkpoint", help="a checkpoint folder (default: the run's latest)")
    parser.add_argument("--seed", type=int, default=0, help="mask seed (same seed, same masks)")
    parser.add_argument("--flow", nargs="*", help="series modalities scored with NSE/KGE")
    parser.add_argument("--batch-size", type=int, help="windows per forward (default data.batch_size)")
    parser.add_argument("--plot-basins", type=int, default=4, help="hydrographs for at most this many basins")
    parser.add_argument("--no-plots", action="store_true", help="metrics only")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data-root", help="the folder that holds the run's data files now (a moved folder)")
    parser.add_argument("--gaps", type=int, metavar="N",
                        help="score N-day streamflow gaps against baselines instead (crossmae/gaps.py)")
    parser.add_argument("--stride", type=int, help="--gaps: days between window starts (default one window)")
    parser.add_argument("--precip", help="--gaps: the precipitation as modality[:channel] (default: by name)")
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    overrides = []
    for item in rest:
        if not (item.startswith("--mask.") and "=" in item):
            parser.error(f"unrecognised argument {item!r} (mask overrides look like --mask.key=value)")
        overrides.append(item[2:])
    if args.gaps is not None:
        from crossmae.gaps import evaluate_gaps, format_gaps

        if overrides:
            parser.error("--gaps hides its own gaps; it takes no --mask.* overrides")
        try:
            metrics = evaluate_gaps(args.run, args.gaps, args.split, args.checkpoint, seed=args.seed,
                                    stride=args.stride, flow=args.flow, precip=args.precip,
                                    batch_size=args.batch_size, device=args.device, data_root=args.data_root)
        except (FileNotFoundError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(format_gaps(metrics))
        return 0
    try:
        metrics = evaluate_run(args.run, args.split, args.checkpoint, seed=args.seed, overrides=overrides,
                               flow=args.flow, batch_size=args.batch_size, plot_basins=args.plot_basins,
                               plots=not args.no_plots, device=args.device, data_root=args.data_root)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(_format_table(metrics))
    print(f"metrics and plots in {Path(args.run) / 'eval'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
