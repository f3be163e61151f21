// The schemas of every op of the CUDA backend (torch.ops.awr_fast.*) and the Python module init. Each op's
// kernels are registered beside its checks, in csrc/<op>/<op>.cpp (TORCH_LIBRARY_IMPL); its fake kernel
// and autograd live in Python (awr_fast/cuda/<op>.py, awr_fast/_ext.py for w2_scores).

#include <Python.h>

#include <torch/library.h>

#include "dot_refined/dot_refined.h"
#include "w2_refined/w2_refined.h"
#include "w2_scores/w2_scores.h"

// The arguments after the tensors are the options of the Triton family of the same name (kernels/).
#define AWR_DOT_REFINED_ARGS                                                                              \
  "Tensor q, Tensor k, Tensor v, Tensor? w_rq, Tensor? w_rk, Tensor? w_rv, Tensor? key_padding_mask, "    \
  "Tensor? seed, str mechanism, float scale, float refine_scale, bool refine_scores, float dropout_p"

#define AWR_W2_REFINED_ARGS                                                                                  \
  "Tensor mu_q, Tensor sig_q, Tensor mu_k, Tensor sig_k, Tensor mu_v, Tensor sig_v, Tensor? w_rq, Tensor? w_rk, " \
  "Tensor? w_rv, Tensor? w_mu, Tensor? w_sigma, Tensor? key_padding_mask, Tensor? seed, str mechanism, "          \
  "float scale, float refine_scale, bool refine_scores, float dropout_p"

TORCH_LIBRARY(awr_fast, m) {
  m.def("w2_scores_cuda(Tensor mu, Tensor sig, Tensor item_mu, Tensor item_sig) -> Tensor");
  m.def("w2_scores_cuda_bwd(Tensor grad, Tensor mu, Tensor sig, Tensor item_mu, Tensor item_sig) -> "
        "(Tensor, Tensor, Tensor, Tensor)");
  // (values, indices) of the k nearest items; exclude: a bool (B, V) mask or (B, L) item ids padded with -1
  m.def("w2_topk_cuda(Tensor mu, Tensor sig, Tensor item_mu, Tensor item_sig, int k, Tensor? exclude, "
        "bool exclude_padding) -> (Tensor, Tensor)");
  m.def("w2_topk_cuda_smem_bytes(int k) -> int", &awr_fast::w2_topk_cuda_smem_bytes);
  m.def("dot_refined_cuda_fwd(" AWR_DOT_REFINED_ARGS ") -> Tensor");
  // (dq, dk, dv, dw_rq, dw_rk, dw_rv); an empty tensor where the call has no such input
  m.def("dot_refined_cuda_bwd(Tensor grad, " AWR_DOT_REFINED_ARGS
        ") -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Shared memory one fused block needs (bytes), for the resource report and the capability checks.
  m.def("dot_refined_cuda_smem_bytes(int n, str mechanism, bool backward) -> int", &awr_fast::dot_refined::smem_bytes);
  m.def("w2_refined_cuda_fwd(" AWR_W2_REFINED_ARGS ") -> (Tensor, Tensor)");
  // the six input gradients, then (dw_rq, dw_rk, dw_rv, dw_mu, dw_sigma); empty where the call has none
  m.def("w2_refined_cuda_bwd(Tensor grad_mu, Tensor grad_sig, " AWR_W2_REFINED_ARGS
        ") -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("w2_refined_cuda_smem_bytes(int n, str mechanism, bool backward, int r) -> int",
        &awr_fast::w2_refined::smem_bytes);
}
// `import awr_fast._C` loads this library, which runs the registrations above. The module itself is
// empty; it only uses the limited (stable) Python API, so it does not depend on libtorch_python.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      "awr_fast CUDA kernels, registered as torch.ops.awr_fast.*",
      -1,    // size of per-interpreter state, -1: global
      nullptr,
  };
  return PyModule_Create(&module_def);
}
}
