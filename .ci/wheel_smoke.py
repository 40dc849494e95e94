"""Smoke check of an installed crossmae wheel, run by `make wheel-check` from outside the source tree.

    python .ci/wheel_smoke.py PIP_LOG     # PIP_LOG: pip's output of installing the wheel

Checks that the installed package (not a source checkout) imports, carries one version, has its
compiled extension and its console scripts' functions, and computes: the ``cpu`` backend
(crossmae._C) against the ``math`` reference, forward and backward, on a small ragged batch; and that
installing the wheel pulled no torch and no CUDA library (torch was installed before it, from the
pinned CPU build).
"""

import importlib.metadata
import re
import sys
from pathlib import Path

import torch


def main(pip_log: str) -> int:
    import crossmae
    import crossmae._C  # noqa: F401
    import crossmae_kernels
    from crossmae.ops import cpu_attention, varlen_attention
    from crossmae.packed import Packed

    where = Path(crossmae.__file__).resolve()
    if "site-packages" not in where.parts:
        raise SystemExit(f"crossmae imported from {where}, not from the installed wheel")
    installed = importlib.metadata.version("crossmae")
    if installed != crossmae.__version__:
        raise SystemExit(f"version: metadata says {installed}, crossmae.__version__ {crossmae.__version__}")
    scripts = [ep for ep in importlib.metadata.distribution("crossmae").entry_points if ep.group == "console_scripts"]
    for ep in scripts:
        if not callable(ep.load()):
            raise SystemExit(f"console script {ep.name} = {ep.value} is not callable")
    if cpu_attention.unavailable_reason() is not None:
        raise SystemExit(f"the cpu backend can't run: {cpu_attention.unavailable_reason()}")

    gen = torch.Generator().manual_seed(0)
    packed_q, packed_k = Packed.from_lengths([5, 0, 17]), Packed.from_lengths([9, 3, 1])
    q = torch.randn(packed_q.total, 2, 16, generator=gen, requires_grad=True)  # [total_q, H, D]
    k = torch.randn(packed_k.total, 2, 16, generator=gen, requires_grad=True)  # [total_k, H, D]
    v = torch.randn(packed_k.total, 2, 16, generator=gen, requires_grad=True)  # [total_k, H, D]
    results = {}
    for backend in ("cpu", "math"):
        out = varlen_attention(q, k, v, packed_q.cu_seqlens, packed_k.cu_seqlens, packed_q.max_seqlen,
                               packed_k.max_seqlen, backend=backend)
        results[backend] = (out, *torch.autograd.grad(out.sum(), (q, k, v)))
    for name, got, want in zip(("out", "dq", "dk", "dv"), results["cpu"], results["math"], strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")

    log = Path(pip_log).read_text()
    pulled = re.findall(r"Successfully installed (.*)", log)
    pulled = pulled[-1].split() if pulled else []
    unwanted = [p for p in pulled if p.startswith(("torch-", "nvidia-", "triton-"))]
    if unwanted:
        raise SystemExit(f"installing the wheel pulled {', '.join(unwanted)}: torch must come from the pinned build")
    cuda = [d.metadata["Name"] for d in importlib.metadata.distributions() if d.metadata["Name"].startswith("nvidia-")]
    if cuda:
        raise SystemExit(f"CUDA libraries in the venv: {', '.join(sorted(cuda))}")
    print(f"crossmae {installed} from {where.parent}; crossmae_kernels from {Path(crossmae_kernels.__file__).parent}; "
          f"console scripts {', '.join(ep.name for ep in scripts) or 'none'}; torch {torch.__version__}; "
          f"cpu backend matches math; the wheel installed {len(pulled)} packages, no torch, no CUDA")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    sys.exit(main(sys.argv[1]))
