"""Kernel benchmark of varlen attention: every registered backend, forward, backward, both.

Shapes are the decoder cross-attention of a workload preset (``crossmae.presets``, docs/presets.md):
sample b has ``Lq_b`` queries (its masked tokens) and ``Lk_b`` keys (its visible tokens),
``H = preset.dec_heads``, ``D = preset.dec_head_dim`` (16 at ``seed`` and ``cpu``, 64 at
``wide``). Inputs are random normal: q ``[total_q, H, D]``, k and v ``[total_k, H, D]``, the
output gradient dout ``[total_q, H, D]``; one set per preset, shared by every backend.
Each backend is called through the public op, ``varlen_attention(..., backend=name)``.

Passes, i.e. what one timed call does:
    fwd      ``out = varlen_attention(q, k, v, ...)`` with q, k, v requiring grad, as in
             training (autograd records the graph and the backend saves what its backward
             needs). A backend with no backward on this device (FlexAttention on CPU) is timed
             on inputs that don't require grad, and its row says so.
    bwd      the backward alone. ``out`` is computed once, outside the timer; each timed call is
             ``torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)``: the same backward
             graph runs again on its retained saved tensors and returns fresh gradients (nothing
             accumulates into ``.grad``, so no extra add is timed).
    fwd+bwd  ``torch.autograd.grad(varlen_attention(q, k, v, ...), (q, k, v), dout)``.

FLOPs count the real lengths (docs/presets.md, ``crossmae.presets.attention_flops``): forward
``4·Σ_b Lq_b·Lk_b·H·D``, backward 2.5× forward, fwd+bwd 3.5×. TFLOP/s is at the median time;
``peak_frac`` divides it by a large ``torch.matmul`` timed in the same run (bf16 on a GPU, the
run's dtype on a CPU). ``speedup_vs_loop`` is the speedup over the ``loop`` backend (one SDPA call
per sample, the seed's way) at the same preset and pass, measured in the same process.
``first_call_ms`` is a row's first call alone: a Triton row's compile and autotuning.
Peak memory: see :mod:`bench.harness` (CUDA allocator on a GPU, resident set on a CPU), taken
in the first round. With ``--rounds N`` the whole sweep runs N times, one measurement of each
(backend, pass) per round, and each row's quantiles are over the samples of all rounds: on a
shared or drifting machine, every backend then sees the same conditions.

Backends are measured one after another (all presets and passes of one, then the next), so a
slow backend or a long first compile delays only its own rows; results are saved after every
measurement. Backends that can't run here get a row with ``status = "skipped"`` and the registry's reasons.
So do runs that would not fit in memory: ``math`` holds ``B·H·max_q·max_k`` scores per tensor,
FlexAttention on CPU ``H·total_q·total_k`` (an eager dense fallback), estimated before the call.

Usage (from the repository root; ``python bench/attention_speed.py`` works as well)::

    python -m bench.attention_speed                      # cpu preset on CPU; seed,wide in bf16 on a GPU
    python -m bench.attention_speed --preset seed,cpu --backends loop,sdpa_padded --reps 3
    python -m bench.attention_speed --rounds 3 --threads 1       # interleaved rounds on a shared CPU
    python -m bench.attention_speed --backends cpu,sdpa_padded,loop,math --compare bench/results/cpu_backend_speed.json
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

if not __package__:  # run as `python bench/attention_speed.py`: find the `bench` package by this file's place
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
    available_memory_bytes,
    compare,
    device_label,
    dtype_name,
    format_value,
    parse_dtype,
    parse_list,
    print_table,
    resolve_device,
    run_rounds,
    time_row,
)
from crossmae.ops import BACKENDS, backend_reasons, varlen_attention
from crossmae.packed import Packed
from crossmae.presets import PRESETS, WorkloadPreset, attention_flops, attention_lengths

PASSES = ("fwd", "bwd", "fwd+bwd")
KEY_FIELDS = ("op", "backend", "pass", "preset", "B", "total_q", "total_k", "H", "D", "dtype")
ROW_FIELDS = (
    *KEY_FIELDS, "max_q", "max_k", "status", "reason", "reps", "ms_p20", "ms_p50", "ms_p80", "first_call_ms", "gflop",
    "tflops", "peak_frac", "peak_tflops", "peak_dtype", "peak_mb", "peak_total_mb", "speedup_vs_loop", "joules",
    "power_w", "sm_clock_mhz",
)

# How many score-sized tensors a pass needs at its peak, for the backends that materialise
# scores: measured at the cpu preset in fp32 (math: fwd 3.3, fwd+bwd 3.4, bwd 2.1 above the
# retained forward; eager flex fwd 3.3), rounded up. The bwd pass also holds its retained forward.
SCORE_COPIES = {"fwd": 4, "bwd": 6, "fwd+bwd": 5}
MEMORY_BUDGET = 0.6  # fraction of the available memory a single run may be estimated to take


@dataclass
class AttentionInputs:
    """Decoder cross-attention inputs of one preset.

    Attributes:
        preset: the (possibly resized) preset.
        packed_q, packed_k: boundaries of the B query and key segments.
        q: ``[total_q, H, D]`` leaf requiring grad.
        k, v: ``[total_k, H, D]`` leaves requiring grad.
        dout: ``[total_q, H, D]`` output gradient for the backward passes.
        fwd_flops, bwd_flops: attention FLOPs over the real lengths.
    """

    preset: WorkloadPreset
    packed_q: Packed
    packed_k: Packed
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    dout: torch.Tensor
    fwd_flops: float
    bwd_flops: float

    def shape_fields(self) -> dict:
        return {"B": self.packed_q.batch_size, "total_q": self.packed_q.total, "total_k": self.packed_k.total,
                "H": self.q.shape[1], "D": self.q.shape[2]}

    def flops(self, pass_: str) -> float:
        return {"fwd": self.fwd_flops, "bwd": self.bwd_flops, "fwd+bwd": self.fwd_flops + self.bwd_flops}[pass_]

    def attend(self, backend: str, *, grad: bool = True) -> torch.Tensor:
        """``varlen_attention`` on these inputs; ``grad=False`` uses detached inputs (no graph)."""
        q, k, v = (self.q, self.k, self.v) if grad else (self.q.detach(), self.k.detach(), self.v.detach())
        return varlen_attention(q, k, v, self.packed_q.cu_seqlens, self.packed_k.cu_seqlens,
                                self.packed_q.max_seqlen, self.packed_k.max_seqlen, backend=backend)


def make_inputs(preset: WorkloadPreset, device: torch.device, dtype: torch.dtype, seed: int = 0) -> AttentionInputs:
    """Random inputs at the preset's decoder cross-attention lengths (masked queries, visible keys)."""
    lengths_q, lengths_k = attention_lengths(preset)
    heads, head_dim = preset.dec_heads, preset.dec_head_dim
    packed_q = Packed.from_lengths(lengths_q, device=device)
    packed_k = Packed.from_lengths(lengths_k, device=device)
    gen = torch.Generator().manual_seed(seed)

    def rand(rows: int, requires_grad: bool) -> torch.Tensor:
        t = torch.randn(rows, heads, head_dim, generator=gen).to(device=device, dtype=dtype)  # [rows, H, D]
        return t.requires_grad_(requires_grad)

    fwd, bwd = attention_flops(lengths_q, lengths_k, heads, head_dim)
    return AttentionInputs(preset, packed_q, packed_k, rand(packed_q.total, True), rand(packed_k.total, True),
                           rand(packed_k.total, True), rand(packed_q.total, False), fwd, bwd)


