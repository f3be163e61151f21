// dot_refined (SPEC §1-3, §3b): argument checks, allocation and the registration of the CUDA backend's
// ops awr_fast::dot_refined_cuda_fwd / _bwd (schemas in csrc/registration.cpp; fake kernels and autograd
// in awr_fast/cuda/dot_refined.py).
//
// One Python call is one call here: M = W_RQ W_RK^T (one GEMM), the kernel, and in the backward the
// reductions of the per-block partials into dW_RQ, dW_RK and dW_RV. On CPU tensors the same block code
// runs on the host (the emulation CI checks against the float64 reference; slow, by design).

#include <string>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/refine_host.h"
#include "dot_refined/dot_refined.h"

namespace awr_fast {
namespace dot_refined {
namespace {

constexpr const char* kOp = "dot_refined_cuda";
using refine::OptTensor;

struct Call {
  refine::Prepared prep;
  at::Tensor q, k, v;
  Args args;
};

Call prepare(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const OptTensor& w_rq,
             const OptTensor& w_rk, const OptTensor& w_rv, const OptTensor& kpm, const OptTensor& seed,
             const std::string& mechanism, double scale, double refine_scale, bool refine_scores, double dropout_p) {
  Call call;
  call.prep = refine::prepare(kOp, q, "q", false, w_rq, w_rk, w_rv, std::nullopt, std::nullopt, kpm, seed, mechanism,
                              scale, refine_scale, refine_scores, dropout_p);
  refine::check_like(kOp, k, "k", q, "q");
  refine::check_like(kOp, v, "v", q, "q");
  call.q = q.contiguous();
  call.k = k.contiguous();
  call.v = v.contiguous();
  call.args.core = call.prep.core;
  call.args.q = call.q.data_ptr();
  call.args.k = call.k.data_ptr();
  call.args.v = call.v.data_ptr();
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

at::Tensor forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const OptTensor& w_rq,
                   const OptTensor& w_rk, const OptTensor& w_rv, const OptTensor& kpm, const OptTensor& seed,
                   std::string mechanism, double scale, double refine_scale, bool refine_scores, double dropout_p) {
  std::optional<c10::cuda::CUDAGuard> guard;
  if (q.is_cuda()) guard.emplace(q.device());
  Call call = prepare(q, k, v, w_rq, w_rk, w_rv, kpm, seed, mechanism, scale, refine_scale, refine_scores, dropout_p);
  at::Tensor out = at::empty_like(call.q);
  call.args.out = out.data_ptr();
  run(call, false);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const OptTensor& w_rq,
    const OptTensor& w_rk, const OptTensor& w_rv, const OptTensor& kpm, const OptTensor& seed,
    std::string mechanism, double scale, double refine_scale, bool refine_scores, double dropout_p) {
  std::optional<c10::cuda::CUDAGuard> guard;
  if (q.is_cuda()) guard.emplace(q.device());
  Call call = prepare(q, k, v, w_rq, w_rk, w_rv, kpm, seed, mechanism, scale, refine_scale, refine_scores, dropout_p);
  refine::check_like(kOp, grad, "grad", q, "q");
  const at::Tensor g = grad.contiguous();
  at::Tensor dq = at::empty_like(call.q), dk = at::empty_like(call.k), dv = at::empty_like(call.v);
  refine::allocate_partials(call.prep);
  call.args.core = call.prep.core;
  call.args.grad = g.data_ptr();
  call.args.dq = dq.data_ptr();
  call.args.dk = dk.data_ptr();
  call.args.dv = dv.data_ptr();
  run(call, true);
  auto [dw_rq, dw_rk, dw_rv, unused_mu, unused_sigma] =
      refine::weight_grads(call.prep, w_rq, w_rk, w_rv, std::nullopt, std::nullopt);
  return std::make_tuple(dq, dk, dv, dw_rq, dw_rk, dw_rv);
}

}  // namespace

int64_t smem_bytes(int64_t n, std::string mechanism, bool backward) {
  const int mech = refine::parse_mechanism(kOp, mechanism, false);
  return static_cast<int64_t>(refine::smem_elems(static_cast<int>(n), mech, backward, 0) * sizeof(float));
}

}  // namespace dot_refined
}  // namespace awr_fast

TORCH_LIBRARY_IMPL(awr_fast, CUDA, m) {
  m.impl("dot_refined_cuda_fwd", &awr_fast::dot_refined::forward);
  m.impl("dot_refined_cuda_bwd", &awr_fast::dot_refined::backward);
}

// CPU tensors: the host emulation of the same block code.
TORCH_LIBRARY_IMPL(awr_fast, CPU, m) {
  m.impl("dot_refined_cuda_fwd", &awr_fast::dot_refined::forward);
  m.impl("dot_refined_cuda_bwd", &awr_fast::dot_refined::backward);
}
