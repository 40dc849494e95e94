"""Our compiled C++ kernels (``crossmae._C``) as the ``cpu`` backend: fake implementations and autograd.

Layering: ``kernels/csrc/cpu/`` holds the kernels and their launcher, and
``kernels/csrc/torch_bindings.cpp`` defines ``crossmae::varlen_attn_cpu_fwd`` /
``crossmae::varlen_attn_cpu_bwd`` in one ``TORCH_LIBRARY`` block. This module loads the
extension on first use and registers the ops' fake implementations and autograd
(:func:`crossmae.ops.registration.register_fake_and_autograd`), so ``torch.compile`` traces
through them.
:func:`crossmae.ops.varlen_attention` is the public entry point.

Without the extension (installed with ``CROSSMAE_SKIP_EXTENSION=1``, or built against another
torch) everything still imports; :func:`unavailable_reason` says why the backend can't run.
"""

from __future__ import annotations

import importlib
import threading

import torch

from crossmae.ops.registration import op_attention_fn, register_fake_and_autograd

EXTENSION = "crossmae._C"
_FWD = "crossmae::varlen_attn_cpu_fwd"
_BWD = "crossmae::varlen_attn_cpu_bwd"

_load_result: list[str | None] = []  # empty until the first load attempt, then [reason or None]
_load_lock = threading.Lock()


@torch.compiler.assume_constant_result
def unavailable_reason() -> str | None:
    """Why the compiled kernels can't run here (loading them on the first call), or None when they can."""
    with _load_lock:
        if not _load_result:
            try:
                importlib.import_module(EXTENSION)
            except ImportError as exc:
                _load_result.append(
                    f"the compiled extension {EXTENSION} can't be imported ({exc}); build it with "
                    "`pip install --no-build-isolation -e .` (it is skipped when CROSSMAE_SKIP_EXTENSION=1)"
                )
            else:
                register_fake_and_autograd(_FWD, _BWD)
                _load_result.append(None)
        return _load_result[0]


def isa() -> str | None:
    """The instruction set the kernels run with here (``"avx512"``, ``"avx2"``, ``"default"``), or None."""
    if unavailable_reason() is not None:
        return None
    return importlib.import_module(EXTENSION).cpu_isa


# The ``cpu`` backend: the compiled forward op, differentiable through the compiled backward op.
cpu_varlen_attention = op_attention_fn(_FWD)