def score_elements(backend: str, inputs: AttentionInputs) -> int:
    """Elements of one dense score tensor the backend materialises (0 for the blockwise ones)."""
    heads = inputs.q.shape[1]
    if backend == "math":
        return inputs.packed_q.batch_size * heads * inputs.packed_q.max_seqlen * inputs.packed_k.max_seqlen
    if backend == "flex" and inputs.q.device.type == "cpu":
        return heads * inputs.packed_q.total * inputs.packed_k.total
    return 0


def memory_reason(backend: str, pass_: str, inputs: AttentionInputs) -> str | None:
    """Why a run would not fit in memory (an estimate made before trying), or None."""
    needed = SCORE_COPIES[pass_] * score_elements(backend, inputs) * inputs.q.element_size()
    available = available_memory_bytes(inputs.q.device)
    if needed == 0 or available is None or needed <= MEMORY_BUDGET * available:
        return None
    return (f"would need ~{needed / 1e9:.1f} GB ({SCORE_COPIES[pass_]} dense score tensors), more than "
            f"{MEMORY_BUDGET:.0%} of the {available / 1e9:.1f} GB available")


def timed_call(backend: str, pass_: str, inputs: AttentionInputs, *, grad: bool) -> Callable[[], object]:
    """The call one measurement times (see the module docstring for each pass)."""
    leaves = (inputs.q, inputs.k, inputs.v)
    if pass_ == "fwd":
        return lambda: inputs.attend(backend, grad=grad)
    if pass_ == "fwd+bwd":
        return lambda: torch.autograd.grad(inputs.attend(backend), leaves, inputs.dout)
    out = inputs.attend(backend)  # [total_q, H, D], its graph retained across the timed calls
    return lambda: torch.autograd.grad(out, leaves, inputs.dout, retain_graph=True)


