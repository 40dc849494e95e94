// Packed variable-length attention on the CPU: forward and backward kernels.
//
// Algorithm
//   FlashAttention-2 on packed tensors, one OpenMP parallel region per call over all samples.
//   The launcher (varlen_attention_cpu.cpp) reads cu_seqlens, lays out the packed buffers and
//   lists the tasks, largest first; this file packs the inputs and runs the tasks (dynamic
//   schedule). Matrix products are register-tiled: a tile of up to 12 rows x 4 vectors of
//   accumulators stays in registers while one operand is broadcast and the other streamed.
//   Forward: one task per (segment, head, block of kBlockM query rows). It works on the
//   transposed scores S^T [keys, query rows], so that one vector holds kVL query rows and the
//   softmax's max and sum over keys are plain vertical vector ops (no horizontal reductions,
//   no per-row scalar work). Per block of kBlockN keys:
//     S^T = K Q^T                     its max over keys taken from the registers of each tile
//     P^T = exp2(S^T - m_new)         online softmax: running max m, running sum l, O^T rescaled
//     O^T += V^T P^T
//   and at the end out = O / l, lse = m + log2(l).
//   Backward: a preprocess, then one task per (segment, head, key chunk):
//     1. preprocess   delta_i = rowsum(dO_i * O_i); q, dout, k, v packed to fp32
//     2. per task     for every query block i, for every key block j of the chunk:
//                     recompute P = exp2(Q_i K_j^T - lse_i), dP = dO_i V_j^T,
//                     dS = P * (dP - delta_i); dV_j += P^T dO_i, dK_j += dS^T Q_i,
//                     dQ_i += dS K_j
//   P is computed once per (i, j) pair and dK, dV and dQ all come from it (5 matmuls and one
//   exp per score) rather than in separate dK/dV and dQ passes (7 matmuls, two exps). A task
//   owns its key chunk's dK/dV rows, so there are no atomics and no races. dQ_i sums over key
//   chunks: with one chunk per segment the task owning it writes dQ directly; with several
//   (few segments x heads: the keys are split to make enough tasks) each chunk writes its own
//   fp32 partial and a last pass adds them in chunk order. The split depends on the shapes
//   only, never on the thread count, so results are bit-for-bit the same on every run and at
//   any number of threads.
//
// Layouts
//   q                [total_q, H, D]  fp32 / bf16, any strides
//   k, v             [total_k, H, D]  same dtype, any strides
//   out              [total_q, H, D]  input dtype, contiguous
//   lse              [H, total_q]     fp32, base 2: lse_i = log2(sum_j exp2(s2_ij)), as the
//                                     Triton kernel's (natural-log LSE = lse * ln 2)
//   dq, dk, dv       like q, k, v, contiguous
//   packed fp32 scratch, zero-padded to kPad (= 16) floats: see Problem in the header.
//
// Numerics
//   Scores are taken in base 2, s2_ij = (q_i . k_j) * softmax_scale * log2(e) (q is scaled when
//   packed), so exp2 replaces exp. Every product and sum is fp32; bf16 inputs are widened when
//   packed and the outputs rounded to nearest even once, at the end. P stays fp32 for P V
//   (FlashAttention casts it to the input dtype; keeping it is more accurate). exp2 is Cephes'
//   exp2f polynomial (exp2_nonpositive: within 2e-7 relative, 13 vector ops). A query row
//   whose key segment is empty gets out = 0, lse = -inf and dq = 0; key rows whose query
//   segment is empty get dk = dv = 0.
//
// Instruction sets
//   This file is compiled three times (CMakeLists.txt): DEFAULT (no flags), AVX2 (-mavx2
//   -mfma -mf16c) and AVX512 (-mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma), each with
//   CPU_CAPABILITY naming its namespace, the way ATen builds its own CPU kernels; the launcher
//   picks one at run time from at::get_cpu_capability() (which honours ATEN_CPU_CAPABILITY).
//   at::vec::Vectorized<float> is 16 lanes under AVX512 and 8 otherwise. Nothing here calls
//   out-of-line library code that the compiler could emit with wider instructions (no std::
//   containers, no c10 conversions): all of it lives in the per-ISA namespace.
//
// Work floor at the `cpu` preset (decoder cross-attention: B=4, Lq=1128, Lk=376, H=8, D=16)
//   scores        B*H*Lq*Lk = 13.6 M
//   FLOPs         forward 4*scores*D = 0.87 GFLOP; backward 5 matmuls = 2.17 GFLOP
//   exps          forward 13.6 M; backward 13.6 M (P recomputed once)
//   bytes (fp32)  forward: q 2.3 MB, k 0.8, v 0.8 in; out 2.3, lse 0.1 out = 6.3 MB
//                 backward: dout, q, out 2.3 MB each, k, v 0.8 each, lse 0.1 in;
//                 dq 2.3, dk, dv 0.8 each out = 12.5 MB
//   machine       2 cores, AVX-512; torch.matmul fp32 (2048^3) reaches ~200 GFLOP/s, ~100
//                 per core; all of the above fits in the 105 MB L3.
//   floor         matmul FLOPs at 200 GFLOP/s: forward 4.3 ms, backward 10.9 ms. Bytes at
//                 10 GB/s (DRAM, pessimistic): 0.6 ms and 1.3 ms, so compute-bound (~140
//                 FLOP/byte). The softmax is not free: per 16 scores the forward issues 32 FMAs
//                 for its two products and ~17 vector ops for max, exp2 and sum on the same
//                 vector ports, a realistic forward floor of ~7 ms; the backward's 80 FMAs and
//                 ~20 other ops per 16 scores make ~13.5 ms.
//
// Limitations
//   Non-causal, no dropout, equal head counts for q and k/v, fp32 and bf16 only. Any head dim
//   (a row of more than 4 vectors, D > 64 under AVX-512, runs in several column panels). No
//   double backward.

