"""Fill the gaps of a record with a trained run: every missing value predicted from what was observed.

    python -m crossmae.fill --run runs/moselle --out filled/ [--config data.yaml] [--data-root DIR]
                            [--checkpoint PATH] [--stride 15] [--members 8] [--seed 0]
    crossmae-fill ...                                 # the same, as a console script

What it does
    Reads the data the run was trained on (its ``data`` section), or the ``data`` section of ``--config``: the
    same modalities, channels, window length and patch size as the run (a difference stops it before any work,
    naming it), other basins, periods or files. Every basin's whole record is cut into windows of
    ``data.steps`` days every ``--stride`` days (default half a window; the last window ends on the record's
    last day). In each window the missing tokens are the decoder's queries and every observed token is
    visible to the encoders. A day predicted by several windows gets the mean of their predictions, taken in
    physical units. Observed values are written as read, unchanged. A grid patch with some missing cells is
    predicted whole, and only its missing cells are filled. A basin's record runs from the first to the last
    day that any of its files covers (``crossmae/data/files.py``), so the days before or after a file's own
    rows are missing in it and are filled too: a gauge that opened a year after the gridded forcing starts
    gets that year predicted, flagged ``extended`` rather than ``filled``.

Ensemble spread (``--members M``, M ≥ 2)
    M further passes, each also hiding a random ``--extra-ratio`` of the observed tokens (seeded by
    ``--seed``, the member and the window), give M predictions of every filled value; their 10 % and 90 %
    quantiles are written beside the filled value (which comes from the pass that hides only the missing
    tokens, so it sees more than any member and may lie outside their band).

Files (written atomically: a temporary file, then a rename; a fill stopped by Ctrl-C or SIGTERM leaves whole
files or none, and exits 130 or 143)
    ``OUT/<modality>/<basin>.csv`` for a series modality: three comment lines (``# run:``, ``# checkpoint:``
        with its step, ``# written:`` UTC time), then the header ``date,<column>...,<column>_flag...`` (and
        ``<column>_q10,<column>_q90`` with ``--members``), one row per record day; the flag is ``observed``,
        ``filled`` (between the column's first and last observed day), ``extended`` (filled before the first or
        after the last: beyond the gauge's own record) or ``missing`` (not filled: see below). Read it back with
        the project's CSV reader: ``format: csv``, ``skip_rows: [0, 1, 2]``.
    ``OUT/<modality>/<basin>.nc`` for a grid modality: each variable ``(time, y, x)`` filled, ``filled``
        ``(time, y, x)`` uint8 (1 = filled), with ``--members`` ``<variable>_q10`` and ``<variable>_q90``; the
        grid's coordinates after the crop; attributes ``crossmae_run``, ``crossmae_checkpoint``,
        ``crossmae_step``, ``crossmae_written``.

A basin-modality with no observed value in its whole record is not filled (that would be noise): it is
reported and skipped; so is a channel (a column, a variable) never observed in a basin's record, whose
values stay missing. Likewise a window with no observed token of any modality (a series token is observed
when all its columns are) predicts nothing: a day that only such windows cover stays missing (flag
``missing``, counted in the report). A record shorter than one window is reported and skipped. Before any
work it stops, naming the argument and the value, when ``--out`` is a file, lies under a file or an
unwritable folder, or would overwrite one of the data's input files, when ``--stride`` exceeds
``data.steps`` (days no window covers), when ``--device`` is not on this machine, and when the run's weights
do not fit the data (a grid of another size under ``model.learned_space``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import logging
import os
import signal
import sys
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from crossmae.config import Config, DataConfig, SplitConfig, load_yaml
from crossmae.data.collate import MaskingCollator, unpatchify
from crossmae.data.loader import make_collator
from crossmae.data.readers import day_to_iso
from crossmae.data.sample import Sample
from crossmae.model import MultimodalCrossMAE

log = logging.getLogger(__name__)

QUANTILES = (0.1, 0.9)


# -- the run and its data -----------------------------------------------------------------------------------
def _source_channels(data: DataConfig) -> dict[str, tuple[str, list[str]]]:
    """modality → (kind, declared channels; empty when a series takes every column of its file)."""
    files = data.files
    out = {g.name: ("grid", list(g.variables or [g.name])) for g in files.grids}
    out.update({s.name: ("series", list(s.columns)) for s in files.series})
    return out


def _source_transforms(data: DataConfig) -> dict[str, tuple[str, dict[str, str]]]:
    """modality → (its ``transform``, its per-channel ``transforms``)."""
    files = data.files
    return {src.name: (src.transform, dict(src.transforms)) for src in [*files.grids, *files.series]}


def check_same_modalities(run: DataConfig, other: DataConfig, what: str) -> None:
    """Raise ValueError naming every difference in modalities, kinds, channels, static columns, window length
    or patch size between the run's data section and ``other`` (``what`` names where ``other`` came from)."""
    if run.source != "files" or other.source != "files":
        raise ValueError(f"{what}: fill and embed read files (data.source: files); the run has data.source "
                         f"{run.source!r} and {what} has {other.source!r}")
    differences = []
    for key in ("steps", "patch_size"):
        if getattr(run, key) != getattr(other, key):
            differences.append(f"data.{key}: the run has {getattr(run, key)}, {what} has {getattr(other, key)}")
    mine, theirs = _source_channels(run), _source_channels(other)
    if list(mine) != list(theirs):
        differences.append(f"modalities: the run has {list(mine)}, {what} has {list(theirs)}")
    transforms = (_source_transforms(run), _source_transforms(other))
    for name in mine.keys() & theirs.keys():
        if mine[name][0] != theirs[name][0]:
            differences.append(f"{name!r} is a {mine[name][0]} in the run, a {theirs[name][0]} in {what}")
        elif mine[name][1] != theirs[name][1]:
            differences.append(f"{name!r} channels: the run has {mine[name][1]}, {what} has {theirs[name][1]}")
        elif transforms[0][name] != transforms[1][name]:
            run_tr, other_tr = (f"transform {t!r}" + (f", transforms {per}" if per else "")
                                for t, per in (transforms[0][name], transforms[1][name]))
            differences.append(f"{name!r}: the run has {run_tr}, {what} has {other_tr}")
    if run.files.static.columns != other.files.static.columns:
        differences.append(f"static columns: the run has {run.files.static.columns}, {what} has "
                           f"{other.files.static.columns}")
    if differences:
        raise ValueError(f"{what} does not match the run's data: " + "; ".join(differences))


