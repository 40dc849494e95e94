"""GPU checks of every CUDA backend (skipped without CUDA).

At the ``seed`` and ``wide`` decoder cross-attention shapes (DESIGN §7) and on small random
ragged batches with lengths 0 and 1, forward and backward, with FlashAttention's tolerance
rule: error against float64 at most 2× (output) / 3× (gradients) the error of plain PyTorch
computing in the same low precision, plus a small floor.
"""

import pytest
import torch
from attention_cases import assert_within_rule, forward_backward, make_case, random_case

from crossmae.ops import backend_reasons, varlen_attention
from crossmae.presets import attention_lengths, get_preset

pytestmark = pytest.mark.gpu

CUDA_BACKENDS = ["triton", "torch_varlen", "flash_attn", "xformers", "flex", "sdpa_padded", "loop"]


def backend_fn(name):
    def fn(q, k, v, cu_q, cu_k, max_q, max_k):
        return varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, backend=name)

    return fn


def check_rule(backend, case, dtype, floor):
    why = backend_reasons(backend, case.q.to(dtype), needs_backward=True)
    if why:
        pytest.skip(f"{backend}: {'; '.join(why)}")
    grad_out = torch.randn(case.q.shape, device=case.q.device, generator=torch.Generator(case.q.device).manual_seed(3))
    got = forward_backward(backend_fn(backend), case, grad_out, dtype=dtype)
    base = forward_backward(backend_fn("math"), case, grad_out, dtype=dtype)
    ref = forward_backward(backend_fn("loop"), case, grad_out, dtype=torch.float64)
    for i, name in enumerate(("out", "dq", "dk", "dv")):
        assert torch.isfinite(got[i]).all(), f"{backend} {name} has non-finite values"
        assert_within_rule(got[i], ref[i], base[i], factor=2 if i == 0 else 3, floor=floor, name=f"{backend} {name}")


@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("seed", range(3))
def test_random_ragged_batches(backend, dtype, seed):
    case = random_case(9, 300, 170, 4, (16, 32, 64)[seed], seed=seed, device="cuda")
    check_rule(backend, case, dtype, floor=1e-3)


@pytest.mark.parametrize("head_dim", [16, 32, 64, 128, 48])
def test_triton_fp32_and_head_dims(head_dim):
    case = random_case(5, 200, 130, 2, head_dim, seed=head_dim, device="cuda")
    check_rule("triton", case, torch.float32, floor=1e-5)
    check_rule("triton", case, torch.bfloat16, floor=1e-3)


@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("preset", ["seed", "wide"])
def test_preset_shapes(backend, preset):
    if backend == "loop" or backend == "flex" and preset == "wide":
        pytest.skip("covered by the random batches; the reference dominates the time here")
    p = get_preset(preset)
    lengths_q, lengths_k = attention_lengths(p)
    case = make_case(lengths_q, lengths_k, p.dec_heads, p.dec_head_dim, device="cuda")
    check_rule(backend, case, torch.bfloat16, floor=1e-3)


def test_triton_backward_is_deterministic_on_gpu():
    p = get_preset("seed")
    lengths_q, lengths_k = attention_lengths(p)
    case = make_case(lengths_q, lengths_k, p.dec_heads, p.dec_head_dim, dtype=torch.bfloat16, device="cuda")
    grad_out = torch.randn(case.q.shape, device="cuda", dtype=torch.bfloat16)
    first = forward_backward(backend_fn("triton"), case, grad_out)
    second = forward_backward(backend_fn("triton"), case, grad_out)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
