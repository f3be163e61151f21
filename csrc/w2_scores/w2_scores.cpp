// w2_scores (SPEC §4): checks, allocation and the CUDA registration of awr_fast::w2_scores_cuda (schema in
// csrc/registration.cpp, fake kernel in awr_fast/_ext.py). No autograd: it serves evaluation. The same
// function is registered for CPU so that CPU tensors get this file's own error message rather than the
// dispatcher's.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
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

}  // namespace
}  // namespace awr_fast

TORCH_LIBRARY_IMPL(awr_fast, CUDA, m) { m.impl("w2_scores_cuda", &awr_fast::w2_scores_cuda); }

TORCH_LIBRARY_IMPL(awr_fast, CPU, m) { m.impl("w2_scores_cuda", &awr_fast::w2_scores_cuda); }
