"""Every attention backend against float64 math on adversarial numerics, forward and backward.

Each case is a ragged batch with one head per pattern of :data:`attention_cases.HEAD_PATTERNS`
(rows whose logits all lie near -120, the same spread over hundreds, rows with one dominant key,
rows near +120, standard normal rows), with lengths 0 and 1, block edges (15/16/17 for the Triton interpreter's 16-row
tiles, 63/64/65 and 127/128/129 for the 64-row tiles of the C++ kernels), a single key, and
lengths that are no multiple of any block; Lq != Lk throughout. Every head is checked on its own.

The rule is FlashAttention's, per head and per tensor (out, dq, dk, dv): the error against
float64 is at most 2x (out) / 3x (gradients) the error of plain PyTorch (``math``) in the same
dtype, plus a floor of ``FLOOR_ULPS`` unit roundoffs of :func:`attention_cases.rounding_magnitudes`
(what a FlashAttention-style kernel rounds: its fp32 log-sum-exp and the two sums behind
``dP - delta``). A failing comparison names the head and prints the worst index.
"""

from __future__ import annotations

import pytest
import torch
from attention_cases import (
    HEAD_PATTERNS,
    assert_rounding_rule,
    forward_backward,
    numerics_case,
    reference_fn,
    rounding_magnitudes,
    unit_roundoff,
)

from crossmae.ops import BACKENDS, cpu_attention, varlen_attention
from crossmae.packed import pad_packed
from crossmae_kernels.varlen_attention import is_interpreting

# name -> (lengths_q, lengths_k, head dim)
CASES = {
    "lq0-1-1_lk43-1-111": ([0, 1, 1], [43, 1, 111], 16),
    "block16_edges": ([1, 15, 16, 17], [17, 16, 15, 1], 16),
    "block64_edges": ([63, 64, 65], [129, 1, 64], 32),
    "block128_edges": ([127, 128, 129, 0], [65, 128, 0, 127], 16),
    "single_key": ([5, 3, 0], [1, 1, 1], 16),
    "odd_lengths": ([97, 0, 33], [0, 61, 150], 64),
}
# the Triton interpreter is slow: the cases that reach its 16-row tile edges and a single key
TRITON_CASES = ["lq0-1-1_lk43-1-111", "block16_edges", "single_key"]
FACTORS = (2.0, 3.0, 3.0, 3.0)  # out, dq, dk, dv
NAMES = ("out", "dq", "dk", "dv")
# Unit roundoffs of rounding_magnitudes allowed on top of FACTORS x math's error. Measured need
# (fp32, these cases, seeds 0 and 1, logits near ±120): triton ≤ 1.7, sdpa_padded/loop ≤ 1.1, cpu ≤ 0.8
# (SDPA given scale= instead of a pre-scaled q: 3.5); math's own error is 0.1-1.5 of them.
FLOOR_ULPS = 4.0


def cpu_backends() -> list[str]:
    names = ["math", "loop", "sdpa_padded"]
    if cpu_attention.unavailable_reason() is None:
        names.append("cpu")
    return names


def call(backend: str, softmax_scale: float):
    def fn(q, k, v, cu_q, cu_k, max_q, max_k):
        return varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=softmax_scale, backend=backend)

    return fn


def check_backend(backend: str, case_name: str, dtype: torch.dtype, *, seed: int = 0, device: str = "cpu",
                  floor_ulps: float = FLOOR_ULPS, backward: bool = True) -> None:
    lengths_q, lengths_k, head_dim = CASES[case_name]
    case = numerics_case(lengths_q, lengths_k, head_dim, seed=seed, device=device)
    grad_out = torch.randn(case.q.shape, generator=torch.Generator().manual_seed(seed)).to(device)
    ref = forward_backward(reference_fn_scaled(case.softmax_scale), case, grad_out, dtype=torch.float64)
    base = forward_backward(call("math", case.softmax_scale), case, grad_out, dtype=dtype)
    magnitudes = rounding_magnitudes(case, grad_out)
    if backward:
        got = forward_backward(call(backend, case.softmax_scale), case, grad_out, dtype=dtype)
    else:
        leaves = [t.detach().to(dtype) for t in (case.q, case.k, case.v)]
        got = (call(backend, case.softmax_scale)(*leaves, *case.args[3:]),)
    for i, tensor in enumerate(got):
        assert tensor.dtype == dtype, f"{backend} {NAMES[i]} dtype {tensor.dtype} != {dtype}"
        assert_rounding_rule(
            tensor.cpu(), ref[i].cpu(), base[i].cpu(), magnitudes[i], factor=FACTORS[i], floor_ulps=floor_ulps,
            unit=unit_roundoff(dtype), name=f"{backend} {NAMES[i]} ({case_name}, {str(dtype)[6:]}, seed {seed})",
        )