def resolve_data(config: Config, config_file: str | None = None, data_root: str | None = None) -> DataConfig:
    """The data section to read: the run's, or ``config_file``'s (checked against the run's), with
    ``data.files.root`` (``data.region.root`` for a region run) replaced by ``data_root`` when given (a
    moved data folder)."""
    data = copy.deepcopy(config.data)
    if config_file:
        from crossmae.config import resolve_config

        other = resolve_config(None, config_file, [])
        if not load_yaml(config_file).get("data"):
            raise ValueError(f"--config {config_file!r} has no data section")
        check_same_modalities(config.data, other.data, f"--config {config_file!r}")
        data = copy.deepcopy(other.data)
    section = {"files": data.files, "region": data.region}.get(data.source)
    if data_root:
        if section is None:
            raise ValueError(f"--data-root: the run's data.source {data.source!r} reads no files")
        if not os.path.isdir(data_root):
            raise FileNotFoundError(f"--data-root {data_root!r} is not a folder")
        section.root = os.path.abspath(data_root)
    elif section is not None and section.root and not os.path.isdir(section.root):
        raise FileNotFoundError(f"data.{data.source}.root {section.root!r} of the run does not exist (moved?); "
                                "pass --data-root with the folder that holds the run's data files now")
    return data


def whole_record_dataset(data: DataConfig, norm_stats: dict):
    """A files data set of every configured basin over its whole record, with the run's statistics."""
    from crossmae.data.files import FilesDataset

    data = copy.deepcopy(data)
    data.files.split = SplitConfig(by="period")
    data.val_fraction = 0.0
    data.stride = data.steps
    return FilesDataset(data, "train", norm_stats=norm_stats)


def record_windows(dataset, stride: int) -> tuple[list[tuple[int, int]], dict[str, str]]:
    """Window starts ``(basin position, first day)`` covering each basin's whole record every ``stride``
    days, the last ending on the record's last day; and the basins skipped (id → why)."""
    steps = dataset.steps
    starts, skipped = [], {}
    for b, (first, last) in enumerate(dataset.records):
        if last - first + 1 < steps:
            skipped[dataset.basins[b]] = f"its record has {last - first + 1} days, fewer than one window ({steps})"
            continue
        days = list(range(first, last - steps + 2, stride))
        if days[-1] != last - steps + 1:
            days.append(last - steps + 1)
        starts += [(b, d) for d in days]
    return starts, skipped