#include "varlen_attention_cpu.h"

#include <ATen/cpu/vec/vec.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

namespace crossmae::cpu::CPU_CAPABILITY {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kVL = Vec::size();
static_assert(kPad % kVL == 0, "packed padding must be a whole number of vectors");
static_assert(kBlockM % kPad == 0 && kBlockN % kPad == 0, "blocks must be whole numbers of padded vectors");

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// -- element conversions (bf16 is stored as its raw bits) ---------------------------------
struct bf16_t {
  uint16_t bits;
};

inline float to_float(float x) { return x; }
inline float to_float(bf16_t x) {
  const uint32_t u = uint32_t(x.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline void store_as(float x, float* dst) { *dst = x; }
inline void store_as(float x, bf16_t* dst) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) {  // NaN stays NaN
    dst->bits = 0x7fc0;
    return;
  }
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even
  dst->bits = uint16_t(u >> 16);
}

// 2^x for x <= 0, within 2e-7 relative; x = -inf (or anything below -127) gives 0. Cephes'
// exp2f: x = n + f with n = round(x), |f| <= 1/2, 2^f by a degree-6 polynomial, 2^n built in
// the exponent bits. 13 vector ops, against 18 for ATen's exp_u20.
inline Vec exp2_nonpositive(Vec x) {
  using IVec = at::vec::Vectorized<int32_t>;
  x = at::vec::maximum(x, Vec(-127.f));
  const Vec n = x.round();
  const Vec f = x - n;
  Vec c(1.535336188319500e-4f);
  c = at::vec::fmadd(c, f, Vec(1.339887440266574e-3f));
  c = at::vec::fmadd(c, f, Vec(9.618437357674640e-3f));
  c = at::vec::fmadd(c, f, Vec(5.550332471162809e-2f));
  c = at::vec::fmadd(c, f, Vec(2.402264791363012e-1f));
  c = at::vec::fmadd(c, f, Vec(6.931472028550421e-1f));
  c = at::vec::fmadd(c, f, Vec(1.f));
  const IVec biased = at::vec::convert_to_int_of_same_size(n) + IVec(127);
  return c * at::vec::cast<float>(biased << IVec(23));
}

inline void fill(float* x, int64_t n, float value) {
  for (int64_t i = 0; i < n; ++i) x[i] = value;
}

// -- register-tiled matrix products --------------------------------------------------------
// Accumulator registers per tile: AVX-512 has 32 vector registers, AVX2 16.
constexpr int kAccRegs = kVL == 16 ? 24 : 12;
constexpr int kMaxPanel = kVL == 16 ? 4 : 2;

// Rows per tile for NV vectors per row: as many as the accumulator registers allow, up to 12
// (at least 8 independent accumulators keep both FMA pipes busy through their 4-cycle latency).
template <int NV>
constexpr int tile_rows() {
  return kAccRegs / NV < 12 ? kAccRegs / NV : 12;
}

// C[r, 0 : NV*kVL] = (accumulate ? C : 0) + sum_k A[r*a_rs + k*a_ks] * B[k*ldb + 0 : NV*kVL]
// for the R rows of one tile; the R x NV accumulators stay in registers over all of k. With
// col_max, col_max[0 : NV*kVL] also becomes its maximum with the tile's column maxima.
template <int R, int NV>
inline void gemm_tile(const float* a, int64_t a_rs, int64_t a_ks, const float* b, int64_t ldb, float* c,
                      int64_t ldc, int64_t depth, bool accumulate, float* col_max) {
  Vec acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = accumulate ? Vec::loadu(c + r * ldc + v * kVL) : Vec(0.f);
  for (int64_t k = 0; k < depth; ++k) {
    Vec bk[NV];
    for (int v = 0; v < NV; ++v) bk[v] = Vec::loadu(b + k * ldb + v * kVL);
    for (int r = 0; r < R; ++r) {
      const Vec ar(a[r * a_rs + k * a_ks]);
      for (int v = 0; v < NV; ++v) acc[r][v] = at::vec::fmadd(ar, bk[v], acc[r][v]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v].store(c + r * ldc + v * kVL);
  if (col_max != nullptr) {
    for (int v = 0; v < NV; ++v) {
      Vec mx = Vec::loadu(col_max + v * kVL);
      for (int r = 0; r < R; ++r) mx = at::vec::maximum(mx, acc[r][v]);
      mx.store(col_max + v * kVL);
    }
  }
}

// The last rows of a panel, fewer than a whole tile: pick the tile of exactly that height.
template <int R, int NV>
inline void gemm_tail(int64_t rows, const float* a, int64_t a_rs, int64_t a_ks, const float* b, int64_t ldb,
                      float* c, int64_t ldc, int64_t depth, bool accumulate, float* col_max) {
  if constexpr (R > 0) {
    if (rows == R)
      gemm_tile<R, NV>(a, a_rs, a_ks, b, ldb, c, ldc, depth, accumulate, col_max);
    else
      gemm_tail<R - 1, NV>(rows, a, a_rs, a_ks, b, ldb, c, ldc, depth, accumulate, col_max);
  }
}

template <int NV>
void gemm_panel(int64_t rows, const float* a, int64_t a_rs, int64_t a_ks, const float* b, int64_t ldb, float* c,
                int64_t ldc, int64_t depth, bool accumulate, float* col_max) {
  constexpr int R = tile_rows<NV>();
  int64_t r = 0;
  for (; r + R <= rows; r += R)
    gemm_tile<R, NV>(a + r * a_rs, a_rs, a_ks, b, ldb, c + r * ldc, ldc, depth, accumulate, col_max);
  gemm_tail<R - 1, NV>(rows - r, a + r * a_rs, a_rs, a_ks, b, ldb, c + r * ldc, ldc, depth, accumulate, col_max);
}

template <int NV>
inline void gemm_last_panel(int64_t nv, int64_t rows, const float* a, int64_t a_rs, int64_t a_ks, const float* b,
                            int64_t ldb, float* c, int64_t ldc, int64_t depth, bool accumulate, float* col_max) {
  if constexpr (NV > 0) {
    if (nv == NV)
      gemm_panel<NV>(rows, a, a_rs, a_ks, b, ldb, c, ldc, depth, accumulate, col_max);
    else
      gemm_last_panel<NV - 1>(nv, rows, a, a_rs, a_ks, b, ldb, c, ldc, depth, accumulate, col_max);
  }
}

// C[rows, cols] = (accumulate ? C : 0) + A(rows x depth) B[depth, cols], with
// A(r, k) = a[r*a_rs + k*a_ks] (so A may be read transposed), B row-major with leading
// dimension ldb, C row-major with leading dimension ldc; cols is a multiple of kVL. With
// col_max, col_max[0 : cols] also takes the maximum of each column of C.
void gemm(int64_t rows, int64_t cols, int64_t depth, const float* a, int64_t a_rs, int64_t a_ks, const float* b,
          int64_t ldb, float* c, int64_t ldc, bool accumulate, float* col_max = nullptr) {
  const int64_t vecs = cols / kVL;
  int64_t v = 0;
  for (; v + kMaxPanel <= vecs; v += kMaxPanel)
    gemm_panel<kMaxPanel>(rows, a, a_rs, a_ks, b + v * kVL, ldb, c + v * kVL, ldc, depth, accumulate,
                          col_max ? col_max + v * kVL : nullptr);
  gemm_last_panel<kMaxPanel - 1>(vecs - v, rows, a, a_rs, a_ks, b + v * kVL, ldb, c + v * kVL, ldc, depth,
                                 accumulate, col_max ? col_max + v * kVL : nullptr);
}

// -- packing --------------------------------------------------------------------------------
// Row `row` of head h of a [rows, H, D] tensor, widened (and scaled) into dst[0 : dp], zeros after D.
template <typename T>
inline void pack_row(const T* src, const Strides& s, int64_t row, int64_t h, int64_t d, int64_t dp, float scale,
                     float* dst) {
  const T* x = src + row * s.row + h * s.head;
  if (s.dim == 1) {  // the usual layout: a loop the compiler vectorises
    for (int64_t i = 0; i < d; ++i) dst[i] = to_float(x[i]) * scale;
  } else {
    for (int64_t i = 0; i < d; ++i) dst[i] = to_float(x[i * s.dim]) * scale;
  }
  fill(dst + d, dp - d, 0.f);
}

// Rows start..start+len of head h of a [rows, H, D] tensor, times `scale`, into the transposed
// [D, ld] buffer dst, zeros in its columns len..round_up(len, kPad).
template <typename T>
void pack_transposed(const T* src, const Strides& s, int64_t start, int64_t len, int64_t h, int64_t d, float scale,
                     float* dst, int64_t ld) {
  for (int64_t j = 0; j < len; ++j) {
    const T* x = src + (start + j) * s.row + h * s.head;
    for (int64_t i = 0; i < d; ++i) dst[i * ld + j] = to_float(x[i * s.dim]) * scale;
  }
  for (int64_t i = 0; i < d; ++i) fill(dst + i * ld + len, round_up(len, kPad) - len, 0.f);
}

// Rows of segment `seg`, head h, into a row-major [rows, Dp] buffer at row `at`, zero padding included.
template <typename T>
void pack_rows(const T* src, const Strides& s, int64_t start, int64_t len, int64_t h, int64_t d, int64_t dp,
               float* dst, int64_t total, int64_t at) {
  float* r = dst + (h * total + at) * dp;
  for (int64_t j = 0; j < len; ++j) pack_row(src, s, start + j, h, d, dp, 1.f, r + j * dp);
  fill(r + len * dp, (round_up(len, kPad) - len) * dp, 0.f);
}

// Writes rows x D of acc (leading dimension dp), times `scale`, to rows of head h of a
// contiguous [rows, H, D] tensor starting at `row`.
template <typename T>
inline void write_rows(const float* acc, int64_t rows, int64_t dp, float scale, T* dst, int64_t row, int64_t h,
                       int64_t heads, int64_t d) {
  for (int64_t r = 0; r < rows; ++r) {
    T* y = dst + ((row + r) * heads + h) * d;
    for (int64_t i = 0; i < d; ++i) store_as(acc[r * dp + i] * scale, y + i);
  }
}

// Writes rows x D of the transposed accumulator acc [D, ld], times `scale`, to rows of head h
// of a contiguous [rows, H, D] tensor starting at `row`.
template <typename T>
inline void write_transposed(const float* acc, int64_t ld, int64_t rows, float scale, T* dst, int64_t row, int64_t h,
                             int64_t heads, int64_t d) {
  for (int64_t r = 0; r < rows; ++r) {
    T* y = dst + ((row + r) * heads + h) * d;
    for (int64_t i = 0; i < d; ++i) store_as(acc[i * ld + r] * scale, y + i);
  }
}

template <typename T>
void zero_rows(T* dst, int64_t row, int64_t rows, int64_t heads, int64_t d) {
  std::memset(static_cast<void*>(dst + row * heads * d), 0, sizeof(T) * rows * heads * d);
}

// -- forward --------------------------------------------------------------------------------
// The forward works on transposed blocks, S^T [keys, query rows], so that a vector holds kVL
// query rows: the softmax's max and sum over keys are then vertical (no horizontal reductions)
// and its statistics m, l for kVL rows sit in one vector.

// Online softmax of one block, for the query rows of one vector (column g of the block):
// st[j, g] becomes P^T = exp2(S^T - m_new) for the n keys j, where m_new = max(m, block_max);
// m and l are updated and the output accumulator's column g (d rows of ot) is rescaled by
// exp2(m_old - m_new).
inline void online_softmax_block(float* st, int64_t n, int64_t g, const float* block_max, float* m, float* l,
                                 float* ot, int64_t d) {
  const Vec m_old = Vec::loadu(m + g);
  const Vec m_new = at::vec::maximum(m_old, Vec::loadu(block_max + g));
  const Vec alpha = exp2_nonpositive(m_old - m_new);
  Vec sum0(0.f), sum1(0.f);
  int64_t j = 0;
  for (; j + 2 <= n; j += 2) {
    const Vec p0 = exp2_nonpositive(Vec::loadu(st + j * kBlockM + g) - m_new);
    const Vec p1 = exp2_nonpositive(Vec::loadu(st + (j + 1) * kBlockM + g) - m_new);
    p0.store(st + j * kBlockM + g);
    p1.store(st + (j + 1) * kBlockM + g);
    sum0 = sum0 + p0;
    sum1 = sum1 + p1;
  }
  if (j < n) {
    const Vec p0 = exp2_nonpositive(Vec::loadu(st + j * kBlockM + g) - m_new);
    p0.store(st + j * kBlockM + g);
    sum0 = sum0 + p0;
  }
  (Vec::loadu(l + g) * alpha + (sum0 + sum1)).store(l + g);
  m_new.store(m + g);
  for (int64_t i = 0; i < d; ++i) (Vec::loadu(ot + i * kBlockM + g) * alpha).store(ot + i * kBlockM + g);
}

template <typename T>
void fwd_task(const FwdArgs& a, const Task& t, float* scratch) {
  const Problem& p = a.p;
  const Segment& seg = p.segments[t.b];
  const int64_t h = t.h, d = p.head_dim, dp = p.head_dim_padded, rows = t.len, cols = round_up(rows, kPad);
  float* st = scratch;                // [kBlockN, kBlockM] S^T, then P^T
  float* ot = st + kBlockN * kBlockM;  // [dp, kBlockM] O^T accumulator
  float* m = ot + dp * kBlockM;       // [kBlockM] running max
  float* l = m + kBlockM;             // [kBlockM] running sum
  float* block_max = l + kBlockM;     // [kBlockM] this key block's max
  float* qt = block_max + kBlockM;    // [d, kBlockM] this block's q^T * softmax_scale * log2(e)

  pack_transposed(static_cast<const T*>(a.q), a.q_stride, seg.q_start + t.start, rows, h, d,
                  p.softmax_scale * kLog2e, qt, kBlockM);
  const float* kp = a.k_packed + (h * p.k_cols + seg.k_packed) * dp;
  const float* vp = a.v_packed + (h * p.k_cols + seg.k_packed) * dp;
  fill(ot, d * kBlockM, 0.f);
  fill(m, kBlockM, kNegInf);
  fill(l, kBlockM, 0.f);

  for (int64_t kb = 0; kb < seg.k_len; kb += kBlockN) {
    const int64_t n = std::min(kBlockN, seg.k_len - kb);
    // -- S^T = K Q^T, and its max over keys --
    fill(block_max, cols, kNegInf);
    gemm(n, cols, d, kp + kb * dp, dp, 1, qt, kBlockM, st, kBlockM, false, block_max);
    // -- P^T = exp2(S^T - m), rescale O^T --
    for (int64_t g = 0; g < cols; g += kVL) online_softmax_block(st, n, g, block_max, m, l, ot, d);
    // -- O^T += V^T P^T --
    gemm(d, cols, n, vp + kb * dp, 1, dp, st, kBlockM, ot, kBlockM, true);
  }

  // -- out = O / l, lse = m + log2 l --
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t row = seg.q_start + t.start + r;
    const float inv = 1.f / l[r];
    write_transposed(ot + r, kBlockM, 1, inv, static_cast<T*>(a.out), row, h, p.heads, d);
    a.lse[h * p.total_q + row] = m[r] + std::log2(l[r]);
  }
}

template <typename T>
void fwd(const FwdArgs& a) {
  const Problem& p = a.p;
  const T* k = static_cast<const T*>(a.k);
  const T* v = static_cast<const T*>(a.v);
  T* out = static_cast<T*>(a.out);
  const int64_t heads = p.heads, d = p.head_dim, dp = p.head_dim_padded;

#pragma omp parallel num_threads(p.num_threads)
  {
    float* scratch = p.scratch + omp_get_thread_num() * p.scratch_per_thread;
    // -- pack k and v; empty key segments get out = 0, lse = -inf --
#pragma omp for schedule(static)
    for (int64_t i = 0; i < p.batch * heads; ++i) {
      const Segment& seg = p.segments[i / heads];
      const int64_t h = i % heads;
      pack_rows(k, a.k_stride, seg.k_start, seg.k_len, h, d, dp, a.k_packed, p.k_cols, seg.k_packed);
      pack_rows(v, a.v_stride, seg.k_start, seg.k_len, h, d, dp, a.v_packed, p.k_cols, seg.k_packed);
      if (seg.k_len == 0 && seg.q_len > 0) {
        fill(a.lse + h * p.total_q + seg.q_start, seg.q_len, kNegInf);
        if (h == 0) zero_rows(out, seg.q_start, seg.q_len, heads, d);
      }
    }
    // -- attention, one query block per task --
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < p.num_tasks; ++i) fwd_task<T>(a, p.tasks[i], scratch);
  }
}

// -- backward -------------------------------------------------------------------------------
template <typename T>
void bwd_task(const BwdArgs& a, const Task& t, float* scratch) {
  const Problem& p = a.p;
  const Segment& seg = p.segments[t.b];
  const int64_t h = t.h, d = p.head_dim, dp = p.head_dim_padded;
  const int64_t chunk_pad = round_up(t.len, kBlockN);
  float* prob = scratch;                     // [kBlockM, kBlockN] P
  float* ds = prob + kBlockM * kBlockN;      // [kBlockM, kBlockN] dP, then dS
  float* dq = ds + kBlockM * kBlockN;        // [kBlockM, dp]
  float* dkt = dq + kBlockM * dp;            // [d, chunk_pad] dK^T
  float* dvt = dkt + d * chunk_pad;          // [d, chunk_pad] dV^T
  fill(dkt, d * chunk_pad, 0.f);
  fill(dvt, d * chunk_pad, 0.f);

  const int64_t col0 = seg.k_packed + t.start;
  const float* kt = a.kt_packed + h * d * p.k_cols + col0;
  const float* vt = a.vt_packed + h * d * p.k_cols + col0;
  const float* kp = a.k_packed + (h * p.k_cols + col0) * dp;

  for (int64_t qb = 0; qb < seg.q_len; qb += kBlockM) {
    const int64_t rows = std::min(kBlockM, seg.q_len - qb), row0 = seg.q_start + qb;
    const float* qs = a.q_packed + (h * p.total_q + row0) * dp;
    const float* dout = a.do_packed + (h * p.total_q + row0) * dp;
    const float* lse = a.lse + h * p.total_q + row0;
    const float* delta = a.delta + h * p.total_q + row0;
    fill(dq, rows * dp, 0.f);

    for (int64_t kb = 0; kb < t.len; kb += kBlockN) {
      const int64_t n = std::min(kBlockN, t.len - kb), npad = round_up(n, kPad);
      // -- P = exp2(Q K^T - lse) --
      gemm(rows, npad, d, qs, dp, 1, kt + kb, p.k_cols, prob, kBlockN, false);
      for (int64_t r = 0; r < rows; ++r) {
        float* pr = prob + r * kBlockN;
        const Vec vl(lse[r]);
        for (int64_t j = 0; j < npad; j += kVL) exp2_nonpositive(Vec::loadu(pr + j) - vl).store(pr + j);
        fill(pr + n, npad - n, 0.f);
      }
      // -- dS = P * (dO V^T - delta) --
      gemm(rows, npad, d, dout, dp, 1, vt + kb, p.k_cols, ds, kBlockN, false);
      for (int64_t r = 0; r < rows; ++r) {
        float* pr = prob + r * kBlockN;
        float* sr = ds + r * kBlockN;
        const Vec vd(delta[r]);
        for (int64_t j = 0; j < npad; j += kVL) (Vec::loadu(pr + j) * (Vec::loadu(sr + j) - vd)).store(sr + j);
      }
      // -- dV^T += dO^T P, dK^T += Q^T dS (vectorised over keys), dQ += dS K --
      gemm(d, npad, rows, dout, 1, dp, prob, kBlockN, dvt + kb, chunk_pad, true);
      gemm(d, npad, rows, qs, 1, dp, ds, kBlockN, dkt + kb, chunk_pad, true);
      gemm(rows, dp, n, ds, kBlockN, 1, kp + kb * dp, dp, dq, dp, true);
    }

    if (a.key_chunks == 1) {
      write_rows(dq, rows, dp, p.softmax_scale, static_cast<T*>(a.dq), row0, h, p.heads, d);
    } else {
      float* part = a.dq_partial + ((t.chunk * p.heads + h) * p.total_q + row0) * dp;
      std::memcpy(part, dq, sizeof(float) * rows * dp);
    }
  }
  // q was packed times softmax_scale * log2(e), so dK = scale * dS^T Q = ln(2) * dS^T Q_packed
  const int64_t key0 = seg.k_start + t.start;
  write_transposed(dkt, chunk_pad, t.len, kLn2, static_cast<T*>(a.dk), key0, h, p.heads, d);
  write_transposed(dvt, chunk_pad, t.len, 1.f, static_cast<T*>(a.dv), key0, h, p.heads, d);
}

template <typename T>
void bwd(const BwdArgs& a) {
  const Problem& p = a.p;
  const T* dout = static_cast<const T*>(a.dout);
  const T* q = static_cast<const T*>(a.q);
  const T* k = static_cast<const T*>(a.k);
  const T* v = static_cast<const T*>(a.v);
  const T* out = static_cast<const T*>(a.out);
  T* dq = static_cast<T*>(a.dq);
  T* dk = static_cast<T*>(a.dk);
  T* dv = static_cast<T*>(a.dv);
  const int64_t heads = p.heads, batch = p.batch, d = p.head_dim, dp = p.head_dim_padded;

#pragma omp parallel num_threads(p.num_threads)
  {
    float* scratch = p.scratch + omp_get_thread_num() * p.scratch_per_thread;
    // -- preprocess: pack q (scaled) and dout, delta = rowsum(dout * out) --
#pragma omp for schedule(static) nowait
    for (int64_t i = 0; i < p.total_q * heads; ++i) {
      const int64_t h = i / p.total_q, row = i % p.total_q;
      pack_row(q, a.q_stride, row, h, d, dp, p.softmax_scale * kLog2e, a.q_packed + i * dp);
      float* g = a.do_packed + i * dp;
      pack_row(dout, a.dout_stride, row, h, d, dp, 1.f, g);
      const T* o = out + row * a.out_stride.row + h * a.out_stride.head;
      // the same fused multiply-adds in the same order as dP = dO V^T in gemm_tile: where a row's
      // softmax is one-hot (out equals one value row bit for bit), dP - delta is then exactly 0,
      // as the true dS is, rather than a rounding residue that dQ and dK would scale by |K|, |Q|
      Vec acc(0.f);
      for (int64_t j = 0; j < d; ++j)
        acc = at::vec::fmadd(Vec(g[j]), Vec(to_float(o[j * a.out_stride.dim])), acc);
      float lanes[kVL];
      acc.store(lanes);
      a.delta[i] = lanes[0];
    }
    // -- pack k (both ways) and v transposed; zero the gradients nothing else writes --
#pragma omp for schedule(static)
    for (int64_t i = 0; i < batch * heads; ++i) {
      const Segment& seg = p.segments[i / heads];
      const int64_t h = i % heads;
      const int64_t col = h * d * p.k_cols + seg.k_packed;
      pack_transposed(k, a.k_stride, seg.k_start, seg.k_len, h, d, 1.f, a.kt_packed + col, p.k_cols);
      pack_transposed(v, a.v_stride, seg.k_start, seg.k_len, h, d, 1.f, a.vt_packed + col, p.k_cols);
      pack_rows(k, a.k_stride, seg.k_start, seg.k_len, h, d, dp, a.k_packed, p.k_cols, seg.k_packed);
      if (h == 0 && seg.k_len == 0) zero_rows(dq, seg.q_start, seg.q_len, heads, d);
      if (h == 0 && seg.q_len == 0) {
        zero_rows(dk, seg.k_start, seg.k_len, heads, d);
        zero_rows(dv, seg.k_start, seg.k_len, heads, d);
      }
    }
    // -- dK, dV and dQ, one key chunk per task --
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < p.num_tasks; ++i) bwd_task<T>(a, p.tasks[i], scratch);
    // -- dQ = scale * (sum of the chunks' partials, in chunk order) --
    if (a.key_chunks > 1) {
#pragma omp for schedule(static)
      for (int64_t i = 0; i < batch * heads; ++i) {
        const Segment& seg = p.segments[i / heads];
        const int64_t h = i % heads;
        if (seg.k_len == 0 || seg.q_len == 0) continue;
        for (int64_t r = 0; r < seg.q_len; ++r) {
          const int64_t row = seg.q_start + r;
          float* acc = scratch;
          std::memcpy(acc, a.dq_partial + (h * p.total_q + row) * dp, sizeof(float) * dp);
          for (int64_t c = 1; c < seg.k_chunks; ++c) {
            const float* part = a.dq_partial + ((c * heads + h) * p.total_q + row) * dp;
            for (int64_t j = 0; j < dp; ++j) acc[j] += part[j];
          }
          write_rows(acc, 1, dp, p.softmax_scale, dq, row, h, heads, d);
        }
      }
    }
  }
}

}  // namespace

void varlen_attn_fwd_kernel(const FwdArgs& args) {
  if (args.p.dtype == DType::BFloat16)
    fwd<bf16_t>(args);
  else
    fwd<float>(args);
}

void varlen_attn_bwd_kernel(const BwdArgs& args) {
  if (args.p.dtype == DType::BFloat16)
    bwd<bf16_t>(args);
  else
    bwd<float>(args);
}

}  // namespace crossmae::cpu::CPU_CAPABILITY
