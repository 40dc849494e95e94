"""varlen_attention: every CPU-capable backend against the float64 reference, and the contract."""

import gc
import inspect
import sys

import pytest
import torch
from attention_cases import (
    assert_close,
    assert_within_rule,
    forward_backward,
    make_case,
    random_case,
    reference_fn,
)

from crossmae.ops import (
    BACKENDS,
    ENV_VAR,
    AttentionBackend,
    VarlenAttentionFn,
    available_backends,
    backends,
    external,
    resolve_backend,
    select_backend,
    triton_attention,
    varlen_attention,
)
from crossmae.packed import Packed, pad_packed, unpad
from crossmae_kernels.varlen_attention import is_interpreting

# Triton runs on CPU tensors only in its interpreter, which conftest.py turns on when no GPU is
# present; on a GPU machine the Triton backend is checked by test_varlen_attention_gpu.py.
needs_interpreter = pytest.mark.skipif(not is_interpreting(), reason="Triton on CPU tensors needs TRITON_INTERPRET=1")


def backend_fn(name):
    def fn(q, k, v, cu_q, cu_k, max_q, max_k):
        return varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, backend=name)

    return fn


TORCH_BACKENDS = ["math", "loop", "sdpa_padded"]
CPU_BACKENDS = TORCH_BACKENDS + (["triton"] if is_interpreting() else [])
# (B, max Lq, max Lk, H, D): B from 1 to 9, Lq != Lk, head dims 16/32/64
SHAPES = [(1, 13, 7, 2, 16), (2, 1, 9, 1, 32), (4, 40, 23, 2, 64), (5, 9, 33, 3, 16), (9, 21, 12, 2, 32)]
TRITON_SHAPES = [(1, 13, 7, 2, 16), (4, 40, 23, 2, 32), (6, 19, 35, 1, 64), (9, 21, 12, 2, 16), (3, 17, 5, 1, 24)]


def check_against_reference(backend, case, dtype, atol, rtol):
    grad_out = torch.randn(case.q.shape, generator=torch.Generator().manual_seed(7))
    got = forward_backward(backend_fn(backend), case, grad_out, dtype=dtype)
    ref = forward_backward(reference_fn, case, grad_out, dtype=torch.float64)
    for name, a, r in zip(("out", "dq", "dk", "dv"), got, ref):
        assert a.dtype == dtype, f"{name} dtype {a.dtype} != {dtype}"
        assert_close(a, r, atol=atol, rtol=rtol, name=f"{backend} {name}")


@pytest.mark.parametrize("backend", TORCH_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}_q{}_k{}_H{}_D{}".format(*s))
def test_torch_backends_match_reference_fp32(backend, shape):
    batch, max_q, max_k, heads, head_dim = shape
    case = random_case(batch, max_q, max_k, heads, head_dim, seed=sum(shape))
    check_against_reference(backend, case, torch.float32, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("backend", TORCH_BACKENDS)
def test_torch_backends_bf16_within_rule(backend):
    """bf16 error vs float64 ≤ 2× (out) / 3× (grads) plain PyTorch's own bf16 error, + a floor."""
    case = random_case(6, 30, 25, 2, 32, seed=3)
    grad_out = torch.randn(case.q.shape, generator=torch.Generator().manual_seed(8))
    got = forward_backward(backend_fn(backend), case, grad_out, dtype=torch.bfloat16)
    base = forward_backward(backend_fn("math"), case, grad_out, dtype=torch.bfloat16)
    ref = forward_backward(reference_fn, case, grad_out, dtype=torch.float64)
    for i, name in enumerate(("out", "dq", "dk", "dv")):
        assert_within_rule(got[i], ref[i], base[i], factor=2 if i == 0 else 3, floor=1e-2, name=f"{backend} {name}")


@needs_interpreter
@pytest.mark.parametrize("shape", TRITON_SHAPES, ids=lambda s: "B{}_q{}_k{}_H{}_D{}".format(*s))
def test_triton_matches_reference_fp32(shape):
    batch, max_q, max_k, heads, head_dim = shape
    case = random_case(batch, max_q, max_k, heads, head_dim, seed=sum(shape))
    check_against_reference("triton", case, torch.float32, atol=2e-5, rtol=2e-5)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float16])