@dataclass
class InferenceRun:
    """A trained run ready to predict on a data set.

    Attributes:
        run_dir, checkpoint, step: where the weights came from.
        config: the run's config (``data`` replaced by the data read).
        model: the model, in eval mode.
        dataset: every basin's whole record (``crossmae.data.files.FilesDataset``).
    """

    run_dir: Path
    checkpoint: Path
    step: int
    config: Config
    model: MultimodalCrossMAE
    dataset: object


def open_run(run_dir: str | Path, checkpoint: str | Path | None = None, config_file: str | None = None,
             data_root: str | None = None, device: str | torch.device = "cpu") -> InferenceRun:
    """Load a run's weights and build the whole-record data set it will read (see the module docstring)."""
    from crossmae.evaluate import _load

    run_dir = Path(run_dir)
    config, weights, norm_stats, path, step = _load(run_dir, Path(checkpoint) if checkpoint else None)
    data = resolve_data(config, config_file, data_root)
    if data.source != "files":
        raise ValueError(f"--run {str(run_dir)!r}: fill and embed read files (data.source: files); the run has "
                         f"data.source {data.source!r}")
    config = copy.deepcopy(config)
    config.data = data
    dataset = whole_record_dataset(data, norm_stats)
    model = MultimodalCrossMAE(dataset.spec, config.model, patch_size=data.patch_size, steps=data.steps,
                               fused=config.train.fused)
    _check_weights_fit(model, weights, dataset)
    model.load_state_dict(weights)
    model.to(device).eval()
    return InferenceRun(run_dir, path, step, config, model, dataset)


def _check_weights_fit(model: MultimodalCrossMAE, weights: dict, dataset) -> None:
    """Raise ValueError naming every weight whose shape the data gives another size (a grid of another size under
    ``model.learned_space``, which learns one embedding per patch position)."""
    expected = model.state_dict()
    wrong = []
    for key, value in weights.items():
        if key not in expected or expected[key].shape == value.shape:
            continue
        grid = key.removeprefix("learned_space.").split("_", 1)[-1]
        if key.startswith("learned_space.") and grid in dataset.channel_names:
            m = dataset.spec[grid]
            wrong.append(f"grid {grid!r} has {expected[key].shape[0]} patch positions here ({m.height}x{m.width} "
                         f"cells), the run learned {value.shape[0]} (model.learned_space)")
        else:
            wrong.append(f"{key}: the run has {tuple(value.shape)}, this data needs {tuple(expected[key].shape)}")
    if wrong:
        raise ValueError("the run's weights do not fit this data: " + "; ".join(sorted(set(wrong))))


