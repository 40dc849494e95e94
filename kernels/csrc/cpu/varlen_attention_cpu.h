// Shared between the CPU varlen attention launcher (varlen_attention_cpu.cpp, plain compiler
// flags) and its kernels (varlen_attention_cpu_kernel.cpp, compiled once per instruction set):
// the block sizes, the plain-data description of one call, and the per-ISA entry points.
//
// Everything here is plain data so that the kernels never touch an at::Tensor, a std::
// container or any other inline library code compiled with wider instruction sets than the
// machine may have (see the kernel file's header on instruction-set dispatch).
#pragma once

#include <cstdint>

namespace crossmae::cpu {

// Query rows per block and key columns per block. Head dims and key segments are padded to
// kPad floats in the packed buffers (the widest vector, AVX-512's 16 floats).
constexpr int64_t kBlockM = 64;
constexpr int64_t kBlockN = 64;
constexpr int64_t kPad = 16;

constexpr int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

enum class DType : int32_t { Float32, BFloat16 };

// One sample: where its rows are in q (and out) and in k, v, and where its keys start in the
// packed key buffers (a multiple of kPad; the padding after them is zero).
struct Segment {
  int64_t q_start, q_len;
  int64_t k_start, k_len;
  int64_t k_packed;
  int64_t k_chunks;  // backward: how many key chunks (tasks per head) split this segment's keys
};

// One unit of parallel work: segment b, head h, and a range of rows relative to the segment's
// start: query rows for the forward pass, key rows (key chunk number `chunk`) for the backward.
struct Task {
  int32_t b, h, chunk;
  int64_t start, len;
};

// Strides, in elements, of a [rows, H, D] tensor.
struct Strides {
  int64_t row, head, dim;
};

// The problem and the packed fp32 scratch that both passes use. Packed layouts, with
// Dp = round_up(D, kPad) and zeros in every padding row and column:
//   forward   k_packed   [H, k_cols, Dp]    k, segment b at row k_packed
//             v_packed   [H, k_cols, Dp]    v
//   backward  q_packed   [H, total_q, Dp]   q * softmax_scale * log2(e)
//             do_packed  [H, total_q, Dp]   dout
//             kt_packed  [H, D, k_cols]     k^T, segment b at column k_packed
//             vt_packed  [H, D, k_cols]     v^T
//             k_packed   [H, k_cols, Dp]    k
struct Problem {
  int64_t batch = 0, heads = 0, head_dim = 0, head_dim_padded = 0;
  int64_t total_q = 0, total_k = 0, k_cols = 0;
  float softmax_scale = 1.f;
  DType dtype = DType::Float32;
  const Segment* segments = nullptr;
  const Task* tasks = nullptr;  // sorted by decreasing work
  int64_t num_tasks = 0;
  int num_threads = 1;
  float* scratch = nullptr;  // num_threads * scratch_per_thread floats, 64-byte aligned per thread
  int64_t scratch_per_thread = 0;
};

struct FwdArgs {
  Problem p;
  const void *q, *k, *v;
  Strides q_stride, k_stride, v_stride;
  void* out;   // [total_q, H, D] contiguous, input dtype
  float* lse;  // [H, total_q] base-2 log-sum-exp of the scaled scores
  float *k_packed, *v_packed;
};

struct BwdArgs {
  Problem p;
  const void *dout, *q, *k, *v, *out;
  Strides dout_stride, q_stride, k_stride, v_stride, out_stride;
  const float* lse;  // [H, total_q] base 2, from the forward
  void *dq, *dk, *dv;  // contiguous, input dtype
  float *q_packed, *do_packed, *kt_packed, *k_packed, *vt_packed;
  float* delta;       // [H, total_q]: rowsum(dout * out)
  float* dq_partial;  // [key_chunks, H, total_q, Dp] when key_chunks > 1, else unused
  int64_t key_chunks = 1;
};

// Scratch floats per thread for a head dim padded to dp and key chunks of at most chunk_len.
constexpr int64_t fwd_scratch_floats(int64_t dp) { return kBlockN * kBlockM + 2 * dp * kBlockM + 3 * kBlockM; }
constexpr int64_t bwd_scratch_floats(int64_t dp, int64_t chunk_len) {
  return 2 * kBlockM * kBlockN + kBlockM * dp + 2 * round_up(chunk_len, kBlockN) * dp;
}

#define CROSSMAE_DECLARE_CPU_KERNELS(ISA)      \
  namespace ISA {                              \
  void varlen_attn_fwd_kernel(const FwdArgs&); \
  void varlen_attn_bwd_kernel(const BwdArgs&); \
  }

CROSSMAE_DECLARE_CPU_KERNELS(DEFAULT)
CROSSMAE_DECLARE_CPU_KERNELS(AVX2)
CROSSMAE_DECLARE_CPU_KERNELS(AVX512)

}  // namespace crossmae::cpu
