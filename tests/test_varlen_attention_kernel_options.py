"""Launch options and dtype paths of the Triton attention kernels, in Triton's interpreter (tiny cases).

- ``varlen_attn_bwd(..., deterministic=False)``: dQ accumulated with atomics in the dK/dV pass
  agrees with the float64 reference and with the deterministic two-pass backward.
- A negative ``softmax_scale``: the forward takes the row minimum of the raw scores on its
  unmasked path (the maximum of the scaled ones) and still matches the reference.
- fp16 inputs take the 16-bit paths (the software-pipelined forward loop, backward loops with
  an unmasked body and a masked last block), which fp32 inputs skip; head dim 24 runs padded.
"""

import pytest
import torch
from attention_cases import assert_close, make_case, reference_fn

from crossmae_kernels.varlen_attention import LOG2_E, is_interpreting, varlen_attn_bwd, varlen_attn_fwd

pytestmark = pytest.mark.skipif(not is_interpreting(), reason="Triton on CPU tensors needs TRITON_INTERPRET=1")

# lengths around the interpreter's 16 x 16 blocks: empty, single, block - 1, block + 1, several blocks
LENGTHS_Q = [0, 1, 15, 17, 33, 5]
LENGTHS_K = [3, 0, 1, 17, 40, 16]
TOLERANCE = {torch.float32: 5e-5, torch.float16: 2e-2}


def _reference(case, scale, grad_out):
    leaves = [t.detach().double().requires_grad_(True) for t in (case.q, case.k, case.v)]
    out = reference_fn(*leaves, *case.args[3:], softmax_scale=scale)
    return (out.detach(), *torch.autograd.grad(out, leaves, grad_out.double()))


@pytest.mark.parametrize(("dtype", "scale", "head_dim"), [
    (torch.float32, 0.4, 24), (torch.float32, -0.7, 16), (torch.float16, 0.3, 16), (torch.float16, -0.5, 24),
])
def test_forward_and_both_backwards_match_float64(dtype, scale, head_dim):
    case = make_case(LENGTHS_Q, LENGTHS_K, heads=2, head_dim=head_dim, dtype=dtype, seed=3, requires_grad=False)
    grad_out = torch.randn(case.q.shape, generator=torch.Generator().manual_seed(4)).to(dtype)
    expected = _reference(case, scale, grad_out)
    tol = TOLERANCE[dtype]
    out, lse = varlen_attn_fwd(*case.args, scale)
    assert_close(out, expected[0], atol=tol, rtol=tol, name="out")
    bwd_args = (grad_out, case.q, case.k, case.v, out, lse, *case.args[3:], scale)
    two_pass = varlen_attn_bwd(*bwd_args)
    atomic = varlen_attn_bwd(*bwd_args, deterministic=False)
    for name, got, want in zip(("dq", "dk", "dv"), two_pass, expected[1:], strict=True):
        assert_close(got, want, atol=tol, rtol=tol, name=f"{name} (deterministic)")
    for name, got, want in zip(("dq", "dk", "dv"), atomic, expected[1:], strict=True):
        assert_close(got, want, atol=tol, rtol=tol, name=f"{name} (atomic dQ)")
    # dK and dV come from the same pass either way
    assert torch.equal(atomic[1], two_pass[1]) and torch.equal(atomic[2], two_pass[2])



def _rising_case(rise_log2: float):
    """fp16, one query row per sample over 40 keys (two full interpreter blocks and a partial one): the
    keys of the first block score 0, one later key of each sample ``rise_log2`` (base-2 logit units) more.

    The 16-bit forward takes every block against the first block's row max and redoes the row block
    with the online softmax once a row sum of P reaches 2^15 (fp16's limit; 2^64 for bf16). A rise of
    10 stays on the first path (P up to 2^10); 20 overflows fp16's P there, 200 even fp32's.
    """
    case = make_case([1, 1], [40, 40], heads=1, head_dim=16, dtype=torch.float16, seed=5, requires_grad=False)
    base = (rise_log2 / LOG2_E) ** 0.5
    q = torch.zeros_like(case.q)
    q[:, 0, 0] = base
    k = case.k.clone()
    k[:, 0, 0] = 0.0
    k[20, 0, 0] = base  # sample 0: key 20, in the second block
    k[40 + 37, 0, 0] = base  # sample 1: key 37, in the partial third block
    return q, k, case.v, case.args[3:]


@pytest.mark.parametrize("rise_log2", [10.0, 20.0, 200.0])
def test_16bit_forward_when_a_later_block_outgrows_the_first(rise_log2):
    q, k, v, rest = _rising_case(rise_log2)
    out, lse = varlen_attn_fwd(q, k, v, *rest, 1.0)
    expected = reference_fn(q.double(), k.double(), v.double(), *rest, softmax_scale=1.0)
    assert_close(out, expected, atol=2e-2, rtol=2e-2, name=f"out (rise {rise_log2})")
    for sample in range(2):
        logits = q.double()[sample, 0] @ k.double()[40 * sample:40 * (sample + 1), 0].T  # [40], natural units
        assert lse[0, sample].item() == pytest.approx(torch.logsumexp(logits, 0).item() * LOG2_E, rel=1e-3), sample


def test_a_segment_whose_row_offsets_overflow_int32_is_refused_naming_it():
    from crossmae_kernels.varlen_attention import check_segment_offsets

    check_segment_offsets(2**20, 2**20, 2**10, 2**11 - 8)  # just below 2**31 elements
    with pytest.raises(ValueError, match="max_seqlen_k 1048576 x 2048 elements per row"):
        check_segment_offsets(2**20, 2**20, 2**10, 2**11)
    with pytest.raises(ValueError, match="max_seqlen_q"):
        check_segment_offsets(2**21, 1, 2**10, 64)
