"""Packed variable-length attention in Triton: forward and backward.

Algorithm
    FlashAttention-2 on packed tensors. One launch covers every sample: the grid is
    ``(cdiv(max_seqlen, BLOCK), B, H)`` and each program reads its segment's start and length
    from ``cu_seqlens``; a program whose block starts past its segment's end exits at once.
    Forward: a block of BLOCK_M query rows streams over its segment's keys in blocks of
    BLOCK_N with an online softmax (running max ``m``, running sum ``l``, rescaled fp32
    accumulator). Backward (no atomics, so bit-for-bit deterministic):
      1. preprocess   delta_i = rowsum(dO_i * O_i)
      2. dK/dV pass   one program per key block, streaming over the segment's query blocks
      3. dQ pass      one program per query block, streaming over the segment's key blocks
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
    (as FlashAttention-2 does). fp32 inputs use IEEE fp32 products unless
    ``torch.backends.cuda.matmul.allow_tf32`` is set.
    A query row whose key segment is empty gets out = 0, lse = -inf and dq = 0; key rows whose
    query segment is empty get dk = dv = 0.

Limitations
    Non-causal, no dropout, equal head counts for q and k/v. Head dims 16..128 that are
    multiples of 8 (loaded into a power-of-two tile, padded lanes masked).
"""

import os

import torch
import triton
import triton.language as tl

LOG2_E = 1.4426950408889634

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MIN_HEAD_DIM = 16
MAX_HEAD_DIM = 128


def is_interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def head_dim_supported(head_dim: int) -> bool:
    return MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM and head_dim % 8 == 0


def block_head_dim(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


# --------------------------------------------------------------------------------------
# Autotune configurations.
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
        (128, 64, 4, 3),
        (128, 32, 4, 3),
        (64, 128, 4, 3),
        (64, 64, 4, 3),
    ]
]

BWD_DKDV_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm, bn, w, s in [
        (64, 128, 8, 2),
        (32, 128, 8, 3),
        (64, 64, 4, 3),
        (32, 64, 4, 3),
        (128, 64, 4, 2),
    ]
]

BWD_DQ_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm, bn, w, s in [
        (128, 64, 8, 2),
        (128, 32, 8, 3),
        (64, 64, 4, 3),
        (64, 32, 4, 3),
        (64, 128, 4, 2),
    ]
]

# Fixed small blocks for the CPU interpreter: it runs every config it is given, slowly.
INTERPRETER_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 16}


def _elem_bytes(dtype) -> int:
    if isinstance(dtype, torch.dtype):
        return dtype.itemsize
    return 4 if "32" in str(dtype) else 2


def _fits(config: triton.Config, head_dim: int, dtype, kind: str) -> bool:
    """Rough register and shared-memory model for one configuration.

    Register tiles (fp32 unless stated) divided over the block's threads must stay well
    under 255 per thread, and the pipelined shared-memory tiles under ``_SMEM_BUDGET``.
    The rows of the score tile (BLOCK_M for fwd and dq, BLOCK_N for dK/dV) must fill the
    warps: Triton lays a dot that feeds another dot out with every warp along its rows, 16
    rows per warp, so a shorter tile would be computed twice by two warpgroups (and hold
    twice the registers). bench/kernel_report.py checks the result on sm_90.
    """
    bm, bn = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    if (bn if kind == "dkdv" else bm) < 16 * config.num_warps:
        return False
    bd = block_head_dim(head_dim)
    nbytes = _elem_bytes(dtype)
    threads = 32 * config.num_warps
    stages = max(config.num_stages, 1)
    if kind == "fwd":
        regs = (bm * bd + 2 * bm * bn) / threads  # acc, scores (+ probabilities)
        smem = bm * bd * nbytes + stages * 2 * bn * bd * nbytes  # q, pipelined k and v
    elif kind == "dkdv":
        regs = (2 * bn * bd + 2 * bn * bm) / threads  # dk, dv, s^T, dp^T
        smem = 2 * bn * bd * nbytes + stages * 2 * bm * bd * nbytes  # k, v; pipelined q, dO
    else:
        regs = (bm * bd + 2 * bm * bn) / threads  # dq, s, dp
        smem = 2 * bm * bd * nbytes + stages * 2 * bn * bd * nbytes  # q, dO; pipelined k, v
    return regs <= 160 and smem <= _SMEM_BUDGET


