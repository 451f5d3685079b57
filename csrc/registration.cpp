// One registry: schemas of every dynenc:: op and their CPU (C++) kernels.
// CUDA (Triton), fake and autograd implementations are registered from dynenc/ops.py.
#include <Python.h>
#include <torch/library.h>

#include "ops.h"

extern "C" {
// `import dynenc._C` loads this library, whose static initialisers register the ops.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(dynenc, m) {
  m.def("gated_residual_scatter(Tensor x, Tensor y, Tensor? gate, Tensor? index) -> Tensor");
  m.def("gated_residual_scatter_backward(Tensor grad_out, Tensor x, Tensor y, Tensor? gate, Tensor? index)"
        " -> (Tensor, Tensor, Tensor)");
  m.def("gather_rows(Tensor x, Tensor index) -> Tensor");
  m.def("scatter_rows(Tensor y, Tensor index, SymInt num_rows) -> Tensor");
  m.def("varlen_dwconv1d(Tensor x, Tensor cu_seqlens, Tensor weight, Tensor? bias) -> Tensor");
  m.def("varlen_dwconv1d_backward(Tensor grad_out, Tensor x, Tensor cu_seqlens, Tensor weight)"
        " -> (Tensor, Tensor, Tensor)");
  m.def("varlen_attention(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, int max_seqlen, float scale)"
        " -> (Tensor, Tensor)");
  m.def("varlen_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out,"
        " Tensor logsumexp, Tensor cu_seqlens, int max_seqlen, float scale) -> (Tensor, Tensor, Tensor)");
  m.def("build_plan(Tensor row_mask, Tensor cu_seqlens) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(dynenc, CPU, m) {
  m.impl("gated_residual_scatter", &dynenc::gated_residual_scatter);
  m.impl("gated_residual_scatter_backward", &dynenc::gated_residual_scatter_backward);
  m.impl("gather_rows", &dynenc::gather_rows);
  m.impl("scatter_rows", &dynenc::scatter_rows);
  m.impl("varlen_dwconv1d", &dynenc::varlen_dwconv1d);
  m.impl("varlen_dwconv1d_backward", &dynenc::varlen_dwconv1d_backward);
  m.impl("varlen_attention", &dynenc::varlen_attention);
  m.impl("varlen_attention_backward", &dynenc::varlen_attention_backward);
  m.impl("build_plan", &dynenc::build_plan);
}
