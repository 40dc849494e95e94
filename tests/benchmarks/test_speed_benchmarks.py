"""pytest-benchmark cases: decoder training steps and varlen attention backends at small, stable shapes.

Run them with ``pytest --benchmark-only`` (plain ``pytest`` and ``make test`` skip them: pyproject's
``addopts`` has ``--benchmark-skip``, which ``--benchmark-only`` overrides). Every preset of docs/presets.md
is resized to the same small batch (B=2, T=4 on a CPU; B=8, T=16 on a GPU) and each case lands in
its preset's group:

- ``decoder step, <preset>``: one decoder training step (:mod:`bench.decoder_speed`) for the
  ``self_attn``, ``loop`` and ``padded`` variants and ``packed/<backend>`` for every varlen backend;
- ``attention fwd+bwd, <preset>``: forward + backward of ``varlen_attention`` for every backend at
  the preset's decoder cross-attention lengths (:mod:`bench.attention_speed`).

On a CPU the cases run on one thread (``CROSSMAE_BENCH_THREADS`` changes it): on a machine shared
with other work, OpenMP threads that wait for each other made two-thread steps 3–20× slower and far
noisier than one thread on this project's 2-core VM. The timed function synchronises the device
before it returns. ``extra_info`` holds the attention
TFLOP/s over the real lengths and the speedup against the group's baselines (``self_attn`` and
``loop``; measured earlier in the same session, so they are missing when ``-k`` deselects them).
A backend that can't run here is skipped with its reasons.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from bench.attention_speed import make_inputs, timed_call
from bench.decoder_speed import DecoderBench, Variant, bench_reasons, packed_backends
from crossmae.ops import BACKENDS
from crossmae.presets import PRESETS

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
BATCH, STEPS = (8, 16) if DEVICE.type == "cuda" else (2, 4)
ROUNDS = 5
CPU_THREADS = int(os.environ.get("CROSSMAE_BENCH_THREADS", "1"))
BENCH_PRESETS = ("cpu", "seed", "wide", "ragged")
# baselines first: the speedups of the later cases divide by their medians
DECODER_VARIANTS = ("self_attn", "loop", "padded", *(f"packed/{b}" for b in packed_backends()))
ATTENTION_BACKENDS = ("loop", *(b for b in BACKENDS if b != "loop"))

_decoder_benches: dict[str, DecoderBench] = {}
_medians: dict[tuple[str, str, str], float] = {}  # (kind, preset, case) -> median seconds


@pytest.fixture(autouse=True, scope="module")
def cpu_threads():
    """One CPU thread for the module's cases (see the module docstring); restored afterwards."""
    before = torch.get_num_threads()
    if DEVICE.type == "cpu":
        torch.set_num_threads(CPU_THREADS)
    yield
    torch.set_num_threads(before)


def decoder_bench(preset: str) -> DecoderBench:
    if preset not in _decoder_benches:
        _decoder_benches[preset] = DecoderBench.build(preset, DEVICE, batch=BATCH, steps=STEPS)
    return _decoder_benches[preset]


def synchronized(fn, device: torch.device):
    def call():
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return result

    return call


def record(benchmark, kind: str, preset: str, case: str, flops: float, baselines: tuple[str, ...]) -> None:
    """TFLOP/s at the median and the speedups against the baselines, into ``extra_info``."""
    stats = getattr(benchmark, "stats", None)
    median = stats.stats.median if stats is not None else None  # None under --benchmark-disable
    benchmark.extra_info.update(device=str(DEVICE), dtype=str(DTYPE).replace("torch.", ""), B=BATCH, T=STEPS,
                                threads=torch.get_num_threads(), attn_gflop=flops / 1e9)
    if not median:
        return
    _medians[(kind, preset, case)] = median
    benchmark.extra_info["attn_tflops"] = flops / median / 1e12
    for baseline in baselines:
        base = _medians.get((kind, preset, baseline))
        benchmark.extra_info[f"speedup_vs_{baseline}"] = base / median if base else None


@pytest.mark.parametrize(
    ("preset", "variant"), [(p, v) for p in BENCH_PRESETS for v in DECODER_VARIANTS],
    ids=[f"{p}-{v}" for p in BENCH_PRESETS for v in DECODER_VARIANTS],
)
def test_decoder_step(benchmark, preset, variant):
    bench = decoder_bench(preset)
    chosen = Variant.parse(variant)
    why = bench_reasons(chosen, bench.probe())
    if why:
        pytest.skip("; ".join(why))
    benchmark.group = f"decoder step, {preset}"
    benchmark.pedantic(synchronized(bench.step(chosen), DEVICE), rounds=ROUNDS, warmup_rounds=1, iterations=1)
    flops = 3.5 * bench.prepared().flops[chosen.standard]
    record(benchmark, "decoder", preset, variant, flops, ("self_attn", "loop"))


@pytest.mark.parametrize(
    ("preset", "backend"), [(p, b) for p in BENCH_PRESETS for b in ATTENTION_BACKENDS],
    ids=[f"{p}-{b}" for p in BENCH_PRESETS for b in ATTENTION_BACKENDS],
)
def test_attention_fwd_bwd(benchmark, preset, backend):
    inputs = make_inputs(dataclasses.replace(PRESETS[preset], batch=BATCH, steps=STEPS), DEVICE, DTYPE)
    why = bench_reasons(Variant.parse(f"packed/{backend}"), inputs.q)
    if why:
        pytest.skip("; ".join(why))
    benchmark.group = f"attention fwd+bwd, {preset}"
    benchmark.pedantic(synchronized(timed_call(backend, "fwd+bwd", inputs, grad=True), DEVICE), rounds=ROUNDS,
                       warmup_rounds=1, iterations=1)
    record(benchmark, "attention", preset, backend, inputs.flops("fwd+bwd"), ("loop",))