def test_triton_low_precision_within_rule(dtype):
    case = random_case(5, 37, 21, 2, 32, seed=11)
    grad_out = torch.randn(case.q.shape, generator=torch.Generator().manual_seed(9))
    got = forward_backward(backend_fn("triton"), case, grad_out, dtype=dtype)
    base = forward_backward(backend_fn("math"), case, grad_out, dtype=dtype)
    ref = forward_backward(reference_fn, case, grad_out, dtype=torch.float64)
    for i, name in enumerate(("out", "dq", "dk", "dv")):
        assert_within_rule(got[i], ref[i], base[i], factor=2 if i == 0 else 3, floor=1e-3, name=f"triton {name}")


@needs_interpreter
def test_triton_interpreter_refuses_bf16_with_a_reason():
    case = make_case([3], [4], heads=1, head_dim=16, dtype=torch.bfloat16, requires_grad=False)
    with pytest.raises(ValueError, match="interpreter has no bfloat16"):
        varlen_attention(*case.args, backend="triton")


def test_empty_key_segment_gives_zero_output_and_zero_grads():
    case = make_case([3, 4], [0, 5], heads=2, head_dim=16)
    for backend in CPU_BACKENDS:
        out, dq, dk, dv = forward_backward(backend_fn(backend), case, torch.ones(case.q.shape))
        assert torch.equal(out[:3], torch.zeros_like(out[:3])), backend
        assert torch.equal(dq[:3], torch.zeros_like(dq[:3])), backend
        assert out[3:].abs().sum() > 0, backend


def test_degenerate_batches():
    for lengths_q, lengths_k in [([0, 0], [3, 2]), ([2, 1], [0, 0]), ([], []), ([0], [0])]:
        case = make_case(lengths_q, lengths_k, heads=2, head_dim=16)
        for backend in CPU_BACKENDS:
            out, dq, dk, dv = forward_backward(backend_fn(backend), case, torch.ones(case.q.shape))
            assert out.shape == case.q.shape and not out.abs().any(), backend
            assert not dk.abs().any() and not dv.abs().any(), backend


@needs_interpreter
def test_triton_accepts_strided_inputs():
    case = make_case([5, 0, 9], [4, 6, 1], heads=2, head_dim=16, requires_grad=False)
    wide = torch.randn(case.q.shape[0], 2, 48)
    q = wide[:, :, 8:24]  # non-contiguous in the token and head dims
    k = case.k.detach().transpose(0, 1).contiguous().transpose(0, 1)  # head-major storage
    v = case.v.detach()
    got = varlen_attention(q, k, v, *case.args[3:], backend="triton")
    ref = reference_fn(q, k, v, *case.args[3:])
    assert_close(got, ref, atol=2e-5, rtol=2e-5, name="strided out")


