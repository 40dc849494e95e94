"""Packed variable-length attention in Triton: forward and backward.

Algorithm
    FlashAttention-2 on packed tensors. One launch covers every sample: the grid is
    ``(cdiv(max_seqlen, BLOCK), B, H)`` and each program reads its segment's start and length
    from ``cu_seqlens``; a program whose block starts past its segment's end exits at once.
    Forward: a block of BLOCK_M query rows streams over its segment's keys in blocks of
    BLOCK_N. fp32 inputs: an online softmax (running max ``m``, running sum ``l``, rescaled fp32
    accumulator). 16-bit inputs: every block against the row max of the first key block, kept
    fixed: no running max, no rescaling of ``l`` and the accumulator, one FFMA, one exponential
    and one add per score (FlashAttention-4 rescales only when the max grew past a threshold;
    here it never does, and a row block in which a later block outgrew the first block's max so
    far that a row sum reached FIXED_MAX_LIMIT_* (2^64 bf16, 2^15 fp16: P, its 16-bit copy and
    P V stay finite below it) runs again with the online softmax; in fp16 so does a row block
    with a row of 2^15 keys or more of about equal weight). The full key blocks run
    software-pipelined (the scores of block j + 1 are issued before the softmax of block j, so
    the tensor cores and the exponentials overlap), the row max is taken on raw scores and the
    scale folded into one FFMA per score; the last, partial block runs once with masks.
    Backward, ``deterministic=True`` (the default:
    no atomics, bit-for-bit the same on every run):
      1. preprocess   delta_i = rowsum(dO_i * O_i)
      2. dK/dV pass   one program per key block, streaming over the segment's query blocks
      3. dQ pass      one program per query block, streaming over the segment's key blocks
    ``deterministic=False``: step 2 also adds dS K into an fp32 dQ buffer with atomics and step
    3 is skipped (S, dP and the exponentials once instead of twice; dQ's last bits then depend
    on the order the atomics land in). The ``triton`` backend (crossmae/ops/triton_attention.py)
    asks for it unless determinism is requested, as the static profile predicts it faster.
    Both passes issue the dP product before the exponentials, fold the scale into the
    exponent's FFMA, and run their full blocks without row masks (the partial last block once,
    with them).
    Query and key segments have independent lengths (cross-attention, Lq != Lk).

Layouts
    q        [total_q, H, D]  fp16 / bf16 / fp32, any strides
    k, v     [total_k, H, D]  same dtype, any strides
    cu_seqlens_q, cu_seqlens_k  int32 [B + 1], cu[0] == 0, non-decreasing
    out      [total_q, H, D]  input dtype, contiguous
    lse      [H, total_q]     fp32, contiguous
    dq, dk, dv  like q, k, v, contiguous

Numerics
    Scores are taken in base 2: s2 = (q . k) * softmax_scale * log2(e), so ``exp2`` replaces
    ``exp``. The saved log-sum-exp is in the same units:
        lse[h, i] = log2( sum_j exp2(s2_ij) )      (natural-log LSE = lse * ln 2).
    Products accumulate in fp32. P and dS are cast to the input dtype before their matmuls
    (as FlashAttention-2 does). With the fixed max of 16-bit inputs, P is exp2(s2 - m) for
    the first block's max m: up to the limit above instead of at most 1, with the same relative
    precision from 2^-126 (fp32, bf16) or 2^-14 (fp16) up; the row sum is at least 1 (the
    first block's max key has P = 1), so a P below those weighs less than 2^-14 of it. fp32
    inputs use IEEE fp32 products unless ``torch.backends.cuda.matmul.allow_tf32`` is set.
    A query row whose key segment is empty gets out = 0, lse = -inf and dq = 0; key rows whose
    query segment is empty get dk = dv = 0. A negative softmax_scale is allowed: the forward
    then takes the row minimum of the raw scores (constexpr SCALE_POSITIVE).

Autotuning
    Each kernel's autotuner tries the configurations of its list that ``_fits`` keeps for the
    head dim and dtype (fp32 gets its own small tiles: its "ieee" dots run on the FMA units).
    Results are cached on disk (Triton's ``cache_results=True``, in Triton's cache directory).
    Environment variables, read when a kernel is first launched for a head dim and dtype:
      CROSSMAE_TRITON_SINGLE_CONFIG=1   each autotuner sees only the first configuration that
                                        fits (test runs: one compile per kernel, head dim, dtype)
      CROSSMAE_TRITON_CONFIG_FWD, CROSSMAE_TRITON_CONFIG_DKDV, CROSSMAE_TRITON_CONFIG_DQ
                                        "BLOCK_M,BLOCK_N,num_warps,num_stages" pins that kernel's
                                        configuration (ValueError naming the variable if it is
                                        malformed or does not fit the head dim and dtype)
    Under DDP, ``broadcast_autotune_choice(process_group)`` after the first step makes every
    rank use the configurations rank 0 chose (``autotune_choices`` / ``apply_autotune_choices``
    are its plain-data halves), so that ranks stay bit-identical.

Limitations
    Non-causal, no dropout, equal head counts for q and k/v. Head dims 16..128 that are
    multiples of 8; one between two powers of two is zero-padded to the larger by the
    launcher and pays for it (see bench/results/kernel_report.md). fp32
    inputs at head dims above 64 (padded to 128) still spill registers on sm_90 (an FMA-unit
    dot holds whole rows of its K dimension per thread). Loads go through pointers on Triton 3.6 and 3.9
    alike (no TMA descriptors); ``tl.range(warp_specialize=True)`` is not honoured on sm_90 by
    either, so the overlap comes from the software pipelining above. The interpreter
    (``TRITON_INTERPRET=1``) runs the same code with fixed 16 x 16 blocks; nothing here is
    inline PTX, so the interpreter runs exactly the code that compiles.
"""

import os

import torch
import triton
import triton.language as tl

LOG2_E = 1.4426950408889634

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# 16-bit forward: the row sum of P, taken against the first key block's row max, from which the kernel
# redoes its row block with the online softmax. Every P is below it, so P, its 16-bit copy for the P V
# product and the fp32 accumulator stay finite: bf16 has fp32's exponent range, fp16 tops out at 65504.
FIXED_MAX_LIMIT_BF16 = tl.constexpr(2.0**64)
FIXED_MAX_LIMIT_FP16 = tl.constexpr(2.0**15)
MIN_HEAD_DIM = 16
MAX_HEAD_DIM = 128
# deterministic=False (atomic dQ) up to this head dim; above it the dK/dV kernel's extra dS K
# block spills on sm_90 and the backward stays two-pass
ATOMIC_DQ_MAX_HEAD_DIM = 64


def is_interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def head_dim_supported(head_dim: int) -> bool:
    return MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM and head_dim % 8 == 0


