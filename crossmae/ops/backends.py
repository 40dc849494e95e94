"""The registry of varlen attention backends and the choice among them.

Each backend declares the devices, dtypes and head dims it supports, whether it has a
backward, and how to tell if its library is present; :meth:`AttentionBackend.reasons` turns
that into readable reasons why it can't run on given inputs. Selection order for
``backend="auto"``: the environment variable ``CROSSMAE_ATTN_BACKEND`` if set, else the first
backend of :data:`AUTO_ORDER` for the input's device that can run. The evidence for that order
is recorded in ``bench/results/backend_order.md``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from crossmae.ops import cpu_attention, external, reference, triton_attention

ENV_VAR = "CROSSMAE_ATTN_BACKEND"

AttentionFn = Callable[..., torch.Tensor]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_HALF_DTYPES = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class AttentionBackend:
    """One way to compute varlen attention, with what it supports.

    Attributes:
        name: registry key, the value of ``backend=``.
        fn: ``fn(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale)``.
        description: one line for listings.
        devices: device types it runs on (``"cpu"``, ``"cuda"``).
        dtypes: input dtypes it accepts.
        head_dims: description of the head dims it accepts, and the predicate that checks one.
        backward_devices: device types on which gradients flow through it.
        unavailable: returns why the backend can't run at all here (library missing), or None.
        extra_reasons: further input-dependent reasons (e.g. GPU architecture), may be empty.
    """

    name: str
    fn: AttentionFn
    description: str
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    head_dims: tuple[str, Callable[[int], bool]]
    backward_devices: tuple[str, ...] = ("cpu", "cuda")
    unavailable: Callable[[], str | None] = lambda: None
    extra_reasons: Callable[[torch.Tensor], list[str]] = field(default=lambda q: [])

    def reasons(self, q: torch.Tensor, *, needs_backward: bool = False) -> list[str]:
        """Why this backend can't run on inputs like ``q`` ([total_q, H, D]); empty when it can."""
        missing = self.unavailable()
        if missing:
            return [missing]
        why = []
        if q.device.type not in self.devices:
            why.append(f"runs on {'/'.join(self.devices)}, not {q.device.type}")
        if q.dtype not in self.dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in self.dtypes)
            why.append(f"supports dtypes {names}, not {str(q.dtype).replace('torch.', '')}")
        text, accepts = self.head_dims
        if not accepts(q.shape[-1]):
            why.append(f"supports head dims {text}, not {q.shape[-1]}")
        if needs_backward and q.device.type not in self.backward_devices:
            why.append(f"has no backward on {q.device.type}, and the inputs require grad")
        if not why:
            why.extend(self.extra_reasons(q))
        return why


def _any_head_dim(d: int) -> bool:
    return d > 0


BACKENDS: dict[str, AttentionBackend] = {}


def register_backend(backend: AttentionBackend) -> None:
    BACKENDS[backend.name] = backend