@needs_interpreter
def test_triton_backward_is_deterministic():
    case = random_case(7, 45, 30, 2, 32, seed=5)
    grad_out = torch.randn(case.q.shape, generator=torch.Generator().manual_seed(1))
    first = forward_backward(backend_fn("triton"), case, grad_out)
    second = forward_backward(backend_fn("triton"), case, grad_out)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_padded_and_packed_agree():
    """The same samples as a padded batch through SDPA and packed through each backend."""
    lengths_q, lengths_k = [5, 1, 12, 0], [7, 3, 2, 6]
    case = make_case(lengths_q, lengths_k, heads=2, head_dim=16, requires_grad=False)
    pq, pk = case.packed_q, case.packed_k
    qp = pad_packed(case.q, pq.cu_seqlens, pq.max_seqlen)  # [B, Lq, H, D]
    kp = pad_packed(case.k, pk.cu_seqlens, pk.max_seqlen)  # [B, Lk, H, D]
    vp = pad_packed(case.v, pk.cu_seqlens, pk.max_seqlen)
    key_ok = torch.arange(pk.max_seqlen)[None, :] < pk.lengths[:, None]  # [B, Lk]
    padded = torch.nn.functional.scaled_dot_product_attention(
        qp.transpose(1, 2), kp.transpose(1, 2), vp.transpose(1, 2), attn_mask=key_ok[:, None, None, :]
    ).transpose(1, 2)  # [B, Lq, H, D]
    expected = unpad(padded, pq.cu_seqlens, pq.total)
    for backend in CPU_BACKENDS:
        got = varlen_attention(*case.args, backend=backend)
        assert_close(got, expected, atol=2e-5, rtol=2e-5, name=f"{backend} vs padded")


def test_softmax_scale_is_used():
    case = make_case([6, 3], [4, 5], heads=1, head_dim=16, requires_grad=False)
    for backend in CPU_BACKENDS:
        got = varlen_attention(*case.args, softmax_scale=0.3, backend=backend)
        ref = reference_fn(*case.args, softmax_scale=0.3)
        assert_close(got, ref, atol=2e-5, rtol=2e-5, name=f"{backend} scale")


# -- selection --------------------------------------------------------------------------
def test_auto_picks_a_backend_that_can_run_and_honours_env(monkeypatch):
    case = make_case([3], [4], heads=1, head_dim=16, requires_grad=False)
    chosen = select_backend("auto", case.q, needs_backward=True)
    assert not chosen.reasons(case.q, needs_backward=True)
    monkeypatch.setenv(ENV_VAR, "loop")
    assert select_backend("auto", case.q, needs_backward=True).name == "loop"
    monkeypatch.setenv(ENV_VAR, "no_such_backend")
    with pytest.raises(ValueError, match="backend must be"):
        varlen_attention(*case.args)


def test_triton_refuses_float32_head_dims_whose_tile_spills():
    """fp32 runs its dots on the FMA units; a 128-wide head-dim tile spills on sm_90 (kernel report)."""
    from crossmae.ops import triton_attention

    cuda = torch.device("cuda")
    assert triton_attention.device_reasons(cuda, torch.float32, 64) == []
    for head_dim in (72, 128):
        (why,) = triton_attention.device_reasons(cuda, torch.float32, head_dim)
        assert f"head dim {head_dim}" in why and "spills" in why


def test_unavailable_backend_raises_with_reasons():
    case = make_case([3], [4], heads=1, head_dim=16, requires_grad=False)
    for name in ("torch_varlen", "flash_attn", "xformers"):
        with pytest.raises(ValueError, match=f"backend '{name}' can't run"):
            varlen_attention(*case.args, backend=name)
    assert set(TORCH_BACKENDS) <= set(available_backends(case.q, needs_backward=True))


def test_every_backend_declares_its_support():
    case = make_case([3], [4], heads=1, head_dim=16, requires_grad=False)
    for backend in BACKENDS.values():
        assert backend.devices and backend.dtypes and backend.description
        assert isinstance(backend.reasons(case.q), list)


