"""Attention ops on the packed layout: the public op, its backends and its references."""

from crossmae.ops.attention import varlen_attention
from crossmae.ops.backends import (
    AUTO_ORDER,
    BACKENDS,
    ENV_VAR,
    AttentionBackend,
    available_backends,
    backend_reasons,
    get_backend,
    register_backend,
    resolve_backend,
    select_backend,
)
from crossmae.ops.reference import loop_attention, math_attention, sdpa_padded_attention
from crossmae.ops.signature import VarlenAttentionFn

__all__ = [
    "AUTO_ORDER",
    "BACKENDS",
    "ENV_VAR",
    "AttentionBackend",
    "VarlenAttentionFn",
    "available_backends",
    "backend_reasons",
    "get_backend",
    "loop_attention",
    "math_attention",
    "register_backend",
    "resolve_backend",
    "sdpa_padded_attention",
    "select_backend",
    "varlen_attention",
]
