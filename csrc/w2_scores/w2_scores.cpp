// w2_scores (SPEC §4): checks, allocation and the registration of awr_fast::w2_scores_cuda and its
// backward w2_scores_cuda_bwd (schemas in csrc/registration.cpp, fake kernels in awr_fast/_ext.py, autograd
// in awr_fast/cuda/w2_scores.py). The forward is registered for CPU too, so that CPU tensors get this
// file's own error message rather than the dispatcher's. The backward is four GEMMs (cuBLAS on the GPU)
// and norms in float32, in this one C++ call; on CPU tensors the same ATen code runs (CI checks it).

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sqrt.h>
#include <ATen/TensorOperators.h>
#include <ATen/ops/clamp_min.h>
#include <ATen/ops/sum.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "w2_scores/w2_scores.h"

namespace awr_fast {
namespace {

void check_input(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.is_cuda(), "w2_scores_cuda: ", name, " must be a CUDA tensor (this op is the CUDA backend), got device ",
              t.device());
  TORCH_CHECK(t.dim() == 2, "w2_scores_cuda: ", name, " must be 2-d, got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "w2_scores_cuda: ", name, " must have the dtype of ", ref_name,
              " (", ref.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), "w2_scores_cuda: ", name, " must be on the device of ", ref_name, " (",
              ref.device(), "), got ", t.device());
  TORCH_CHECK(t.is_contiguous(), "w2_scores_cuda: ", name, " must be contiguous (call .contiguous())");
}

at::Tensor w2_scores_cuda(const at::Tensor& mu, const at::Tensor& sig, const at::Tensor& item_mu,
                          const at::Tensor& item_sig) {
  check_input(mu, "mu", mu, "mu");
  check_input(sig, "sig", mu, "mu");
  check_input(item_mu, "item_mu", mu, "mu");
  check_input(item_sig, "item_sig", mu, "mu");
  W2Dtype dtype = W2Dtype::kFloat32;
  switch (mu.scalar_type()) {
    case at::kFloat: dtype = W2Dtype::kFloat32; break;
    case at::kHalf: dtype = W2Dtype::kFloat16; break;
    case at::kBFloat16: dtype = W2Dtype::kBFloat16; break;
    default: TORCH_CHECK(false, "w2_scores_cuda: mu must be float32, float16 or bfloat16, got ", mu.scalar_type());
  }
  TORCH_CHECK(sig.sizes() == mu.sizes(), "w2_scores_cuda: sig must have the shape of mu ", mu.sizes(), ", got ",
              sig.sizes());
  TORCH_CHECK(item_sig.sizes() == item_mu.sizes(), "w2_scores_cuda: item_sig must have the shape of item_mu ",
              item_mu.sizes(), ", got ", item_sig.sizes());
  TORCH_CHECK(item_mu.size(1) == mu.size(1), "w2_scores_cuda: item_mu must have ", mu.size(1),
              " columns (the width of mu), got shape ", item_mu.sizes());

  const int64_t B = mu.size(0), V = item_mu.size(0), d = mu.size(1);
  const c10::cuda::CUDAGuard guard(mu.device());
  at::Tensor out = at::empty({B, V}, mu.options().dtype(at::kFloat));
  const cudaError_t err =
      w2_scores_launch(dtype, mu.data_ptr(), sig.data_ptr(), item_mu.data_ptr(), item_sig.data_ptr(),
                       out.data_ptr<float>(), B, V, d, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "w2_scores_cuda: kernel launch failed: ", cudaGetErrorString(err));
  return out;
}

// With G = dL/dout (B, V), rt = sqrt(max(sig, 1e-24)) and the row and column sums of G:
//   dmu = 2 (rowsum(G) mu - G item_mu),          dsig = rowsum(G) - [sig > 1e-24] (G item_rt) / rt,
//   ditem_mu = 2 (colsum(G) item_mu - G^T mu),   ditem_sig = colsum(G) - [item_sig > 1e-24] (G^T rt) / item_rt.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> w2_scores_cuda_bwd(const at::Tensor& grad,
                                                                              const at::Tensor& mu,
                                                                              const at::Tensor& sig,
                                                                              const at::Tensor& item_mu,
                                                                              const at::Tensor& item_sig) {
  constexpr const char* op = "w2_scores_cuda_bwd";
  TORCH_CHECK(mu.dim() == 2 && item_mu.dim() == 2, op, ": mu and item_mu must be 2-d, got shapes ", mu.sizes(),
              " and ", item_mu.sizes());
  TORCH_CHECK(sig.sizes() == mu.sizes(), op, ": sig must have the shape of mu ", mu.sizes(), ", got ", sig.sizes());
  TORCH_CHECK(item_sig.sizes() == item_mu.sizes(), op, ": item_sig must have the shape of item_mu ", item_mu.sizes(),
              ", got ", item_sig.sizes());
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == mu.size(0) && grad.size(1) == item_mu.size(0), op,
              ": grad must be (B, V) = (", mu.size(0), ", ", item_mu.size(0), "), got shape ", grad.sizes());
  for (const at::Tensor* t : {&sig, &item_mu, &item_sig, &grad}) {
    TORCH_CHECK(t->device() == mu.device(), op, ": every input must be on the device of mu (", mu.device(),
                "), got ", t->device());
  }
  std::optional<c10::cuda::CUDAGuard> guard;
  if (mu.is_cuda()) guard.emplace(mu.device());
  const at::ScalarType acc = mu.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  constexpr double kClamp = 1e-24;
  const at::Tensor g = grad.to(acc), m = mu.to(acc), s = sig.to(acc), im = item_mu.to(acc), is = item_sig.to(acc);
  const at::Tensor rt = at::sqrt(at::clamp_min(s, kClamp)), irt = at::sqrt(at::clamp_min(is, kClamp));
  const at::Tensor row = g.sum(1, true), col = g.sum(0).unsqueeze(1);
  const at::Tensor dmu = 2 * (row * m - at::mm(g, im));
  const at::Tensor ditem_mu = 2 * (col * im - at::mm(g.t(), m));
  const at::Tensor dsig = row - (s > kClamp).to(acc) * at::mm(g, irt) / rt;
  const at::Tensor ditem_sig = col - (is > kClamp).to(acc) * at::mm(g.t(), rt) / irt;
  return std::make_tuple(dmu.to(mu.scalar_type()), dsig.to(sig.scalar_type()), ditem_mu.to(item_mu.scalar_type()),
                         ditem_sig.to(item_sig.scalar_type()));
}

}  // namespace
}  // namespace awr_fast

TORCH_LIBRARY_IMPL(awr_fast, CUDA, m) {
  m.impl("w2_scores_cuda", &awr_fast::w2_scores_cuda);
  m.impl("w2_scores_cuda_bwd", &awr_fast::w2_scores_cuda_bwd);
}

TORCH_LIBRARY_IMPL(awr_fast, CPU, m) {
  m.impl("w2_scores_cuda", &awr_fast::w2_scores_cuda);
  m.impl("w2_scores_cuda_bwd", &awr_fast::w2_scores_cuda_bwd);
}