def reference_fn_scaled(softmax_scale: float):
    def fn(q, k, v, cu_q, cu_k, max_q, max_k):
        return reference_fn(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=softmax_scale)

    return fn


# -- the cases are what they claim --------------------------------------------------------------
def test_cases_put_the_logits_where_their_patterns_say():
    case = numerics_case([0, 1, 1, 40], [43, 1, 111, 17], 16)
    pq, pk = case.packed_q, case.packed_k
    q = pad_packed(case.q.detach().double(), pq.cu_seqlens, pq.max_seqlen)  # [B, Lq, H, D]
    k = pad_packed(case.k.detach().double(), pk.cu_seqlens, pk.max_seqlen)  # [B, Lk, H, D]
    logits = torch.einsum("bqhd,bkhd->bhqk", q, k) * case.softmax_scale  # [B, H, Lq, Lk]
    for b in range(pq.batch_size):
        lq, lk = int(pq.lengths[b]), int(pk.lengths[b])
        if lq == 0 or lk == 0:
            continue
        rows = logits[b, :, :lq, :lk]  # [H, lq, lk]
        far_below = rows[HEAD_PATTERNS.index("far_below")]
        assert far_below.max() < -90, f"sample {b}: a far_below row reaches {far_below.max():.1f}"
        positive = rows[HEAD_PATTERNS.index("large_positive")]
        assert positive.min() > 90, f"sample {b}: a large_positive row falls to {positive.min():.1f}"
        dominant = rows[HEAD_PATTERNS.index("dominant_key")]
        if lk > 1:
            top2 = dominant.topk(2, dim=-1).values  # [lq, 2]
            assert (top2[:, 0] - top2[:, 1]).min() > 60, f"sample {b}: the dominant key leads by less than 60"
        assert dominant[:, 0].min() > 90, f"sample {b}: the dominant key's logit is below 90"


def test_the_floor_is_small_next_to_the_gradients():
    """At fp32 the floor stays below 1e-3 of each head's largest value (or of 1, where that is ~0)."""
    lengths_q, lengths_k, head_dim = CASES["lq0-1-1_lk43-1-111"]
    case = numerics_case(lengths_q, lengths_k, head_dim)
    grad_out = torch.randn(case.q.shape, generator=torch.Generator().manual_seed(0))
    ref = forward_backward(reference_fn_scaled(case.softmax_scale), case, grad_out, dtype=torch.float64)
    magnitudes = rounding_magnitudes(case, grad_out)
    for name, tensor, magnitude in zip(NAMES, ref, magnitudes):
        largest = tensor.abs().amax(dim=(0, 2))  # [H]
        floor = FLOOR_ULPS * unit_roundoff(torch.float32) * magnitude
        assert (floor <= 1e-3 * largest.clamp(min=1.0)).all(), f"{name}: floor {floor} vs largest {largest}"


# -- fp32, every backend that runs here ----------------------------------------------------------
@pytest.mark.parametrize("case_name", list(CASES))
@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("seed", [0, 1])
def test_fp32_forward_backward_within_rule(backend, case_name, seed):
    check_backend(backend, case_name, torch.float32, seed=seed)


