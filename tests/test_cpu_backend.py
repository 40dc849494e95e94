"""The `cpu` backend (our compiled C++ kernels, crossmae._C): reference checks, registration, fallback."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from attention_cases import (
    TinyCrossAttention,
    assert_close,
    assert_within_rule,
    forward_backward,
    make_case,
    numerics_case,
    random_case,
    reference_fn,
)

from crossmae.ops import AUTO_ORDER, BACKENDS, cpu_attention, select_backend, varlen_attention

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(
    cpu_attention.unavailable_reason() is not None, reason=f"{cpu_attention.unavailable_reason()}"
)


def cpu_fn(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=None):
    return varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=softmax_scale, backend="cpu")


def math_fn(q, k, v, cu_q, cu_k, max_q, max_k):
    return varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, backend="math")


def run_python(code: str, **env) -> str:
    """Runs code in a fresh interpreter (from the repository root) and returns its stdout."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
        env={**os.environ, **env}, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


# (B, max Lq, max Lk, H, D): lengths include 0 and 1 (random_case), Lq != Lk, odd head dims,
# key segments longer than one 64-key block, and several query blocks
SHAPES = [
    (1, 13, 7, 2, 16), (4, 40, 23, 2, 64), (5, 9, 33, 3, 16), (9, 21, 12, 2, 32), (3, 150, 97, 2, 24),
    (6, 70, 130, 1, 128), (4, 17, 19, 2, 8), (5, 30, 40, 1, 1), (4, 25, 70, 1, 200),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}_q{}_k{}_H{}_D{}".format(*s))
def test_cpu_matches_reference_fp32(shape):
    batch, max_q, max_k, heads, head_dim = shape
    case = random_case(batch, max_q, max_k, heads, head_dim, seed=sum(shape))
    grad_out = torch.randn(case.q.shape, generator=torch.Generator().manual_seed(7))
    got = forward_backward(cpu_fn, case, grad_out)
    ref = forward_backward(reference_fn, case, grad_out, dtype=torch.float64)
    for name, a, r in zip(("out", "dq", "dk", "dv"), got, ref):
        assert a.dtype == torch.float32
        assert_close(a, r, atol=2e-5, rtol=2e-5, name=f"cpu {name}")


@pytest.mark.parametrize("head_dim", [16, 32, 64])
def test_cpu_bf16_within_rule(head_dim):
    """bf16 error vs float64 ≤ 2× (out) / 3× (grads) plain PyTorch's own bf16 error, + a floor."""
    case = random_case(6, 90, 75, 2, head_dim, seed=head_dim)
    grad_out = torch.randn(case.q.shape, generator=torch.Generator().manual_seed(8))
    got = forward_backward(cpu_fn, case, grad_out, dtype=torch.bfloat16)
    base = forward_backward(math_fn, case, grad_out, dtype=torch.bfloat16)
    ref = forward_backward(reference_fn, case, grad_out, dtype=torch.float64)
    for i, name in enumerate(("out", "dq", "dk", "dv")):
        assert got[i].dtype == torch.bfloat16
        assert_within_rule(got[i], ref[i], base[i], factor=2 if i == 0 else 3, floor=1e-2, name=f"cpu {name}")


def test_empty_segments_give_zeros():
    for lengths_q, lengths_k in [([3, 4, 0], [0, 5, 2]), ([0, 0], [3, 2]), ([2, 1], [0, 0]), ([], []), ([0], [0])]:
        case = make_case(lengths_q, lengths_k, heads=2, head_dim=16)
        out, dq, dk, dv = forward_backward(cpu_fn, case, torch.ones(case.q.shape))
        ref = forward_backward(reference_fn, case, torch.ones(case.q.shape), dtype=torch.float64)
        for name, a, r in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), ref):
            assert_close(a, r, atol=2e-5, rtol=2e-5, name=f"{lengths_q}/{lengths_k} {name}")
        rows_without_keys = slice(0, lengths_q[0]) if lengths_q and lengths_k[0] == 0 else slice(0, 0)
        assert torch.equal(out[rows_without_keys], torch.zeros_like(out[rows_without_keys]))


def test_lse_is_base_2_and_minus_inf_without_keys():
    case = make_case([3, 2], [4, 0], heads=2, head_dim=16, requires_grad=False)
    _, lse = torch.ops.crossmae.varlen_attn_cpu_fwd(*case.args, 0.25)  # [H, total_q]
    scores = torch.einsum("qhd,khd->hqk", case.q[:3].double(), case.k.double()) * 0.25  # [H, 3, 4]
    assert_close(lse[:, :3], torch.logsumexp(scores, dim=-1) / torch.log(torch.tensor(2.0)), atol=1e-5, rtol=1e-5,
                 name="lse")
    assert torch.isneginf(lse[:, 3:]).all()


