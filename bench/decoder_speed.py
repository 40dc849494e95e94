"""Decoder training-step benchmark: CrossMAE's packed path against the standard MAE decoder and the seed's loop.

One timed call is one decoder training step on a fixed encoder output: ``forward_decoder`` +
``forward_loss`` + the backward to the decoder's parameters (``torch.autograd.grad``, so nothing
accumulates between calls). The workload is a run preset of docs/presets.md (``crossmae.config.preset_config``):
its synthetic data set, one batch of ``data.batch_size`` windows collated and masked as in training,
its model widths. bf16 autocast on a GPU, fp32 on a CPU.

Variants (the same batch; every CrossMAE variant the same weights):
    self_attn            the standard MAE decoder (``use_cross_attn=False``): self-attention over the
                         memory rows and a mask token at every masked position, batched the standard
                         way (padded, SDPA with a key-padding mask). The baseline.
    self_attn/packed     the same decoder on the packed path (``auto`` backend), for information.
    loop                 CrossMAE, padded tensors, one SDPA call per sample (the seed's way).
    padded               CrossMAE, padded tensors, one SDPA call with a key-padding mask.
    packed/<backend>     CrossMAE on the packed path: one varlen call per attention, for each varlen
                         backend of ``crossmae.ops.BACKENDS`` (``triton``, ``torch_varlen``,
                         ``flash_attn``, ``xformers``, ``flex``, ``cpu``, ``sdpa_padded``, and any other
                         registered later). A backend that can't run here keeps its row, with
                         ``status = "skipped"`` and the registry's reasons.

Per row: ms p20/p50/p80 (CUDA events on a GPU, ``perf_counter`` on a CPU, warm-up excluded; see
:mod:`bench.harness`), peak memory, attention TFLOP/s and its fraction of a large matmul timed in
the same run (bf16 on a GPU, fp32 on a CPU), speedups against ``self_attn``, ``loop`` and
``padded`` (ratios of medians measured in this process), the step's loss (every CrossMAE variant
must give the loop's loss: ``loss_rel_err``) and, on a GPU with NVML, SM clock, power and
joules per step.

Attention FLOPs (docs/presets.md) count the batch's real lengths: per decoder layer and modality,
forward ``4·Σ_b Lq_b·Lk_b·H·D`` with queries = predicted tokens and keys = memory rows (plus
``Lq_b²`` with ``decoder_self_attn``); ``self_attn`` counts its own sequences (``L_b²``,
L = memory rows + masked tokens). A training step is 3.5× the forward.

With ``--rounds N`` every variant is measured once per round, interleaved, and each row pools the
samples of all rounds: on a shared machine every variant then sees the same conditions.

``--sweep batch`` times ``self_attn``, ``loop`` and the fastest packed backend over batch sizes
(1 … 64 on a GPU, 1 … 8 on a CPU) and plots time per sample against B: the packed path's time
grows with its tokens, so its time per sample stays flat.

Outputs: a table; ``--json PATH`` (default ``bench/results/decoder_speed_<preset>_<device>.json``)
holds ``{"metadata", "rows"}``, with a CSV of the rows and a PNG plot beside it.

Usage (from the repository root; ``python -m bench.decoder_speed`` works as well)::

    python bench/decoder_speed.py                           # cpu preset on CPU, seed on a GPU
    python bench/decoder_speed.py --preset ragged --rounds 3
    python bench/decoder_speed.py --sweep batch
    python bench/decoder_speed.py --compare bench/results/decoder_speed_cpu_cpu.json
    python bench/decoder_speed.py --variants self_attn,packed --profile   # where the time goes
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

if not __package__:  # run as `python bench/decoder_speed.py`: find the `bench` package by this file's place
    import _package  # noqa: F401

import torch

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
    import_pyplot,
    measure,
    parse_list,
    print_table,
    resolve_device,
    run_rounds,
    time_row,
)
from crossmae.config import Config, ModelConfig, preset_config
from crossmae.data.collate import MaskingCollator, PackedBatch
from crossmae.data.loader import GlobalBatchOrder, build_dataset
from crossmae.model import EncoderOutput, MultimodalCrossMAE
from crossmae.ops import BACKENDS, backend_reasons, select_backend
from crossmae.presets import PRESETS, attention_flops

PROGRAM = "python bench/decoder_speed.py"
# the packed backends of crossmae/ops/backends.py, in this order; any other registered varlen backend follows
PACKED_BACKENDS = ("triton", "torch_varlen", "flash_attn", "xformers", "flex", "cpu", "sdpa_padded")
REFERENCE_BACKENDS = ("math", "loop")  # the oracle and the per-sample loop: not packed paths
BASELINES = ("self_attn", "loop", "padded")
SWEEP_BATCHES = {"cuda": (1, 2, 4, 8, 16, 32, 64), "cpu": (1, 2, 4, 8)}
KEY_FIELDS = ("variant", "preset", "B", "steps", "dtype")
ROW_FIELDS = (
    *KEY_FIELDS, "backend", "decoder", "path", "status", "reason", "total_q", "total_k", "max_q", "max_k",
    "dec_dim", "dec_depth", "dec_heads", "head_dim", "reps", "ms_p20", "ms_p50", "ms_p80", "first_call_ms",
    "ms_per_sample",
    "peak_mb", "peak_total_mb", "attn_gflop", "attn_tflops", "attn_peak_frac", "peak_tflops", "peak_dtype",
    "speedup_vs_self_attn", "speedup_vs_loop", "speedup_vs_padded", "loss", "loss_rel_err", "joules_per_step",
    "power_w", "sm_clock_mhz",
)
# measured last: backends that compile on their first call (Triton autotuning, FlexAttention), so a
# run cut short by a time limit keeps the baselines and the library kernels
COMPILING_BACKENDS = ("triton", "flex")
# largest relative difference of a CrossMAE variant's loss from the loop's before the row is flagged
LOSS_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


def packed_backends() -> list[str]:
    """Every varlen backend to try on the packed path: the named ones, then any other registered."""
    extra = [n for n in BACKENDS if n not in PACKED_BACKENDS and n not in REFERENCE_BACKENDS]
    return [*PACKED_BACKENDS, *extra]


def all_variants() -> list[str]:
    return ["self_attn", "self_attn/packed", "loop", "padded", *(f"packed/{b}" for b in packed_backends())]


@dataclass(frozen=True)
class Variant:
    """One way to run the decoder step.

    Attributes:
        name: ``self_attn``, ``self_attn/packed``, ``loop``, ``padded`` or ``packed/<backend>``.
        standard: the standard MAE decoder (self-attention) instead of CrossMAE's.
        path: the model's decoder path (``packed``, ``padded``, ``loop``).
        backend: ``model.attn_backend`` for the packed path (``auto`` elsewhere: unused).
    """

    name: str
    standard: bool
    path: str
    backend: str = "auto"

    @classmethod
    def parse(cls, name: str) -> Variant:
        if name == "self_attn":
            return cls(name, True, "padded")
        if name == "self_attn/packed":
            return cls(name, True, "packed")
        if name in ("loop", "padded"):
            return cls(name, False, name)
        if name.startswith("packed/"):
            return cls(name, False, "packed", name.split("/", 1)[1])
        raise ValueError(f"unknown variant {name!r}")


def compute_dtype(device: torch.device) -> torch.dtype:
    """bf16 autocast on a GPU (as training runs), fp32 on a CPU."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def bench_reasons(variant: Variant, probe: torch.Tensor) -> list[str]:
    """Why ``variant`` can't be timed on inputs like ``probe`` (``[1, H, D]``); empty when it can."""
    if variant.path != "packed":
        return []
    if variant.backend != "auto" and variant.backend not in BACKENDS:
        return [f"not registered in crossmae.ops.BACKENDS (backend {variant.backend!r} is not built or not "
                "installed here)"]
    if variant.backend == "auto":
        try:
            select_backend("auto", probe, needs_backward=True)
        except ValueError as exc:
            return [str(exc)]
        return []
    why = backend_reasons(variant.backend, probe, needs_backward=True)
    if not why and variant.backend == "triton" and probe.device.type == "cpu":
        why = ["runs on CPU only in Triton's interpreter (TRITON_INTERPRET=1, for tests): far too slow to time"]
    return why