@pytest.mark.skipif(not is_interpreting(), reason="Triton on CPU tensors needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("case_name", TRITON_CASES)
@pytest.mark.parametrize("deterministic", ["0", "1"], ids=["atomic_dq", "two_pass"])
def test_triton_interpreter_fp32_forward_backward_within_rule(case_name, deterministic, monkeypatch):
    monkeypatch.setenv("CROSSMAE_TRITON_DETERMINISTIC", deterministic)
    check_backend("triton", case_name, torch.float32)


@pytest.mark.parametrize("case_name", ["lq0-1-1_lk43-1-111", "block16_edges", "odd_lengths"])
def test_flex_forward_on_cpu_within_rule(case_name):
    if BACKENDS["flex"].unavailable() is not None:
        pytest.skip(BACKENDS["flex"].unavailable())
    check_backend("flex", case_name, torch.float32, backward=False)


@pytest.mark.parametrize("backend", [b for b in cpu_backends() if b in ("math", "cpu")])
def test_single_keys_give_exactly_zero_dq_and_dk(backend):
    """One key per sample: P = 1, so the true dq and dk are exactly 0 whatever the logits.

    Held by the backends whose ``dP - delta`` cancels exactly there; SDPA's fused CPU backward
    (loop, sdpa_padded) and the Triton kernels leave a rounding residue (within the rule above).
    """
    case = numerics_case([5, 3, 0, 1], [1, 1, 1, 1], 32, seed=3)
    grad_out = torch.randn(case.q.shape, generator=torch.Generator().manual_seed(3))
    out, dq, dk, dv = forward_backward(call(backend, case.softmax_scale), case, grad_out)
    assert not dq.any() and not dk.any(), f"{backend}: |dq| {dq.abs().max():.2e}, |dk| {dk.abs().max():.2e}"


# -- half precision where the backend takes it on CPU -------------------------------------------------
@pytest.mark.parametrize("case_name", ["lq0-1-1_lk43-1-111", "block64_edges", "single_key"])
@pytest.mark.parametrize("backend", [b for b in cpu_backends() if b != "math"])
def test_bf16_forward_backward_within_rule(backend, case_name):
    check_backend(backend, case_name, torch.bfloat16)


@pytest.mark.parametrize("backend", ["loop", "sdpa_padded"])
def test_fp16_forward_backward_within_rule(backend):
    check_backend(backend, "block16_edges", torch.float16)


@pytest.mark.skipif(not is_interpreting(), reason="Triton on CPU tensors needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("case_name", ["lq0-1-1_lk43-1-111", "single_key"])
@pytest.mark.parametrize("deterministic", ["0", "1"], ids=["atomic_dq", "two_pass"])
def test_triton_interpreter_fp16_forward_backward_within_rule(case_name, deterministic, monkeypatch):
    """fp16 takes the 16-bit paths that fp32 skips: the forward against the first key block's row max,
    redone with the online softmax where a row's P would pass fp16's range (in lq0-1-1_lk43-1-111: with
    that pass off, it fails), and backward loops with an unmasked body."""
    monkeypatch.setenv("CROSSMAE_TRITON_DETERMINISTIC", deterministic)
    check_backend("triton", case_name, torch.float16)


def test_flex_bf16_forward_on_cpu_within_rule():
    if BACKENDS["flex"].unavailable() is not None:
        pytest.skip(BACKENDS["flex"].unavailable())
    check_backend("flex", "block16_edges", torch.bfloat16, backward=False)


# -- the same cases on a GPU --------------------------------------------------------------------------
GPU_BACKENDS = ["triton", "torch_varlen", "flash_attn", "xformers", "flex", "sdpa_padded", "loop"]


@pytest.mark.gpu
@pytest.mark.parametrize("case_name", ["lq0-1-1_lk43-1-111", "block64_edges", "single_key", "odd_lengths"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_bf16_forward_backward_within_rule(backend, case_name):
    lengths_q, lengths_k, head_dim = CASES[case_name]
    probe = torch.empty(1, len(HEAD_PATTERNS), head_dim, device="cuda", dtype=torch.bfloat16)
    why = BACKENDS[backend].reasons(probe, needs_backward=True)
    if why:
        pytest.skip("; ".join(why))
    check_backend(backend, case_name, torch.bfloat16, device="cuda")


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("case_name", ["lq0-1-1_lk43-1-111", "single_key"])
@pytest.mark.parametrize("backend", ["triton", "flex", "sdpa_padded", "loop"])
def test_gpu_fp32_forward_backward_within_rule(backend, case_name):
    lengths_q, lengths_k, head_dim = CASES[case_name]
    probe = torch.empty(1, len(HEAD_PATTERNS), head_dim, device="cuda", dtype=torch.float32)
    why = BACKENDS[backend].reasons(probe, needs_backward=True)
    if why:
        pytest.skip("; ".join(why))
    with _NoTF32():
        check_backend(backend, case_name, torch.float32, device="cuda")


class _NoTF32:
    """fp32 matmuls in IEEE precision for the block (the rule compares against fp32 math)."""

    def __enter__(self):
        self.saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.saved

