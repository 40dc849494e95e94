// crossmae._C: the one TORCH_LIBRARY block of crossmae's compiled ops, their CPU kernels, and
// the Python module whose import loads them (torch.ops.crossmae.*). The ops' fake (meta)
// implementations and autograd are registered from Python, in crossmae/ops/cpu_attention.py.
#include "ops.h"

#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(crossmae, m) {
  m.set_python_module("crossmae.ops.cpu_attention");
  m.def(
      "varlen_attn_cpu_fwd(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
      "int max_seqlen_q, int max_seqlen_k, float softmax_scale) -> (Tensor out, Tensor lse)");
  m.def(
      "varlen_attn_cpu_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, float softmax_scale) "
      "-> (Tensor dq, Tensor dk, Tensor dv)");
}

TORCH_LIBRARY_IMPL(crossmae, CPU, m) {
  m.impl("varlen_attn_cpu_fwd", &crossmae::varlen_attn_cpu_fwd);
  m.impl("varlen_attn_cpu_bwd", &crossmae::varlen_attn_cpu_bwd);
}

PyMODINIT_FUNC PyInit__C() {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT,
                               "_C",
                               "crossmae's compiled ops; importing this module registers torch.ops.crossmae.*",
                               -1,
                               nullptr,
                               nullptr,
                               nullptr,
                               nullptr,
                               nullptr};
  PyObject* m = PyModule_Create(&module);
  if (m != nullptr && PyModule_AddStringConstant(m, "cpu_isa", crossmae::cpu::selected_isa()) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
