// Launcher of the CPU varlen attention kernels: checks the arguments (each error names its
// argument and raises ValueError in Python), reads cu_seqlens, plans the packed layout and
// the tasks, allocates outputs and scratch, and calls the kernel built for this CPU's
// instruction set. The kernels themselves are in varlen_attention_cpu_kernel.cpp.
#include "varlen_attention_cpu.h"

#include "../ops.h"

#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <string>
#include <vector>

namespace crossmae::cpu {
namespace {

// Backward: when fewer than this many (segment, head) pairs have work, the keys are split into
// chunks to make more tasks (at most kMaxKeyChunks per segment, each adding an fp32 partial dQ).
constexpr int64_t kMinBwdTasks = 32;
constexpr int64_t kMaxKeyChunks = 4;

struct KernelSet {
  const char* isa;
  void (*fwd)(const FwdArgs&);
  void (*bwd)(const BwdArgs&);
};

KernelSet pick_kernels() {
  const std::string cap = at::get_cpu_capability();
#ifdef CROSSMAE_HAVE_AVX512
  if (cap == "AVX512") return {"avx512", AVX512::varlen_attn_fwd_kernel, AVX512::varlen_attn_bwd_kernel};
#endif
#ifdef CROSSMAE_HAVE_AVX2
  if (cap == "AVX2" || cap == "AVX512") return {"avx2", AVX2::varlen_attn_fwd_kernel, AVX2::varlen_attn_bwd_kernel};
#endif
  return {"default", DEFAULT::varlen_attn_fwd_kernel, DEFAULT::varlen_attn_bwd_kernel};
}

const KernelSet& kernels() {
  static const KernelSet chosen = pick_kernels();
  return chosen;
}

// -- argument checks ----------------------------------------------------------------------------
void check_rows_tensor(const at::Tensor& t, const char* name, const at::Tensor& like, const char* like_name) {
  TORCH_CHECK_VALUE(t.dim() == 3, name, " must have shape [total, H, D], got ", t.sizes());
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK_VALUE(t.scalar_type() == like.scalar_type(), name, " must have ", like_name, "'s dtype ",
                    like.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.size(1) == like.size(1), name, " must have ", like_name, "'s number of heads H=", like.size(1),
                    ", got ", t.size(1));
  TORCH_CHECK_VALUE(t.size(2) == like.size(2), name, " must have ", like_name, "'s head dim D=", like.size(2),
                    ", got ", t.size(2));
}

void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK_VALUE(q.dim() == 3, "q must have shape [total, H, D], got ", q.sizes());
  TORCH_CHECK_VALUE(q.device().is_cpu(), "q must be a CPU tensor, got device ", q.device());
  TORCH_CHECK_VALUE(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16,
                    "q must be float32 or bfloat16, got ", q.scalar_type());
  TORCH_CHECK_VALUE(q.size(2) > 0, "q must have a head dim D > 0, got ", q.size(2));
  check_rows_tensor(k, "k", q, "q");
  check_rows_tensor(v, "v", q, "q");
  TORCH_CHECK_VALUE(v.size(0) == k.size(0), "v must have as many rows as k (", k.size(0), "), got ", v.size(0));
}

// The segment lengths in cu (checked against the rows and max_seqlen), as [B] pairs of (start, length).
std::vector<std::pair<int64_t, int64_t>> read_cu_seqlens(const at::Tensor& cu, const char* name, int64_t rows,
                                                         const char* rows_name, int64_t max_seqlen,
                                                         const char* max_name) {
  TORCH_CHECK_VALUE(cu.scalar_type() == at::kInt, name, " must be int32, got ", cu.scalar_type());
  TORCH_CHECK_VALUE(cu.dim() == 1 && cu.numel() >= 1, name, " must have shape [B + 1], got ", cu.sizes());
  TORCH_CHECK_VALUE(cu.device().is_cpu(), name, " must be a CPU tensor, got device ", cu.device());
  TORCH_CHECK_VALUE(max_seqlen >= 0, max_name, " must be non-negative, got ", max_seqlen);
  const int32_t* c = cu.data_ptr<int32_t>();
  const int64_t stride = cu.stride(0), batch = cu.numel() - 1;
  TORCH_CHECK_VALUE(c[0] == 0, name, "[0] must be 0, got ", c[0]);
  std::vector<std::pair<int64_t, int64_t>> segments(batch);
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t start = c[b * stride], len = int64_t(c[(b + 1) * stride]) - start;
    TORCH_CHECK_VALUE(len >= 0, name, " must be non-decreasing, but a segment has length ", len);
    segments[b] = {start, len};
  }
  TORCH_CHECK_VALUE(c[batch * stride] == rows, name, "[-1] must equal ", rows_name, " = ", rows, ", got ",
                    c[batch * stride]);
  for (const auto& [start, len] : segments)
    TORCH_CHECK_VALUE(len <= max_seqlen, max_name, "=", max_seqlen, " is smaller than the longest segment (", len,
                      ")");
  return segments;
}

