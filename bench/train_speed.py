"""Whole-training-step benchmark of the multimodal model: ``--fused`` against the seed's path and the standard MAE.

One timed call is :meth:`crossmae.engine.Trainer.train_step` on one batch: every modality's
encoder and decoder forward, the loss, the backward, gradient clipping, the AdamW update and the
scheduler step, exactly as ``train.py`` runs it on a step that does not log (bf16 autocast on a
GPU, fp32 on a CPU), eager or compiled (``--modes``: ``train.compile=true``, the model compiled
once by ``torch.compile``). The
workload is a run preset (``crossmae.config.preset_config``): ``default`` is the multimodal
synthetic run (three grid and two series modalities plus static attributes), ``seed``, ``wide``,
``ragged`` and ``cpu`` the one-grid workloads of docs/presets.md, ``regional`` a whole region
(three grids and a site set of gauges per sample; docs/sites.md). ``--batch`` and ``--steps``
shrink a preset (quick CPU runs). One batch (the run's first) is collated once and reused by
every variant.

Variants (CrossMAE variants start from the same weights):
    fused         ``train.py --fused``: packed encoders and decoders, varlen attention (``auto``
                  backend, or ``--backend``), the fused loss where it runs.
    seed          ``train.py`` without ``--fused``: padded encoders, a per-sample loop in the decoders.
    standard_mae  the standard MAE decoder (``use_cross_attn=False``: self-attention over the memory
                  and every masked position), batched the standard way: padded encoders and
                  decoders, SDPA with a key-padding mask.

Per row: ms p20/p50/p80 of the step, samples/s and tokens/s at the median (tokens =
``batch.num_tokens``: encoder plus decoder-query tokens, the same for every variant), peak memory
(after warm-up, optimizer state included in the baseline), the first step's loss (``fused`` and
``seed`` must agree), the first step's wall time (compilation included), ``cpu_ms`` the CPU time
the process spends per step (all its threads; steadier than wall time on a loaded machine); per
step, counted over one step after warm-up by
:class:`crossmae.engine.HostSyncCounter`: ``aten_ops`` (every aten op dispatched: a proxy for
kernel launches) and ``host_syncs`` (``.item()``/``_local_scalar_dense``, ``nonzero``,
device→host copies and Python-level reads such as ``.tolist()``: each one a wait for the device
on a GPU). A dispatch mode makes ``torch.compile`` run the model eagerly, so compiled rows give
instead ``graphs`` (graphs dynamo compiled) and ``graph_breaks``. On a GPU also model-FLOPs
utilisation and energy per sample (NVML):

    model FLOPs = 3 · Σ_linear 2·rows·in·out  +  3.5 · Σ_attention 4·Σ_b Lq_b·Lk_b·H·D

the first term every ``nn.Linear`` call of one forward over the real (unpadded) rows, ×3 for
forward and backward (the 6·params·tokens rule, counted per layer); the second every attention
over the real lengths (encoder self-attention, decoder cross- or self-attention), forward and
backward = 3.5× forward (docs/presets.md). MFU = model FLOPs / median step time / the matmul peak
measured in the same run (bf16 on a GPU; on a CPU the fp32 peak). Padding is not counted:
a padded variant does more arithmetic than its model FLOPs.

Usage (from the repository root)::

    python bench/train_speed.py                        # default and cpu presets on CPU; default, seed on GPU
    python bench/train_speed.py --preset cpu --rounds 3
    python bench/train_speed.py --compare bench/results/train_speed_default_cpu_cpu.json
    python bench/train_speed.py --preset cpu --variants fused --modes eager,compiled
    python bench/train_speed.py --preset regional --batch 1 --steps 8   # a region on a CPU
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

if not __package__:  # run as `python bench/train_speed.py`: find the `bench` package by this file's place
    import _package  # noqa: F401

import torch
from torch import nn

from bench.harness import (
    RESULTS_DIR,
    BenchRun,
    Measurement,
    Timing,
    add_common_args,
    add_speedups,
    apply_common_args,
    compare,
    device_label,
    dtype_name,
    format_value,
    parse_list,
    print_table,
    record_error,
    resolve_device,
    run_rounds,
    time_row,
)
from crossmae.config import PRESETS, Config, preset_config
from crossmae.data.collate import MaskingCollator, PackedBatch
from crossmae.data.loader import GlobalBatchOrder
from crossmae.engine import HostSyncCounter, Trainer
from crossmae.model import MultimodalCrossMAE, static_conditioning
from crossmae.ops import BACKENDS, select_backend
from crossmae.presets import attention_flops

PROGRAM = "python bench/train_speed.py"
VARIANTS = ("fused", "seed", "standard_mae")
MODES = ("eager", "compiled")
KEY_FIELDS = ("variant", "mode", "preset", "B", "steps", "dtype")
ROW_FIELDS = (
    *KEY_FIELDS, "status", "reason", "encoder_path", "decoder_path", "attn_backend", "tokens", "enc_tokens",
    "dec_tokens", "params", "reps", "ms_p20", "ms_p50", "ms_p80", "samples_per_s", "tokens_per_s", "peak_mb",
    "peak_total_mb", "model_gflop", "linear_gflop", "attn_gflop", "model_tflops", "mfu", "peak_tflops",
    "peak_dtype", "speedup_vs_seed", "speedup_vs_standard_mae", "speedup_vs_eager", "loss_first_step",
    "first_step_ms", "cpu_ms", "aten_ops", "host_syncs", "graphs", "graph_breaks", "joules_per_step",
    "joules_per_sample", "power_w", "sm_clock_mhz",
)


def run_config(preset: str, variant: str, mode: str, device: torch.device, out_dir: Path, backend: str,
               batch: int | None = None, steps: int | None = None) -> Config:
    """The preset's run configuration for one variant and mode (no validation, no checkpoints), with its batch size
    and window length overridden when given."""
    config = preset_config(preset)
    if batch is not None:
        config.data.batch_size = batch
    if steps is not None:
        config.data.steps = config.data.stride = steps
    config.train.device = str(device)
    config.train.out_dir = str(out_dir / f"{variant}_{mode}")
    config.train.compile = mode == "compiled"
    config.train.val_every = 0
    config.train.fused = variant == "fused"
    config.model.use_cross_attn = variant != "standard_mae"
    config.model.attn_backend = backend
    return config


def paths_of(variant: str) -> tuple[str, str]:
    """(encoder path, decoder path) of a variant."""
    return {"fused": ("packed", "packed"), "seed": ("padded", "loop"), "standard_mae": ("padded", "padded")}[variant]


# -- model FLOPs -------------------------------------------------------------------------
def linear_forward_flops(model: MultimodalCrossMAE, batch: PackedBatch, autocast) -> float:
    """FLOPs of every ``nn.Linear`` call in one forward on the packed path (real rows only)."""
    total = 0.0

    def count(module: nn.Linear, inputs, output):
        nonlocal total
        rows = inputs[0].numel() // module.in_features
        total += 2.0 * rows * module.in_features * module.out_features

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, nn.Linear)]
    paths = model.encoder_path, model.decoder_path
    try:
        model.set_paths(encoder="packed", decoder="packed")
        with torch.no_grad(), autocast():
            model(batch)
    finally:
        model.set_paths(*paths)
        for hook in hooks:
            hook.remove()
    return total


def attention_forward_flops(model: MultimodalCrossMAE, batch: PackedBatch) -> float:
    """Forward FLOPs of every attention of one forward over the real lengths (docs/presets.md)."""
    cfg = model.cfg
    enc_heads, enc_head_dim = cfg.enc_heads, cfg.enc_dim // cfg.enc_heads
    dec_heads, dec_head_dim = cfg.dec_heads, cfg.dec_dim // cfg.dec_heads
    total = 0.0
    for mb in batch.modalities.values():
        lengths = mb.encoder.seq.lengths.tolist()
        total += cfg.enc_depth * attention_flops(lengths, lengths, enc_heads, enc_head_dim)[0]
        if cfg.use_cross_attn:
            memory = batch.memory.packed if cfg.memory == "joint" else mb.encoder.seq
            queries = mb.queries.packed.lengths.tolist()
            terms = [(queries, memory.lengths.tolist())]
            if cfg.decoder_self_attn:
                terms.append((queries, queries))
        else:
            terms = [(mb.standard.seq.lengths.tolist(), mb.standard.seq.lengths.tolist())]
        for lengths_q, lengths_k in terms:
            total += cfg.dec_depth * attention_flops(lengths_q, lengths_k, dec_heads, dec_head_dim)[0]
    return total


# -- rows --------------------------------------------------------------------------------
@dataclass
class TrainCase:
    """One variant of one preset: its trainer (model, optimizer, autocast) and the shared batch."""

    row: dict
    trainer: Trainer | None
    batch: PackedBatch


def first_batch(trainer: Trainer, config: Config) -> PackedBatch:
    """The run's first batch, with the standard decoder's sequences too (so every variant can use it)."""
    dataset = trainer.train_set
    static_tokens, _ = static_conditioning(dataset.spec, config.model)
    collator = MaskingCollator(dataset.spec, config.mask, config.data.patch_size, config.data.steps,
                               memory=config.model.memory, standard_decoder=True, static_tokens=static_tokens,
                               calendar=config.model.day_of_year)
    items = GlobalBatchOrder(len(dataset), config.data.batch_size, config.train.seed).batch(0)
    return collator([dataset[item] for item in items]).to(trainer.device)


def plan_preset(run: BenchRun, preset: str, variants: Sequence[str], modes: Sequence[str], backend: str,
                out_dir: Path, batch_size: int | None = None, steps: int | None = None) -> list[TrainCase]:
    """Trainers and rows of every variant and mode of one preset (one that can't be built gets an error row)."""
    cases, batch = [], None
    for variant, mode in [(v, m) for v in variants for m in modes]:
        config = run_config(preset, variant, mode, run.device, out_dir, backend, batch_size, steps)
        encoder_path, decoder_path = paths_of(variant)
        row = dict.fromkeys(ROW_FIELDS)
        row.update(variant=variant, mode=mode, preset=preset, B=config.data.batch_size, steps=config.data.steps,
                   dtype="bf16" if run.device.type == "cuda" else "fp32", status="ok", encoder_path=encoder_path,
                   decoder_path=decoder_path, peak_tflops=run.peak.tflops, peak_dtype=run.peak.dtype)
        try:
            trainer = Trainer(config)
            trainer.model.set_paths(encoder=encoder_path, decoder=decoder_path)
            if batch is None:
                batch = first_batch(trainer, config)
            model = trainer.model
            if variant == "fused":
                cfg = model.cfg
                probe = torch.empty(1, cfg.dec_heads, cfg.dec_dim // cfg.dec_heads, device=run.device,
                                    dtype=torch.bfloat16 if run.device.type == "cuda" else torch.float32)
                row["attn_backend"] = select_backend(backend, probe, needs_backward=True).name
            linear = linear_forward_flops(model, batch, trainer.autocast)
            attention = attention_forward_flops(model, batch)
            row.update(
                params=sum(p.numel() for p in model.parameters()), tokens=batch.num_tokens,
                enc_tokens=sum(m.encoder.seq.total for m in batch.modalities.values()),
                dec_tokens=sum(m.queries.packed.total for m in batch.modalities.values()),
                linear_gflop=3.0 * linear / 1e9, attn_gflop=3.5 * attention / 1e9,
                model_gflop=(3.0 * linear + 3.5 * attention) / 1e9,
            )
        except Exception as exc:  # a variant that can't be built must not end the run: record it
            record_error(row, exc, str(variant))
            trainer = None
        cases.append(TrainCase(run.add(**row), trainer, batch))
    return cases


def first_steps(row: dict, step) -> None:
    """The first step's loss and time (compilation included); the process's CPU time per step (median of 3);
    then one warmed-up step's aten ops and host syncs (eager), or the graphs and graph breaks dynamo compiled
    over these steps (compiled)."""
    from torch._dynamo.utils import counters

    graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    start = time.perf_counter()
    row["loss_first_step"] = float(step()[0])  # the read waits for the step
    row["first_step_ms"] = (time.perf_counter() - start) * 1e3
    cpu_ms = []
    for _ in range(3):
        start = time.process_time()
        float(step()[0])
        cpu_ms.append((time.process_time() - start) * 1e3)
    row["cpu_ms"] = statistics.median(cpu_ms)
    if row["mode"] == "compiled":
        row.update(graphs=counters["stats"]["unique_graphs"] - graphs,
                   graph_breaks=sum(counters["graph_break"].values()) - breaks)
        return
    with HostSyncCounter() as counter:
        step()
    row.update(aten_ops=counter.ops, host_syncs=counter.syncs + counter.reads)


def measurement(run: BenchRun, case: TrainCase, args: argparse.Namespace) -> Measurement:
    """How :func:`bench.harness.run_rounds` times one variant's training step (first loss, per-step counts and
    peak memory in the first round)."""
    row, trainer, batch = case.row, case.trainer, case.batch

    def step():
        return trainer.train_step(batch)

    def timed(first: bool) -> Timing | None:
        return time_row(run, row, step, args, first=first, label=f"{row['variant']} {row['mode']}",
                        before=lambda: first_steps(row, step))

    return Measurement(row, timed, f"{row['variant']} {row['mode']} {row['preset']}")


def fill_timing(run: BenchRun, row: dict, timing: Timing) -> None:
    """Timing, throughput and (on a GPU) MFU and energy of a row."""
    seconds = timing.ms_p50 * 1e-3
    model_tflops = row["model_gflop"] * 1e9 / seconds / 1e12
    gpu = run.device.type == "cuda"
    row.update(reps=timing.reps, ms_p20=timing.ms_p20, ms_p50=timing.ms_p50, ms_p80=timing.ms_p80,
               first_call_ms=timing.first_call_ms,
               samples_per_s=row["B"] / seconds, tokens_per_s=row["tokens"] / seconds, model_tflops=model_tflops,
               mfu=model_tflops / run.peak.tflops if gpu else None, joules_per_step=timing.joules,
               joules_per_sample=timing.joules / row["B"] if timing.joules is not None else None,
               power_w=timing.power_w, sm_clock_mhz=timing.sm_clock_mhz)


def add_baseline_speedups(rows: Sequence[dict]) -> None:
    """``speedup_vs_seed`` and ``speedup_vs_standard_mae`` of every timed row of the same preset and mode, and
    ``speedup_vs_eager`` of each compiled row."""
    add_speedups(rows, "variant", ("seed", "standard_mae"), ["preset", "mode"])
    add_speedups(rows, "mode", ("eager",), ["preset", "variant"])


TABLE_COLUMNS = [
    "variant", "mode", "preset", "B", ("backend", "attn_backend"), ("p50 ms", "ms_p50"), ("p20 ms", "ms_p20"),
    ("p80 ms", "ms_p80"), ("samples/s", "samples_per_s"), ("tokens/s", "tokens_per_s"), ("aten ops", "aten_ops"),
    ("host syncs", "host_syncs"), ("graphs", "graphs"), ("peak MB", "peak_mb"), ("TFLOP/s", "model_tflops"),
    ("MFU %", "mfu_pct"), ("vs seed", "speedup_vs_seed"), ("vs standard", "speedup_vs_standard_mae"),
    ("vs eager", "speedup_vs_eager"), ("J/sample", "joules_per_sample"), ("loss step 1", "loss_first_step"),
    ("step 1 ms", "first_step_ms"), ("CPU ms", "cpu_ms"),
]


def print_results(run: BenchRun) -> None:
    shown = [{**r, "mfu_pct": 100 * r["mfu"] if r["mfu"] is not None else None}
             for r in run.rows if r["status"] == "ok"]
    print()
    if shown:
        print_table(shown, TABLE_COLUMNS)
    for r in run.rows:
        if r["status"] != "ok":
            print(f"not run: {r['variant']} {r['mode']} ({r['preset']}): {r['reason']}")
    print(f"\nmatmul peak: {format_value(run.peak.tflops)} TFLOP/s ({run.peak.dtype}, n={run.peak.n}); "
          f"{run.env['device_name']}; torch {run.env['torch']}; git {run.env['git_sha'][:12]}"
          f"{' (dirty)' if run.env['git_dirty'] else ''}; load average {format_value(run.env['load_avg_1m'])}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROGRAM, description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=None,
                        help=f"comma-separated run presets of {', '.join(PRESETS)} (default: default,cpu on a CPU, "
                             "default,seed on a GPU)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated of {', '.join(VARIANTS)}")
    parser.add_argument("--modes", default="eager",
                        help=f"comma-separated of {', '.join(MODES)}: the model eager, or compiled once by "
                             "torch.compile (train.compile=true; the first call compiles: minutes on a CPU)")
    parser.add_argument("--backend", default="auto",
                        help=f"attention backend of the fused variant: auto or one of {', '.join(BACKENDS)}")
    parser.add_argument("--batch", type=int, default=None, help="override every preset's batch size B")
    parser.add_argument("--steps", type=int, default=None, help="override every preset's T (quick runs and tests)")
    parser.add_argument("--json", default=None, metavar="PATH",
                        help="result JSON (a CSV is written beside it; default under bench/results/)")
    add_common_args(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    try:
        apply_common_args(args)
        device = resolve_device(args.device)
        presets = parse_list(args.preset or ("default,seed" if device.type == "cuda" else "default,cpu"), PRESETS,
                             "--preset")
        variants = parse_list(args.variants, VARIANTS, "--variants")
        modes = parse_list(args.modes, MODES, "--modes")
        if args.backend != "auto" and args.backend not in BACKENDS:
            raise ValueError(f"--backend must be auto or one of {', '.join(BACKENDS)}, got {args.backend!r}")
        if args.json and args.out:
            raise ValueError("--json and --out name the same files: give one")
        for flag, value in (("--batch", args.batch), ("--steps", args.steps)):
            if value is not None and value < 1:
                raise ValueError(f"{flag} must be at least 1, got {value}")
    except ValueError as exc:
        parser.error(str(exc))
    if args.json:
        out = Path(args.json).with_suffix("")
    else:
        out = Path(args.out) if args.out else RESULTS_DIR / f"train_speed_{'_'.join(presets)}_{device_label(device)}"

    peak_dtype = torch.float32 if device.type == "cpu" else None  # bf16 on a GPU (docs/presets.md)
    run = BenchRun.start("train_speed", device, key_fields=KEY_FIELDS, argv=argv, peak_dtype=peak_dtype,
                         peak_size=args.peak_size, program=PROGRAM, metric="ms_p50")
    run.env["mfu_formula"] = "(3·Σ_linear 2·rows·in·out + 3.5·Σ_attn 4·Σ_b Lq_b·Lk_b·H·D) / ms_p50 / matmul peak"
    print(f"train_speed on {run.env['device_name']} ({device}), {dtype_name(peak_dtype or torch.bfloat16)}; "
          f"matmul peak {format_value(run.peak.tflops)} TFLOP/s ({run.peak.dtype}); "
          f"load average {format_value(run.env['load_avg_1m'])}")
    with tempfile.TemporaryDirectory(prefix="train_speed_") as tmp:
        cases = []
        for preset in presets:
            cases += plan_preset(run, preset, variants, modes, args.backend, Path(tmp) / preset, args.batch, args.steps)
            batch = cases[-1].batch
            if batch is not None:
                print(f"{preset}: B={batch.batch_size} T={batch.steps} modalities={len(batch.modalities)} "
                      f"tokens={batch.num_tokens}")
        run_rounds(run, [measurement(run, case, args) for case in cases], rounds=args.rounds, out=out,
                   fill=lambda row, timing: fill_timing(run, row, timing), derive=add_baseline_speedups)
    json_path, csv_path = run.save(out)
    print_results(run)
    print(f"\nwrote {json_path} and {csv_path}")
    if args.compare:
        return compare(args.compare, json_path, args.threshold)
    return 0


if __name__ == "__main__":
    sys.exit(main())
