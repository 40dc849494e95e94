// The compiled ops of crossmae._C, as registered in torch_bindings.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace crossmae {

// Varlen attention forward on CPU tensors: out [total_q, H, D] (q's dtype) and the base-2
// log-sum-exp lse [H, total_q] (fp32). Contract and layouts: cpu/varlen_attention_cpu_kernel.cpp.
std::tuple<at::Tensor, at::Tensor> varlen_attn_cpu_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                       const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                                                       int64_t max_seqlen_q, int64_t max_seqlen_k,
                                                       double softmax_scale);

// Its backward: dq, dk, dv (contiguous, the inputs' dtype) from dout and the forward's out and lse.
std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_attn_cpu_bwd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, double softmax_scale);

namespace cpu {
// The instruction set the CPU kernels run with here: "avx512", "avx2" or "default".
const char* selected_isa();
}  // namespace cpu

}  // namespace crossmae