// -- planning ---------------------------------------------------------------------------------
struct Plan {
  std::vector<Segment> segments;
  std::vector<Task> tasks;
  int64_t k_cols = 0;
  int64_t key_chunks = 1;      // backward: the most chunks any segment's keys are split into
  int64_t max_chunk_len = 0;   // backward: the longest key chunk
};

Plan plan_segments(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cu_seqlens_q,
                   const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k) {
  TORCH_CHECK_VALUE(cu_seqlens_k.numel() == cu_seqlens_q.numel(),
                    "cu_seqlens_k must have the length of cu_seqlens_q (B + 1 = ", cu_seqlens_q.numel(), "), got ",
                    cu_seqlens_k.numel());
  const auto sq = read_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", q.size(0), "q.shape[0] (total_q)", max_seqlen_q,
                                  "max_seqlen_q");
  const auto sk = read_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", k.size(0), "k.shape[0] (total_k)", max_seqlen_k,
                                  "max_seqlen_k");
  Plan plan;
  for (size_t b = 0; b < sq.size(); ++b) {
    plan.segments.push_back({sq[b].first, sq[b].second, sk[b].first, sk[b].second, plan.k_cols, 0});
    plan.k_cols += round_up(sk[b].second, kPad);
  }
  return plan;
}

// Sorts tasks by decreasing work (rows x rows of the other side), so the dynamic schedule ends evenly.
void sort_tasks(Plan& plan, bool forward) {
  auto work = [&](const Task& t) {
    const Segment& s = plan.segments[t.b];
    return t.len * (forward ? s.k_len : s.q_len);
  };
  std::stable_sort(plan.tasks.begin(), plan.tasks.end(),
                   [&](const Task& x, const Task& y) { return work(x) > work(y); });
}

void plan_fwd_tasks(Plan& plan, int64_t heads) {
  for (size_t b = 0; b < plan.segments.size(); ++b) {
    const Segment& s = plan.segments[b];
    if (s.k_len == 0) continue;
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t start = 0; start < s.q_len; start += kBlockM)
        plan.tasks.push_back({int32_t(b), int32_t(h), 0, start, std::min(kBlockM, s.q_len - start)});
  }
  sort_tasks(plan, true);
}

void plan_bwd_tasks(Plan& plan, int64_t heads) {
  int64_t busy = 0;
  for (const Segment& s : plan.segments) busy += (s.q_len > 0 && s.k_len > 0) ? heads : 0;
  const int64_t wanted = busy == 0 ? 1 : std::clamp((kMinBwdTasks + busy - 1) / busy, int64_t(1), kMaxKeyChunks);
  for (size_t b = 0; b < plan.segments.size(); ++b) {
    Segment& s = plan.segments[b];
    if (s.q_len == 0 || s.k_len == 0) continue;
    const int64_t blocks = (s.k_len + kBlockN - 1) / kBlockN;
    const int64_t chunk_len = (blocks + std::min(wanted, blocks) - 1) / std::min(wanted, blocks) * kBlockN;
    s.k_chunks = (s.k_len + chunk_len - 1) / chunk_len;
    plan.key_chunks = std::max(plan.key_chunks, s.k_chunks);
    plan.max_chunk_len = std::max(plan.max_chunk_len, std::min(chunk_len, s.k_len));
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t c = 0; c < s.k_chunks; ++c)
        plan.tasks.push_back(
            {int32_t(b), int32_t(h), int32_t(c), c * chunk_len, std::min(chunk_len, s.k_len - c * chunk_len)});
  }
  sort_tasks(plan, false);
}

Problem make_problem(const at::Tensor& q, const at::Tensor& k, const Plan& plan, double softmax_scale) {
  Problem p;
  p.batch = int64_t(plan.segments.size());
  p.heads = q.size(1);
  p.head_dim = q.size(2);
  p.head_dim_padded = round_up(p.head_dim, kPad);
  p.total_q = q.size(0);
  p.total_k = k.size(0);
  p.k_cols = plan.k_cols;
  p.softmax_scale = float(softmax_scale);
  p.dtype = q.scalar_type() == at::kBFloat16 ? DType::BFloat16 : DType::Float32;
  p.segments = plan.segments.data();
  p.tasks = plan.tasks.data();
  p.num_tasks = int64_t(plan.tasks.size());
  p.num_threads = std::max(1, at::get_num_threads());
  return p;
}

at::Tensor float_buffer(int64_t n) { return at::empty({std::max<int64_t>(n, 1)}, at::TensorOptions(at::kFloat)); }

// Per-thread scratch, each thread's part a whole number of 64-byte lines.
at::Tensor thread_scratch(Problem& p, int64_t floats) {
  p.scratch_per_thread = round_up(floats, 16);
  at::Tensor t = float_buffer(p.num_threads * p.scratch_per_thread);
  p.scratch = t.data_ptr<float>();
  return t;
}