def prune_configs(configs, head_dim: int, dtype, kind: str):
    """The configurations of ``configs`` that fit ``head_dim`` and ``dtype`` (never empty)."""
    kept = [c for c in configs if _fits(c, head_dim, dtype, kind)]
    if not kept:
        kept = [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]
    return kept


def _pruner(kind: str):
    def prune(configs, named_args, **kwargs):
        head_dim = kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM"))
        return prune_configs(configs, head_dim, named_args["Q"].dtype, kind)

    return prune


# --------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------
@triton.jit
def _attn_fwd_inner(
    acc, l_i, m_i, q,
    k_ptrs, v_ptrs, stride_kt, stride_vt,
    start_n, end_n, k_len, qk_scale,
    offs_n, d_mask,
    BLOCK_N: tl.constexpr, MASK_N: tl.constexpr, EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Online-softmax update of one query block over key blocks [start_n, end_n)."""
    k_ptrs += start_n * stride_kt
    v_ptrs += start_n * stride_vt
    for n0 in range(start_n, end_n, BLOCK_N):
        # -- load K^T and V blocks --
        if MASK_N:
            n_mask = (n0 + offs_n) < k_len
            kt = tl.load(k_ptrs, mask=n_mask[None, :] & d_mask[:, None], other=0.0)  # [BLOCK_D, BLOCK_N]
            v = tl.load(v_ptrs, mask=n_mask[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
        elif EVEN_D:
            kt = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        else:
            kt = tl.load(k_ptrs, mask=d_mask[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=d_mask[None, :], other=0.0)
        # -- scores in base 2, masked past the segment's end --
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
        if MASK_N:
            s = tl.where(n_mask[None, :], s, float("-inf"))
        # -- online softmax: new running max, rescale what was accumulated --
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
        k_ptrs += BLOCK_N * stride_kt
        v_ptrs += BLOCK_N * stride_vt
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
    DOT_PRECISION: tl.constexpr,
):
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

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # -- full key blocks without masks, then the partial tail block with them --
    n_full = (k_len // BLOCK_N) * BLOCK_N
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kt, stride_vt,
        0, n_full, k_len, qk_scale, offs_n, d_mask,
        BLOCK_N, False, EVEN_D, DOT_PRECISION,
    )
    if n_full < k_len:
        acc, l_i, m_i = _attn_fwd_inner(
            acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kt, stride_vt,
            n_full, k_len, k_len, qk_scale, offs_n, d_mask,
            BLOCK_N, True, EVEN_D, DOT_PRECISION,
        )

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
def _varlen_attn_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, Lse, Delta,
    cu_seqlens_q, cu_seqlens_k,
    qk_scale, softmax_scale,
    stride_qt, stride_qh, stride_qd,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_dot, stride_doh, stride_dod,
    stride_dkt, stride_dkh,
    stride_dvt, stride_dvh,
    stride_lse_h,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One program per key block: dV = P^T dO and dK = scale * dS^T Q over its query segment."""
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

    qt_ptrs = Q + (q_start + offs_m[None, :]) * stride_qt + head * stride_qh + offs_d[:, None] * stride_qd
    do_ptrs = DO + (q_start + offs_m[:, None]) * stride_dot + head * stride_doh + offs_d[None, :] * stride_dod
    lse_ptrs = Lse + head * stride_lse_h + q_start + offs_m
    delta_ptrs = Delta + head * stride_lse_h + q_start + offs_m
    for m0 in range(0, q_len, BLOCK_M):
        # -- load Q^T, dO and the row statistics of one query block --
        m_mask = (m0 + offs_m) < q_len
        qt = tl.load(qt_ptrs, mask=m_mask[None, :] & d_mask[:, None], other=0.0)  # [BLOCK_D, BLOCK_M]
        do = tl.load(do_ptrs, mask=m_mask[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
        # rows past the segment get lse = +inf, hence P = 0 and no contribution
        lse = tl.load(lse_ptrs, mask=m_mask, other=float("inf"))
        delta = tl.load(delta_ptrs, mask=m_mask, other=0.0)
        # -- recompute P^T from the saved log-sum-exp --
        st = tl.dot(k, qt, input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_N, BLOCK_M]
        pt = tl.exp2(st - lse[None, :])
        # -- dV += P^T dO;  dS^T = P^T * (dP^T - delta);  dK += dS^T Q --
        dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # [BLOCK_N, BLOCK_M]
        dst = pt * (dpt - delta[None, :])
        dk = tl.dot(dst.to(qt.dtype), tl.trans(qt), dk, input_precision=DOT_PRECISION)
        qt_ptrs += BLOCK_M * stride_qt
        do_ptrs += BLOCK_M * stride_dot
        lse_ptrs += BLOCK_M
        delta_ptrs += BLOCK_M

    dk = dk * softmax_scale
    tl.store(DK + (k_start + offs_n[:, None]) * stride_dkt + head * stride_dkh + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=nd_mask)
    tl.store(DV + (k_start + offs_n[:, None]) * stride_dvt + head * stride_dvh + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=nd_mask)


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

    kt_ptrs = K + (k_start + offs_n[None, :]) * stride_kt + head * stride_kh + offs_d[:, None] * stride_kd
    vt_ptrs = V + (k_start + offs_n[None, :]) * stride_vt + head * stride_vh + offs_d[:, None] * stride_vd
    for n0 in range(0, k_len, BLOCK_N):
        # -- load K^T and V^T of one key block; rows past the segment load as zeros --
        n_mask = (n0 + offs_n) < k_len
        nd_mask = n_mask[None, :] & d_mask[:, None]
        kt = tl.load(kt_ptrs, mask=nd_mask, other=0.0)  # [BLOCK_D, BLOCK_N]
        vt = tl.load(vt_ptrs, mask=nd_mask, other=0.0)  # [BLOCK_D, BLOCK_N]
        # -- recompute P; keys past the segment get P = 0 (a zero score minus a very negative
        #    lse would overflow exp2 and turn dS * 0 into NaN) --
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
        s = tl.where(n_mask[None, :], s, float("-inf"))
        p = tl.exp2(s - lse[:, None])
        dp = tl.dot(do, vt, input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(kt.dtype), tl.trans(kt), dq, input_precision=DOT_PRECISION)
        kt_ptrs += BLOCK_N * stride_kt
        vt_ptrs += BLOCK_N * stride_vt

    dq = dq * softmax_scale
    tl.store(DQ + (q_start + offs_m[:, None]) * stride_dqt + head * stride_dqh + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=md_mask)


_fwd_tuned = triton.autotune(
    configs=FWD_CONFIGS, key=["HEAD_DIM", "DOT_PRECISION"], prune_configs_by={"early_config_prune": _pruner("fwd")}
)(_varlen_attn_fwd_kernel)
_dkdv_tuned = triton.autotune(
    configs=BWD_DKDV_CONFIGS, key=["HEAD_DIM", "DOT_PRECISION"],
    prune_configs_by={"early_config_prune": _pruner("dkdv")},
)(_varlen_attn_bwd_dkdv_kernel)
_dq_tuned = triton.autotune(
    configs=BWD_DQ_CONFIGS, key=["HEAD_DIM", "DOT_PRECISION"], prune_configs_by={"early_config_prune": _pruner("dq")}
)(_varlen_attn_bwd_dq_kernel)


# --------------------------------------------------------------------------------------
# Launchers: check what the kernels rely on, allocate, launch.
# --------------------------------------------------------------------------------------
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
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if cu.dtype != torch.int32 or not cu.is_contiguous():
            raise ValueError(f"{name} must be a contiguous int32 tensor")


def varlen_attn_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int,
                    softmax_scale: float):
    """Launch the forward kernel.

    Args:
        q: [total_q, H, D]; k, v: [total_k, H, D]; cu_seqlens_q/k: int32 [B + 1].
        max_seqlen_q/k: host ints, at least every segment's length.
        softmax_scale: multiplies q . k before the softmax.

    Returns:
        out [total_q, H, D] (input dtype) and lse [H, total_q] (fp32, base 2, see the header).
    """
    _check_launch_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k)
    total_q, n_heads, head_dim = q.shape
    batch = cu_seqlens_q.numel() - 1
    out = torch.empty((total_q, n_heads, head_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((n_heads, total_q), dtype=torch.float32, device=q.device)
    if total_q == 0 or batch == 0 or max_seqlen_q == 0:
        return out, lse
    args = (
        q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, softmax_scale * LOG2_E,
        *q.stride(), *k.stride(), *v.stride(), out.stride(0), out.stride(1), lse.stride(0),
    )
    meta = dict(HEAD_DIM=head_dim, BLOCK_D=block_head_dim(head_dim), DOT_PRECISION=_dot_precision(q.dtype))
    if is_interpreting():
        grid = (triton.cdiv(max_seqlen_q, INTERPRETER_BLOCKS["BLOCK_M"]), batch, n_heads)
        _varlen_attn_fwd_kernel[grid](*args, **meta, **INTERPRETER_BLOCKS)
    else:
        def grid(cfg):
            return (triton.cdiv(max_seqlen_q, cfg["BLOCK_M"]), batch, n_heads)
        _fwd_tuned[grid](*args, **meta)
    return out, lse


def varlen_attn_bwd(do, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int,
                    softmax_scale: float):
    """Launch the three backward kernels; returns dq, dk, dv (contiguous, input dtype).

    ``out`` and ``lse`` are what :func:`varlen_attn_fwd` returned; ``do`` is [total_q, H, D].
    """
    _check_launch_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k)
    total_q, n_heads, head_dim = q.shape
    batch = cu_seqlens_q.numel() - 1
    dq = torch.empty((total_q, n_heads, head_dim), dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if batch == 0:
        return dq, dk, dv
    if out.stride(-1) != 1:
        out = out.contiguous()
    block_d = block_head_dim(head_dim)
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
    dkdv_args = (q, k, v, do, dk, dv, lse, delta, *common,
                 dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), lse.stride(0))
    dq_args = (q, k, v, do, dq, lse, delta, *common, dq.stride(0), dq.stride(1), lse.stride(0))
    if is_interpreting():
        bm, bn = INTERPRETER_BLOCKS["BLOCK_M"], INTERPRETER_BLOCKS["BLOCK_N"]
        if max_seqlen_k > 0:
            _varlen_attn_bwd_dkdv_kernel[(triton.cdiv(max_seqlen_k, bn), batch, n_heads)](
                *dkdv_args, **meta, **INTERPRETER_BLOCKS)
        if max_seqlen_q > 0:
            _varlen_attn_bwd_dq_kernel[(triton.cdiv(max_seqlen_q, bm), batch, n_heads)](
                *dq_args, **meta, **INTERPRETER_BLOCKS)
    else:
        if max_seqlen_k > 0:
            _dkdv_tuned[lambda cfg: (triton.cdiv(max_seqlen_k, cfg["BLOCK_N"]), batch, n_heads)](*dkdv_args, **meta)
        if max_seqlen_q > 0:
            _dq_tuned[lambda cfg: (triton.cdiv(max_seqlen_q, cfg["BLOCK_M"]), batch, n_heads)](*dq_args, **meta)
    return dq, dk, dv


__all__ = [
    "FWD_CONFIGS",
    "BWD_DKDV_CONFIGS",
    "BWD_DQ_CONFIGS",
    "LOG2_E",
    "head_dim_supported",
    "is_interpreting",
    "prune_configs",
    "varlen_attn_bwd",
    "varlen_attn_fwd",
]