def block_head_dim(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


# fp32 dots run on the FMA units ("ieee"): a 128-wide head dim tile spills on sm_90 in every
# configuration (bench/results/kernel_report.md covers fp32 up to 64), so the launcher refuses it
FP32_MAX_BLOCK_HEAD_DIM = 64


def fp32_head_dim_spills(head_dim: int) -> bool:
    """True where float32 inputs of this head dim would run a spilling kernel on the GPU."""
    return block_head_dim(head_dim) > FP32_MAX_BLOCK_HEAD_DIM


# --------------------------------------------------------------------------------------
# Autotune configurations.
#
# Kept short: every configuration is a compile on first use (about a second each on a CPU core,
# per head dim and dtype). The lists hold the configurations the inner-loop profile of
# bench/results/kernel_report.md ranks best at some head dim, plus the small fallbacks.
#
# Every configuration the autotuner may pick is listed here and pruned by the same
# function the static report (bench/kernel_report.py) uses, so that report covers exactly
# what can run. Register and shared-memory limits are what prune: on sm_90 a thread has at
# most 255 registers and a block at most 227 KiB of shared memory.
# --------------------------------------------------------------------------------------
_SMEM_BUDGET = 200 * 1024

FWD_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm, bn, w, s in [
        (128, 128, 8, 2),
        (128, 64, 8, 3),
        (64, 64, 4, 3),
        (128, 32, 8, 3),
        (64, 32, 4, 3),
    ]
]

BWD_DKDV_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm, bn, w, s in [
        (64, 128, 8, 2),
        (32, 128, 8, 2),
        (64, 64, 4, 3),
        (32, 64, 4, 3),
        (16, 64, 4, 2),
    ]
]

BWD_DQ_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm, bn, w, s in [
        (128, 64, 8, 2),
        (64, 64, 4, 3),
        (64, 32, 4, 2),
    ]
]

# fp32 inputs get their own small tile (see _fits); the autotune lists end with it.
FP32_CONFIGS = {kind: [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
                for kind in ("fwd", "dkdv", "dq")}
FP32_CONFIGS["dkdv_atomic"] = FP32_CONFIGS["dkdv"]  # the dK/dV kernel with ATOMIC_DQ: the same list
FWD_CONFIGS += FP32_CONFIGS["fwd"]
BWD_DKDV_CONFIGS += FP32_CONFIGS["dkdv"]
BWD_DQ_CONFIGS += FP32_CONFIGS["dq"]

# Fixed small blocks for the CPU interpreter: it runs every config it is given, slowly.
INTERPRETER_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 16}


def _elem_bytes(dtype) -> int:
    if isinstance(dtype, torch.dtype):
        return dtype.itemsize
    return 4 if "32" in str(dtype) else 2


def _fits(config: triton.Config, head_dim: int, dtype, kind: str) -> bool:
    """Rough register and shared-memory model for one configuration.

    16-bit inputs (tensor cores): register tiles (fp32 unless stated) divided over the block's
    threads must stay under a per-kernel budget that keeps ptxas at or below 240 registers per
    thread, and the pipelined shared-memory tiles under ``_SMEM_BUDGET``. The budgets are
    calibrated on bench/results/kernel_report.md under Triton 3.9 and 3.6: the forward keeps
    two score tiles and P live (software pipelining) besides acc and q, 208 per thread (D=128
    at 128x64 with 8 warps: 254 registers; at 128x32: 188); dK/dV holds dk, dv, k and v for
    the whole loop, 144 (D=64 at 64x128 with 8 warps and 2 stages: 240 registers, 222 with 3.6),
    plus the dS K block with atomic dQ ("dkdv_atomic"); dQ holds dq, q and dO, 160 (D=128
    at 64x64 with 4 warps: 255 registers and a spill; D=16 at 64x128 with 4 warps: 238). The
    rows of the score tile (BLOCK_M for fwd and dq, BLOCK_N for dK/dV) must fill the warps: Triton lays a dot that
    feeds another dot out with every warp along its rows, 16 rows per warp, so a shorter tile
    would be computed twice by two warpgroups (and hold twice the registers).

    fp32 inputs: "ieee" dots run on the FMA units, whose dot layout holds whole K-rows of its
    operands in registers; only the small ``FP32_CONFIGS`` tile is allowed (and none of the
    16-bit ones): it compiles without spills up to head dim 64 and still spills at 128.
    bench/kernel_report.py checks the result on sm_90.
    """
    if _elem_bytes(dtype) == 4:
        return any(config is c for c in FP32_CONFIGS[kind])
    if any(config is c for c in FP32_CONFIGS[kind]):
        return False
    bm, bn = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    if (bn if kind.startswith("dkdv") else bm) < 16 * config.num_warps:
        return False
    bd = block_head_dim(head_dim)
    nbytes = _elem_bytes(dtype)
    threads = 32 * config.num_warps
    stages = max(config.num_stages, 1)
    if kind == "fwd":
        regs = (2 * bm * bd + 3 * bm * bn) / threads  # acc and q, scores of two blocks, probabilities
        budget = 208
        smem = bm * bd * nbytes + stages * 2 * bn * bd * nbytes  # q, pipelined k and v
    elif kind.startswith("dkdv"):
        regs = (3 * bn * bd + 2 * bn * bm) / threads  # dk, dv (fp32), k and v (16-bit), s^T, dp^T
        if kind == "dkdv_atomic":
            regs += 2 * bm * bd / threads  # the dS K block (fp32) and dS^T as its operand
        budget = 144
        smem = 2 * bn * bd * nbytes + stages * 2 * bm * bd * nbytes  # k, v; pipelined q, dO
    else:
        regs = (2 * bm * bd + 2 * bm * bn) / threads  # dq (fp32), q and dO (16-bit), s, dp
        budget = 160
        smem = 2 * bm * bd * nbytes + stages * 2 * bn * bd * nbytes  # q, dO; pipelined k, v
    return regs <= budget and smem <= _SMEM_BUDGET