def resolved_backend(variant: Variant, probe: torch.Tensor) -> str | None:
    """The varlen backend the variant's attention runs on (None off the packed path)."""
    if variant.path != "packed":
        return None
    return select_backend(variant.backend, probe, needs_backward=True).name


# -- workload ----------------------------------------------------------------------------
def decoder_attention_flops(cfg: ModelConfig, batch: PackedBatch, *, standard: bool) -> float:
    """Forward attention FLOPs of every decoder of ``batch`` over the real lengths (docs/presets.md)."""
    heads, head_dim = cfg.dec_heads, cfg.dec_dim // cfg.dec_heads
    total = 0.0
    for mb in batch.modalities.values():
        if standard:
            terms = [(mb.standard.seq.lengths, mb.standard.seq.lengths)]
        else:
            memory = batch.memory.packed if cfg.memory == "joint" else mb.encoder.seq
            terms = [(mb.queries.packed.lengths, memory.lengths)]
            if cfg.decoder_self_attn:
                terms.append((mb.queries.packed.lengths, mb.queries.packed.lengths))
        for lengths_q, lengths_k in terms:
            total += attention_flops(lengths_q.tolist(), lengths_k.tolist(), heads, head_dim)[0]
    return total * cfg.dec_depth


@dataclass
class PreparedBatch:
    """One batch on the device with its fixed encoder output.

    Attributes:
        batch: the collated batch (CrossMAE's and the standard decoder's sequences).
        encoded: the encoder's output, computed once without grad and detached.
        shape: B, token counts and the longest sequences, summed over modalities.
        flops: forward attention FLOPs, keyed by ``standard`` (True: the standard decoder).
    """

    batch: PackedBatch
    encoded: EncoderOutput
    shape: dict
    flops: dict[bool, float]