register_backend(AttentionBackend(
    name="math",
    fn=reference.math_attention,
    description="plain PyTorch softmax(qk^T)v on a padded batch (the oracle)",
    devices=("cpu", "cuda"),
    dtypes=_FLOAT_DTYPES,
    head_dims=("any", _any_head_dim),
))
register_backend(AttentionBackend(
    name="loop",
    fn=reference.loop_attention,
    description="one SDPA call per sample in a Python loop (the seed's way)",
    devices=("cpu", "cuda"),
    dtypes=_FLOAT_DTYPES,
    head_dims=("any", _any_head_dim),
))
register_backend(AttentionBackend(
    name="cpu",
    fn=cpu_attention.cpu_varlen_attention,
    description="our compiled C++ kernels (crossmae._C), forward and backward (FA2-style, OpenMP, deterministic)",
    devices=("cpu",),
    dtypes=(torch.bfloat16, torch.float32),
    head_dims=("any", _any_head_dim),
    unavailable=cpu_attention.unavailable_reason,
))
register_backend(AttentionBackend(
    name="sdpa_padded",
    fn=reference.sdpa_padded_attention,
    description="pad to max_seqlen, one SDPA call with a key-padding mask, unpad",
    devices=("cpu", "cuda"),
    dtypes=_FLOAT_DTYPES,
    head_dims=("any", _any_head_dim),
))
register_backend(AttentionBackend(
    name="triton",
    fn=triton_attention.triton_varlen_attention,
    description="our Triton kernels, forward and backward (FA2-style, deterministic)",
    devices=("cpu", "cuda"),
    dtypes=(torch.float16, torch.bfloat16, torch.float32),
    head_dims=("16..128, multiples of 8", triton_attention.head_dim_supported),
    unavailable=triton_attention.unavailable_reason,
    extra_reasons=triton_attention.device_reasons,
))
register_backend(AttentionBackend(
    name="torch_varlen",
    fn=external.torch_varlen_attention,
    description="torch.nn.attention.varlen.varlen_attn (PyTorch's bundled FlashAttention-2)",
    devices=("cuda",),
    dtypes=_HALF_DTYPES,
    head_dims=("8..256, multiples of 8", external.flash_head_dim_supported),
    unavailable=external.torch_varlen_unavailable,
    extra_reasons=external.sm80_reasons,
))
register_backend(AttentionBackend(
    name="flash_attn",
    fn=external.flash_attn_attention,
    description="flash_attn_varlen_func (FlashAttention-3 interface if installed, else FlashAttention-2)",
    devices=("cuda",),
    dtypes=_HALF_DTYPES,
    head_dims=("8..256, multiples of 8", external.flash_head_dim_supported),
    unavailable=external.flash_attn_unavailable,
    extra_reasons=external.sm80_reasons,
))
register_backend(AttentionBackend(
    name="xformers",
    fn=external.xformers_attention,
    description="xformers memory_efficient_attention with BlockDiagonalMask.from_seqlens",
    devices=("cuda",),
    dtypes=(torch.float16, torch.bfloat16, torch.float32),
    head_dims=("8..256, multiples of 8", external.flash_head_dim_supported),
    unavailable=external.xformers_unavailable,
))
register_backend(AttentionBackend(
    name="flex",
    fn=external.flex_attention,
    description="FlexAttention with a document mask (compiled on CUDA; CPU forward only)",
    devices=("cpu", "cuda"),
    dtypes=(torch.float16, torch.bfloat16, torch.float32),
    head_dims=("16..256, powers of two", external.flex_head_dim_supported),
    backward_devices=("cuda",),
    unavailable=external.flex_unavailable,
))

# The order "auto" tries, per device type. See bench/results/backend_order.md for the evidence.
AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "cuda": ("flash_attn", "torch_varlen", "triton", "xformers", "flex", "sdpa_padded", "math"),
    "cpu": ("cpu", "sdpa_padded", "math"),
}


def get_backend(name: str) -> AttentionBackend:
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(f"backend must be 'auto' or one of {sorted(BACKENDS)}, got {name!r}") from None


def backend_reasons(name: str, q: torch.Tensor, *, needs_backward: bool = False) -> list[str]:
    """Why backend ``name`` can't run on inputs like ``q``; empty when it can."""
    return get_backend(name).reasons(q, needs_backward=needs_backward)


def available_backends(q: torch.Tensor, *, needs_backward: bool = False) -> list[str]:
    """Names of every registered backend that can run on inputs like ``q``."""
    return [name for name, b in BACKENDS.items() if not b.reasons(q, needs_backward=needs_backward)]


def select_backend(backend: str, q: torch.Tensor, *, needs_backward: bool) -> AttentionBackend:
    """Resolve ``backend`` (a name or ``"auto"``) for inputs like ``q``; raise with reasons if it can't run."""
    if backend == "auto":
        backend = os.environ.get(ENV_VAR, "auto") or "auto"
    if backend != "auto":
        chosen = get_backend(backend)
        why = chosen.reasons(q, needs_backward=needs_backward)
        if why:
            raise ValueError(f"backend {backend!r} can't run on these inputs: " + "; ".join(why))
        return chosen
    tried = []
    for name in AUTO_ORDER.get(q.device.type, ("math",)):
        why = BACKENDS[name].reasons(q, needs_backward=needs_backward)
        if not why:
            return BACKENDS[name]
        tried.append(f"{name}: {'; '.join(why)}")
    raise ValueError("no attention backend can run on these inputs: " + " | ".join(tried))