def test_strided_inputs():
    case = make_case([5, 0, 9], [4, 6, 70], heads=2, head_dim=16, requires_grad=False)
    wide = torch.randn(case.q.shape[0], 2, 48)
    q = wide[:, :, 8:24]  # non-contiguous in the token and head dims
    k = case.k.detach().transpose(0, 1).contiguous().transpose(0, 1)  # head-major storage
    v = case.v.detach()
    assert_close(cpu_fn(q, k, v, *case.args[3:]), reference_fn(q, k, v, *case.args[3:]), atol=2e-5, rtol=2e-5,
                 name="strided out")


def test_key_chunks_split_few_heads_and_agree_with_one_chunk():
    """One (segment, head) pair: the backward splits the keys into chunks; dq still matches."""
    case = random_case(1, 70, 300, 1, 32, seed=4)
    grad_out = torch.randn(case.q.shape, generator=torch.Generator().manual_seed(2))
    got = forward_backward(cpu_fn, case, grad_out)
    ref = forward_backward(reference_fn, case, grad_out, dtype=torch.float64)
    for name, a, r in zip(("out", "dq", "dk", "dv"), got, ref):
        assert_close(a, r, atol=2e-5, rtol=2e-5, name=f"chunked {name}")


@pytest.mark.parametrize("shape", [(7, 145, 130, 2, 32), (1, 70, 300, 1, 16)], ids=["one_chunk", "key_chunks"])
def test_results_are_bitwise_equal_across_runs_and_thread_counts(shape):
    case = random_case(*shape, seed=5)
    grad_out = torch.randn(case.q.shape, generator=torch.Generator().manual_seed(1))
    threads = torch.get_num_threads()
    try:
        runs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            runs.append(forward_backward(cpu_fn, case, grad_out))
            runs.append(forward_backward(cpu_fn, case, grad_out))
    finally:
        torch.set_num_threads(threads)
    for run in runs[1:]:
        for a, b in zip(runs[0], run):
            assert torch.equal(a, b)


def test_every_instruction_set_matches_the_reference():
    """ATen's ATEN_CPU_CAPABILITY picks the kernel build; each narrower one must agree with the reference too."""
    code = """
        import sys
        sys.path.insert(0, "tests")
        import torch
        from attention_cases import assert_close, forward_backward, random_case, reference_fn
        from crossmae.ops import cpu_attention, varlen_attention
        case = random_case(5, 40, 77, 2, 24, seed=3)
        g = torch.randn(case.q.shape, generator=torch.Generator().manual_seed(0))
        got = forward_backward(lambda *a: varlen_attention(*a, backend="cpu"), case, g)
        ref = forward_backward(reference_fn, case, g, dtype=torch.float64)
        for a, r in zip(got, ref):
            assert_close(a, r, atol=2e-5, rtol=2e-5)
        print(cpu_attention.isa())
    """
    narrower = {"avx512": ["avx2", "default"], "avx2": ["default"]}.get(cpu_attention.isa(), [])
    for isa in narrower:
        assert run_python(code, ATEN_CPU_CAPABILITY=isa).strip() == isa


# -- registry -------------------------------------------------------------------------------
def test_registry_entry_and_auto_order():
    case = make_case([3], [4], heads=1, head_dim=16)
    assert BACKENDS["cpu"].reasons(case.q, needs_backward=True) == []
    assert AUTO_ORDER["cpu"][0] == "cpu"
    assert select_backend("auto", case.q, needs_backward=True).name == "cpu"
    with pytest.raises(ValueError, match="supports dtypes bfloat16, float32, not float64"):
        varlen_attention(*make_case([3], [4], heads=1, head_dim=16, dtype=torch.float64).args, backend="cpu")
    with pytest.raises(ValueError, match="runs on cpu, not meta"):
        varlen_attention(*make_case([3], [4], heads=1, head_dim=16, device="meta").args, backend="cpu")


@pytest.mark.parametrize("call,match", [
    (lambda a: (a[0], a[1], a[2], a[3].long(), *a[4:]), "cu_seqlens_q must be int32"),
    (lambda a: (a[0], a[1], a[2], a[3], torch.tensor([0, 4], dtype=torch.int32), *a[5:]), "cu_seqlens_k must have"),
    (lambda a: (a[0], a[1], a[2], torch.tensor([0, 3, 7], dtype=torch.int32), *a[4:]), r"cu_seqlens_q\[-1\]"),
    (lambda a: (a[0], a[1], a[2], torch.tensor([0, 9, 8], dtype=torch.int32), *a[4:]), "non-decreasing"),
    (lambda a: (*a[:5], 4, a[6], a[7]), "max_seqlen_q=4 is smaller"),
    (lambda a: (a[0], a[1].double(), *a[2:]), "k must have q's dtype"),
    (lambda a: (a[0].double(), a[1].double(), a[2].double(), *a[3:]), "q must be float32 or bfloat16"),
    (lambda a: (a[0], a[1][:, :1], *a[2:]), "k must have q's number of heads"),
    (lambda a: (a[0], a[1], a[2][:5], *a[3:]), "v must have as many rows as k"),
])
def test_op_errors_name_the_argument(call, match):
    case = make_case([3, 5], [4, 2], heads=2, head_dim=16, requires_grad=False)
    with pytest.raises(ValueError, match=match):
        torch.ops.crossmae.varlen_attn_cpu_fwd(*call((*case.args, 0.25)))


