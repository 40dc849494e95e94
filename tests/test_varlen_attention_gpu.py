"""GPU checks of every CUDA backend (skipped without CUDA).

At the ``seed`` and ``wide`` decoder cross-attention shapes (docs/presets.md) and on small random
ragged batches with lengths 0 and 1, forward and backward, with FlashAttention's tolerance
rule: error against float64 at most 2× (output) / 3× (gradients) the error of plain PyTorch
computing in the same low precision, plus a small floor.

The cases are one ordered list (:data:`CASES`), built so that a GPU run stays short: every
Triton kernel meets every dtype and every head-dim tile (16, 32, 64, 128, and 48 for padded
lanes) at least once, with few distinct (head dim, dtype) pairs, since each pair compiles every
kernel anew; fp32 (slow to compile) and FlexAttention (compiled through inductor) come last, so
a run cut short has checked the rest. Every (dtype, head dim) pair is checked by the test marked
``slow``. ``python -m bench.gpu_test_plan`` lists what ``-m "gpu and not slow"`` runs here and
counts the Triton compiles it triggers.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from attention_cases import AttentionCase, assert_within_rule, forward_backward, make_case, random_case

from crossmae.ops import backend_reasons, varlen_attention
from crossmae.presets import attention_lengths, get_preset

pytestmark = pytest.mark.gpu

DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
# the backends that run on CUDA; flash_attn and xformers skip with their reasons where not installed
LOW_PRECISION_BACKENDS = ["triton", "torch_varlen", "sdpa_padded", "flash_attn", "xformers", "loop"]
FP32_BACKENDS = ["triton", "torch_varlen", "sdpa_padded", "loop"]
PRESET_BACKENDS = ["triton", "torch_varlen", "sdpa_padded", "flash_attn", "xformers"]


@dataclass(frozen=True)
class GpuCase:
    """One backend on one attention batch in one dtype.

    ``shape`` is ``"random"`` (a ragged batch of 9 samples, up to 300 queries and 170 keys,
    4 heads, lengths 0 and 1 included, drawn from ``seed``) or a preset name (its decoder
    cross-attention lengths, heads and head dim).
    """

    backend: str
    dtype: torch.dtype
    head_dim: int
    shape: str = "random"
    seed: int = 0

    @property
    def id(self) -> str:
        return f"{self.backend}-{DTYPE_NAMES[self.dtype]}-D{self.head_dim}-{self.shape}"

    @property
    def floor(self) -> float:
        """Absolute error allowed on top of the rule (rounding of near-zero values)."""
        return 1e-5 if self.dtype == torch.float32 else 1e-3

    def build(self, device: str) -> AttentionCase:
        """The fp32 inputs of this case on ``device`` (cast to :attr:`dtype` by the check)."""
        if self.shape == "random":
            return random_case(9, 300, 170, 4, self.head_dim, seed=self.seed, device=device)
        preset = get_preset(self.shape)
        lengths_q, lengths_k = attention_lengths(preset)
        return make_case(lengths_q, lengths_k, preset.dec_heads, preset.dec_head_dim, device=device)

    def total_q(self) -> int:
        """Query rows of the batch (Triton specialises its kernels on this row count's alignment)."""
        if self.shape == "random":
            return self.build("cpu").q.shape[0]
        return sum(attention_lengths(get_preset(self.shape))[0])


def preset_case(backend: str, preset: str) -> GpuCase:
    return GpuCase(backend, torch.bfloat16, get_preset(preset).dec_head_dim, shape=preset)


# (dtype, head dim) of the random low-precision batches: with the presets' bf16 D=16 and D=64
# and fp32 D=48 below, every dtype and every head-dim tile is met once
RANDOM_LOW_PRECISION = [(torch.bfloat16, 16), (torch.float16, 32), (torch.bfloat16, 64), (torch.float16, 128)]

CASES = [
    *[GpuCase(backend, dtype, head_dim, seed=i)
      for i, (dtype, head_dim) in enumerate(RANDOM_LOW_PRECISION) for backend in LOW_PRECISION_BACKENDS],
    *[preset_case(backend, preset) for preset in ("seed", "wide") for backend in PRESET_BACKENDS],
    *[GpuCase(backend, torch.float32, 48, seed=4) for backend in FP32_BACKENDS],
    GpuCase("flex", torch.bfloat16, 16, seed=0),
]
DETERMINISM_CASE = preset_case("triton", "seed")
# every (dtype, head dim) pair of the Triton kernels: ~4x the compiles of CASES, so marked slow
EVERY_TRITON_PAIR = [GpuCase("triton", dtype, head_dim, seed=head_dim)
                     for dtype in (torch.bfloat16, torch.float16, torch.float32) for head_dim in (16, 32, 48, 64, 128)]


def backend_fn(name):
    def fn(q, k, v, cu_q, cu_k, max_q, max_k):
        return varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, backend=name)

    return fn