def plan_row(run: BenchRun, inputs: AttentionInputs, backend: str, pass_: str) -> tuple[dict, bool]:
    """The row of one (backend, pass) before timing, and whether its inputs require grad.

    The row holds the key fields, and ``status = "skipped"`` with the reasons when it can't run.
    """
    row = dict.fromkeys(ROW_FIELDS)
    row.update(op="varlen_attention", backend=backend, preset=inputs.preset.name, dtype=dtype_name(inputs.q.dtype),
               max_q=inputs.packed_q.max_seqlen, max_k=inputs.packed_k.max_seqlen, status="ok",
               gflop=inputs.flops(pass_) / 1e9, peak_tflops=run.peak.tflops, peak_dtype=run.peak.dtype,
               **inputs.shape_fields())
    row["pass"] = pass_
    why = backend_reasons(backend, inputs.q, needs_backward=True)
    grad = not why
    if pass_ == "fwd" and why:
        why_no_grad = backend_reasons(backend, inputs.q, needs_backward=False)
        if not why_no_grad:
            row["reason"] = "forward on inputs without grad: " + "; ".join(why)
        why = why_no_grad
    skip = "; ".join(why) or memory_reason(backend, pass_, inputs)
    if skip:
        row.update(status="skipped", reason=skip)
    return row, grad


def measurement(run: BenchRun, inputs: AttentionInputs, row: dict, grad: bool,
                args: argparse.Namespace) -> Measurement:
    """How :func:`bench.harness.run_rounds` times one row (its peak memory in the first round)."""
    def time(first: bool) -> Timing | None:
        call = timed_call(row["backend"], row["pass"], inputs, grad=grad)  # the bwd pass retains a graph
        return time_row(run, row, call, args, first=first, label=f"{row['backend']} {row['pass']}")

    return Measurement(row, time, f"{row['backend']} {row['preset']} {row['pass']}")


def add_speedups_vs_loop(rows: Sequence[dict]) -> None:
    """``speedup_vs_loop`` = loop's median / this row's median, for rows of the same preset, shape, pass, dtype."""
    add_speedups(rows, "backend", ["loop"], [k for k in KEY_FIELDS if k not in ("op", "backend")])


TABLE_COLUMNS = [
    "backend", "pass", "preset", "B", "total_q", "total_k", "H", "D", "dtype", ("p20 ms", "ms_p20"),
    ("p50 ms", "ms_p50"), ("p80 ms", "ms_p80"), ("first call ms", "first_call_ms"), ("TFLOP/s", "tflops"),
    ("% peak", "peak_pct"), ("peak MB", "peak_mb"), ("vs loop", "speedup_vs_loop"), ("J/call", "joules"),
    ("note", "reason"),
]


def print_results(run: BenchRun) -> None:
    """The measured rows as a table, then the skipped backends grouped by reason."""
    shown = [{**r, "peak_pct": 100 * r["peak_frac"] if r["peak_frac"] is not None else None}
             for r in run.rows if r["status"] != "skipped"]
    print()
    if shown:
        print_table(shown, TABLE_COLUMNS)
    skipped: dict[tuple[str, str], list[str]] = {}
    for r in run.rows:
        if r["status"] == "skipped":
            skipped.setdefault((r["backend"], r["reason"]), []).append(f"{r['preset']}/{r['pass']}")
    if skipped:
        print("\nnot run:")
        for (backend, reason), where in skipped.items():
            print(f"  {backend:<13} {', '.join(where)}: {reason}")
    print(f"\nmatmul peak: {format_value(run.peak.tflops)} TFLOP/s ({run.peak.dtype}, n={run.peak.n}); "
          f"{run.env['device_name']}; torch {run.env['torch']}, triton {run.env['triton']}, "
          f"python {run.env['python']}; git {run.env['git_sha'][:12]}{' (dirty)' if run.env['git_dirty'] else ''}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.attention_speed", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--preset", default=None,
                        help=f"comma-separated presets of {', '.join(PRESETS)} (default: cpu on CPU, seed,wide on GPU)")
    parser.add_argument("--backends", default=None,
                        help=f"comma-separated backends of {', '.join(BACKENDS)} (default: all; those that "
                             "can't run here are listed with their reasons)")
    parser.add_argument("--passes", default=",".join(PASSES), help=f"comma-separated of {', '.join(PASSES)} (all)")
    parser.add_argument("--dtype", default=None, help="fp32, bf16, fp16 or fp64 (default: bf16 on GPU, fp32 on CPU)")
    parser.add_argument("--batch", type=int, default=None, help="override the presets' B (quick runs and tests)")
    parser.add_argument("--steps", type=int, default=None, help="override the presets' T (quick runs and tests)")
    add_common_args(parser)
    return parser