# -- torch.library registration ---------------------------------------------------------------
def test_opcheck_forward_op():
    case = make_case([5, 0, 7, 1], [3, 4, 0, 70], heads=2, head_dim=16)
    torch.library.opcheck(torch.ops.crossmae.varlen_attn_cpu_fwd.default, (*case.args, 0.25))


def test_opcheck_backward_op():
    case = make_case([5, 0, 7], [3, 4, 1], heads=2, head_dim=16, requires_grad=False)
    out, lse = torch.ops.crossmae.varlen_attn_cpu_fwd(*case.args, 0.25)
    dout = torch.randn_like(out)
    torch.library.opcheck(torch.ops.crossmae.varlen_attn_cpu_bwd.default,
                          (dout, case.q, case.k, case.v, out, lse, *case.args[3:], 0.25))


def test_torch_compile_traces_a_module_using_the_op():
    torch.manual_seed(0)
    case = make_case([5, 0, 7], [3, 4, 1], heads=1, head_dim=32, requires_grad=False)
    x, memory = case.q[:, 0], case.k[:, 0]  # [total, 32]
    model = TinyCrossAttention("cpu")
    eager = model(x, memory, *case.args[3:])
    eager_grads = torch.autograd.grad(eager.square().sum(), list(model.parameters()))
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x, memory, *case.args[3:])
    grads = torch.autograd.grad(out.square().sum(), list(model.parameters()))
    assert_close(out, eager, atol=1e-5, rtol=1e-5, name="compiled out")
    for g, e in zip(grads, eager_grads):
        assert_close(g, e, atol=1e-5, rtol=1e-5, name="compiled grad")


# -- without the extension ------------------------------------------------------------------
def test_fallback_when_the_extension_is_absent():
    """With crossmae._C unimportable, crossmae still imports, `cpu` says why, and `auto` falls back."""
    out = run_python("""
        import sys
        sys.modules["crossmae._C"] = None  # what an install with CROSSMAE_SKIP_EXTENSION=1 looks like
        import torch
        from crossmae.ops import BACKENDS, select_backend, varlen_attention
        from crossmae.packed import Packed
        pq, pk = Packed.from_lengths([3, 2]), Packed.from_lengths([4, 1])
        q, k = torch.randn(5, 2, 16), torch.randn(5, 2, 16)
        print(BACKENDS["cpu"].reasons(q)[0])
        print(select_backend("auto", q, needs_backward=True).name)
        try:
            varlen_attention(q, k, k, pq.cu_seqlens, pk.cu_seqlens, 3, 4, backend="cpu")
        except ValueError as exc:
            print(exc)
    """)
    reason, auto, error = out.strip().splitlines()
    assert "crossmae._C can't be imported" in reason and "CROSSMAE_SKIP_EXTENSION" in reason
    assert auto != "cpu"
    assert error.startswith("backend 'cpu' can't run on these inputs: the compiled extension crossmae._C")


# -- rows whose softmax is one-hot --------------------------------------------------------------------
SCALE = 5.0  # softmax_scale of these cases


def cpu_scaled(*args):
    return cpu_fn(*args, softmax_scale=SCALE)


def test_single_keys_give_exactly_zero_dq_and_dk():
    """With one key, P = 1 and dS = dP - delta is exactly 0: delta is summed like dP, so no residue is left."""
    for seed in range(4):
        case = numerics_case([5, 3, 0, 1], [1, 1, 1, 1], 32, softmax_scale=SCALE, seed=seed)
        grad_out = torch.randn(case.q.shape, generator=torch.Generator().manual_seed(seed))
        out, dq, dk, dv = forward_backward(cpu_scaled, case, grad_out)
        assert not dq.any() and not dk.any(), f"seed {seed}: |dq| {dq.abs().max():.2e}, |dk| {dk.abs().max():.2e}"


def test_one_hot_rows_far_below_zero_as_accurate_as_math():
    """The lengths of issue 10 with logits far below zero and spread over hundreds: the true dq, dk are ~0."""
    def reference(*args):
        return reference_fn(*args, softmax_scale=SCALE)

    def plain(*args):
        return varlen_attention(*args, softmax_scale=SCALE, backend="math")

    for seed in range(8):
        case = numerics_case([0, 1, 1], [43, 1, 111], 16, patterns=("far_below_spread",), softmax_scale=SCALE,
                             seed=seed)
        grad_out = torch.randn(case.q.shape, generator=torch.Generator().manual_seed(seed))
        ref = forward_backward(reference, case, grad_out, dtype=torch.float64)
        got = forward_backward(cpu_scaled, case, grad_out)
        base = forward_backward(plain, case, grad_out)
        for name, a, r, m in list(zip(("out", "dq", "dk", "dv"), got, ref, base))[1:3]:
            err, math_err = (a.double() - r).abs().max().item(), (m.double() - r).abs().max().item()
            assert err <= 10 * math_err + 1e-30, f"seed {seed} {name}: {err:.2e} vs math {math_err:.2e}"
