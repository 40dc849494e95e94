"""The fused packed loss kernel against the PyTorch reference (Triton interpreter on CPU)."""

import pytest
import torch

from crossmae.ops.loss import masked_sse, masked_sse_reference, masked_sse_triton
from crossmae_kernels.varlen_attention import is_interpreting

pytestmark = pytest.mark.skipif(
    not (is_interpreting() or torch.cuda.is_available()), reason="Triton needs a GPU or TRITON_INTERPRET=1"
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("rows,cols", [(0, 100), (1, 1), (37, 100), (70, 3), (33, 200)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_sse_matches_reference_forward_and_backward(rows, cols, dtype):
    gen = torch.Generator().manual_seed(rows * 1000 + cols)
    pred = torch.randn(rows, cols, generator=gen).to(DEVICE, dtype).requires_grad_(True)
    target = torch.randn(rows, cols, generator=gen).to(DEVICE)
    weight = (torch.rand(rows, cols, generator=gen) < 0.7).float().to(DEVICE)
    fused = masked_sse_triton(pred, target, weight)
    ref = masked_sse_reference(pred, target, weight)
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-5)
    (g_fused,) = torch.autograd.grad(fused * 0.5, pred)
    (g_ref,) = torch.autograd.grad(ref * 0.5, pred)
    torch.testing.assert_close(g_fused, g_ref, rtol=1e-3 if dtype == torch.float16 else 1e-6, atol=1e-6)


def test_opcheck_and_strided_rows():
    pred = torch.randn(20, 64, device=DEVICE)[:, :48].requires_grad_(True)  # row stride 64
    target, weight = torch.randn(20, 48, device=DEVICE), torch.ones(20, 48, device=DEVICE)
    torch.library.opcheck(masked_sse_triton, (pred, target, weight))
    torch.testing.assert_close(masked_sse_triton(pred, target, weight), masked_sse_reference(pred, target, weight))


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="must share a \\[N, K\\] shape"):
        masked_sse_triton(torch.randn(3, 4), torch.randn(3, 5), torch.ones(3, 4))


def test_unfused_path_is_the_reference_on_cpu():
    pred, target, weight = torch.randn(5, 6), torch.randn(5, 6), torch.ones(5, 6)
    assert torch.equal(masked_sse(pred, target, weight, fused=True), masked_sse_reference(pred, target, weight))