# -- bad inputs ---------------------------------------------------------------------------
def bad_input_cases():
    def base():
        c = make_case([3, 5], [4, 2], heads=2, head_dim=16, requires_grad=False)
        return list(c.args)

    def with_(i, value):
        args = base()
        args[i] = value(args) if callable(value) else value
        return args

    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    return [
        ("cu_seqlens_q must be int32", with_(3, cu.long())),
        ("cu_seqlens_k must have the length", with_(4, torch.tensor([0, 6], dtype=torch.int32))),
        ("cu_seqlens_q must have shape", with_(3, cu[None])),
        ("cu_seqlens_q must be non-decreasing", with_(3, torch.tensor([0, 9, 8], dtype=torch.int32))),
        (r"cu_seqlens_q\[0\] must be 0", with_(3, torch.tensor([1, 3, 8], dtype=torch.int32))),
        (r"cu_seqlens_q\[-1\] must equal", with_(3, torch.tensor([0, 3, 7], dtype=torch.int32))),
        (r"cu_seqlens_k\[-1\] must equal", with_(4, torch.tensor([0, 4, 5], dtype=torch.int32))),
        ("max_seqlen_q=4 is smaller than the longest segment", with_(5, 4)),
        ("max_seqlen_k=3 is smaller than the longest segment", with_(6, 3)),
        ("max_seqlen_q must be a Python int", with_(5, torch.tensor(5))),
        ("k must have q's number of heads", with_(1, lambda a: torch.randn(6, 3, 16))),
        ("v must have q's head dim", with_(2, lambda a: torch.randn(6, 2, 8))),
        ("k must have q's head dim", with_(1, lambda a: torch.randn(6, 2, 32))),
        ("k must have q's dtype", with_(1, lambda a: a[1].double())),
        ("v must have as many rows as k", with_(2, lambda a: torch.randn(5, 2, 16))),
        (r"q must have shape \[total, H, D\]", with_(0, lambda a: a[0][None])),
        ("cu_seqlens_q must be a torch.Tensor", with_(3, [0, 3, 8])),
    ]


@pytest.mark.parametrize("match,args", bad_input_cases(), ids=[c[0][:40] for c in bad_input_cases()])
def test_bad_inputs_raise_value_error_naming_the_argument(match, args):
    with pytest.raises(ValueError, match=match):
        varlen_attention(*args, backend="math")


def test_device_mismatch_is_rejected():
    case = make_case([3], [4], heads=1, head_dim=16, requires_grad=False)
    k_meta = case.k.to("meta")
    with pytest.raises(ValueError, match="k must be on q's device"):
        varlen_attention(case.q, k_meta, case.v, *case.args[3:], backend="math")
    with pytest.raises(ValueError, match="cu_seqlens_k must be on q's device"):
        varlen_attention(case.q, case.k, case.v, case.args[3], case.args[4].to("meta"), 3, 4, backend="math")


def test_unsupported_head_dim_is_rejected_by_backend():
    case = make_case([3], [4], heads=1, head_dim=256, requires_grad=False)
    with pytest.raises(ValueError, match="supports head dims .* not 256"):
        varlen_attention(*case.args, backend="triton")
    case = make_case([3], [4], heads=1, head_dim=12, requires_grad=False)
    with pytest.raises(ValueError, match="not 12"):
        varlen_attention(*case.args, backend="triton")


def test_packed_cu_seqlens_are_not_read_back():
    """cu_seqlens built by Packed are trusted: checking them reads nothing from the tensor."""
    packed = Packed.from_lengths([4, 0, 7])
    from crossmae.packed import _SUMMARIES

    assert packed.cu_seqlens in _SUMMARIES


def test_flex_forward_on_cpu_matches_reference_and_refuses_backward():
    case = random_case(5, 20, 14, 2, 16, seed=2, requires_grad=False)
    got = varlen_attention(*case.args, backend="flex")
    assert_close(got, reference_fn(*case.args), atol=2e-5, rtol=2e-5, name="flex out")
    case.q.requires_grad_(True)
    with pytest.raises(ValueError, match="has no backward on cpu"):
        varlen_attention(*case.args, backend="flex")