@dataclass
class DecoderBench:
    """A preset's data, collator and models, shared by every variant and batch size.

    Attributes:
        preset: the run preset's name.
        config: its configuration (sizes possibly overridden).
        device: where it runs.
        models: ``standard`` → model: False the CrossMAE, True the standard MAE decoder's model
            (same encoder weights and dims).
        dataset, collator: the training split and a collator that also builds the standard
            decoder's sequences.
    """

    preset: str
    config: Config
    device: torch.device
    models: dict[bool, MultimodalCrossMAE]
    dataset: object
    collator: MaskingCollator
    seed: int = 0
    _batches: dict[int, PreparedBatch] = field(default_factory=dict)

    @classmethod
    def build(cls, preset: str, device: torch.device, *, batch: int | None = None, steps: int | None = None,
              seed: int = 0) -> DecoderBench:
        config = preset_config(preset)
        if batch is not None:
            config.data.batch_size = batch
        if steps is not None:
            config.data.steps = config.data.stride = steps
        dataset = build_dataset(config.data, "train")
        collator = MaskingCollator(dataset.spec, config.mask, config.data.patch_size, config.data.steps,
                                   memory=config.model.memory, standard_decoder=True)
        models = {}
        for standard in (False, True):
            cfg = copy.deepcopy(config.model)
            cfg.use_cross_attn = not standard
            torch.manual_seed(seed)  # the encoders (built first) get the same weights in both models
            models[standard] = MultimodalCrossMAE(dataset.spec, cfg, patch_size=config.data.patch_size,
                                                  steps=config.data.steps).to(device)
        return cls(preset, config, device, models, dataset, collator, seed)

    @property
    def dtype(self) -> torch.dtype:
        return compute_dtype(self.device)

    def autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def probe(self) -> torch.Tensor:
        """A ``[1, H, D]`` tensor like the decoder attention's queries (for the backend registry)."""
        cfg = self.config.model
        return torch.empty(1, cfg.dec_heads, cfg.dec_dim // cfg.dec_heads, dtype=self.dtype, device=self.device)

    def prepared(self, size: int | None = None) -> PreparedBatch:
        """The batch of ``size`` windows (default: the preset's), built once."""
        size = size or self.config.data.batch_size
        if size not in self._batches:
            self._batches[size] = self._prepare(size)
        return self._batches[size]

    def _prepare(self, size: int) -> PreparedBatch:
        # the run's first batch; past the data set's size, windows repeat with their own mask noise
        order = GlobalBatchOrder(len(self.dataset), min(size, len(self.dataset)), self.seed).batch(0)
        items = [order[i] if i < len(order) else (order[i % len(order)][0], 10**9 + i) for i in range(size)]
        batch = self.collator([self.dataset[item] for item in items]).to(self.device)
        with torch.no_grad(), self.autocast():
            encoded = self.models[False].forward_encoder(batch).detach()
        mods = batch.modalities.values()
        memory = [batch.memory.packed] if self.config.model.memory == "joint" else [mb.encoder.seq for mb in mods]
        shape = {
            "B": size, "steps": self.config.data.steps,
            "total_q": sum(mb.queries.packed.total for mb in mods), "total_k": sum(m.total for m in memory),
            "max_q": max(mb.queries.packed.max_seqlen for mb in mods), "max_k": max(m.max_seqlen for m in memory),
            "total_seq": sum(mb.standard.seq.total for mb in mods),
            "max_seq": max(mb.standard.seq.max_seqlen for mb in mods),
        }
        cfg = self.config.model
        flops = {standard: decoder_attention_flops(cfg, batch, standard=standard) for standard in (False, True)}
        return PreparedBatch(batch, encoded, shape, flops)

    def step(self, variant: Variant, size: int | None = None) -> Callable[[], tuple[torch.Tensor, tuple]]:
        """The timed call: one decoder training step; returns (loss, decoder gradients)."""
        model = self.models[variant.standard]
        params = [p for p in model.decoders.parameters() if p.requires_grad]
        prepared = self.prepared(size)

        def run():
            model.set_paths(decoder=variant.path)
            model.cfg.attn_backend = variant.backend
            with self.autocast():
                predictions = model.forward_decoder(prepared.batch, prepared.encoded)
                loss = model.forward_loss(prepared.batch, predictions).loss
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            return loss.detach(), grads

        return run

    def synchronize(self) -> None:
        """Wait for the device (a timer outside :func:`bench.harness.measure` needs it on a GPU)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


# -- rows --------------------------------------------------------------------------------
def plan_row(run: BenchRun, bench: DecoderBench, variant: Variant, size: int | None = None) -> dict:
    """The row of one variant before timing; ``status = "skipped"`` with the reasons when it can't run."""
    prepared = bench.prepared(size)
    cfg = bench.config.model
    shape = prepared.shape
    row = dict.fromkeys(ROW_FIELDS)
    row.update(
        variant=variant.name, preset=bench.preset, B=shape["B"], steps=shape["steps"],
        dtype=dtype_name(bench.dtype), decoder="standard" if variant.standard else "crossmae", path=variant.path,
        status="ok", dec_dim=cfg.dec_dim, dec_depth=cfg.dec_depth, dec_heads=cfg.dec_heads,
        head_dim=cfg.dec_dim // cfg.dec_heads, attn_gflop=3.5 * prepared.flops[variant.standard] / 1e9,
        peak_tflops=run.peak.tflops, peak_dtype=run.peak.dtype,
    )
    if variant.standard:
        row.update(total_q=shape["total_seq"], total_k=shape["total_seq"], max_q=shape["max_seq"],
                   max_k=shape["max_seq"])
    else:
        row.update({k: shape[k] for k in ("total_q", "total_k", "max_q", "max_k")})
    probe = bench.probe()
    why = bench_reasons(variant, probe)
    if why:
        row.update(status="skipped", reason="; ".join(why), backend=variant.backend)
    else:
        row["backend"] = resolved_backend(variant, probe)
    return row


def measurement(run: BenchRun, bench: DecoderBench, variant: Variant, row: dict,
                args: argparse.Namespace) -> Measurement:
    """How :func:`bench.harness.run_rounds` times one variant: in the first round also its loss and peak memory."""
    step = bench.step(variant, row["B"])

    def first_loss() -> None:
        loss, _ = step()
        row["loss"] = float(loss)

    def time(first: bool) -> Timing | None:
        return time_row(run, row, step, args, first=first, label=variant.name, before=first_loss)

    return Measurement(row, time, f"{row['variant']} {row['preset']} B={row['B']}")


def fill_timing(run: BenchRun, row: dict, timing: Timing) -> None:
    """Put a (merged) timing and what follows from it into the row."""
    attn_tflops = row["attn_gflop"] * 1e9 / (timing.ms_p50 * 1e-3) / 1e12
    row.update(
        reps=timing.reps, ms_p20=timing.ms_p20, ms_p50=timing.ms_p50, ms_p80=timing.ms_p80,
        first_call_ms=timing.first_call_ms, ms_per_sample=timing.ms_p50 / row["B"], attn_tflops=attn_tflops,
        attn_peak_frac=attn_tflops / run.peak.tflops,
        joules_per_step=timing.joules, power_w=timing.power_w, sm_clock_mhz=timing.sm_clock_mhz,
    )


def add_comparisons(rows: Sequence[dict]) -> None:
    """Speedups (baseline median / row median) and loss agreement, among rows of the same preset and shape."""
    def key(row):
        return row["preset"], row["B"], row["steps"], row["dtype"]

    add_speedups(rows, "variant", BASELINES, ["preset", "B", "steps", "dtype"])
    loop_loss = {key(r): r["loss"] for r in rows if r["variant"] == "loop" and r["loss"] is not None}
    for row in rows:
        if row["decoder"] == "crossmae" and row["loss"] is not None and key(row) in loop_loss:
            ref = loop_loss[key(row)]
            row["loss_rel_err"] = abs(row["loss"] - ref) / max(abs(ref), 1e-12)


def loss_mismatches(rows: Sequence[dict]) -> list[dict]:
    """CrossMAE rows whose loss is off the loop's by more than the dtype's tolerance."""
    tolerance = {dtype_name(d): t for d, t in LOSS_TOLERANCE.items()}
    return [r for r in rows if r["loss_rel_err"] is not None and r["loss_rel_err"] > tolerance.get(r["dtype"], 1e-4)]


TABLE_COLUMNS = [
    "variant", "preset", "B", ("backend", "backend"), ("p20 ms", "ms_p20"), ("p50 ms", "ms_p50"),
    ("p80 ms", "ms_p80"), ("peak MB", "peak_mb"), ("attn TFLOP/s", "attn_tflops"), ("% peak", "peak_pct"),
    ("vs self_attn", "speedup_vs_self_attn"), ("vs loop", "speedup_vs_loop"), ("vs padded", "speedup_vs_padded"),
    ("J/step", "joules_per_step"), ("loss err", "loss_rel_err"),
]


def print_results(run: BenchRun, rows: Sequence[dict], columns=TABLE_COLUMNS) -> None:
    """The timed rows as a table, then the variants that did not run, with their reasons."""
    shown = [{**r, "peak_pct": 100 * r["attn_peak_frac"] if r["attn_peak_frac"] is not None else None}
             for r in rows if r["status"] == "ok"]
    print()
    if shown:
        print_table(shown, columns)
    not_run = [r for r in rows if r["status"] != "ok"]
    if not_run:
        print("\nnot run:")
        for r in not_run:
            print(f"  {r['variant']:<20} {r['preset']}, B={r['B']}: {r['status']}: {r['reason']}")
    for r in loss_mismatches(rows):
        print(f"WARNING: {r['variant']} ({r['preset']}, B={r['B']}): loss {r['loss']:.6g} is off the loop's by "
              f"{r['loss_rel_err']:.2g} (relative)", file=sys.stderr)
    nvml = run.env.get("nvml") or {}
    gpu = f"; {nvml.get('name')} at {nvml.get('sm_clock_mhz')} MHz, {nvml.get('power_w')} W" if nvml else ""
    print(f"\nmatmul peak: {format_value(run.peak.tflops)} TFLOP/s ({run.peak.dtype}, n={run.peak.n}); "
          f"{run.env['device_name']}{gpu}; torch {run.env['torch']}, triton {run.env['triton']}, "
          f"python {run.env['python']}; git {run.env['git_sha'][:12]}{' (dirty)' if run.env['git_dirty'] else ''}; "
          f"load average {format_value(run.env['load_avg_1m'])}")


# -- plots -------------------------------------------------------------------------------
def plot_speedups(rows: Sequence[dict], path: Path) -> Path | None:
    """Bars of every timed variant's speedup against ``self_attn`` and ``loop``, one panel per preset."""
    plt = import_pyplot()
    if plt is None:
        return None
    presets = list(dict.fromkeys(r["preset"] for r in rows))
    fig, axes = plt.subplots(1, len(presets), figsize=(1 + 4.5 * len(presets), 4.2), squeeze=False)
    for ax, preset in zip(axes[0], presets):
        timed = [r for r in rows if r["preset"] == preset and r["status"] == "ok"]
        x = range(len(timed))
        for offset, key, label in ((-0.2, "speedup_vs_self_attn", "vs self_attn"), (0.2, "speedup_vs_loop", "vs loop")):
            values = [r[key] or 0.0 for r in timed]
            bars = ax.bar([i + offset for i in x], values, width=0.4, label=label)
            ax.bar_label(bars, labels=[f"{v:.2f}" if v else "" for v in values], fontsize=7)
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xticks(list(x), [r["variant"] for r in timed], rotation=35, ha="right", fontsize=8)
        ax.set_ylabel("speedup (×, higher is faster)")
        device = timed[0]["device_name"] if timed else ""
        ax.set_title(f"decoder step, {preset} preset\n{device}", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_sweep(rows: Sequence[dict], path: Path) -> Path | None:
    """Time per sample against batch size, one line per variant, one panel per preset."""
    plt = import_pyplot()
    if plt is None:
        return None
    presets = list(dict.fromkeys(r["preset"] for r in rows))
    fig, axes = plt.subplots(1, len(presets), figsize=(1 + 4.5 * len(presets), 4.2), squeeze=False)
    for ax, preset in zip(axes[0], presets):
        timed = [r for r in rows if r["preset"] == preset and r["status"] == "ok"]
        for variant in dict.fromkeys(r["variant"] for r in timed):
            points = sorted((r["B"], r["ms_per_sample"]) for r in timed if r["variant"] == variant)
            ax.plot(*zip(*points), marker="o", label=variant)
        ax.set_xscale("log", base=2)
        sizes = sorted({r["B"] for r in timed})
        ax.set_xticks(sizes, [str(b) for b in sizes])
        ax.set_ylim(bottom=0)
        ax.set_xlabel("batch size B")
        ax.set_ylabel("ms per sample (decoder step)")
        device = timed[0]["device_name"] if timed else ""
        ax.set_title(f"batch sweep, {preset} preset\n{device}", fontsize=9)
        ax.legend(fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def profile_rows(planned: list[tuple[dict, DecoderBench, Variant]], path: Path, top: int = 15) -> Path:
    """One step of every timed variant under ``torch.profiler``: the operators with the most self time."""
    from torch.profiler import ProfilerActivity, profile

    sections = []
    for row, bench, variant in planned:
        if row["status"] != "ok":
            continue
        step = bench.step(variant, row["B"])
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if bench.device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            step()
            bench.synchronize()
        sort = "self_cuda_time_total" if bench.device.type == "cuda" else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=sort, row_limit=top, max_name_column_width=60)
        sections.append(f"== {row['variant']} ({row['preset']}, B={row['B']}, backend {row['backend']}; "
                        f"timed p50 {format_value(row['ms_p50'])} ms)\n{table}")
    path.write_text("\n\n".join(sections) + "\n")
    return path


def sweep_growth(rows: Sequence[dict]) -> list[dict]:
    """Per preset and variant: time from the smallest to the largest B against tokens over the same span.

    ``growth`` = (time ratio) / (token ratio): 1 means the step's time grows exactly with its
    tokens (linear), below 1 fixed costs being amortised, above 1 super-linear growth.
    """
    out = []
    for preset in dict.fromkeys(r["preset"] for r in rows):
        for variant in dict.fromkeys(r["variant"] for r in rows if r["preset"] == preset):
            timed = sorted((r for r in rows if r["preset"] == preset and r["variant"] == variant
                            and r["status"] == "ok"), key=lambda r: r["B"])
            if len(timed) < 2:
                continue
            first, last = timed[0], timed[-1]
            tokens = (last["total_q"] + last["total_k"]) / (first["total_q"] + first["total_k"])
            time_ratio = last["ms_p50"] / first["ms_p50"]
            out.append({"preset": preset, "variant": variant, "B": f"{first['B']}→{last['B']}",
                        "time_ratio": time_ratio, "token_ratio": tokens, "growth": time_ratio / tokens,
                        "ms_per_sample_first": first["ms_per_sample"], "ms_per_sample_last": last["ms_per_sample"]})
    return out


# -- command line ------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROGRAM, description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=None,
                        help=f"comma-separated run presets of {', '.join(PRESETS)} (default: seed on a GPU, cpu on "
                             "a CPU)")
    parser.add_argument("--variants", default=None,
                        help="comma-separated variants: self_attn, self_attn/packed, loop, padded, packed/<backend> "
                             "or 'packed' for every packed backend (default: all; --sweep: self_attn, loop and the "
                             "fastest packed backend)")
    parser.add_argument("--sweep", default=None, choices=("batch",),
                        help="time self_attn, loop and the fastest packed backend over batch sizes")
    parser.add_argument("--batches", default=None,
                        help="comma-separated batch sizes of --sweep batch (default 1..64 on a GPU, 1..8 on a CPU)")
    parser.add_argument("--sweep-backend", default=None,
                        help="packed backend of --sweep (default: the fastest at the preset's batch, measured first)")
    parser.add_argument("--batch", type=int, default=None, help="override the preset's batch size B")
    parser.add_argument("--steps", type=int, default=None, help="override the preset's T (quick runs and tests)")
    parser.add_argument("--json", default=None, metavar="PATH",
                        help="result JSON (a CSV and a PNG are written beside it; default under bench/results/)")
    parser.add_argument("--no-plot", action="store_true", help="write no PNG")
    parser.add_argument("--profile", action="store_true",
                        help="after timing, run each timed variant once under torch.profiler and write the operators "
                             "that take the most time to STEM.profile.txt")
    add_common_args(parser)
    return parser


@dataclass(frozen=True)
class Plan:
    """What to run, resolved from the flags."""

    device: torch.device
    presets: list[str]
    variants: list[Variant]
    sweep_batches: list[int] | None
    out: Path


def parse_variants(text: str | None, sweep: bool) -> list[Variant]:
    if text is None:
        return [] if sweep else [Variant.parse(v) for v in all_variants()]
    names = []
    for item in parse_list(text, [*all_variants(), "packed"], "--variants"):
        names += [f"packed/{b}" for b in packed_backends()] if item == "packed" else [item]
    return [Variant.parse(n) for n in dict.fromkeys(names)]


def resolve_plan(args: argparse.Namespace) -> Plan:
    """Check the flags and fill in the device-dependent defaults; errors name the flag."""
    apply_common_args(args)
    device = resolve_device(args.device)
    presets = parse_list(args.preset or ("seed" if device.type == "cuda" else "cpu"), PRESETS, "--preset")
    for flag, value in (("--batch", args.batch), ("--steps", args.steps)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}")
    variants = parse_variants(args.variants, args.sweep is not None)
    batches = None
    if args.sweep == "batch":
        if args.batches:
            try:
                batches = sorted({int(b) for b in args.batches.split(",") if b.strip()})
            except ValueError:
                raise ValueError(f"--batches must be comma-separated integers, got {args.batches!r}") from None
            if not batches or batches[0] < 1:
                raise ValueError(f"--batches must name batch sizes of at least 1, got {args.batches!r}")
        else:
            batches = list(SWEEP_BATCHES[device.type])
    elif args.batches or args.sweep_backend:
        raise ValueError("--batches and --sweep-backend need --sweep batch")
    if args.sweep_backend is not None and args.sweep_backend not in packed_backends():
        raise ValueError(f"--sweep-backend must be one of {', '.join(packed_backends())}, got {args.sweep_backend!r}")
    if args.json and args.out:
        raise ValueError("--json and --out name the same files: give one")
    if args.json:
        out = Path(args.json).with_suffix("")
    elif args.out:
        out = Path(args.out)
    else:
        sweep = f"sweep_{args.sweep}_" if args.sweep else ""
        out = RESULTS_DIR / f"decoder_speed_{sweep}{'_'.join(presets)}_{device_label(device)}"
    return Plan(device, presets, variants, batches, out)


def fastest_packed_backend(run: BenchRun, bench: DecoderBench, args: argparse.Namespace) -> tuple[str, str]:
    """(backend, how it was chosen) for the sweep: the one given, the only one, or the fastest measured now."""
    if args.sweep_backend:
        return args.sweep_backend, "--sweep-backend"
    probe = bench.probe()
    candidates = [b for b in packed_backends() if not bench_reasons(Variant.parse(f"packed/{b}"), probe)]
    if not candidates:
        raise ValueError("no packed backend can run here: " + "; ".join(
            f"{b}: {'; '.join(bench_reasons(Variant.parse(f'packed/{b}'), probe))}" for b in packed_backends()))
    if len(candidates) == 1:
        return candidates[0], "the only packed backend that runs here"
    medians = {}
    for backend in candidates:
        try:
            medians[backend] = measure(bench.step(Variant.parse(f"packed/{backend}")), device=run.device,
                                       warmup=max(args.warmup, 1), reps=3, energy_time=0).ms_p50
        except Exception as exc:  # a broken backend is not the fastest
            print(f"  packed/{backend}: {type(exc).__name__}: {exc}", file=sys.stderr)
    best = min(medians, key=medians.get)
    chosen = ", ".join(f"{b} {format_value(ms)} ms" for b, ms in medians.items())
    return best, f"fastest at B={bench.config.data.batch_size} ({chosen})"


def measure_order(row: dict, variant: Variant) -> tuple:
    """Baselines first, then the packed backends, the compiling ones last; batch sizes ascending."""
    rank = 0 if variant.name in BASELINES else 2 if variant.backend in COMPILING_BACKENDS else 1
    return row["preset"], row["B"], rank


def run_rows(run: BenchRun, planned: list[tuple[dict, DecoderBench, Variant]], args: argparse.Namespace,
             out: Path) -> None:
    """Time every planned row, ``args.rounds`` interleaved rounds, saving after each measurement.

    Rows keep their planned order in the results; they are measured in :func:`measure_order`.
    """
    order = sorted(range(len(planned)), key=lambda i: measure_order(planned[i][0], planned[i][2]))
    measurements = [measurement(run, planned[i][1], planned[i][2], planned[i][0], args) for i in order]
    run_rounds(run, measurements, rounds=args.rounds, out=out, fill=lambda row, timing: fill_timing(run, row, timing),
               derive=add_comparisons)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    try:
        plan = resolve_plan(args)
    except ValueError as exc:
        parser.error(str(exc))

    dtype = compute_dtype(plan.device)
    peak_dtype = dtype if plan.device.type == "cpu" else None  # bf16 on a GPU (docs/presets.md)
    run = BenchRun.start("decoder_speed", plan.device, key_fields=KEY_FIELDS, argv=argv, peak_dtype=peak_dtype,
                         peak_size=args.peak_size, program=PROGRAM, metric="ms_p50")
    print(f"decoder_speed on {run.env['device_name']} ({plan.device}), {dtype_name(dtype)}; matmul peak "
          f"{format_value(run.peak.tflops)} TFLOP/s ({run.peak.dtype}); load average "
          f"{format_value(run.env['load_avg_1m'])}")
    benches = [DecoderBench.build(p, plan.device, batch=args.batch, steps=args.steps) for p in plan.presets]
    planned = []
    sweep_choice = {}
    for bench in benches:
        shape = bench.prepared().shape
        print(f"{bench.preset}: B={shape['B']} T={shape['steps']} queries={shape['total_q']} "
              f"memory rows={shape['total_k']} (self_attn sequence rows={shape['total_seq']}), "
              f"decoder d={bench.config.model.dec_dim} depth={bench.config.model.dec_depth} "
              f"heads={bench.config.model.dec_heads}")
        if plan.sweep_batches is None:
            planned += [(run.add(**plan_row(run, bench, v)), bench, v) for v in plan.variants]
            continue
        variants = plan.variants
        if not variants:
            backend, how = fastest_packed_backend(run, bench, args)
            sweep_choice[bench.preset] = {"backend": backend, "chosen": how}
            print(f"  sweep backend: {backend} ({how})")
            variants = [Variant.parse(v) for v in ("self_attn", "loop", f"packed/{backend}")]
        for size in plan.sweep_batches:
            planned += [(run.add(**plan_row(run, bench, v, size)), bench, v) for v in variants]
    if sweep_choice:
        run.env["sweep_backend"] = sweep_choice
    run_rows(run, planned, args, plan.out)
    json_path, csv_path = run.save(plan.out)
    print_results(run, run.rows)
    written = [json_path, csv_path]
    if plan.sweep_batches is not None:
        growth = sweep_growth(run.rows)
        if growth:
            print("\ngrowth from the smallest to the largest batch (time ratio / token ratio; 1 = linear in tokens):")
            print_table(growth, ["preset", "variant", "B", ("time ×", "time_ratio"), ("tokens ×", "token_ratio"),
                                 "growth", ("ms/sample first", "ms_per_sample_first"),
                                 ("ms/sample last", "ms_per_sample_last")])
            run.env["sweep_growth"] = growth
            json_path, csv_path = run.save(plan.out)
    if args.profile:
        written.append(profile_rows(planned, plan.out.with_suffix(".profile.txt")))
    if not args.no_plot:
        plot = (plot_sweep if plan.sweep_batches is not None else plot_speedups)(run.rows, plan.out.with_suffix(".png"))
        if plot is not None:
            written.append(plot)
    print("\nwrote " + ", ".join(map(str, written)))
    status = 0
    if args.compare:
        status = compare(args.compare, json_path, args.threshold)
    return status


if __name__ == "__main__":
    sys.exit(main())
