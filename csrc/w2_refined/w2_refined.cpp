// w2_refined (SPEC §3, §4): argument checks, allocation and the registration of the CUDA backend's ops
// awr_fast::w2_refined_cuda_fwd / _bwd (schemas in csrc/registration.cpp; fake kernels and autograd in
// awr_fast/cuda/w2_refined.py). One Python call is one call here, as for dot_refined; on CPU tensors the
// same block code runs on the host (the emulation CI checks against the float64 reference).

#include <string>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/refine_host.h"
#include "w2_refined/w2_refined.h"

namespace awr_fast {
namespace w2_refined {
namespace {

constexpr const char* kOp = "w2_refined_cuda";
using refine::OptTensor;
constexpr const char* kNames[6] = {"mu_q", "sig_q", "mu_k", "sig_k", "mu_v", "sig_v"};

struct Call {
  refine::Prepared prep;
  at::Tensor x[6];  // contiguous inputs
  Args args;
};

Call prepare(const at::Tensor& mu_q, const at::Tensor& sig_q, const at::Tensor& mu_k, const at::Tensor& sig_k,
             const at::Tensor& mu_v, const at::Tensor& sig_v, const OptTensor& w_rq, const OptTensor& w_rk,
             const OptTensor& w_rv, const OptTensor& w_mu, const OptTensor& w_sigma, const OptTensor& kpm,
             const OptTensor& seed, const std::string& mechanism, double scale, double refine_scale,
             bool refine_scores, double dropout_p) {
  Call call;
  call.prep = refine::prepare(kOp, mu_q, "mu_q", true, w_rq, w_rk, w_rv, w_mu, w_sigma, kpm, seed, mechanism, scale,
                              refine_scale, refine_scores, dropout_p);
  const at::Tensor* inputs[6] = {&mu_q, &sig_q, &mu_k, &sig_k, &mu_v, &sig_v};
  for (int i = 0; i < 6; ++i) {
    refine::check_like(kOp, *inputs[i], kNames[i], mu_q, "mu_q");
    call.x[i] = inputs[i]->contiguous();
  }
  Args& a = call.args;
  a.core = call.prep.core;
  a.mu_q = call.x[0].data_ptr();
  a.sig_q = call.x[1].data_ptr();
  a.mu_k = call.x[2].data_ptr();
  a.sig_k = call.x[3].data_ptr();
  a.mu_v = call.x[4].data_ptr();
  a.sig_v = call.x[5].data_ptr();
  return call;
}

void run(Call& call, bool backward) {
  refine::Prepared& p = call.prep;
  if (p.on_host) {
    backward ? backward_host(p.dtype, call.args) : forward_host(p.dtype, call.args);
    return;
  }
  refine::place_blocks(p, call.args.core, backward);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const cudaError_t err =
      backward ? backward_launch(p.dtype, call.args, stream) : forward_launch(p.dtype, call.args, stream);
  TORCH_CHECK(err == cudaSuccess, kOp, backward ? "_bwd" : "_fwd", ": kernel launch failed: ",
              cudaGetErrorString(err));
}

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& mu_q, const at::Tensor& sig_q, const at::Tensor& mu_k,
                                           const at::Tensor& sig_k, const at::Tensor& mu_v, const at::Tensor& sig_v,
                                           const OptTensor& w_rq, const OptTensor& w_rk, const OptTensor& w_rv,
                                           const OptTensor& w_mu, const OptTensor& w_sigma, const OptTensor& kpm,
                                           const OptTensor& seed, std::string mechanism, double scale,
                                           double refine_scale, bool refine_scores, double dropout_p) {
  std::optional<c10::cuda::CUDAGuard> guard;
  if (mu_q.is_cuda()) guard.emplace(mu_q.device());
  Call call = prepare(mu_q, sig_q, mu_k, sig_k, mu_v, sig_v, w_rq, w_rk, w_rv, w_mu, w_sigma, kpm, seed, mechanism,
                      scale, refine_scale, refine_scores, dropout_p);
  at::Tensor out_mu = at::empty_like(call.x[0]), out_sig = at::empty_like(call.x[0]);
  call.args.out_mu = out_mu.data_ptr();
  call.args.out_sig = out_sig.data_ptr();
  run(call, false);
  return std::make_tuple(out_mu, out_sig);
}

using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                         at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Grads backward(const at::Tensor& grad_mu, const at::Tensor& grad_sig, const at::Tensor& mu_q, const at::Tensor& sig_q,
               const at::Tensor& mu_k, const at::Tensor& sig_k, const at::Tensor& mu_v, const at::Tensor& sig_v,
               const OptTensor& w_rq, const OptTensor& w_rk, const OptTensor& w_rv, const OptTensor& w_mu,
               const OptTensor& w_sigma, const OptTensor& kpm, const OptTensor& seed, std::string mechanism,
               double scale, double refine_scale, bool refine_scores, double dropout_p) {
  std::optional<c10::cuda::CUDAGuard> guard;
  if (mu_q.is_cuda()) guard.emplace(mu_q.device());
  Call call = prepare(mu_q, sig_q, mu_k, sig_k, mu_v, sig_v, w_rq, w_rk, w_rv, w_mu, w_sigma, kpm, seed, mechanism,
                      scale, refine_scale, refine_scores, dropout_p);
  refine::check_like(kOp, grad_mu, "grad_mu", mu_q, "mu_q");
  refine::check_like(kOp, grad_sig, "grad_sig", mu_q, "mu_q");
  const at::Tensor gm = grad_mu.contiguous(), gs = grad_sig.contiguous();
  at::Tensor d[6];
  for (int i = 0; i < 6; ++i) d[i] = at::empty_like(call.x[i]);
  refine::allocate_partials(call.prep);
  Args& a = call.args;
  a.core = call.prep.core;
  a.grad_mu = gm.data_ptr();
  a.grad_sig = gs.data_ptr();
  a.d_mu_q = d[0].data_ptr();
  a.d_sig_q = d[1].data_ptr();
  a.d_mu_k = d[2].data_ptr();
  a.d_sig_k = d[3].data_ptr();
  a.d_mu_v = d[4].data_ptr();
  a.d_sig_v = d[5].data_ptr();
  run(call, true);
  auto [dw_rq, dw_rk, dw_rv, dw_mu, dw_sigma] = refine::weight_grads(call.prep, w_rq, w_rk, w_rv, w_mu, w_sigma);
  return std::make_tuple(d[0], d[1], d[2], d[3], d[4], d[5], dw_rq, dw_rk, dw_rv, dw_mu, dw_sigma);
}

}  // namespace

int64_t smem_bytes(int64_t n, std::string mechanism, bool backward, int64_t r) {
  const int mech = refine::parse_mechanism(kOp, mechanism, true);
  return static_cast<int64_t>(
      refine::smem_elems(static_cast<int>(n), mech, backward, static_cast<int>(r)) * sizeof(float));
}

}  // namespace w2_refined
}  // namespace awr_fast

TORCH_LIBRARY_IMPL(awr_fast, CUDA, m) {
  m.impl("w2_refined_cuda_fwd", &awr_fast::w2_refined::forward);
  m.impl("w2_refined_cuda_bwd", &awr_fast::w2_refined::backward);
}

// CPU tensors: the host emulation of the same block code.
TORCH_LIBRARY_IMPL(awr_fast, CPU, m) {
  m.impl("w2_refined_cuda_fwd", &awr_fast::w2_refined::forward);
  m.impl("w2_refined_cuda_bwd", &awr_fast::w2_refined::backward);
}