def prune_configs(configs, head_dim: int, dtype, kind: str):
    """The configurations of ``configs`` that fit ``head_dim`` and ``dtype`` (never empty)."""
    kept = [c for c in configs if _fits(c, head_dim, dtype, kind)]
    if not kept:  # the smallest tile of the dtype's kind (16-bit or fp32)
        fp32 = _elem_bytes(dtype) == 4
        same_kind = [c for c in configs if any(c is f for f in FP32_CONFIGS[kind]) == fp32]
        kept = [min(same_kind, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]
    return kept


SINGLE_CONFIG_ENV = "CROSSMAE_TRITON_SINGLE_CONFIG"
CONFIG_ENV = {"fwd": "CROSSMAE_TRITON_CONFIG_FWD", "dkdv": "CROSSMAE_TRITON_CONFIG_DKDV",
              "dkdv_atomic": "CROSSMAE_TRITON_CONFIG_DKDV", "dq": "CROSSMAE_TRITON_CONFIG_DQ"}


def parse_config(variable: str, value: str) -> triton.Config:
    """A configuration written "BLOCK_M,BLOCK_N,num_warps,num_stages" (``variable`` names it in errors)."""
    parts = [part.strip() for part in value.split(",")]
    if len(parts) != 4 or not all(part.isdigit() for part in parts):
        raise ValueError(f"{variable} must be 'BLOCK_M,BLOCK_N,num_warps,num_stages' (four positive integers), "
                         f"got {value!r}")
    bm, bn, warps, stages = map(int, parts)
    for name, number in (("BLOCK_M", bm), ("BLOCK_N", bn), ("num_warps", warps)):
        if number < 1 or number & (number - 1):
            raise ValueError(f"{variable}={value!r}: {name} must be a power of two, got {number}")
    if bm < 16 or bn < 16:
        raise ValueError(f"{variable}={value!r}: BLOCK_M and BLOCK_N must be at least 16")
    if stages < 1:
        raise ValueError(f"{variable}={value!r}: num_stages must be at least 1")
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


def select_configs(configs, head_dim: int, dtype, kind: str, environ=os.environ):
    """What the autotuner of kernel ``kind`` ("fwd", "dkdv", "dkdv_atomic", "dq") tries, read from the
    environment.

    ``CROSSMAE_TRITON_CONFIG_<KIND>`` pins one configuration (an error if it is malformed or does
    not fit ``head_dim`` and ``dtype``); else ``CROSSMAE_TRITON_SINGLE_CONFIG=1`` keeps the first
    configuration that fits; else every configuration that fits (``prune_configs``).
    """
    variable = CONFIG_ENV[kind]
    pinned = environ.get(variable, "").strip()
    if pinned:
        config = parse_config(variable, pinned)
        if not _fits(config, head_dim, dtype, kind):
            raise ValueError(f"{variable}={pinned!r} does not fit head dim {head_dim} with {dtype}: it would spill "
                             f"registers, overflow shared memory or repeat rows across warpgroups "
                             f"(see _fits in {__name__})")
        return [config]
    kept = prune_configs(configs, head_dim, dtype, kind)
    single = environ.get(SINGLE_CONFIG_ENV, "0").strip()
    if single not in ("0", "1", ""):
        raise ValueError(f"{SINGLE_CONFIG_ENV} must be 0 or 1, got {single!r}")
    return kept[:1] if single == "1" else kept


def _pruner(kind: str):
    def prune(configs, named_args, **kwargs):
        head_dim = kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM"))
        atomic = kind == "dkdv" and kwargs.get("ATOMIC_DQ", named_args.get("ATOMIC_DQ", False))
        return select_configs(configs, head_dim, named_args["Q"].dtype, "dkdv_atomic" if atomic else kind)

    return prune


# --------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------
@triton.jit
def _load_block(ptrs, d_mask, EVEN_D: tl.constexpr, D_AXIS: tl.constexpr):
    """A block without row masks: a transposed tile (K^T, Q^T: head dim on axis 0) or a row tile
    (V, dO: head dim on axis 1); padded head-dim lanes masked unless EVEN_D."""
    if EVEN_D:
        block = tl.load(ptrs)
    elif D_AXIS == 0:
        block = tl.load(ptrs, mask=d_mask[:, None], other=0.0)
    else:
        block = tl.load(ptrs, mask=d_mask[None, :], other=0.0)
    return block


@triton.jit
def _row_max(s, qk_scale, SCALE_POSITIVE: tl.constexpr):
    """max_j s_ij * qk_scale of raw scores ``s``: their max, or their min when the scale is negative."""
    if SCALE_POSITIVE:
        return tl.max(s, 1) * qk_scale
    return tl.min(s, 1) * qk_scale


@triton.jit
def _attn_fwd_update(acc, l_i, m_i, s, v, qk_scale, SCALE_POSITIVE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                     FIXED_MAX: tl.constexpr):
    """Softmax update with one block of raw scores ``s`` [BLOCK_M, BLOCK_N] and its V.

    The scale is folded into the exponent's argument: one FFMA per score, s * qk_scale - m, in
    base 2. FIXED_MAX: ``m_i`` stays as it is (no row max, no rescaling); else the online softmax,
    its row max taken on the raw scores.
    """
    if FIXED_MAX:
        p = tl.exp2(tl.fma(s, qk_scale, -m_i[:, None]))
        l_i += tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        return acc, l_i, m_i
    m_new = tl.maximum(m_i, _row_max(s, qk_scale, SCALE_POSITIVE))
    p = tl.exp2(tl.fma(s, qk_scale, -m_new[:, None]))
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _attn_fwd_full_blocks(
    acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kt, stride_vt, n_full, qk_scale, d_mask,
    BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr, SCALE_POSITIVE: tl.constexpr,
    FIXED_MAX: tl.constexpr,
):
    """The key blocks [0, n_full), n_full > 0 a multiple of BLOCK_N, without masks.

    Software-pipelined for 16-bit inputs: the scores of block j + 1 are computed before the
    softmax of block j, so that the P V product of block j is still on the tensor cores while
    the exponentials of block j + 1 run. fp32 inputs (FMA-unit dots, no tensor cores to
    overlap with, and a second score tile would spill) take one block at a time. FIXED_MAX
    (16-bit inputs only): the row max of the first block is the max of every block.
    """
    if q.dtype == tl.float32:
        for _ in range(0, n_full, BLOCK_N):
            s = tl.dot(q, _load_block(k_ptrs, d_mask, EVEN_D, 0), input_precision=DOT_PRECISION)
            v = _load_block(v_ptrs, d_mask, EVEN_D, 1)
            acc, l_i, m_i = _attn_fwd_update(acc, l_i, m_i, s, v, qk_scale, SCALE_POSITIVE, DOT_PRECISION, False)
            k_ptrs += BLOCK_N * stride_kt
            v_ptrs += BLOCK_N * stride_vt
        return acc, l_i, m_i
    s = tl.dot(q, _load_block(k_ptrs, d_mask, EVEN_D, 0), input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
    if FIXED_MAX:
        m_i = _row_max(s, qk_scale, SCALE_POSITIVE)
    for _ in range(BLOCK_N, n_full, BLOCK_N):
        k_ptrs += BLOCK_N * stride_kt
        s_next = tl.dot(q, _load_block(k_ptrs, d_mask, EVEN_D, 0), input_precision=DOT_PRECISION)
        v = _load_block(v_ptrs, d_mask, EVEN_D, 1)  # [BLOCK_N, BLOCK_D]
        acc, l_i, m_i = _attn_fwd_update(acc, l_i, m_i, s, v, qk_scale, SCALE_POSITIVE, DOT_PRECISION, FIXED_MAX)
        v_ptrs += BLOCK_N * stride_vt
        s = s_next
    v = _load_block(v_ptrs, d_mask, EVEN_D, 1)
    return _attn_fwd_update(acc, l_i, m_i, s, v, qk_scale, SCALE_POSITIVE, DOT_PRECISION, FIXED_MAX)


@triton.jit
def _attn_fwd_tail_block(
    acc, l_i, m_i, q, k_ptrs, v_ptrs, n0, k_len, qk_scale, offs_n, d_mask, DOT_PRECISION: tl.constexpr,
    FIXED_MAX: tl.constexpr,
):
    """The last, partial key block [n0, k_len): keys past the segment get probability 0.

    FIXED_MAX: ``m_i`` is kept, unless no block came before (n0 == 0): then this block's max."""
    n_mask = (n0 + offs_n) < k_len
    kt = tl.load(k_ptrs, mask=n_mask[None, :] & d_mask[:, None], other=0.0)  # [BLOCK_D, BLOCK_N]
    v = tl.load(v_ptrs, mask=n_mask[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
    s = tl.dot(q, kt, input_precision=DOT_PRECISION)
    s = tl.where(n_mask[None, :], s * qk_scale, float("-inf"))  # [BLOCK_M, BLOCK_N], base 2
    if FIXED_MAX:
        m_new = tl.where(n0 == 0, tl.max(s, 1), m_i)
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.exp2(s - m_new[:, None])
    if FIXED_MAX:
        l_i += tl.sum(p, 1)
    else:
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _attn_fwd_all_blocks(
    q, k_ptrs, v_ptrs, stride_kt, stride_vt, k_len, qk_scale, offs_n, d_mask,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, SCALE_POSITIVE: tl.constexpr, FIXED_MAX: tl.constexpr,
):
    """acc [BLOCK_M, BLOCK_D], l, m [BLOCK_M] over the whole key segment: the full key blocks
    without masks, then the partial tail block with them."""
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    n_full = (k_len // BLOCK_N) * BLOCK_N
    if n_full > 0:
        acc, l_i, m_i = _attn_fwd_full_blocks(
            acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kt, stride_vt, n_full, qk_scale, d_mask,
            BLOCK_N, EVEN_D, DOT_PRECISION, SCALE_POSITIVE, FIXED_MAX,
        )
    if n_full < k_len:
        acc, l_i, m_i = _attn_fwd_tail_block(
            acc, l_i, m_i, q, k_ptrs + n_full * stride_kt, v_ptrs + n_full * stride_vt,
            n_full, k_len, qk_scale, offs_n, d_mask, DOT_PRECISION, FIXED_MAX,
        )
    return acc, l_i, m_i


@triton.jit
def _varlen_attn_fwd_kernel(
    Q, K, V, Out, Lse,
    cu_seqlens_q, cu_seqlens_k,
    qk_scale,
    stride_qt, stride_qh, stride_qd,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_ot, stride_oh,
    stride_lse_h,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, SCALE_POSITIVE: tl.constexpr,
):
    # token and head strides are multiples of 8 (the launcher makes sure): 16-byte row loads
    stride_qt, stride_qh = tl.multiple_of(stride_qt, 8), tl.multiple_of(stride_qh, 8)
    stride_kt, stride_kh = tl.multiple_of(stride_kt, 8), tl.multiple_of(stride_kh, 8)
    stride_vt, stride_vh = tl.multiple_of(stride_vt, 8), tl.multiple_of(stride_vh, 8)
    stride_ot, stride_oh = tl.multiple_of(stride_ot, 8), tl.multiple_of(stride_oh, 8)
    pid_m = tl.program_id(0)
    seg = tl.program_id(1)
    head = tl.program_id(2).to(tl.int64)
    # -- find this program's rows; exit if the block lies past the segment --
    q_start = tl.load(cu_seqlens_q + seg)
    q_len = tl.load(cu_seqlens_q + seg + 1) - q_start
    if pid_m * BLOCK_M >= q_len:
        return
    k_start = tl.load(cu_seqlens_k + seg)
    k_len = tl.load(cu_seqlens_k + seg + 1) - k_start
    q_start = q_start.to(tl.int64)
    k_start = k_start.to(tl.int64)

    EVEN_D: tl.constexpr = BLOCK_D == HEAD_DIM
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < q_len
    d_mask = offs_d < HEAD_DIM

    # -- load the query block; it stays in registers for the whole key loop --
    q_ptrs = Q + (q_start + offs_m[:, None]) * stride_qt + head * stride_qh + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=m_mask[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
    k_ptrs = K + (k_start + offs_n[None, :]) * stride_kt + head * stride_kh + offs_d[:, None] * stride_kd
    v_ptrs = V + (k_start + offs_n[:, None]) * stride_vt + head * stride_vh + offs_d[None, :] * stride_vd

    # -- 16-bit inputs: every key block against the first block's row max (no running max, no
    #    rescaling); the row block again with the online softmax where a later block outgrew that max
    #    so far that some row sum reached the limit. fp32: the online softmax --
    FIXED_MAX: tl.constexpr = Q.dtype.element_ty != tl.float32
    LIMIT: tl.constexpr = FIXED_MAX_LIMIT_FP16 if Q.dtype.element_ty == tl.float16 else FIXED_MAX_LIMIT_BF16
    acc, l_i, m_i = _attn_fwd_all_blocks(q, k_ptrs, v_ptrs, stride_kt, stride_vt, k_len, qk_scale, offs_n, d_mask,
                                         BLOCK_M, BLOCK_N, BLOCK_D, EVEN_D, DOT_PRECISION, SCALE_POSITIVE, FIXED_MAX)
    if FIXED_MAX:
        if tl.max(tl.where(m_mask, l_i, 0.0), 0) >= LIMIT:  # rows past the segment: l = k_len
            acc, l_i, m_i = _attn_fwd_all_blocks(q, k_ptrs, v_ptrs, stride_kt, stride_vt, k_len, qk_scale, offs_n,
                                                 d_mask, BLOCK_M, BLOCK_N, BLOCK_D, EVEN_D, DOT_PRECISION,
                                                 SCALE_POSITIVE, False)

    # -- normalise; an empty key segment leaves l = 0: output 0, lse = -inf --
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    acc = acc / l_safe[:, None]
    lse = m_i + tl.log2(l_safe)
    o_ptrs = Out + (q_start + offs_m[:, None]) * stride_ot + head * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])
    tl.store(Lse + head * stride_lse_h + q_start + offs_m, lse, mask=m_mask)


# --------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------
@triton.jit
def _varlen_attn_bwd_preprocess_kernel(
    Out, DO, Delta,
    total_q,
    stride_ot, stride_oh,
    stride_dot, stride_doh, stride_dod,
    stride_delta_h,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """delta[h, i] = sum_d dO[i, h, d] * O[i, h, d] (fp32): the row term of dS."""
    # token and head strides are multiples of 8 (the launcher makes sure): 16-byte row loads
    stride_ot, stride_oh = tl.multiple_of(stride_ot, 8), tl.multiple_of(stride_oh, 8)
    stride_dot, stride_doh = tl.multiple_of(stride_dot, 8), tl.multiple_of(stride_doh, 8)
    pid = tl.program_id(0)
    head = tl.program_id(1).to(tl.int64)
    offs_m = (pid * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < total_q)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(Out + offs_m[:, None] * stride_ot + head * stride_oh + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + offs_m[:, None] * stride_dot + head * stride_doh + offs_d[None, :] * stride_dod,
                 mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(Delta + head * stride_delta_h + offs_m, delta, mask=offs_m < total_q)


@triton.jit
def _bwd_dkdv_tile(
    dk, dv, k, v, qt_ptrs, do_ptrs, lse_ptrs, delta_ptrs, dqa_ptrs, rows_left, offs_m, n_mask, d_mask, qk_scale,
    MASK_M: tl.constexpr, EVEN_D: tl.constexpr, ATOMIC_DQ: tl.constexpr, DOT_PRECISION: tl.constexpr,
    DP_EARLY: tl.constexpr,
):
    """dK/dV (and with ATOMIC_DQ dQ) contributions of one query block; MASK_M: a partial block."""
    # -- load Q^T, dO and the row statistics --
    if MASK_M:
        m_mask = offs_m < rows_left
        md_mask = m_mask[:, None] & d_mask[None, :]
        qt = tl.load(qt_ptrs, mask=m_mask[None, :] & d_mask[:, None], other=0.0)  # [BLOCK_D, BLOCK_M]
        do = tl.load(do_ptrs, mask=md_mask, other=0.0)  # [BLOCK_M, BLOCK_D]
        # rows past the segment get lse = +inf, hence P = 0 and no contribution
        lse = tl.load(lse_ptrs, mask=m_mask, other=float("inf"))
        delta = tl.load(delta_ptrs, mask=m_mask, other=0.0)
    else:
        qt = _load_block(qt_ptrs, d_mask, EVEN_D, 0)
        do = _load_block(do_ptrs, d_mask, EVEN_D, 1)
        lse = tl.load(lse_ptrs)
        delta = tl.load(delta_ptrs)
    # -- raw scores S^T; dP^T = V dO^T issued beside them (DP_EARLY) or after the dV product --
    st = tl.dot(k, qt, input_precision=DOT_PRECISION)  # [BLOCK_N, BLOCK_M]
    if DP_EARLY:
        dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # [BLOCK_N, BLOCK_M]
    # -- P^T from the saved log-sum-exp, the scale folded in: one FFMA per score --
    pt = tl.exp2(tl.fma(st, qk_scale, -lse[None, :]))
    # -- dV += P^T dO;  dS^T = P^T * (dP^T - delta);  dK += dS^T Q --
    dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
    if not DP_EARLY:
        dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # [BLOCK_N, BLOCK_M]
    dst = pt * (dpt - delta[None, :])
    dk = tl.dot(dst.to(qt.dtype), tl.trans(qt), dk, input_precision=DOT_PRECISION)
    if ATOMIC_DQ:
        # -- dQ += dS K for this block's query rows; key rows past the segment load as zeros, and
        #    their P = exp2(0 - lse) overflows where every logit is far below zero: dS = 0 there,
        #    or inf * 0 would put NaN into dQ --
        dsq = tl.where(n_mask[:, None], dst, 0.0)
        dq_part = tl.dot(tl.trans(dsq.to(k.dtype)), k, input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_D]
        if MASK_M:
            tl.atomic_add(dqa_ptrs, dq_part, mask=md_mask, sem="relaxed")
        elif EVEN_D:
            tl.atomic_add(dqa_ptrs, dq_part, sem="relaxed")
        else:
            tl.atomic_add(dqa_ptrs, dq_part, mask=d_mask[None, :], sem="relaxed")
    return dk, dv


@triton.jit
def _varlen_attn_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, Lse, Delta, DQAccum,
    cu_seqlens_q, cu_seqlens_k,
    qk_scale, softmax_scale,
    stride_qt, stride_qh, stride_qd,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_dot, stride_doh, stride_dod,
    stride_dkt, stride_dkh,
    stride_dvt, stride_dvh,
    stride_dqat, stride_dqah,
    stride_lse_h,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, ATOMIC_DQ: tl.constexpr,
):
    """One program per key block: dV = P^T dO and dK = scale * dS^T Q over its query segment.

    With ATOMIC_DQ the same pass also adds dS K (unscaled, fp32) of every tile into ``DQAccum``
    with atomics, FlashAttention-2's single pass: no dQ kernel, but the order of the additions,
    hence the last bits of dQ, vary from run to run.
    """
    # token and head strides are multiples of 8 (the launcher makes sure): 16-byte row loads
    stride_qt, stride_qh = tl.multiple_of(stride_qt, 8), tl.multiple_of(stride_qh, 8)
    stride_kt, stride_kh = tl.multiple_of(stride_kt, 8), tl.multiple_of(stride_kh, 8)
    stride_vt, stride_vh = tl.multiple_of(stride_vt, 8), tl.multiple_of(stride_vh, 8)
    stride_dot, stride_doh = tl.multiple_of(stride_dot, 8), tl.multiple_of(stride_doh, 8)
    stride_dkt, stride_dkh = tl.multiple_of(stride_dkt, 8), tl.multiple_of(stride_dkh, 8)
    stride_dvt, stride_dvh = tl.multiple_of(stride_dvt, 8), tl.multiple_of(stride_dvh, 8)
    stride_dqat, stride_dqah = tl.multiple_of(stride_dqat, 8), tl.multiple_of(stride_dqah, 8)
    pid_n = tl.program_id(0)
    seg = tl.program_id(1)
    head = tl.program_id(2).to(tl.int64)
    k_start = tl.load(cu_seqlens_k + seg)
    k_len = tl.load(cu_seqlens_k + seg + 1) - k_start
    if pid_n * BLOCK_N >= k_len:
        return
    q_start = tl.load(cu_seqlens_q + seg)
    q_len = tl.load(cu_seqlens_q + seg + 1) - q_start
    q_start = q_start.to(tl.int64)
    k_start = k_start.to(tl.int64)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    n_mask = offs_n < k_len
    d_mask = offs_d < HEAD_DIM
    nd_mask = n_mask[:, None] & d_mask[None, :]

    # -- this program's K and V rows stay in registers --
    k = tl.load(K + (k_start + offs_n[:, None]) * stride_kt + head * stride_kh + offs_d[None, :] * stride_kd,
                mask=nd_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
    v = tl.load(V + (k_start + offs_n[:, None]) * stride_vt + head * stride_vh + offs_d[None, :] * stride_vd,
                mask=nd_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    # -- query blocks addressed from the loop index (scalar) and loop-invariant offsets, so that no pointer
    #    tensor is carried from one iteration, or one loop, to the next --
    q_head = Q + q_start * stride_qt + head * stride_qh
    do_head = DO + q_start * stride_dot + head * stride_doh
    lse_head = Lse + head * stride_lse_h + q_start
    delta_head = Delta + head * stride_lse_h + q_start
    dqa_head = DQAccum + q_start * stride_dqat + head * stride_dqah
    qt_offs = offs_m[None, :] * stride_qt + offs_d[:, None] * stride_qd  # [BLOCK_D, BLOCK_M]
    do_offs = offs_m[:, None] * stride_dot + offs_d[None, :] * stride_dod  # [BLOCK_M, BLOCK_D]
    dqa_offs = offs_m[:, None] * stride_dqat + offs_d[None, :]  # [BLOCK_M, BLOCK_D]
    # -- full query blocks without row masks, then the partial last block with them; fp32 (FMA-unit
    #    dots, whose operands would stay live from the loop into the tail) masks every block instead --
    EVEN_D: tl.constexpr = BLOCK_D == HEAD_DIM
    SPLIT_TAIL: tl.constexpr = Q.dtype.element_ty != tl.float32
    # dP^T beside S^T, before the exponentials, in the two-pass 16-bit kernel at head dim 16 (exponentials
    # dominate, registers to spare) and for fp32 (FMA-unit dots: the other order spills at head dim 64);
    # elsewhere after the dV product, so that its tile is not live during the exponentials: fewer registers
    # and more overlap (bench/results/kernel_report.md)
    DP_EARLY: tl.constexpr = (BLOCK_D == 16 and not ATOMIC_DQ) or not SPLIT_TAIL
    m_full = (q_len // BLOCK_M) * BLOCK_M if SPLIT_TAIL else 0
    lse_ptrs = lse_head + offs_m
    delta_ptrs = delta_head + offs_m
    for m0 in range(0, m_full, BLOCK_M):
        dk, dv = _bwd_dkdv_tile(dk, dv, k, v, q_head + m0 * stride_qt + qt_offs, do_head + m0 * stride_dot + do_offs,
                                lse_ptrs, delta_ptrs,
                                dqa_head + m0 * stride_dqat + dqa_offs, BLOCK_M, offs_m, n_mask, d_mask, qk_scale,
                                False, EVEN_D, ATOMIC_DQ, DOT_PRECISION, DP_EARLY)
        lse_ptrs += BLOCK_M
        delta_ptrs += BLOCK_M
    for m0 in range(m_full, q_len, BLOCK_M):
        dk, dv = _bwd_dkdv_tile(dk, dv, k, v, q_head + m0 * stride_qt + qt_offs, do_head + m0 * stride_dot + do_offs,
                                lse_ptrs, delta_ptrs,
                                dqa_head + m0 * stride_dqat + dqa_offs, q_len - m0, offs_m, n_mask, d_mask, qk_scale,
                                True, EVEN_D, ATOMIC_DQ, DOT_PRECISION, DP_EARLY)
        lse_ptrs += BLOCK_M
        delta_ptrs += BLOCK_M

    dk = dk * softmax_scale
    tl.store(DK + (k_start + offs_n[:, None]) * stride_dkt + head * stride_dkh + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=nd_mask)
    tl.store(DV + (k_start + offs_n[:, None]) * stride_dvt + head * stride_dvh + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=nd_mask)


@triton.jit
def _bwd_dq_tile(
    dq, q, do, lse, delta, kt_ptrs, vt_ptrs, cols_left, offs_n, d_mask, qk_scale,
    MASK_N: tl.constexpr, EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dQ contribution of one key block; MASK_N: a partial block (keys past the segment get P = 0:
    a zero score minus a very negative lse would overflow exp2 and turn dS * 0 into NaN)."""
    # -- load K^T and V^T --
    if MASK_N:
        n_mask = offs_n < cols_left
        nd_mask = n_mask[None, :] & d_mask[:, None]
        kt = tl.load(kt_ptrs, mask=nd_mask, other=0.0)  # [BLOCK_D, BLOCK_N]
        vt = tl.load(vt_ptrs, mask=nd_mask, other=0.0)  # [BLOCK_D, BLOCK_N]
    else:
        kt = _load_block(kt_ptrs, d_mask, EVEN_D, 0)
        vt = _load_block(vt_ptrs, d_mask, EVEN_D, 0)
    # -- raw scores and dP = dO V^T, both issued before the exponentials --
    s = tl.dot(q, kt, input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
    dp = tl.dot(do, vt, input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
    if MASK_N:
        p = tl.exp2(tl.where(n_mask[None, :], tl.fma(s, qk_scale, -lse[:, None]), float("-inf")))
    else:
        p = tl.exp2(tl.fma(s, qk_scale, -lse[:, None]))
    ds = p * (dp - delta[:, None])
    return tl.dot(ds.to(kt.dtype), tl.trans(kt), dq, input_precision=DOT_PRECISION)


@triton.jit
def _varlen_attn_bwd_dq_kernel(
    Q, K, V, DO, DQ, Lse, Delta,
    cu_seqlens_q, cu_seqlens_k,
    qk_scale, softmax_scale,
    stride_qt, stride_qh, stride_qd,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_dot, stride_doh, stride_dod,
    stride_dqt, stride_dqh,
    stride_lse_h,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One program per query block: dQ = scale * dS K over its key segment."""
    # token and head strides are multiples of 8 (the launcher makes sure): 16-byte row loads
    stride_qt, stride_qh = tl.multiple_of(stride_qt, 8), tl.multiple_of(stride_qh, 8)
    stride_kt, stride_kh = tl.multiple_of(stride_kt, 8), tl.multiple_of(stride_kh, 8)
    stride_vt, stride_vh = tl.multiple_of(stride_vt, 8), tl.multiple_of(stride_vh, 8)
    stride_dot, stride_doh = tl.multiple_of(stride_dot, 8), tl.multiple_of(stride_doh, 8)
    stride_dqt, stride_dqh = tl.multiple_of(stride_dqt, 8), tl.multiple_of(stride_dqh, 8)
    pid_m = tl.program_id(0)
    seg = tl.program_id(1)
    head = tl.program_id(2).to(tl.int64)
    q_start = tl.load(cu_seqlens_q + seg)
    q_len = tl.load(cu_seqlens_q + seg + 1) - q_start
    if pid_m * BLOCK_M >= q_len:
        return
    k_start = tl.load(cu_seqlens_k + seg)
    k_len = tl.load(cu_seqlens_k + seg + 1) - k_start
    q_start = q_start.to(tl.int64)
    k_start = k_start.to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < q_len
    d_mask = offs_d < HEAD_DIM
    md_mask = m_mask[:, None] & d_mask[None, :]

    # -- this program's Q, dO and row statistics stay in registers --
    q = tl.load(Q + (q_start + offs_m[:, None]) * stride_qt + head * stride_qh + offs_d[None, :] * stride_qd,
                mask=md_mask, other=0.0)  # [BLOCK_M, BLOCK_D]
    do = tl.load(DO + (q_start + offs_m[:, None]) * stride_dot + head * stride_doh + offs_d[None, :] * stride_dod,
                 mask=md_mask, other=0.0)  # [BLOCK_M, BLOCK_D]
    lse = tl.load(Lse + head * stride_lse_h + q_start + offs_m, mask=m_mask, other=0.0)
    delta = tl.load(Delta + head * stride_lse_h + q_start + offs_m, mask=m_mask, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # -- key blocks addressed from the loop index (scalar) and loop-invariant offsets, so that no pointer
    #    tensor is carried from one iteration, or one loop, to the next --
    k_head = K + k_start * stride_kt + head * stride_kh
    v_head = V + k_start * stride_vt + head * stride_vh
    kt_offs = offs_n[None, :] * stride_kt + offs_d[:, None] * stride_kd  # [BLOCK_D, BLOCK_N]
    vt_offs = offs_n[None, :] * stride_vt + offs_d[:, None] * stride_vd  # [BLOCK_D, BLOCK_N]
    # -- full key blocks without masks, then the partial last block with them (fp32: every block
    #    masked, as in the dK/dV pass) --
    EVEN_D: tl.constexpr = BLOCK_D == HEAD_DIM
    SPLIT_TAIL: tl.constexpr = Q.dtype.element_ty != tl.float32
    n_full = (k_len // BLOCK_N) * BLOCK_N if SPLIT_TAIL else 0
    for n0 in range(0, n_full, BLOCK_N):
        dq = _bwd_dq_tile(dq, q, do, lse, delta, k_head + n0 * stride_kt + kt_offs, v_head + n0 * stride_vt + vt_offs,
                          BLOCK_N, offs_n, d_mask, qk_scale, False, EVEN_D, DOT_PRECISION)
    for n0 in range(n_full, k_len, BLOCK_N):
        dq = _bwd_dq_tile(dq, q, do, lse, delta, k_head + n0 * stride_kt + kt_offs, v_head + n0 * stride_vt + vt_offs,
                          k_len - n0, offs_n, d_mask, qk_scale, True, EVEN_D, DOT_PRECISION)

    dq = dq * softmax_scale
    tl.store(DQ + (q_start + offs_m[:, None]) * stride_dqt + head * stride_dqh + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=md_mask)


def _autotune(configs, kind: str, kernel, key=("HEAD_DIM", "DOT_PRECISION")):
    """Autotuner of one kernel: keyed by ``key`` and the dtypes; results cached on disk."""
    return triton.autotune(configs=configs, key=list(key),
                           prune_configs_by={"early_config_prune": _pruner(kind)}, cache_results=True)(kernel)


_fwd_tuned = _autotune(FWD_CONFIGS, "fwd", _varlen_attn_fwd_kernel)
_dkdv_tuned = _autotune(BWD_DKDV_CONFIGS, "dkdv", _varlen_attn_bwd_dkdv_kernel,
                        key=("HEAD_DIM", "DOT_PRECISION", "ATOMIC_DQ"))
_dq_tuned = _autotune(BWD_DQ_CONFIGS, "dq", _varlen_attn_bwd_dq_kernel)
_TUNED = {"fwd": _fwd_tuned, "dkdv": _dkdv_tuned, "dq": _dq_tuned}


def autotune_choices() -> dict[str, list]:
    """The configurations the autotuners have chosen so far, as plain data.

    {kind: [(tuning key, (BLOCK_M, BLOCK_N, num_warps, num_stages)), ...]} for kinds "fwd",
    "dkdv", "dq"; the tuning key is the autotuner's own (head dim, dot precision, dtypes).
    """
    return {kind: [(key, (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages))
                   for key, c in tuned.cache.items()]
            for kind, tuned in _TUNED.items()}


def apply_autotune_choices(choices: dict[str, list]) -> None:
    """Make the autotuners use ``choices`` (from :func:`autotune_choices`) for those keys, without tuning."""
    for kind, entries in choices.items():
        if kind not in _TUNED:
            raise ValueError(f"choices: unknown kernel {kind!r}, expected one of {sorted(_TUNED)}")
        for key, (bm, bn, warps, stages) in entries:
            _TUNED[kind].cache[tuple(key)] = triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps,
                                                          num_stages=stages)


def broadcast_autotune_choice(process_group=None) -> dict[str, list]:
    """Give every rank of ``process_group`` the configurations its first rank chose.

    Timing differs between GPUs, so ranks that tune on their own can pick different
    configurations and stop being bit-identical. Call this on every rank after a first step
    (every kernel shape tuned); later launches with those keys use rank 0's choice. Returns
    the choices applied. Needs an initialised ``torch.distributed``.
    """
    import torch.distributed as dist

    src = dist.get_global_rank(process_group, 0) if process_group is not None else 0
    payload = [autotune_choices() if dist.get_rank() == src else None]
    dist.broadcast_object_list(payload, src=src, group=process_group)
    apply_autotune_choices(payload[0])
    return payload[0]


# --------------------------------------------------------------------------------------
# Launchers: check what the kernels rely on, allocate, launch.
# --------------------------------------------------------------------------------------
def static_constexprs(head_dim: int, dtype: torch.dtype) -> dict:
    """Compile-time arguments of a typical launch at ``head_dim`` beyond blocks and dot precision:
    the padded head dim the kernels see and a positive ``softmax_scale``. What
    bench/kernel_report.py compiles with."""
    return {"HEAD_DIM": block_head_dim(head_dim), "SCALE_POSITIVE": True}


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype != torch.float32 or is_interpreting():
        return "ieee"
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _check_launch_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k):
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"q must be float16, bfloat16 or float32 for the triton backend, got {q.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not head_dim_supported(q.shape[-1]):
        raise ValueError(
            f"head dim {q.shape[-1]} is not supported by the triton backend "
            f"(multiples of 8 from {MIN_HEAD_DIM} to {MAX_HEAD_DIM})"
        )
    if q.dtype == torch.float32 and not is_interpreting() and fp32_head_dim_spills(q.shape[-1]):
        raise ValueError(
            f"head dim {q.shape[-1]} in float32 is not supported by the triton backend: its "
            f"{block_head_dim(q.shape[-1])}-wide tile spills registers on sm_90 (float32 up to head dim "
            f"{FP32_MAX_BLOCK_HEAD_DIM}; bf16/fp16 up to {MAX_HEAD_DIM})"
        )
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if cu.dtype != torch.int32 or not cu.is_contiguous():
            raise ValueError(f"{name} must be a contiguous int32 tensor")


def check_segment_offsets(max_seqlen_q: int, max_seqlen_k: int, q_row_stride: int, k_row_stride: int) -> None:
    """Raise ValueError when a row offset inside one segment would overflow int32.

    The kernels start each segment from an int64 base and index rows within it in int32
    (64-bit offsets cost a third of the backward's loop instructions), so a segment's
    ``max_seqlen * row stride`` (row stride = H * D elements for contiguous rows) must stay
    below 2**31.
    """
    for name, length, stride in (("q", max_seqlen_q, q_row_stride), ("k", max_seqlen_k, k_row_stride)):
        if length * stride >= 2**31:
            raise ValueError(
                f"max_seqlen_{name} {length} x {stride} elements per row = {length * stride} is 2**31 or more: "
                "the triton backend indexes rows within a segment in int32; split the segment or use another backend"
            )


def _rows_aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` [total, H, D], or a contiguous copy when its token or head stride is not a multiple
    of 8 elements (the kernels assume it, so that a row loads as 16-byte vectors)."""
    if t.stride(0) % 8 or t.stride(1) % 8:
        return t.contiguous()
    return t


def _pad_head_dim(t: torch.Tensor, block_d: int) -> torch.Tensor:
    """[total, H, D] -> [total, H, block_d], zeros in the new lanes."""
    return torch.nn.functional.pad(t, (0, block_d - t.shape[-1]))


def varlen_attn_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int,
                    softmax_scale: float):
    """Launch the forward kernel.

    Args:
        q: [total_q, H, D]; k, v: [total_k, H, D]; cu_seqlens_q/k: int32 [B + 1].
        max_seqlen_q/k: host ints, at least every segment's length.
        softmax_scale: multiplies q . k before the softmax.

    Returns:
        out [total_q, H, D] (input dtype) and lse [H, total_q] (fp32, base 2, see the header).

    A head dim that is not a power of two runs zero-padded to the next one (zero lanes change
    no score); the kernels' own masking of such lanes compiles to scalar loads and spills (see
    bench/results/kernel_report.md), the padding copies cost O(total * H * D) instead.
    """
    _check_launch_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k)
    total_q, n_heads, head_dim = q.shape
    block_d = block_head_dim(head_dim)
    if block_d != head_dim:
        out, lse = varlen_attn_fwd(*(_pad_head_dim(t, block_d) for t in (q, k, v)), cu_seqlens_q, cu_seqlens_k,
                                   max_seqlen_q, max_seqlen_k, softmax_scale)
        return out[..., :head_dim].contiguous(), lse
    batch = cu_seqlens_q.numel() - 1
    out = torch.empty((total_q, n_heads, head_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((n_heads, total_q), dtype=torch.float32, device=q.device)
    if total_q == 0 or batch == 0 or max_seqlen_q == 0:
        return out, lse
    q, k, v = _rows_aligned(q), _rows_aligned(k), _rows_aligned(v)
    check_segment_offsets(max_seqlen_q, max_seqlen_k, max(q.stride(0), out.stride(0)), max(k.stride(0), v.stride(0)))
    args = (
        q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, softmax_scale * LOG2_E,
        *q.stride(), *k.stride(), *v.stride(), out.stride(0), out.stride(1), lse.stride(0),
    )
    meta = dict(HEAD_DIM=head_dim, BLOCK_D=block_head_dim(head_dim), DOT_PRECISION=_dot_precision(q.dtype),
                SCALE_POSITIVE=softmax_scale >= 0)
    if is_interpreting():
        grid = (triton.cdiv(max_seqlen_q, INTERPRETER_BLOCKS["BLOCK_M"]), batch, n_heads)
        _varlen_attn_fwd_kernel[grid](*args, **meta, **INTERPRETER_BLOCKS)
    else:
        def grid(cfg):
            return (triton.cdiv(max_seqlen_q, cfg["BLOCK_M"]), batch, n_heads)
        _fwd_tuned[grid](*args, **meta)
    return out, lse


def varlen_attn_bwd(do, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int,
                    softmax_scale: float, deterministic: bool = True):
    """Launch the backward kernels; returns dq, dk, dv (contiguous, input dtype).

    ``out`` and ``lse`` are what :func:`varlen_attn_fwd` returned; ``do`` is [total_q, H, D].
    ``deterministic`` True (default): preprocess, dK/dV pass, dQ pass; bit-for-bit the same on
    every run. False: the dK/dV pass also accumulates dQ with fp32 atomics (one pass fewer,
    S and P computed once; see bench/results/kernel_report.md), and dQ's last bits depend on
    the order the atomics land in; head dims above ``ATOMIC_DQ_MAX_HEAD_DIM`` (after padding
    to a power of two) stay two-pass.
    """
    _check_launch_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k)
    total_q, n_heads, head_dim = q.shape
    block_d = block_head_dim(head_dim)
    if block_d != head_dim:  # zero-padded like the forward
        grads = varlen_attn_bwd(*(_pad_head_dim(t, block_d) for t in (do, q, k, v, out)), lse, cu_seqlens_q,
                                cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, deterministic)
        return tuple(g[..., :head_dim].contiguous() for g in grads)
    batch = cu_seqlens_q.numel() - 1
    dq = torch.empty((total_q, n_heads, head_dim), dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if batch == 0:
        return dq, dk, dv
    if out.stride(-1) != 1:
        out = out.contiguous()
    q, k, v, do, out = (_rows_aligned(t) for t in (q, k, v, do, out))
    check_segment_offsets(max_seqlen_q, max_seqlen_k, max(q.stride(0), do.stride(0), out.stride(0), dq.stride(0)),
                          max(k.stride(0), v.stride(0)))
    delta = torch.empty_like(lse)
    if total_q > 0:
        pre_block = 64 if not is_interpreting() else INTERPRETER_BLOCKS["BLOCK_M"]
        _varlen_attn_bwd_preprocess_kernel[(triton.cdiv(total_q, pre_block), n_heads)](
            out, do, delta, total_q, out.stride(0), out.stride(1), *do.stride(), delta.stride(0),
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=pre_block,
        )
    meta = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, DOT_PRECISION=_dot_precision(q.dtype))
    common = (cu_seqlens_q, cu_seqlens_k, softmax_scale * LOG2_E, softmax_scale,
              *q.stride(), *k.stride(), *v.stride(), *do.stride())
    atomic = not deterministic and head_dim <= ATOMIC_DQ_MAX_HEAD_DIM
    dq_accum = torch.zeros((total_q, n_heads, head_dim), dtype=torch.float32, device=q.device) if atomic else lse
    dqa_strides = (dq_accum.stride(0), dq_accum.stride(1)) if atomic else (0, 0)
    dkdv_args = (q, k, v, do, dk, dv, lse, delta, dq_accum, *common,
                 dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), *dqa_strides, lse.stride(0))
    dq_args = (q, k, v, do, dq, lse, delta, *common, dq.stride(0), dq.stride(1), lse.stride(0))
    if is_interpreting():
        bm, bn = INTERPRETER_BLOCKS["BLOCK_M"], INTERPRETER_BLOCKS["BLOCK_N"]
        if max_seqlen_k > 0:
            _varlen_attn_bwd_dkdv_kernel[(triton.cdiv(max_seqlen_k, bn), batch, n_heads)](
                *dkdv_args, **meta, ATOMIC_DQ=atomic, **INTERPRETER_BLOCKS)
        if max_seqlen_q > 0 and not atomic:
            _varlen_attn_bwd_dq_kernel[(triton.cdiv(max_seqlen_q, bm), batch, n_heads)](
                *dq_args, **meta, **INTERPRETER_BLOCKS)
    else:
        if max_seqlen_k > 0:
            _dkdv_tuned[lambda cfg: (triton.cdiv(max_seqlen_k, cfg["BLOCK_N"]), batch, n_heads)](
                *dkdv_args, **meta, ATOMIC_DQ=atomic)
        if max_seqlen_q > 0 and not atomic:
            _dq_tuned[lambda cfg: (triton.cdiv(max_seqlen_q, cfg["BLOCK_M"]), batch, n_heads)](*dq_args, **meta)
    if atomic:
        dq = (dq_accum * softmax_scale).to(q.dtype)  # keys of an empty segment add nothing: dq = 0
    return dq, dk, dv


__all__ = [
    "ATOMIC_DQ_MAX_HEAD_DIM",
    "CONFIG_ENV",
    "SINGLE_CONFIG_ENV",
    "apply_autotune_choices",
    "autotune_choices",
    "broadcast_autotune_choice",
    "check_segment_offsets",
    "parse_config",
    "select_configs",
    "FWD_CONFIGS",
    "BWD_DKDV_CONFIGS",
    "BWD_DQ_CONFIGS",
    "LOG2_E",
    "fp32_head_dim_spills",
    "head_dim_supported",
    "is_interpreting",
    "prune_configs",
    "varlen_attn_bwd",
    "varlen_attn_fwd",
]
