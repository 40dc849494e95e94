"""Data path benchmark: windows/s of ``__getitem__``, the collator and the DataLoader at a run preset.

    python bench/data_speed.py                              # seed and cpu presets, loader with 0, 1, 2 workers
    python -m bench.data_speed --preset seed --workers 0,2 --rounds 3
    python bench/data_speed.py --preset seed --stages getitem+collate --workers ''   # one row (A/B of two trees)

One batch is ``data.batch_size`` windows of the preset's training split, chosen by the run's own batch
order (:class:`crossmae.data.loader.GlobalBatchOrder`); the rows cycle through the first batches of it.
Stages (one row each per preset):

    getitem          ``dataset[k]`` for every window of one batch
    collate          the collator (:func:`crossmae.data.loader.make_collator`) on one batch of fetched samples
    getitem+collate  both, as a DataLoader worker does them
    loader/wN        ``next()`` on the run's DataLoader (:func:`crossmae.data.loader.make_loader`) with N workers,
                     after warm-up batches (worker start-up excluded), no pinning

Per row: ``ms_p20``/``ms_p50``/``ms_p80`` wall time per batch and ``windows_per_s`` (B / ``ms_p50``);
``cpu_ms_p50`` the CPU time per batch and ``windows_per_cpu_s`` (B / ``cpu_ms_p50``: windows per second per
core, the number to compare on a loaded machine, where wall time mostly measures the other processes).
CPU time is the calling thread's (``time.thread_time``; torch runs on ``--threads`` threads, 1 by default, so
that is all of it) for getitem/collate and ``loader/w0``; for ``loader/wN`` it is the main thread's plus every
worker process's user + system time (``/proc/<pid>/stat``) over the timed batches, divided by their count.
``faults_per_batch``: minor page faults per batch (median over the calls; the loader's: over the timed batches,
main thread and workers): fresh memory the allocator maps for a batch costs kernel CPU time, so two runs whose
CPU times differ usually differ here. Memory: ``rss_mb`` the main process's resident set after the row; for
workers ``worker_rss_mb`` (the largest worker's resident set, shared copy-on-write pages of the forked parent
included) and ``worker_private_mb`` (its private pages, ``/proc/<pid>/smaps_rollup``: what each extra worker
costs); ``peak_mb`` the resident memory one call adds (``bench.harness.measure_peak_memory``, first round).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

if not __package__:  # run as `python bench/data_speed.py`: find the `bench` package by this file's place
    import _package  # noqa: F401

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
    run_rounds,
)
from crossmae.config import PRESETS, preset_config
from crossmae.data.loader import GlobalBatchOrder, build_dataset, make_collator, make_loader

PROGRAM = "python bench/data_speed.py"
STAGES = ("getitem", "collate", "getitem+collate")
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
    """One preset's data set, collator, batch order and a few fetched batches."""

    def __init__(self, preset: str, batches: int):
        self.preset = preset
        self.config = preset_config(preset)
        self.dataset = build_dataset(self.config.data, "train")
        self.collator = make_collator(self.config, self.dataset)
        self.order = GlobalBatchOrder(len(self.dataset), self.config.data.batch_size, self.config.train.seed)
        self.keys = [self.order.batch(k) for k in range(batches)]
        self.samples = [[self.dataset[k] for k in keys] for keys in self.keys]
        self.batch_size = self.config.data.batch_size
        self.steps = self.config.data.steps
        self.next = 0

    def _cycle(self) -> int:
        self.next = (self.next + 1) % len(self.keys)
        return self.next

    def call(self, stage: str) -> Callable[[], object]:
        if stage == "getitem":
            return lambda: [self.dataset[k] for k in self.keys[self._cycle()]]
        if stage == "collate":
            return lambda: self.collator(self.samples[self._cycle()])
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
                if first:
                    memory = measure_peak_memory(case.call(stage), device="cpu")
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
    parser.add_argument("--json", default=None, metavar="PATH",
                        help="result JSON (a CSV is written beside it; default under bench/results/)")
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
        if args.device not in (None, "cpu"):
            raise ValueError(f"--device: the data path runs on the host; only cpu is measured, got {args.device!r}")
        if args.json and args.out:
            raise ValueError("--json and --out name the same files: give one")
    except ValueError as exc:
        parser.error(str(exc))
    if args.json:
        out = Path(args.json).with_suffix("")
    else:
        out = Path(args.out) if args.out else RESULTS_DIR / f"data_speed_{'_'.join(presets)}_cpu"

    run = BenchRun.start("data_speed", "cpu", key_fields=KEY_FIELDS, argv=argv, peak_dtype=torch.float32,
                         peak_size=args.peak_size, program=PROGRAM, metric="ms_p50")
    run.env["torch_threads"] = torch.get_num_threads()
    print(f"data_speed on {run.env['device_name']}, torch threads {torch.get_num_threads()}; "
          f"load average {format_value(run.env['load_avg_1m'])}")
    plan = []
    for preset in presets:
        case = DataCase(preset, args.batches)
        print(f"{preset}: B={case.batch_size} T={case.steps} windows={len(case.dataset)}")
        plan += measurements(run, case, stages, workers, args)
    run_rounds(run, plan, rounds=args.rounds, out=out, fill=lambda row, timing: fill(row, timing, CPU_MS[id(row)]))
    json_path, csv_path = run.save(out)
    print_table([r for r in run.rows if r.get("status") == "ok"],
                ["stage", "preset", "B", "steps", "ms_p50", "cpu_ms_p50", "windows_per_s", "windows_per_cpu_s",
                 "faults_per_batch", "rss_mb", "worker_rss_mb", "worker_private_mb", "peak_mb"])
    print(f"\nwrote {json_path} and {csv_path}")
    if args.compare:
        return compare(args.compare, json_path, args.threshold)
    return 0


if __name__ == "__main__":
    sys.exit(main())
