"""The Triton op's torch.library registration: opcheck, and torch.compile through a module using it."""

import pytest
import torch
from attention_cases import TinyCrossAttention, assert_close, make_case

from crossmae.ops.triton_attention import varlen_attn_triton_bwd, varlen_attn_triton_fwd
from crossmae_kernels.varlen_attention import is_interpreting

pytestmark = pytest.mark.skipif(
    not (is_interpreting() or torch.cuda.is_available()), reason="Triton needs a GPU or TRITON_INTERPRET=1"
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_opcheck_forward_op():
    case = make_case([5, 0, 7, 1], [3, 4, 0, 2], heads=2, head_dim=16, device=DEVICE)
    torch.library.opcheck(varlen_attn_triton_fwd, (*case.args, 0.25))


def test_opcheck_backward_op():
    case = make_case([5, 0, 7], [3, 4, 1], heads=2, head_dim=16, device=DEVICE, requires_grad=False)
    out, lse = varlen_attn_triton_fwd(*case.args, 0.25)
    dout = torch.randn_like(out)
    torch.library.opcheck(varlen_attn_triton_bwd, (dout, case.q, case.k, case.v, out, lse, *case.args[3:], 0.25))


def test_torch_compile_traces_a_module_using_the_op():
    torch.manual_seed(0)
    case = make_case([5, 0, 7], [3, 4, 1], heads=1, head_dim=32, device=DEVICE, requires_grad=False)
    x, memory = case.q[:, 0], case.k[:, 0]  # [total, 32]
    model = TinyCrossAttention("triton").to(DEVICE)
    eager = model(x, memory, *case.args[3:])
    eager_grads = torch.autograd.grad(eager.square().sum(), list(model.parameters()))
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x, memory, *case.args[3:])
    grads = torch.autograd.grad(out.square().sum(), list(model.parameters()))
    assert_close(out, eager, atol=1e-5, rtol=1e-5, name="compiled out")
    for g, e in zip(grads, eager_grads):
        assert_close(g, e, atol=1e-5, rtol=1e-5, name="compiled grad")
