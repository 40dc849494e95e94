"""Encoder embeddings of every basin and window, for downstream work (regional regression, clustering basins).

    python -m crossmae.embed --run runs/camels --out embeddings.nc [--config data.yaml] [--data-root DIR]
                             [--checkpoint PATH] [--stride DAYS]
    crossmae-embed ...                                 # the same, as a console script

What it does
    Reads the data the run was trained on (or ``--config``'s ``data`` section: the same modalities, channels,
    window length and patch size, else it stops before any work naming the difference), cuts every basin's
    whole record into windows of ``data.steps`` days every ``--stride`` days (default: one window, so windows
    do not overlap; the last ends on the record's last day), and runs the encoders with every observed token
    visible and nothing hidden. Each window's encoder rows (the joint memory, after the fusion blocks when the
    run has them, the static token included when the run uses one) are mean-pooled per modality and over all
    modalities (``joint``). A modality with no observed token in a window has no rows there: its embedding is
    NaN and its token count 0.

Layout (``.nc``: NetCDF; ``.parquet``: Parquet, needs ``pyarrow``)
    NetCDF, dims ``window`` (one per basin and window, basins in config order, windows in time order) and
    ``feature`` (``model.enc_dim``):
        ``basin (window)`` str, ``window_start (window)`` datetime64 (the window's first day),
        ``joint (window, feature)`` float32, ``<modality> (window, feature)`` float32 for each modality in the
        memory, ``tokens_<modality> (window)`` int32 observed tokens pooled;
        attributes ``crossmae_run``, ``crossmae_checkpoint``, ``crossmae_step``, ``window_days``.
    Parquet: one row per window with columns ``basin``, ``window_start``, ``tokens_<modality>``, then
    ``joint_0 … joint_{D-1}`` and ``<modality>_0 …``; the run and checkpoint in the schema metadata.
    The file is written atomically. An output that is a folder, lies under a file or an unwritable folder, or
    is one of the data's input files stops it before any work.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from crossmae.data.loader import make_collator
from crossmae.fill import (
    GapCollator,
    add_run_arguments,
    check_device,
    check_output,
    check_targets,
    open_run,
    record_windows,
    sigterm_as_exit,
    write_atomic,
)

log = logging.getLogger(__name__)


@dataclass
class Embeddings:
    """Pooled encoder embeddings of W windows.

    Attributes:
        basins: ``[W]`` basin ids.
        starts: ``[W]`` int64 first day of each window (days since 1970-01-01).
        pooled: ``joint`` and each memory modality → ``[W, D]`` float32 (NaN where a modality has no token).
        tokens: each memory modality → ``[W]`` int32 tokens pooled.
        skipped: basin id → why it has no window.
    """

    basins: list[str]
    starts: np.ndarray
    pooled: dict[str, np.ndarray]
    tokens: dict[str, np.ndarray]
    skipped: dict[str, str]


def _segment_mean(rows: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Mean of consecutive segments: ``rows [total, D]`` with ``lengths [B]`` → ``[B, D]`` (NaN for length 0)."""
    segment = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)  # [total]
    sums = torch.zeros(lengths.numel(), rows.shape[1], dtype=torch.float64).index_add_(0, segment, rows.double())
    return (sums / lengths[:, None].double()).float()  # [B, D]; 0 / 0 = NaN


def embed_windows(run, stride: int | None = None, batch_size: int = 8) -> Embeddings:
    """Pooled embeddings of every window of ``run.dataset`` (an :class:`crossmae.fill.InferenceRun`)."""
    dataset, model = run.dataset, run.model
    starts, skipped = record_windows(dataset, stride or dataset.steps)
    dataset.starts = list(starts)
    collator = GapCollator.from_collator(make_collator(run.config, dataset))
    names = list(collator.settings.memory_modalities)
    pooled = {n: [] for n in ["joint", *names]}
    tokens = {n: [] for n in names}
    device = next(model.parameters()).device
    for first in range(0, len(starts), batch_size):
        samples = [dataset[(i, i)] for i in range(first, min(first + batch_size, len(starts)))]
        batch = collator(samples)
        with torch.no_grad():
            memory = model.forward_encoder(batch.to(device)).memory.float().cpu()  # [total_mem, enc_dim]
        pooled["joint"].append(_segment_mean(memory, batch.memory.packed.lengths))
        for name in names:
            seq = batch.modalities[name].encoder.seq
            pooled[name].append(_segment_mean(memory[batch.memory.rows[name].cpu()], seq.lengths))  # [B, D]
            tokens[name].append(batch.modalities[name].encoder.visible.lengths.int())
    return Embeddings(
        basins=[dataset.basins[b] for b, _ in starts], starts=np.array([s for _, s in starts], dtype=np.int64),
        pooled={n: torch.cat(v).numpy() for n, v in pooled.items()},
        tokens={n: torch.cat(v).numpy() for n, v in tokens.items()}, skipped=skipped)