# -- resolution once, the hot path, cached masks ---------------------------------------------------
def test_resolve_backend_is_cached_and_can_be_passed_to_the_op():
    case = make_case([3, 0, 5], [4, 2, 0], heads=2, head_dim=16, requires_grad=False)
    first = resolve_backend("loop", device="cpu", dtype=torch.float32, head_dim=16)
    assert resolve_backend("loop", device=torch.device("cpu"), dtype=torch.float32, head_dim=16) is first
    assert torch.equal(varlen_attention(*case.args, backend=first), varlen_attention(*case.args, backend="loop"))
    float64 = make_case([3], [4], heads=1, head_dim=16, dtype=torch.float64, requires_grad=False)
    math_f64 = resolve_backend("math", device="cpu", dtype=torch.float64, head_dim=16)
    assert_close(varlen_attention(*float64.args, backend=math_f64), reference_fn(*float64.args), atol=1e-12,
                 rtol=1e-12, name="resolved math")
    flex = resolve_backend("flex", device="cpu", dtype=torch.float32, head_dim=16, needs_backward=False)
    with pytest.raises(ValueError, match="backend 'flex' can't run on these inputs: has no backward on cpu"):
        varlen_attention(*make_case([3], [4], heads=1, head_dim=16).args, backend=flex)


def test_calls_after_the_first_do_not_walk_the_registry(monkeypatch):
    case = make_case([3, 5], [4, 2], heads=2, head_dim=16, requires_grad=False)
    calls = []
    original = AttentionBackend.reasons_for

    def counting(self, **inputs):
        calls.append(self.name)
        return original(self, **inputs)

    monkeypatch.setattr(AttentionBackend, "reasons_for", counting)
    backends._RESOLVED.clear()
    varlen_attention(*case.args)
    assert calls, "the first call resolves"
    calls.clear()
    for _ in range(3):
        varlen_attention(*case.args)
    assert calls == []
    monkeypatch.setenv(ENV_VAR, "sdpa_padded")
    assert select_backend("auto", case.q, needs_backward=False).name == "sdpa_padded"


def test_every_backend_function_has_the_varlen_signature():
    def positional(fn):
        return [p.name for p in inspect.signature(fn).parameters.values() if p.kind == p.POSITIONAL_OR_KEYWORD]

    expected = positional(VarlenAttentionFn.__call__)[1:]  # without self
    for backend in BACKENDS.values():
        assert positional(backend.fn) == expected, backend.name


def test_triton_reasons_name_a_missing_c_compiler(monkeypatch, tmp_path):
    monkeypatch.setattr(triton_attention, "_unavailable", [])
    monkeypatch.setattr(triton_attention._kernels, "is_interpreting", lambda: False)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CC", raising=False)
    assert triton_attention.c_compiler() is None
    case = make_case([3], [4], heads=1, head_dim=16, requires_grad=False)
    assert "needs a C compiler at run time" in BACKENDS["triton"].reasons(case.q)[0]
    monkeypatch.setenv("CC", sys.executable)  # Triton runs whatever program CC names
    assert triton_attention.c_compiler() == sys.executable
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    assert triton_attention.c_compiler() is None


def test_per_cu_seqlens_cache_builds_once_per_pair_and_version():
    packed_q, packed_k = Packed.from_lengths([3, 0, 5]), Packed.from_lengths([4, 2, 1])
    builds = []

    def build():
        builds.append(1)
        return len(builds)

    def get(pq, pk):
        return external.cached_per_cu_seqlens("test", pq.cu_seqlens, pk.cu_seqlens, 8, build)

    assert get(packed_q, packed_k) == get(packed_q, packed_k) == 1
    other = Packed.from_lengths([3, 0, 5])  # equal values, a new batch's tensor
    assert get(other, packed_k) == 2
    packed_k.cu_seqlens.add_(0)  # an in-place write bumps the version
    assert get(packed_q, packed_k) == 3
    alive = len(external._PER_CU_SEQLENS)
    del other
    gc.collect()
    assert len(external._PER_CU_SEQLENS) == alive - 1


