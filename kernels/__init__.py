"""crossmae_kernels: Triton kernels and their launchers (installed from the ``kernels/`` folder).

No ``nn.Module`` and no training logic lives here: each module holds ``@triton.jit`` kernels
and plain launchers that check, allocate and launch. Autograd and ``torch.library``
registration live in :mod:`crossmae.ops`.
"""