def check_device(device: str) -> torch.device:
    """``device`` (``cpu``, ``cuda``, ``cuda:N``, ``auto``: CUDA when available) as a torch device; ValueError
    naming ``--device`` when it does not parse or is not on this machine."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r} is not a device; expected cpu, cuda, cuda:N or auto") from None
    if parsed.type == "cuda" and (not torch.cuda.is_available() or (parsed.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"--device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if parsed.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {device!r}: expected cpu, cuda, cuda:N or auto")
    return parsed


def check_output(path: str | Path, arg: str, *, folder: bool) -> None:
    """Raise ValueError naming ``arg`` and ``path`` unless ``path`` can be written: a folder (``folder``) or a file
    that is not a folder, under a writable folder. Nothing is created."""
    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        raise ValueError(f"{arg} {str(path)!r} is a file; expected a folder (created when missing)")
    if not folder and path.is_dir():
        raise ValueError(f"{arg} {str(path)!r} is a folder; expected a file name")
    existing = path if folder else path.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{arg} {str(path)!r}: {str(existing)!r} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{arg} {str(path)!r}: the folder {str(existing)!r} is not writable")


def check_targets(targets: list[Path], dataset, arg: str, inside: Path | None = None) -> None:
    """Raise ValueError naming ``arg`` when a file to write is one of the data set's input files or a folder, or
    lies outside the folder ``inside`` (a basin id such as ``../x``)."""
    inputs = {os.path.realpath(p) for p in dataset.input_files()}
    for path in targets:
        if inside is not None and os.path.commonpath([os.path.realpath(inside), os.path.realpath(path)]) \
                != os.path.realpath(inside):
            raise ValueError(f"{arg}: {str(path)!r} lies outside {str(inside)!r} (a basin id with '..'?); expected "
                             "basin ids that name files inside the output folder")
        if os.path.realpath(path) in inputs:
            raise ValueError(f"{arg}: writing {str(path)!r} would overwrite an input file of the data; choose "
                             "another output")
        if path.is_dir():
            raise ValueError(f"{arg}: {str(path)!r} is a folder; expected a file there or nothing")
        if path.parent.exists() and not path.parent.is_dir():
            raise ValueError(f"{arg}: {str(path.parent)!r} is a file; expected a folder there or nothing")


# -- masks: the missing tokens are the queries ----------------------------------------------------------------
class GapCollator(MaskingCollator):
    """A collator whose hidden tokens are the missing ones (and, with ``extra_ratio > 0``, a random share of
    the observed ones): a missing token inside the basin becomes a query; every other observed token stays
    visible. Build it with :meth:`from_collator` from the run's collator (same settings, so the model accepts
    its batches).

    Attributes:
        extra_ratio: share of each sample-modality's observed tokens also hidden (0: none).
        stream: a further seed of the extra hiding (an ensemble member).
    """

    extra_ratio: float = 0.0
    stream: int = 0

    @classmethod
    def from_collator(cls, base: MaskingCollator, extra_ratio: float = 0.0, stream: int = 0) -> GapCollator:
        out = cls.__new__(cls)
        out.__dict__.update(base.__dict__)
        out.extra_ratio, out.stream, out._missing = extra_ratio, stream, {}
        return out

    def _tokens(self, m, samples):
        values, valid, weight = super()._tokens(m, samples)
        present = (weight > 0).any(-1)[:, None].expand_as(valid)  # [B, T, P]: the patch holds a basin cell
        self._missing[m.name] = present & ~valid
        return values, valid | present, weight

    def _masks(self, samples, valid):
        out = {}
        for i, m in enumerate(self.spec.modalities):
            missing = self._missing[m.name]
            hidden = missing.clone()
            if self.extra_ratio > 0:
                noise = torch.stack([
                    torch.rand(missing.shape[1:], generator=torch.Generator().manual_seed(
                        (int(s.noise_seed) * 1009 + self.stream) * 1009 + i)) for s in samples])  # [B, T, P]
                hidden |= valid[m.name] & ~missing & (noise < self.extra_ratio)
            out[m.name] = (hidden, hidden)
        return out


# -- filling ------------------------------------------------------------------------------------------------
@dataclass
class FillReport:
    """What :func:`fill_run` wrote and skipped.

    Attributes:
        files: the files written.
        filled: ``"<modality>/<basin>"`` → number of values filled.
        left_missing: ``"<modality>/<basin>"`` → number of missing values left missing: no window that covers
            them holds an observed token of any modality (a series token is observed when all its columns are).
        skipped: ``"<modality>/<basin>"`` (or a basin id) → why it was not filled.
    """

    files: list[Path] = field(default_factory=list)
    filled: dict[str, int] = field(default_factory=dict)
    left_missing: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


def predict_record(run: InferenceRun, starts: list[tuple[int, int]], *, extra_ratio: float = 0.0, stream: int = 0,
                   batch_size: int = 8) -> dict[str, list[np.ndarray | None]]:
    """The model's prediction of every hidden value, averaged over the windows that predicted it, in physical
    units: modality → per basin position ``[N, F]`` (series) or ``[N, C, h, w]`` (grid) float64 over the
    record, NaN where nothing was predicted (None for a basin without windows). A window with no observed token
    of any modality predicts nothing (it would be the model's guess from nothing). Modalities the run
    reconstructs only up to scale (``model.norm_pix_loss``) are left out."""
    dataset, model, steps = run.dataset, run.model, run.dataset.steps
    collator = GapCollator.from_collator(make_collator(run.config, dataset), extra_ratio, stream)
    names = [m.name for m in dataset.spec.modalities if m.name not in model.norm_pix_names]
    sums: dict[str, list] = {n: [None] * len(dataset.basins) for n in names}
    counts: dict[str, list] = {n: [None] * len(dataset.basins) for n in names}
    dataset.starts = list(starts)
    for first in range(0, len(starts), batch_size):
        samples: list[Sample] = [dataset[(i, i)] for i in range(first, min(first + batch_size, len(starts)))]
        batch = collator(samples)
        informed = torch.zeros(len(samples), dtype=torch.bool)  # [B]: the window holds an observed token
        for mb in batch.modalities.values():
            informed |= mb.encoder.visible.lengths.cpu() > 0
        with torch.no_grad():
            predictions = model(batch.to(next(model.parameters()).device)).predictions
        for name in names:
            m = dataset.spec[name]
            mb = batch.modalities[name]
            pred = predictions[name].float().cpu()  # [total_pred, token_dim]
            rows, cols = mb.patch_grid
            tokens = torch.full((len(samples), steps, rows * cols, pred.shape[1]), float("nan"))
            b_i, t_i, p_i = mb.queries.index.unbind(1)
            tokens[b_i, t_i, p_i] = pred  # [B, T, P, token_dim]
            if m.kind == "grid":
                recon = unpatchify(tokens, m.height, m.width, m.channels, dataset.config.patch_size)  # [B,T,C,H,W]
            else:
                recon = tokens[:, :, 0]  # [B, T, F]
            recon = dataset.denormalize(name, recon.double()).numpy()
            for k, s in enumerate(samples):
                if not informed[k]:
                    continue
                b, start = dataset.starts[s.meta["index"]]
                first_day, last_day = dataset.records[b]
                if sums[name][b] is None:
                    shape = (last_day - first_day + 1, m.channels)
                    if m.kind == "grid":
                        shape += dataset.grid_reader(name, b).shape
                    sums[name][b], counts[name][b] = np.zeros(shape), np.zeros(shape)
                values = recon[k]
                if m.kind == "grid":
                    values = values[..., :sums[name][b].shape[2], :sums[name][b].shape[3]]  # the basin's own grid
                rows_of = slice(start - first_day, start - first_day + steps)
                seen = np.isfinite(values)
                sums[name][b][rows_of][seen] += values[seen]
                counts[name][b][rows_of] += seen
    return {n: [None if s is None else np.where(c > 0, s / np.maximum(c, 1), np.nan)
                for s, c in zip(sums[n], counts[n])] for n in names}


@contextlib.contextmanager
def sigterm_as_exit():
    """Inside the block SIGTERM raises ``SystemExit(143)``, so a file being written is removed like on Ctrl-C
    (never left as a temporary); the previous handler comes back after. Main thread only (else a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def write_atomic(path: Path, write) -> None:
    """Call ``write(tmp_path)``, then rename the temporary file onto ``path`` (nothing half-written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_series_csv(path: Path, header: list[str], days: np.ndarray, columns: list[str], values: np.ndarray,
                      flags: np.ndarray, band: np.ndarray | None) -> None:
    """One CSV: comment ``header`` lines, then date, values ``[N, F]`` (repr precision), flags ``[N, F]`` and
    the band ``[2, N, F]``."""
    names = ["date", *columns, *[f"{c}_flag" for c in columns]]
    if band is not None:
        names += [f"{c}_{q}" for c in columns for q in ("q10", "q90")]

    def write(tmp: Path) -> None:
        with open(tmp, "w") as f:
            f.writelines(f"# {line}\n" for line in header)
            f.write(",".join(names) + "\n")
            for i, day in enumerate(days):
                row = [day_to_iso(int(day)), *[repr(float(v)) if np.isfinite(v) else "nan" for v in values[i]],
                       *flags[i]]
                if band is not None:
                    row += [repr(float(band[q, i, c])) if np.isfinite(band[q, i, c]) else "nan"
                            for c in range(values.shape[1]) for q in range(2)]
                f.write(",".join(row) + "\n")
            f.flush()
            os.fsync(f.fileno())

    write_atomic(path, write)


def _filled_or_extended(seen: np.ndarray) -> np.ndarray:
    """``[N, F]`` flag of a value filled on each day: ``filled`` between a column's first and last observed day,
    ``extended`` before the first or after the last (a prediction beyond the gauge's own record)."""
    n = seen.shape[0]
    first = np.where(seen.any(0), seen.argmax(0), n)  # [F]
    last = np.where(seen.any(0), n - 1 - seen[::-1].argmax(0), -1)  # [F]
    day = np.arange(n)[:, None]  # [N, 1]
    return np.where((day < first) | (day > last), "extended", "filled")


def _write_grid_netcdf(path: Path, attrs: dict, days: np.ndarray, variables: list[str], values: np.ndarray,
                       filled: np.ndarray, band: np.ndarray | None, reader) -> None:
    """One NetCDF: each variable of ``values [N, C, h, w]`` on ``(time, y, x)``, ``filled [N, h, w]`` uint8,
    the band ``[2, N, C, h, w]``, the grid's coordinates (1-D and 2-D) after the crop."""
    import xarray as xr

    y_dim, x_dim = reader.dims
    dims = ("time", y_dim, x_dim)
    y0, y1, x0, x1 = reader.crop or (0, reader.full_shape[0], 0, reader.full_shape[1])
    coords = {"time": days.astype("datetime64[D]").astype("datetime64[ns]")}
    for dim, coord, (lo, hi) in zip(reader.dims, reader.coords, ((y0, y1), (x0, x1))):
        if coord is not None:
            coords[dim] = coord[lo:hi]
    for name, (grid_values, grid_attrs) in reader.grid_coordinates().items():
        coords[name] = (dims[1:], grid_values, grid_attrs)  # [h, w]
    data_vars = {v: (dims, values[:, c].astype(np.float32)) for c, v in enumerate(variables)}
    data_vars["filled"] = (dims, filled.astype(np.uint8))
    if band is not None:
        for c, v in enumerate(variables):
            data_vars[f"{v}_q10"] = (dims, band[0, :, c].astype(np.float32))
            data_vars[f"{v}_q90"] = (dims, band[1, :, c].astype(np.float32))
    ds = xr.Dataset(data_vars, coords=coords, attrs=attrs)
    write_atomic(path, lambda tmp: ds.to_netcdf(tmp, engine="h5netcdf"))


def fill_run(run_dir: str | Path, out_dir: str | Path, *, config_file: str | None = None,
             checkpoint: str | Path | None = None, data_root: str | None = None, stride: int | None = None,
             members: int = 0, extra_ratio: float = 0.25, seed: int = 0, batch_size: int = 8,
             device: str = "cpu") -> FillReport:
    """Fill every missing value of the data a run reads; write one file per modality and basin.

    Args:
        run_dir: the run folder.
        out_dir: where ``<modality>/<basin>.csv|nc`` go.
        config_file: a YAML file whose ``data`` section replaces the run's (same modalities and channels).
        checkpoint: a checkpoint folder (default the run's latest).
        data_root: the run's data folder when it moved (replaces ``data.files.root``).
        stride: days between window starts (default half a window, at least 1).
        members: ensemble passes for the 10–90 % band (0: none; else at least 2).
        extra_ratio: share of the observed tokens each ensemble pass also hides, in (0, 1).
        seed: seed of the ensemble passes.
        batch_size: windows per forward.
        device: where the model runs (``cpu``, ``cuda``, ``cuda:N``, ``auto``).
    """
    for key, value, ok, expected in (
            ("--stride", stride, stride is None or stride >= 1, "at least 1"),
            ("--members", members, members == 0 or members >= 2, "0 (no band) or at least 2 (a 10-90 % band)"),
            ("--extra-ratio", extra_ratio, 0.0 < extra_ratio < 1.0, "in (0, 1)"),
            ("--batch-size", batch_size, batch_size >= 1, "at least 1")):
        if not ok:
            raise ValueError(f"{key} must be {expected}, got {value}")
    out_dir = Path(out_dir)
    device = check_device(device)
    check_output(out_dir, "--out", folder=True)
    run = open_run(run_dir, checkpoint, config_file, data_root, device)
    dataset = run.dataset
    stride = stride or max(1, dataset.steps // 2)
    if stride > dataset.steps:
        raise ValueError(f"--stride {stride} is longer than a window (data.steps = {dataset.steps}): the days between "
                         "windows would not be filled; expected at most the window length")
    starts, short = record_windows(dataset, stride)
    for m in dataset.spec.modalities:
        check_targets([out_dir / m.name / f"{basin}.{'nc' if m.kind == 'grid' else 'csv'}"
                       for basin in dataset.basins if basin not in short], dataset, "--out", inside=out_dir / m.name)
    report = FillReport(skipped=dict(short))
    central = predict_record(run, starts, batch_size=batch_size)
    draws = [predict_record(run, starts, extra_ratio=extra_ratio, stream=seed * 1009 + j + 1, batch_size=batch_size)
             for j in range(members)]
    written = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    for m in dataset.spec.modalities:
        if m.name not in central:
            report.skipped[m.name] = "the run reconstructs it only up to its scale (model.norm_pix_loss)"
            continue
        for b, basin in enumerate(dataset.basins):
            key = f"{m.name}/{basin}"
            if basin in short:
                continue
            observed = dataset.physical_record(m.name, b).astype(np.float64)
            seen = np.isfinite(observed)
            if not seen.any():
                report.skipped[key] = "no observed value in the whole record"
                log.warning("%s: no observed value in the whole record; not filled", key)
                continue
            predicted = _or_nan(central[m.name][b], observed.shape)
            inside = dataset.basin_mask(m.name, b) if m.kind == "grid" else True
            names = dataset.channel_names[m.name]
            never = ~seen.any(axis=tuple(a for a in range(seen.ndim) if a != 1))  # [C]: a channel never observed
            for c in np.flatnonzero(never):
                report.skipped[f"{key}:{names[c]}"] = "no observed value in the whole record"
            observed_channel = (~never).reshape((1, -1) + (1,) * (seen.ndim - 2))  # [1, C, 1, 1] or [1, C]
            fill = ~seen & np.isfinite(predicted) & inside & observed_channel
            values = np.where(fill, predicted, observed)
            unfilled = int((~seen & ~fill & inside & observed_channel).sum())
            if unfilled:
                report.left_missing[key] = unfilled
            band = None
            if draws:
                stack = np.stack([_or_nan(d[m.name][b], observed.shape) for d in draws])  # [M, N, ...]
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)  # values no member predicted: NaN
                    band = np.nanquantile(stack, QUANTILES, axis=0)  # [2, N, ...]
                band = np.where(fill[None], band, np.nan)
            first, last = dataset.records[b]
            days = np.arange(first, last + 1)
            header = [f"run: {run.run_dir.resolve()}", f"checkpoint: {run.checkpoint.resolve()} (step {run.step})",
                      f"written: {written}"]
            if m.kind == "series":
                flags = np.where(seen, "observed", np.where(fill, _filled_or_extended(seen), "missing"))
                path = out_dir / m.name / f"{basin}.csv"
                _write_series_csv(path, header, days, names, values, flags, band)
            else:
                attrs = {"crossmae_run": str(run.run_dir.resolve()),
                         "crossmae_checkpoint": str(run.checkpoint.resolve()),
                         "crossmae_step": run.step, "crossmae_written": written}
                path = out_dir / m.name / f"{basin}.nc"
                _write_grid_netcdf(path, attrs, days, names, values, fill.any(1), band,
                                   dataset.grid_reader(m.name, b))
            report.files.append(path)
            report.filled[key] = int(fill.sum())
    return report


def _or_nan(predicted: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    """A basin's prediction, or all NaN where no window of it predicted anything."""
    return np.full(shape, np.nan) if predicted is None else predicted


def add_run_arguments(parser: argparse.ArgumentParser, *, out_help: str) -> None:
    """The flags that name a run and its data (what :func:`open_run` takes), and ``--out``."""
    parser.add_argument("--run", required=True, help="the run folder")
    parser.add_argument("--out", required=True, help=out_help)
    parser.add_argument("--config", help="YAML whose data section replaces the run's (same modalities)")
    parser.add_argument("--checkpoint", help="a checkpoint folder (default: the run's latest)")
    parser.add_argument("--data-root", help="the run's data folder, when it moved")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description="Fill the gaps of a record with a trained run.")
    add_run_arguments(parser, out_help="output folder: <modality>/<basin>.csv or .nc")
    parser.add_argument("--stride", type=int, help="days between window starts (default half a window)")
    parser.add_argument("--members", type=int, default=0, help="ensemble passes for a 10-90 %% band")
    parser.add_argument("--extra-ratio", type=float, default=0.25, help="observed share each pass also hides")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        with sigterm_as_exit():
            report = fill_run(args.run, args.out, config_file=args.config, checkpoint=args.checkpoint,
                              data_root=args.data_root, stride=args.stride, members=args.members,
                              extra_ratio=args.extra_ratio, seed=args.seed, batch_size=args.batch_size,
                              device=args.device)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: whole files or none were written", file=sys.stderr)
        return 130
    for key, count in report.filled.items():
        print(f"{key}: {count} values filled")
    for key, count in report.left_missing.items():
        print(f"{key}: {count} values left missing (no window around them shows the model an observed token)")
    for key, why in report.skipped.items():
        print(f"skipped {key}: {why}")
    print(f"{len(report.files)} file(s) in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
