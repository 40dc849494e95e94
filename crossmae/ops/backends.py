"""The registry of varlen attention backends and the choice among them.

Each backend declares the devices, dtypes and head dims it supports, whether it has a
backward, and how to tell if its library is present; :meth:`AttentionBackend.reasons_for` turns
that into readable reasons why it can't run on given inputs. Selection order for
``backend="auto"``: the environment variable ``CROSSMAE_ATTN_BACKEND`` if set, else the first
backend of :data:`AUTO_ORDER` for the input's device that can run. The evidence for that order
is recorded in ``bench/results/backend_order.md``.

:func:`resolve_backend` makes the choice for a (name, device, dtype, head dim, backward) and
caches it, so a layer can resolve once and :func:`crossmae.ops.varlen_attention` pays one dict
lookup per call.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from crossmae.ops import cpu_attention, external, reference, triton_attention
from crossmae.ops.signature import VarlenAttentionFn

ENV_VAR = "CROSSMAE_ATTN_BACKEND"

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_HALF_DTYPES = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class AttentionBackend:
    """One way to compute varlen attention, with what it supports.

    Attributes:
        name: registry key, the value of ``backend=``.
        fn: the backend's :class:`~crossmae.ops.signature.VarlenAttentionFn`.
        description: one line for listings.
        devices: device types it runs on (``"cpu"``, ``"cuda"``).
        dtypes: input dtypes it accepts.
        head_dims: description of the head dims it accepts, and the predicate that checks one.
        backward_devices: device types on which gradients flow through it.
        unavailable: returns why the backend can't run at all here (library missing), or None.
        extra_reasons: further reasons for a (device, dtype, head dim) (e.g. GPU architecture), may be empty.
    """

    name: str
    fn: VarlenAttentionFn
    description: str
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    head_dims: tuple[str, Callable[[int], bool]]
    backward_devices: tuple[str, ...] = ("cpu", "cuda")
    unavailable: Callable[[], str | None] = lambda: None
    extra_reasons: Callable[[torch.device, torch.dtype, int], list[str]] = field(
        default=lambda device, dtype, head_dim: [])

    def reasons_for(
        self, *, device: torch.device | str, dtype: torch.dtype, head_dim: int, needs_backward: bool
    ) -> list[str]:
        """Why it can't run on ``[total, H, head_dim]`` inputs of ``dtype`` on ``device``; empty when it can."""
        missing = self.unavailable()
        if missing:
            return [missing]
        device = torch.device(device)
        why = []
        if device.type not in self.devices:
            why.append(f"runs on {'/'.join(self.devices)}, not {device.type}")
        if dtype not in self.dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in self.dtypes)
            why.append(f"supports dtypes {names}, not {str(dtype).replace('torch.', '')}")
        text, accepts = self.head_dims
        if not accepts(head_dim):
            why.append(f"supports head dims {text}, not {head_dim}")
        if needs_backward and device.type not in self.backward_devices:
            why.append(f"has no backward on {device.type}, and the inputs require grad")
        if not why:
            why.extend(self.extra_reasons(device, dtype, head_dim))
        return why

    def reasons(self, q: torch.Tensor, *, needs_backward: bool = False) -> list[str]:
        """Why this backend can't run on inputs like ``q`` ([total_q, H, D]); empty when it can."""
        return self.reasons_for(device=q.device, dtype=q.dtype, head_dim=q.shape[-1], needs_backward=needs_backward)


def _any_head_dim(d: int) -> bool:
    return d > 0


BACKENDS: dict[str, AttentionBackend] = {}
# (name, CROSSMAE_ATTN_BACKEND for "auto", device, dtype, head dim, needs_backward) -> the choice
_RESOLVED: dict[tuple, AttentionBackend] = {}


def register_backend(backend: AttentionBackend) -> None:
    """Add ``backend`` to the registry (replacing one of the same name) and forget earlier choices."""
    BACKENDS[backend.name] = backend
    _RESOLVED.clear()


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
    description="our Triton kernels, forward and backward (FA2-style; atomic dQ unless determinism is asked for)",
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
    # fp32 through its CUTLASS operators (xformers docs, "xFormers optimized operators": cutlass.FwOp /
    # cutlass.BwOp support "a large number of settings (including without TensorCores, f32 ...)")
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


def resolve_backend(
    name: str, *, device: torch.device | str, dtype: torch.dtype, head_dim: int, needs_backward: bool = True
) -> AttentionBackend:
    """The backend that ``name`` (a registered name or ``"auto"``) means for these inputs, cached.

    ``"auto"`` reads ``CROSSMAE_ATTN_BACKEND`` and otherwise takes the first backend of
    :data:`AUTO_ORDER` for the device type that can run. The result can be kept (a layer
    resolves once) and passed as ``varlen_attention(..., backend=resolved)``; the op checks it
    again for each call's inputs with one cached lookup. For example, in a layer built on its
    device and dtype::

        self.attn_backend = resolve_backend(backend, device=device, dtype=dtype, head_dim=dim // heads)
        ...
        out = varlen_attention(q, k, v, ..., backend=self.attn_backend)

    Raises:
        ValueError: ``name`` is not registered, or no backend it means can run, with the reasons.
    """
    if not isinstance(device, torch.device):
        device = torch.device(device)
    env = os.environ.get(ENV_VAR) if name == "auto" else None
    key = (name, env, device, dtype, head_dim, needs_backward)
    chosen = _RESOLVED.get(key)
    if chosen is None:
        chosen = _choose((env or "auto") if name == "auto" else name, device, dtype, head_dim, needs_backward)
        _RESOLVED[key] = chosen
    return chosen


def _choose(
    name: str, device: torch.device, dtype: torch.dtype, head_dim: int, needs_backward: bool
) -> AttentionBackend:
    inputs = dict(device=device, dtype=dtype, head_dim=head_dim, needs_backward=needs_backward)
    if name != "auto":
        chosen = get_backend(name)
        why = chosen.reasons_for(**inputs)
        if why:
            raise ValueError(f"backend {name!r} can't run on these inputs: " + "; ".join(why))
        return chosen
    tried = []
    for candidate in AUTO_ORDER.get(device.type, ("math",)):
        why = BACKENDS[candidate].reasons_for(**inputs)
        if not why:
            return BACKENDS[candidate]
        tried.append(f"{candidate}: {'; '.join(why)}")
    raise ValueError("no attention backend can run on these inputs: " + " | ".join(tried))


def select_backend(backend: str, q: torch.Tensor, *, needs_backward: bool) -> AttentionBackend:
    """Resolve ``backend`` (a name or ``"auto"``) for inputs like ``q``; raise with reasons if it can't run."""
    return resolve_backend(backend, device=q.device, dtype=q.dtype, head_dim=q.shape[-1], needs_backward=needs_backward)


@torch.compiler.assume_constant_result
def resolved_name(name: str, device_type: str, device_index: int, dtype: torch.dtype, head_dim: int,
                  needs_backward: bool) -> str:
    """:func:`resolve_backend`'s choice by name (``device_index`` -1 for none): a constant to ``torch.compile``."""
    device = torch.device(device_type, None if device_index < 0 else device_index)
    return resolve_backend(name, device=device, dtype=dtype, head_dim=head_dim, needs_backward=needs_backward).name