def write_embeddings(path: Path, emb: Embeddings, attrs: dict) -> None:
    """``emb`` to ``path`` (``.nc`` or ``.parquet``, layout in the module docstring), atomically."""
    dates = emb.starts.astype("datetime64[D]").astype("datetime64[ns]")
    if path.suffix == ".parquet":
        import pandas as pd

        columns = {"basin": emb.basins, "window_start": dates}
        columns.update({f"tokens_{n}": v for n, v in emb.tokens.items()})
        for name, values in emb.pooled.items():
            columns.update({f"{name}_{j}": values[:, j] for j in range(values.shape[1])})
        frame = pd.DataFrame(columns)
        frame.attrs.update(attrs)
        write_atomic(path, lambda tmp: frame.to_parquet(tmp, index=False))
        return
    import xarray as xr

    data_vars = {"basin": ("window", np.array(emb.basins, dtype=str)), "window_start": ("window", dates)}
    data_vars.update({name: (("window", "feature"), values) for name, values in emb.pooled.items()})
    data_vars.update({f"tokens_{n}": ("window", v) for n, v in emb.tokens.items()})
    ds = xr.Dataset(data_vars, attrs=attrs)
    write_atomic(path, lambda tmp: ds.to_netcdf(tmp, engine="h5netcdf"))


def embed_run(run_dir: str | Path, out: str | Path, *, config_file: str | None = None,
              checkpoint: str | Path | None = None, data_root: str | None = None, stride: int | None = None,
              batch_size: int = 8, device: str = "cpu") -> Embeddings:
    """Write the pooled encoder embeddings of every basin and window of a run's data to ``out``; returns them.

    Args:
        run_dir: the run folder.
        out: a ``.nc`` or ``.parquet`` file.
        config_file: a YAML file whose ``data`` section replaces the run's (same modalities and channels).
        checkpoint: a checkpoint folder (default the run's latest).
        data_root: the run's data folder when it moved.
        stride: days between window starts (default ``data.steps``).
        batch_size: windows per forward.
        device: where the model runs (``cpu``, ``cuda``, ``cuda:N``, ``auto``).
    """
    out = Path(out)
    if out.suffix not in (".nc", ".parquet"):
        raise ValueError(f"out must end in .nc (NetCDF) or .parquet, got {str(out)!r}")
    if out.suffix == ".parquet" and importlib.util.find_spec("pyarrow") is None:
        raise ValueError(f"out {str(out)!r}: Parquet needs pyarrow (pip install pyarrow), or write a .nc file")
    for key, value in (("--stride", stride), ("--batch-size", batch_size)):
        if value is not None and value < 1:
            raise ValueError(f"{key} must be at least 1, got {value}")
    device = check_device(device)
    check_output(out, "out", folder=False)
    run = open_run(run_dir, checkpoint, config_file, data_root, device)
    check_targets([out], run.dataset, "out")
    emb = embed_windows(run, stride, batch_size)
    attrs = {"crossmae_run": str(run.run_dir.resolve()), "crossmae_checkpoint": str(run.checkpoint.resolve()),
             "crossmae_step": run.step, "window_days": run.dataset.steps}
    write_embeddings(out, emb, attrs)
    return emb


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description="Pooled encoder embeddings of every basin and window of a run.")
    add_run_arguments(parser, out_help="a .nc or .parquet file")
    parser.add_argument("--stride", type=int, help="days between window starts (default one window)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        with sigterm_as_exit():
            emb = embed_run(args.run, args.out, config_file=args.config, checkpoint=args.checkpoint,
                            data_root=args.data_root, stride=args.stride, batch_size=args.batch_size,
                            device=args.device)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the output file was not written", file=sys.stderr)
        return 130
    for basin, why in emb.skipped.items():
        print(f"skipped {basin}: {why}")
    seen = np.sum([v for v in emb.tokens.values()], axis=0)  # [W] tokens of all modalities
    for basin in dict.fromkeys(emb.basins):
        if not seen[np.array(emb.basins) == basin].any():
            print(f"basin {basin}: no observed value in any window; its modality embeddings are NaN")
    dim = emb.pooled["joint"].shape[1]
    print(f"{len(emb.basins)} windows x {dim} features ({', '.join(emb.pooled)}) in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
