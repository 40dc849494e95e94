"""Data path benchmark: windows/s of ``__getitem__``, the collator, the DataLoader and the device-resident path at a
run preset, and of lazy reads from a large on-disk data set.

    python bench/data_speed.py                              # seed and cpu presets, loader with 0, 1, 2 workers
    python -m bench.data_speed --preset seed --workers 0,2 --rounds 3
    python bench/data_speed.py --preset seed --stages getitem+collate --workers ''   # one row (A/B of two trees)
    python bench/data_speed.py --preset seed --stages device --workers '' --device cuda   # the device path on a GPU
    python bench/data_speed.py --large-files                # a 290 x 180 grid, 3 variables, 2 years, 120 gauges
    python bench/data_speed.py --large-files --years 10     # the seed's scale: 10 years (3.7 GB of floats)

One batch is ``data.batch_size`` windows of the preset's training split, chosen by the run's own batch
order (:class:`crossmae.data.loader.GlobalBatchOrder`); the rows cycle through the first batches of it.
Stages (one row each per preset):

    getitem          ``dataset[k]`` for every window of one batch
    collate          the collator (:func:`crossmae.data.loader.make_collator`) on one batch of fetched samples
    getitem+collate  both, as a DataLoader worker does them
    device           :class:`crossmae.data.device.DeviceCollator` on the batch's keys (``data.on_device``: the same
                     batch, made from a copy of the data set on ``--device``, cpu by default; ``device_copy_s`` and
                     ``device_copy_mb`` say what the copy cost)
    loader/wN        ``next()`` on the run's DataLoader (:func:`crossmae.data.loader.make_loader`) with N workers,
                     after warm-up batches (worker start-up excluded), no pinning

Per row: ``ms_p20``/``ms_p50``/``ms_p80`` wall time per batch and ``windows_per_s`` (B / ``ms_p50``);
``cpu_ms_p50`` the CPU time per batch and ``windows_per_cpu_s`` (B / ``cpu_ms_p50``: windows per second per
core, the number to compare on a loaded machine, where wall time mostly measures the other processes).
CPU time is the calling thread's (``time.thread_time``; torch runs on ``--threads`` threads, 1 by default, so
that is all of it) for getitem/collate/device and ``loader/w0``; for ``loader/wN`` it is the main thread's plus
every worker process's user + system time (``/proc/<pid>/stat``) over the timed batches, divided by their count.
``faults_per_batch``: minor page faults per batch (median over the calls; the loader's: over the timed batches,
main thread and workers): fresh memory the allocator maps for a batch costs kernel CPU time, so two runs whose
CPU times differ usually differ here. Memory: ``rss_mb`` the main process's resident set after the row; for
workers ``worker_rss_mb`` (the largest worker's resident set, shared copy-on-write pages of the forked parent
included) and ``worker_private_mb`` (its private pages, ``/proc/<pid>/smaps_rollup``: what each extra worker
costs); ``peak_mb`` the resident memory one call adds (``bench.harness.measure_peak_memory``, first round).

Large files (``--large-files``): writes a data set under ``--data-dir`` (``/tmp``, never the repository): one
gridded source of ``pr``, ``tas`` and ``sm`` on a 180 x 290 (lat x lon) grid, daily for ``--years`` years, as a
Zarr store chunked by ``--chunk-days`` days (``--format netcdf``: one NetCDF-4 file a year, chunked the same),
each of ``--gauges`` gauges with its own basin mask (a file of the grid's format) and a daily streamflow CSV. It is read
through the project's ``files`` source (:class:`crossmae.data.files.FilesDataset`, the seed's T = 90,
10-cell patches): each row builds a fresh data set with the reader's record cache
(:data:`crossmae.data.readers.CACHE_BYTES`) set to one of ``--cache-mb``, measures the resident memory that
reading the windows of ``--batches`` batches one at a time adds (``peak_mb``: the first reads, cache fill
included; each window is dropped before the next), then times
``getitem`` and ``getitem+collate`` of one batch of B = 8 windows. A record larger than the cache is read
window by window (memory: a window's days); one that fits is read once and kept (memory: the record).
``record_mb`` is the grid record of one basin as float32 days, ``window_mb`` one window's grid days.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

if not __package__:  # run as `python bench/data_speed.py`: find the `bench` package by this file's place
    import _package  # noqa: F401

import numpy as np
import torch

from bench.harness import (
    RESULTS_DIR,
    BenchRun,
    Measurement,
    Timing,
    add_common_args,
    apply_common_args,
    compare,
    format_value,
    measure_peak_memory,
    parse_list,
    print_table,
    record_error,
    resolve_device,
    run_rounds,
)
from crossmae.config import PRESETS, Config, FilesConfig, GridSource, SeriesSource, preset_config
from crossmae.data import readers
from crossmae.data.device import DeviceCollator, DeviceDataset
from crossmae.data.files import FilesDataset
from crossmae.data.loader import GlobalBatchOrder, build_dataset, keep_batch_memory_mapped, make_collator, make_loader

PROGRAM = "python bench/data_speed.py"
STAGES = ("getitem", "collate", "getitem+collate", "device")
KEY_FIELDS = ("stage", "preset", "B", "steps")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
CPU_MS: dict[int, list[float]] = {}  # id(row) → CPU ms per batch, pooled over rounds


def _thread_ms() -> float:
    return time.thread_time() * 1e3


def _thread_faults() -> int:
    """Minor page faults of the calling thread so far."""
    return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt


def _proc_cpu(pid: int) -> tuple[float, int]:
    """User + system CPU time in ms and minor page faults of process ``pid`` (``/proc/<pid>/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1e3 / CLOCK_TICKS, int(fields[7])  # utime + stime, minflt


def _proc_memory_mb(pid: int | str) -> tuple[float | None, float | None]:
    """(resident set, private pages) of process ``pid`` in MB; None where /proc lacks them."""
    rss = private = None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / 1024
        kb = 0
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                kb += int(line.split()[1])
        private = kb / 1024
    except OSError:
        pass
    return rss, private


class DataCase:
    """One preset's data set, collator, batch order and a few fetched batches.

    Args:
        preset: the run preset.
        batches: distinct batches the stages cycle through.
        device: where the device stage keeps its copy of the data set and makes its batches.
    """

    def __init__(self, preset: str, batches: int, device: torch.device | None = None):
        self.preset = preset
        self.config = preset_config(preset)
        self.dataset = build_dataset(self.config.data, "train")
        self.collator = make_collator(self.config, self.dataset)
        self.order = GlobalBatchOrder(len(self.dataset), self.config.data.batch_size, self.config.train.seed)
        self.keys = [self.order.batch(k) for k in range(batches)]
        self.samples = [[self.dataset[k] for k in keys] for keys in self.keys]
        self.batch_size = self.config.data.batch_size
        self.steps = self.config.data.steps
        self.device = device or torch.device("cpu")
        self._device_collator: DeviceCollator | None = None
        self.device_copy: dict = {}
        self.next = 0

    def _cycle(self) -> int:
        self.next = (self.next + 1) % len(self.keys)
        return self.next

    def device_collator(self) -> DeviceCollator:
        """The device path (built on first use; its build time and size go to :attr:`device_copy`)."""
        if self._device_collator is None:
            start = time.perf_counter()
            data = DeviceDataset(self.dataset, self.device, self.config.data.patch_size)
            self._device_collator = DeviceCollator(self.collator, data)
            tables = [*data.grids.values(), *data.series.values(), *data.inside.values()]
            self.device_copy = {"device_copy_s": time.perf_counter() - start,
                                "device_copy_mb": sum(t.numel() * t.element_size() for t in tables) / 1e6}
        return self._device_collator

    def call(self, stage: str) -> Callable[[], object]:
        if stage == "getitem":
            return lambda: [self.dataset[k] for k in self.keys[self._cycle()]]
        if stage == "collate":
            return lambda: self.collator(self.samples[self._cycle()])
        if stage == "device":
            collate = self.device_collator()
            if self.device.type == "cuda":
                return lambda: (collate(self.keys[self._cycle()]), torch.cuda.synchronize(self.device))
            return lambda: collate(self.keys[self._cycle()])
        return lambda: self.collator([self.dataset[k] for k in self.keys[self._cycle()]])


def time_calls(fn: Callable[[], object], args: argparse.Namespace) -> tuple[Timing, list[float], list[int]]:
    """Wall timing of ``fn`` (after ``--warmup`` calls; ``--reps`` or ``--min-time``), each call's thread CPU ms and
    minor page faults."""
    first = None
    last = 0.0
    for i in range(max(args.warmup, 1)):
        start = time.perf_counter()
        fn()
        last = time.perf_counter() - start
        first = last if i == 0 else first
    reps = args.reps or int(min(1000, max(5, args.min_time / max(last, 1e-6))))
    wall, cpu, faults = [], [], []
    for _ in range(reps):
        f0, c0, w0 = _thread_faults(), _thread_ms(), time.perf_counter()
        fn()
        wall.append((time.perf_counter() - w0) * 1e3)
        cpu.append(_thread_ms() - c0)
        faults.append(_thread_faults() - f0)
    return Timing.from_samples(wall, first_call_ms=first * 1e3), cpu, faults


def time_loader(case: DataCase, workers: int, args: argparse.Namespace) -> tuple[Timing, list[float], dict]:
    """Per-batch wall times of ``next()`` on a fresh DataLoader, the CPU ms per batch (main thread + workers) and
    the workers' memory."""
    loader = make_loader(case.dataset, GlobalBatchOrder(len(case.dataset), case.batch_size, case.config.train.seed),
                         case.collator, workers, pin_memory=False)
    it = iter(loader)
    start = time.perf_counter()
    for _ in range(max(args.warmup, 1) + 2 * workers):  # start-up and the prefetched batches
        next(it)
    first = (time.perf_counter() - start) * 1e3
    pids = [w.pid for w in getattr(it, "_workers", [])]
    worker0 = [_proc_cpu(p) for p in pids]
    thread0, faults0 = _thread_ms(), _thread_faults()
    wall = []
    for _ in range(args.loader_batches):
        w0 = time.perf_counter()
        next(it)
        wall.append((time.perf_counter() - w0) * 1e3)
    worker1 = [_proc_cpu(p) for p in pids]
    cpu_total = _thread_ms() - thread0 + sum(a[0] - b[0] for a, b in zip(worker1, worker0, strict=True))
    faults = _thread_faults() - faults0 + sum(a[1] - b[1] for a, b in zip(worker1, worker0, strict=True))
    memory = [_proc_memory_mb(p) for p in pids]
    del it
    extra = {"faults_per_batch": faults / args.loader_batches}
    if memory:
        extra.update(worker_rss_mb=max(m[0] or 0.0 for m in memory),
                     worker_private_mb=max(m[1] or 0.0 for m in memory))
    return Timing.from_samples(wall, first_call_ms=first), [cpu_total / args.loader_batches], extra


def fill(row: dict, timing: Timing, cpu: Sequence[float]) -> None:
    row.update(timing.as_row())
    cpu_p50 = float(torch.tensor(cpu, dtype=torch.float64).median()) if cpu else None
    row["cpu_ms_p50"] = cpu_p50
    row["windows_per_s"] = row["B"] / (timing.ms_p50 * 1e-3)
    row["windows_per_cpu_s"] = row["B"] / (cpu_p50 * 1e-3) if cpu_p50 else None
    row["rss_mb"] = _proc_memory_mb("self")[0]


def measurements(run: BenchRun, case: DataCase, stages: Sequence[str], workers: Sequence[int],
                 args: argparse.Namespace) -> list[Measurement]:
    out = []
    base = {"preset": case.preset, "B": case.batch_size, "steps": case.steps, "status": "ok"}

    for stage in stages:
        row = run.add(stage=stage, workers=None, **base)
        cpu = CPU_MS.setdefault(id(row), [])

        def timed(first: bool, row=row, stage=stage, cpu=cpu) -> Timing | None:
            try:
                timing, samples, faults = time_calls(case.call(stage), args)
                row["faults_per_batch"] = float(torch.tensor(faults, dtype=torch.float64).median())
                if stage == "device":
                    row.update(case.device_copy, data_device=str(case.device))
                if first:
                    memory = measure_peak_memory(case.call(stage), device=case.device if stage == "device"
                                                 else "cpu")
                    if memory is not None:
                        row["peak_mb"] = memory.peak_mb
            except Exception as exc:
                record_error(row, exc, f"{stage} {case.preset}")
                return None
            cpu.extend(samples)
            return timing

        out.append(Measurement(row, timed, f"{stage} {case.preset}"))
    for n in workers:
        row = run.add(stage=f"loader/w{n}", workers=n, **base)
        cpu = CPU_MS.setdefault(id(row), [])

        def timed(first: bool, row=row, n=n, cpu=cpu) -> Timing | None:
            try:
                timing, samples, extra = time_loader(case, n, args)
            except Exception as exc:
                record_error(row, exc, f"loader/w{n} {case.preset}")
                return None
            cpu.extend(samples)
            row.update(extra)
            return timing

        out.append(Measurement(row, timed, f"loader/w{n} {case.preset}"))
    return out


LARGE_SHAPE = (180, 290)  # (lat, lon) cells
LARGE_VARIABLES = ("pr", "tas", "sm")
LARGE_FIRST_DAY = np.datetime64("2000-01-01")
LARGE_MANIFEST = "crossmae_large_files.json"


def _zarr_installed() -> bool:
    try:
        import zarr  # noqa: F401
    except ImportError:
        return False
    return True


def write_large_files(folder: Path, years: int, gauges: int, fmt: str, chunk_days: int) -> float:
    """Write the ``--large-files`` data set into ``folder`` (or keep it when its manifest says it is the same);
    returns the seconds spent writing (0 when kept).

    Raises:
        ValueError: ``folder`` holds other files (it is never cleared unless it holds this benchmark's manifest).
    """
    import shutil

    manifest = {"complete": True, "years": years, "gauges": gauges, "format": fmt, "chunk_days": chunk_days,
                "shape": list(LARGE_SHAPE), "variables": list(LARGE_VARIABLES)}
    marker = folder / LARGE_MANIFEST
    if marker.is_file() and json.loads(marker.read_text()) == manifest:
        return 0.0
    if folder.exists() and any(folder.iterdir()):
        if not marker.is_file():
            raise ValueError(f"--data-dir {str(folder)!r} holds files that this benchmark did not write; give an "
                             f"empty or new folder")
        shutil.rmtree(folder)
    start = time.perf_counter()
    (folder / "masks").mkdir(parents=True)
    (folder / "gauges").mkdir()
    marker.write_text(json.dumps({**manifest, "complete": False}))  # ours, to clear if the writing stops
    days = int(round(365.25 * years))
    rng = np.random.default_rng(0)
    with warnings.catch_warnings():  # zarr 3 notes that consolidated metadata (what xarray reads) is not in its spec
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        _write_large_grids(folder, days, fmt, chunk_days, rng)
        _write_gauges(folder, days, gauges, fmt, rng)
    marker.write_text(json.dumps(manifest))
    return time.perf_counter() - start


def _large_coords() -> tuple[np.ndarray, np.ndarray]:
    """Latitudes ``[H]`` (north to south) and longitudes ``[W]`` of the large grid's cell centres (0.05°)."""
    h, w = LARGE_SHAPE
    return 55.0 - 0.05 * np.arange(h), 5.0 + 0.05 * np.arange(w)


def _write_large_grids(folder: Path, days: int, fmt: str, chunk_days: int, rng: np.random.Generator) -> None:
    import xarray as xr

    h, w = LARGE_SHAPE
    lat, lon = _large_coords()
    block = chunk_days * max(1, 180 // chunk_days)  # whole chunks per write
    time_encoding = {"units": "days since 2000-01-01", "dtype": "int32"}
    for first in range(0, days, block):
        n = min(block, days - first)
        t = np.arange(first, first + n)
        season = np.sin(2 * np.pi * (t - 105) / 365.25).astype(np.float32)[:, None, None]  # [n, 1, 1]
        fields = {
            "pr": np.maximum(rng.standard_normal((n, h, w), dtype=np.float32) * 4.0 - 1.0, 0.0),
            "tas": 9.0 + 9.0 * season + rng.standard_normal((n, h, w), dtype=np.float32),
            "sm": 0.3 + 0.05 * rng.standard_normal((n, h, w), dtype=np.float32),
        }
        ds = xr.Dataset({v: (("time", "lat", "lon"), fields[v]) for v in LARGE_VARIABLES},
                        coords={"time": (LARGE_FIRST_DAY + t).astype("datetime64[ns]"), "lat": lat, "lon": lon})
        if fmt == "zarr":
            if first == 0:
                encoding = {v: {"chunks": (chunk_days, h, w)} for v in LARGE_VARIABLES}
                ds.to_zarr(folder / "grid.zarr", mode="w", encoding={**encoding, "time": time_encoding})
            else:
                ds.to_zarr(folder / "grid.zarr", mode="a", append_dim="time")
        else:
            encoding = {v: {"chunksizes": (min(chunk_days, n), h, w)} for v in LARGE_VARIABLES}
            ds.to_netcdf(folder / f"grid_{first:06d}.nc", engine="h5netcdf",
                         encoding={**encoding, "time": time_encoding})


def _write_gauges(folder: Path, days: int, gauges: int, fmt: str, rng: np.random.Generator) -> None:
    import xarray as xr

    h, w = LARGE_SHAPE
    lat, lon = _large_coords()
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    dates = (LARGE_FIRST_DAY + np.arange(days)).astype(str)
    for g in range(gauges):
        cy, cx, radius = rng.uniform(0.1 * h, 0.9 * h), rng.uniform(0.1 * w, 0.9 * w), rng.uniform(0.05, 0.17) * h
        inside = ((yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2).astype(np.float32)  # [H, W] 1 inside
        mask = xr.Dataset({"mask": (("lat", "lon"), inside)}, coords={"lat": lat, "lon": lon})
        if fmt == "zarr":  # a grid source's mask files are read in its format
            mask.to_zarr(folder / "masks" / f"g{g:03d}.zarr", mode="w")
        else:
            mask.to_netcdf(folder / "masks" / f"g{g:03d}.nc", engine="h5netcdf")
        flow = np.convolve(rng.gamma(0.6, 3.0, days), 0.2 * 0.8 ** np.arange(30))[:days] + 0.3  # [days]
        flow[rng.integers(0, days - 30):][:30] = np.nan  # a month's gap
        text = "\n".join(f"{d},{q:.4f}" for d, q in zip(dates, flow, strict=True))
        (folder / "gauges" / f"g{g:03d}.csv").write_text("date,flow\n" + text + "\n")


def large_files_config(folder: Path, gauges: int, fmt: str) -> Config:
    """The seed preset's run on the ``--large-files`` data set (``files`` source, T = 90, 10-cell patches)."""
    config = preset_config("seed")
    data = config.data
    data.source, data.stride = "files", 30
    data.files = FilesConfig(
        root=str(folder), basins=[f"g{g:03d}" for g in range(gauges)],
        grids=[GridSource(name="met", format=fmt, path="grid.zarr" if fmt == "zarr" else "grid_*.nc",
                          variables=list(LARGE_VARIABLES), mask_variable="mask", transforms={"pr": "log1p"},
                          mask_path="masks/{basin}.zarr" if fmt == "zarr" else "masks/{basin}.nc")],
        series=[SeriesSource(name="flow", path="gauges/{basin}.csv", columns=["flow"], transform="log1p",
                             flow=True)],
    )
    return config


def large_files_rows(run: BenchRun, args: argparse.Namespace, out: Path) -> None:
    """The ``--large-files`` rows (see the module docstring), one data set per ``--cache-mb`` setting."""
    folder = Path(args.data_dir)
    fmt = args.format or ("zarr" if _zarr_installed() else "netcdf")
    print(f"large files: {args.years} years, {args.gauges} gauges, {fmt} chunked by {args.chunk_days} days, "
          f"in {folder}" + ("" if fmt == "zarr" or args.format else " (zarr is not installed)"))
    written = write_large_files(folder, args.years, args.gauges, fmt, args.chunk_days)
    print(f"  {'wrote it in ' + format_value(written) + ' s' if written else 'kept the data set written before'}")
    config = large_files_config(folder, args.gauges, fmt)
    start = time.perf_counter()
    stats_set = FilesDataset(dataclasses.replace(config.data, files=dataclasses.replace(
        config.data.files, basins=config.data.files.basins[:1])), "train")
    stats_s = time.perf_counter() - start
    stats = stats_set.norm_stats
    reader = stats_set.grid_reader("met", 0)
    h, w = reader.shape
    record_mb = (int(reader.days[-1]) - int(reader.days[0]) + 1) * len(LARGE_VARIABLES) * h * w * 4 / 1e6
    window_mb = config.data.steps * len(LARGE_VARIABLES) * h * w * 4 / 1e6
    on_disk_mb = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 1e6
    print(f"  statistics from one basin's training days: {format_value(stats_s)} s; record {format_value(record_mb)} "
          f"MB of float32 days, a window {format_value(window_mb)} MB, on disk {format_value(on_disk_mb)} MB")
    facts = {"format": fmt, "years": args.years, "gauges": args.gauges, "record_mb": record_mb,
             "window_mb": window_mb, "on_disk_mb": on_disk_mb}
    default_cache = readers.CACHE_BYTES
    try:
        for cache_mb in args.cache_mb:
            readers.CACHE_BYTES = int(cache_mb * 2**20)
            _cache_rows(run, args, out, config, stats, {**facts, "cache_mb": cache_mb})
    finally:
        readers.CACHE_BYTES = default_cache


def _cache_rows(run: BenchRun, args: argparse.Namespace, out: Path, config: Config, stats: dict, facts: dict) -> None:
    """The two ``--large-files`` rows of one cache setting (already set in :mod:`crossmae.data.readers`)."""
    start = time.perf_counter()
    dataset = FilesDataset(config.data, "train", norm_stats=stats)
    build_s = time.perf_counter() - start
    collator = make_collator(config, dataset)
    order = GlobalBatchOrder(len(dataset), config.data.batch_size, config.train.seed)
    keys = [order.batch(k) for k in range(args.batches)]
    common = {"preset": "large", "B": config.data.batch_size, "steps": config.data.steps, "status": "ok",
              "windows": len(dataset), "dataset_build_s": build_s,
              "cached": facts["record_mb"] * 1e6 <= readers.CACHE_BYTES, **facts}
    def read_each() -> None:
        for batch in keys:
            for k in batch:
                dataset[k]  # one window at a time: what stays is what the reader keeps

    first = measure_peak_memory(read_each, device="cpu")
    cycle = iter(range(10**9))

    def fetch() -> list:
        return [dataset[k] for k in keys[next(cycle) % len(keys)]]

    for stage, call in (("files/getitem", fetch), ("files/getitem+collate", lambda: collator(fetch()))):
        row = run.add(stage=stage, workers=None, **common)
        timing, cpu, faults = time_calls(call, args)
        fill(row, timing, cpu)
        row["faults_per_batch"] = float(torch.tensor(faults, dtype=torch.float64).median())
        row["peak_mb"] = first.peak_mb if first is not None else None
        print(f"  cache {format_value(facts['cache_mb'])} MiB {stage:<22} p50 {format_value(timing.ms_p50):>8} ms, "
              f"{format_value(row['windows_per_s'])} windows/s, the first reads add {format_value(row['peak_mb'])} MB",
              flush=True)
        run.save(out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROGRAM, description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="seed,cpu", help=f"comma-separated run presets of {', '.join(PRESETS)}")
    parser.add_argument("--stages", default=",".join(STAGES),
                        help=f"comma-separated of {', '.join(STAGES)} (default: all)")
    parser.add_argument("--workers", default="0,1,2",
                        help="comma-separated DataLoader worker counts (0,1,2; empty: no loader rows)")
    parser.add_argument("--loader-batches", type=int, default=12,
                        help="timed batches per loader measurement, after warm-up (default 12)")
    parser.add_argument("--batches", type=int, default=3, help="distinct batches the stages cycle through (3)")
    parser.add_argument("--large-files", action="store_true",
                        help="measure lazy reads of a large on-disk data set instead of the presets")
    parser.add_argument("--years", type=int, default=2, help="--large-files: years of daily grids (2; the seed's "
                        "scale: 10)")
    parser.add_argument("--gauges", type=int, default=120, help="--large-files: gauges, each a basin (120)")
    parser.add_argument("--format", choices=("zarr", "netcdf"), default=None,
                        help="--large-files: grid file format (default zarr when installed, else netcdf)")
    parser.add_argument("--chunk-days", type=int, default=30, help="--large-files: days per chunk (30)")
    parser.add_argument("--cache-mb", default="256,4096",
                        help="--large-files: comma-separated record cache sizes in MiB, one data set each "
                        "(256 = the project's default, crossmae.data.readers.CACHE_BYTES)")
    parser.add_argument("--data-dir", default="/tmp/crossmae_large_files",
                        help="--large-files: where the data set is written (outside the repository)")
    parser.add_argument("--json", default=None, metavar="PATH",
                        help="result JSON (a CSV is written beside it; default under bench/results/)")
    parser.add_argument("--default-allocator", action="store_true",
                        help="keep glibc's malloc defaults (the trainer sets crossmae.data.loader."
                        "keep_batch_memory_mapped; so does this benchmark unless told not to)")
    add_common_args(parser)
    parser.set_defaults(threads=1, peak_size=256)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    try:
        apply_common_args(args)
        presets = parse_list(args.preset, PRESETS, "--preset")
        stages = parse_list(args.stages, STAGES, "--stages") if args.stages.strip() else []
        try:
            workers = [int(w) for w in args.workers.split(",") if w.strip()]
        except ValueError:
            raise ValueError(f"--workers must be comma-separated integers, got {args.workers!r}") from None
        if any(w < 0 for w in workers):
            raise ValueError(f"--workers must be non-negative, got {args.workers!r}")
        if args.loader_batches < 1:
            raise ValueError(f"--loader-batches must be at least 1, got {args.loader_batches}")
        if args.batches < 1:
            raise ValueError(f"--batches must be at least 1, got {args.batches}")
        if args.device is not None and not args.device.startswith(("cpu", "cuda")):
            raise ValueError(f"--device must be cpu, cuda or cuda:N (the device stage's device), got {args.device!r}")
        data_device = resolve_device(args.device or "cpu")
        if data_device.type != "cpu" and args.large_files:
            raise ValueError("--large-files reads on the host: drop --device")
        if args.large_files:
            for flag, value in (("--years", args.years), ("--gauges", args.gauges), ("--chunk-days", args.chunk_days)):
                if value < 1:
                    raise ValueError(f"{flag} must be at least 1, got {value}")
            try:
                args.cache_mb = [float(c) for c in args.cache_mb.split(",") if c.strip()]
            except ValueError:
                raise ValueError(f"--cache-mb must be comma-separated numbers, got {args.cache_mb!r}") from None
            if not args.cache_mb or any(c < 0 for c in args.cache_mb):
                raise ValueError(f"--cache-mb must be non-negative sizes, got {args.cache_mb!r}")
            repo = Path(__file__).resolve().parents[1]
            if Path(args.data_dir).resolve().is_relative_to(repo):
                raise ValueError(f"--data-dir {args.data_dir!r} lies inside the repository; write the data elsewhere")
        if args.json and args.out:
            raise ValueError("--json and --out name the same files: give one")
    except ValueError as exc:
        parser.error(str(exc))
    if args.json:
        out = Path(args.json).with_suffix("")
    elif args.out:
        out = Path(args.out)
    elif args.large_files:
        out = RESULTS_DIR / f"data_speed_large_files_{args.years}y_cpu"
    else:
        out = RESULTS_DIR / f"data_speed_{'_'.join(presets)}_{data_device.type}"

    tuned = False if args.default_allocator else keep_batch_memory_mapped()
    run = BenchRun.start("data_speed", "cpu", key_fields=KEY_FIELDS, argv=argv, peak_dtype=torch.float32,
                         peak_size=args.peak_size, program=PROGRAM, metric="ms_p50")
    run.env["torch_threads"] = torch.get_num_threads()
    run.env["malloc_kept_mapped"] = tuned
    run.env["glibc_tunables"] = os.environ.get("GLIBC_TUNABLES", "")
    print(f"data_speed on {run.env['device_name']}, torch threads {torch.get_num_threads()}; "
          f"load average {format_value(run.env['load_avg_1m'])}")
    columns = ["stage", "preset", "B", "steps", "ms_p50", "cpu_ms_p50", "windows_per_s", "windows_per_cpu_s",
               "faults_per_batch", "rss_mb", "worker_rss_mb", "worker_private_mb", "peak_mb"]
    if args.large_files:
        large_files_rows(run, args, out)
        columns = ["stage", "cache_mb", "cached", "ms_p50", "cpu_ms_p50", "windows_per_s", "windows_per_cpu_s",
                   "record_mb", "window_mb", "peak_mb", "rss_mb"]
    else:
        plan = []
        for preset in presets:
            case = DataCase(preset, args.batches, data_device)
            print(f"{preset}: B={case.batch_size} T={case.steps} windows={len(case.dataset)}")
            plan += measurements(run, case, stages, workers, args)
        run_rounds(run, plan, rounds=args.rounds, out=out,
                   fill=lambda row, timing: fill(row, timing, CPU_MS[id(row)]))
    json_path, csv_path = run.save(out)
    print_table([r for r in run.rows if r.get("status") == "ok"], columns)
    print(f"\nwrote {json_path} and {csv_path}")
    if args.compare:
        return compare(args.compare, json_path, args.threshold)
    return 0


if __name__ == "__main__":
    sys.exit(main())