def test_flex_block_mask_is_built_once_per_cu_seqlens_with_a_module_level_mask_mod(monkeypatch):
    builds = []
    original = external._flex_block_mask

    def counting(*args):
        mask = original(*args)
        builds.append(mask)
        return mask

    monkeypatch.setattr(external, "_flex_block_mask", counting)
    case = random_case(4, 20, 14, 2, 16, seed=3, requires_grad=False)
    first = varlen_attention(*case.args, backend="flex")
    second = varlen_attention(*case.args, backend="flex")
    assert torch.equal(first, second) and len(builds) == 1
    assert builds[0].mask_mod.func is external._same_sample
    again = random_case(4, 20, 14, 2, 16, seed=3, requires_grad=False)  # same lengths, new tensors
    assert_close(varlen_attention(*again.args, backend="flex"), first, atol=0, rtol=0, name="flex, new batch")
    assert len(builds) == 2


@pytest.mark.parametrize("lengths_q,lengths_k", [
    ([0, 233, 60], [163, 279, 0]), ([97, 183], [101, 266]), ([90, 184, 69], [127, 270, 210]), ([0, 235], [283, 0]),
])
def test_flex_block_mask_from_tiles_equals_create_block_mask(lengths_q, lengths_k):
    """The tile-level document mask has the tiles, full tiles and elements of FlexAttention's own dense build."""
    from torch.nn.attention.flex_attention import create_block_mask

    packed_q, packed_k = Packed.from_lengths(lengths_q), Packed.from_lengths(lengths_k)
    ours = external._flex_block_mask(packed_q.cu_seqlens, packed_k.cu_seqlens, packed_q.total, packed_k.total)
    seg_q, seg_k = packed_q.segment_ids(), packed_k.segment_ids()
    theirs = create_block_mask(lambda b, h, q_idx, kv_idx: seg_q[q_idx] == seg_k[kv_idx], None, None,
                               packed_q.total, packed_k.total, device="cpu")
    assert torch.equal(ours.to_dense(), theirs.to_dense())
    assert torch.equal(ours.full_kv_num_blocks, theirs.full_kv_num_blocks)
    q_idx, kv_idx = torch.arange(packed_q.total)[:, None], torch.arange(packed_k.total)[None, :]
    assert torch.equal(ours.mask_mod(0, 0, q_idx, kv_idx), seg_q[q_idx] == seg_k[kv_idx])


def _unique_graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def test_flex_block_masks_of_new_batches_reuse_the_compiled_graph():
    """Dynamo's guards (backend aot_eager: the guards, not inductor) hold across batches of new lengths."""
    from torch.nn.attention.flex_attention import flex_attention

    compiled = torch.compile(flex_attention, dynamic=True, backend="aot_eager")
    before = _unique_graphs()
    for lengths_q, lengths_k in [([30, 0, 50], [20, 7, 40]), ([64, 3], [10, 90]), ([5, 6, 7, 8], [9, 10, 11, 12])]:
        case = make_case(lengths_q, lengths_k, heads=2, head_dim=16, requires_grad=False)
        mask = external._flex_block_mask(case.packed_q.cu_seqlens, case.packed_k.cu_seqlens, case.packed_q.total,
                                         case.packed_k.total)
        q, k, v = (t.detach().transpose(0, 1)[None] for t in (case.q, case.k, case.v))  # [1, H, total, D]
        out = compiled(q, k, v, block_mask=mask, scale=0.25)[0].transpose(0, 1)  # [total_q, H, D]
        assert_close(out, reference_fn(*case.args, softmax_scale=0.25), atol=2e-5, rtol=2e-5, name="compiled flex")
    assert _unique_graphs() - before == 1


@pytest.mark.gpu
def test_flex_on_cuda_compiles_once_for_batches_of_new_lengths():
    before = _unique_graphs()
    for seed in range(3):
        case = random_case(6, 200, 150, 2, 32, seed=seed, device="cuda", dtype=torch.bfloat16)
        out, dq, dk, dv = forward_backward(backend_fn("flex"), case, torch.randn(case.q.shape, device="cuda"))
        assert torch.isfinite(out).all() and torch.isfinite(dq).all()
    assert _unique_graphs() - before <= 2, "a new batch recompiled FlexAttention"