Strides strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

}  // namespace

const char* selected_isa() { return kernels().isa; }

}  // namespace crossmae::cpu

namespace crossmae {

std::tuple<at::Tensor, at::Tensor> varlen_attn_cpu_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                       const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                                                       int64_t max_seqlen_q, int64_t max_seqlen_k,
                                                       double softmax_scale) {
  using namespace cpu;
  check_qkv(q, k, v);
  Plan plan = plan_segments(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k);
  plan_fwd_tasks(plan, q.size(1));
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({q.size(1), q.size(0)}, q.options().dtype(at::kFloat));
  if (q.numel() == 0) return {out, lse};

  FwdArgs a;
  a.p = make_problem(q, k, plan, softmax_scale);
  const int64_t heads = a.p.heads, dp = a.p.head_dim_padded;
  at::Tensor k_packed = float_buffer(heads * a.p.k_cols * dp);
  at::Tensor v_packed = float_buffer(heads * a.p.k_cols * dp);
  at::Tensor scratch = thread_scratch(a.p, fwd_scratch_floats(dp));
  a.q = q.data_ptr();
  a.k = k.data_ptr();
  a.v = v.data_ptr();
  a.q_stride = strides_of(q);
  a.k_stride = strides_of(k);
  a.v_stride = strides_of(v);
  a.out = out.data_ptr();
  a.lse = lse.data_ptr<float>();
  a.k_packed = k_packed.data_ptr<float>();
  a.v_packed = v_packed.data_ptr<float>();
  kernels().fwd(a);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_attn_cpu_bwd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, double softmax_scale) {
  using namespace cpu;
  check_qkv(q, k, v);
  for (const auto& [t, name] : {std::pair{&dout, "dout"}, std::pair{&out, "out"}}) {
    check_rows_tensor(*t, name, q, "q");
    TORCH_CHECK_VALUE(t->size(0) == q.size(0), name, " must have as many rows as q (", q.size(0), "), got ",
                      t->size(0));
  }
  TORCH_CHECK_VALUE(lse.scalar_type() == at::kFloat, "lse must be float32, got ", lse.scalar_type());
  TORCH_CHECK_VALUE(lse.device().is_cpu(), "lse must be a CPU tensor, got device ", lse.device());
  TORCH_CHECK_VALUE(lse.dim() == 2 && lse.size(0) == q.size(1) && lse.size(1) == q.size(0),
                    "lse must have shape [H, total_q] = [", q.size(1), ", ", q.size(0), "], got ", lse.sizes());
  Plan plan = plan_segments(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k);
  plan_bwd_tasks(plan, q.size(1));
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  if (q.numel() == 0 && k.numel() == 0) return {dq, dk, dv};

  BwdArgs a;
  a.p = make_problem(q, k, plan, softmax_scale);
  const int64_t heads = a.p.heads, dp = a.p.head_dim_padded, total_q = a.p.total_q;
  const at::Tensor lse_c = lse.contiguous();
  at::Tensor q_packed = float_buffer(heads * total_q * dp);
  at::Tensor do_packed = float_buffer(heads * total_q * dp);
  at::Tensor delta = float_buffer(heads * total_q);
  at::Tensor kt_packed = float_buffer(heads * a.p.head_dim * a.p.k_cols);
  at::Tensor vt_packed = float_buffer(heads * a.p.head_dim * a.p.k_cols);
  at::Tensor k_packed = float_buffer(heads * a.p.k_cols * dp);
  at::Tensor dq_partial = float_buffer(plan.key_chunks > 1 ? plan.key_chunks * heads * total_q * dp : 0);
  at::Tensor scratch = thread_scratch(a.p, bwd_scratch_floats(dp, plan.max_chunk_len));
  a.dout = dout.data_ptr();
  a.q = q.data_ptr();
  a.k = k.data_ptr();
  a.v = v.data_ptr();
  a.out = out.data_ptr();
  a.dout_stride = strides_of(dout);
  a.q_stride = strides_of(q);
  a.k_stride = strides_of(k);
  a.v_stride = strides_of(v);
  a.out_stride = strides_of(out);
  a.lse = lse_c.data_ptr<float>();
  a.dq = dq.data_ptr();
  a.dk = dk.data_ptr();
  a.dv = dv.data_ptr();
  a.q_packed = q_packed.data_ptr<float>();
  a.do_packed = do_packed.data_ptr<float>();
  a.kt_packed = kt_packed.data_ptr<float>();
  a.k_packed = k_packed.data_ptr<float>();
  a.vt_packed = vt_packed.data_ptr<float>();
  a.delta = delta.data_ptr<float>();
  a.dq_partial = dq_partial.data_ptr<float>();
  a.key_chunks = plan.key_chunks;
  kernels().bwd(a);
  return {dq, dk, dv};
}

}  // namespace crossmae