@dataclass(frozen=True)
class Plan:
    """What to run, resolved from the flags."""

    device: torch.device
    dtype: torch.dtype
    presets: list[WorkloadPreset]
    backends: list[str]
    passes: list[str]
    out: Path


def resolve_plan(args: argparse.Namespace) -> Plan:
    """Check the flags and fill in the device-dependent defaults; errors name the flag."""
    apply_common_args(args)
    device = resolve_device(args.device)
    on_gpu = device.type == "cuda"
    dtype = parse_dtype(args.dtype) if args.dtype else (torch.bfloat16 if on_gpu else torch.float32)
    names = parse_list(args.preset or ("seed,wide" if on_gpu else "cpu"), PRESETS, "--preset")
    resize = {}
    for flag, field, value in (("--batch", "batch", args.batch), ("--steps", "steps", args.steps)):
        if value is not None:
            if value < 1:
                raise ValueError(f"{flag} must be at least 1, got {value}")
            resize[field] = value
    presets = [dataclasses.replace(PRESETS[name], **resize) for name in names]
    backends = parse_list(args.backends, BACKENDS, "--backends") if args.backends else list(BACKENDS)
    passes = parse_list(args.passes, PASSES, "--passes")
    out = Path(args.out) if args.out else RESULTS_DIR / f"attention_speed_{device_label(device)}"
    return Plan(device, dtype, presets, backends, passes, out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    try:
        plan = resolve_plan(args)
    except ValueError as exc:
        parser.error(str(exc))

    peak_dtype = plan.dtype if plan.device.type == "cpu" else None  # bf16 on GPU (docs/presets.md)
    run = BenchRun.start("attention_speed", plan.device, key_fields=KEY_FIELDS, argv=argv, peak_dtype=peak_dtype,
                         peak_size=args.peak_size)
    print(f"attention_speed on {run.env['device_name']} ({plan.device}), {dtype_name(plan.dtype)}; "
          f"matmul peak {format_value(run.peak.tflops)} TFLOP/s ({run.peak.dtype})")
    presets = [make_inputs(preset, plan.device, plan.dtype) for preset in plan.presets]
    for inputs in presets:
        shape = inputs.shape_fields()
        print(f"{inputs.preset.name}: B={shape['B']} total_q={shape['total_q']} total_k={shape['total_k']} "
              f"H={shape['H']} D={shape['D']}, forward {inputs.fwd_flops / 1e9:.2f} GFLOP")
    # backend-major order: a slow backend (or a slow first compile) delays only its own rows
    planned = []  # (row as stored in run.rows, inputs require grad, inputs)
    for backend in plan.backends:
        for inputs in presets:
            for pass_ in plan.passes:
                row, grad = plan_row(run, inputs, backend, pass_)
                planned.append((run.add(**row), grad, inputs))

    def fill(row: dict, timing: Timing) -> None:
        row.update(**timing.as_row(), **run.throughput(row["gflop"] * 1e9, timing))

    measurements = [measurement(run, inputs, row, grad, args) for row, grad, inputs in planned]
    run_rounds(run, measurements, rounds=args.rounds, out=plan.out, fill=fill, derive=add_speedups_vs_loop)
    json_path, csv_path = run.save(plan.out)
    print_results(run)
    print(f"\nwrote {json_path} and {csv_path}")
    if args.compare:
        return compare(args.compare, json_path, args.threshold)
    return 0


if __name__ == "__main__":
    sys.exit(main())