def skip_unless_runs(case: GpuCase, inputs: AttentionCase) -> None:
    why = backend_reasons(case.backend, inputs.q.to(case.dtype), needs_backward=True)
    if why:
        pytest.skip(f"{case.backend}: {'; '.join(why)}")


@pytest.mark.parametrize("case", [DETERMINISM_CASE], ids=[DETERMINISM_CASE.id])
def test_triton_backward_is_deterministic_on_gpu(case: GpuCase, monkeypatch):
    """Asked for determinism, the two-pass backward gives the same bits on every call."""
    monkeypatch.setenv("CROSSMAE_TRITON_DETERMINISTIC", "1")
    inputs = case.build("cuda")
    skip_unless_runs(case, inputs)
    grad_out = torch.randn(inputs.q.shape, device="cuda", dtype=case.dtype)
    first = forward_backward(backend_fn(case.backend), inputs, grad_out, dtype=case.dtype)
    second = forward_backward(backend_fn(case.backend), inputs, grad_out, dtype=case.dtype)
    for name, a, b in zip(("out", "dq", "dk", "dv"), first, second, strict=True):
        assert torch.equal(a, b), f"{case.backend} {name} differs between two identical calls"


def check_against_reference(case: GpuCase) -> None:
    inputs = case.build("cuda")
    skip_unless_runs(case, inputs)
    grad_out = torch.randn(inputs.q.shape, device="cuda", generator=torch.Generator("cuda").manual_seed(3))
    got = forward_backward(backend_fn(case.backend), inputs, grad_out, dtype=case.dtype)
    base = forward_backward(backend_fn("math"), inputs, grad_out, dtype=case.dtype)
    ref = forward_backward(backend_fn("loop"), inputs, grad_out, dtype=torch.float64)
    for i, name in enumerate(("out", "dq", "dk", "dv")):
        assert torch.isfinite(got[i]).all(), f"{case.id} {name} has non-finite values"
        assert_within_rule(got[i], ref[i], base[i], factor=2 if i == 0 else 3, floor=case.floor,
                           name=f"{case.id} {name}")


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_backend_matches_float64_reference(case: GpuCase):
    check_against_reference(case)


@pytest.mark.slow
@pytest.mark.parametrize("case", EVERY_TRITON_PAIR, ids=[c.id for c in EVERY_TRITON_PAIR])
def test_triton_every_dtype_and_head_dim(case: GpuCase):
    check_against_reference(case)



@pytest.mark.parametrize("rise_log2", [10.0, 60.0, 200.0])
def test_triton_bf16_forward_when_a_later_block_outgrows_the_first(rise_log2):
    """The bf16 forward takes every key block against the first block's row max and redoes a row block
    with the online softmax once a row sum reaches 2^64: a later key ``rise_log2`` (base-2 logit units)
    above the first block's keys stays on the first path at 10 and 60 and overflows it at 200. The late
    keys sit in a full block (sample 0) and in partial last blocks (samples 1 and 2)."""
    from attention_cases import reference_fn

    from crossmae_kernels.varlen_attention import LOG2_E, varlen_attn_fwd

    case = make_case([1, 1, 3], [700, 300, 129], heads=1, head_dim=16, dtype=torch.bfloat16, device="cuda",
                     seed=5, requires_grad=False)
    base = (rise_log2 / LOG2_E) ** 0.5
    q = torch.zeros_like(case.q)
    q[:, 0, 0] = base
    k = case.k.clone()
    k[:, 0, 0] = 0.0
    k[[300, 700 + 299, 1000 + 128], 0, 0] = base
    out, lse = varlen_attn_fwd(q, k, case.v, *case.args[3:], 1.0)
    ref = reference_fn(q.double(), k.double(), case.v.double(), *case.args[3:], softmax_scale=1.0)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    err = (out.double() - ref).abs().max().item()
    assert err < 2e-2, f"rise {rise_log2}: max abs error {err:.3e}"
