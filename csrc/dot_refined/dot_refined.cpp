// dot_refined (SPEC §1-3, §3b): argument checks, allocation and the registration of the CUDA backend's
// ops awr_fast::dot_refined_cuda_fwd / _bwd (schemas in csrc/registration.cpp; fake kernels and autograd
// in awr_fast/cuda/dot_refined.py).
//
// One Python call is one call here: M = W_RQ W_RK^T (one GEMM), the kernel, and in the backward the
// reductions of the per-block partials into dM, dW_RQ, dW_RK and dW_RV. On CPU tensors the same block
// code runs on the host (the emulation CI checks against the float64 reference; slow, by design).

#include <string>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include "dot_refined/dot_refined.h"

namespace awr_fast {
namespace dot_refined {
namespace {

constexpr const char* kOp = "dot_refined_cuda";

using OptTensor = std::optional<at::Tensor>;

Mechanism parse_mechanism(const std::string& name) {
  if (name == "none") return kNone;
  if (name == "simp") return kSimp;
  if (name == "add") return kAdd;
  if (name == "value") return kValue;
  TORCH_CHECK(false, kOp, ": mechanism must be one of 'none', 'simp', 'add', 'value' (value_literal is not causal: ",
              "only the reference runs it), got '", name, "'");
}

Dtype dtype_of(const at::Tensor& t, bool on_host) {
  switch (t.scalar_type()) {
    case at::kFloat: return Dtype::kFloat32;
    case at::kHalf: return Dtype::kFloat16;
    case at::kBFloat16: return Dtype::kBFloat16;
    case at::kDouble:
      if (on_host) return Dtype::kFloat64;
      [[fallthrough]];
    default:
      TORCH_CHECK(false, kOp, ": q must be float32, float16 or bfloat16", on_host ? " (or float64 on the host)" : "",
                  ", got ", t.scalar_type());
  }
}

void check_like(const at::Tensor& t, const char* name, const at::Tensor& q) {
  TORCH_CHECK(t.device() == q.device(), kOp, ": ", name, " must be on the device of q (", q.device(), "), got ",
              t.device());
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), kOp, ": ", name, " must have the dtype of q (", q.scalar_type(),
              "), got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == q.sizes(), kOp, ": ", name, " must have the shape of q ", q.sizes(), ", got ", t.sizes());
}

// A refinement weight: (n, r) shared or (H, n, r) per head, on q's device; returns it in the
// accumulation dtype.
at::Tensor check_weight(const OptTensor& w, const char* name, const at::Tensor& q, bool square, at::ScalarType acc) {
  TORCH_CHECK(w.has_value() && w->defined(), kOp, ": mechanism needs ", name, ", got None");
  const int64_t heads = q.size(1), n = q.size(2);
  TORCH_CHECK(w->device() == q.device(), kOp, ": ", name, " must be on the device of q (", q.device(), "), got ",
              w->device());
  TORCH_CHECK(w->dim() == 2 || (w->dim() == 3 && w->size(0) == heads), kOp, ": ", name, " must be (n, ",
              square ? "n" : "r", ") or (heads=", heads, ", n, ", square ? "n" : "r", "), got shape ", w->sizes());
  TORCH_CHECK(w->size(-2) == n && (!square || w->size(-1) == n), kOp, ": ", name, " must have ", n, " rows",
              square ? " and columns" : "", " (n of q), got shape ", w->sizes());
  TORCH_CHECK(w->is_floating_point(), kOp, ": ", name, " must be floating point, got ", w->scalar_type());
  return w->to(acc).contiguous();
}

struct Prepared {
  at::Tensor q, k, v, kpm, m, w_rv, first, second;  // first/second: the factors of M (acc dtype)
  Args args;
  Dtype dtype;
  bool on_host;
};

Prepared prepare(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const OptTensor& w_rq,
                 const OptTensor& w_rk, const OptTensor& w_rv, const OptTensor& kpm, const OptTensor& seed,
                 const std::string& mechanism, double scale, double refine_scale, bool refine_scores,
                 double dropout_p) {
  Prepared p;
  p.on_host = !q_in.is_cuda();
  TORCH_CHECK(q_in.is_cuda() || q_in.is_cpu(), kOp, ": q must be a CUDA tensor (or a CPU tensor for the host ",
              "emulation), got device ", q_in.device());
  TORCH_CHECK(q_in.dim() == 4, kOp, ": q must be (batch, heads, n, d_h), got shape ", q_in.sizes());
  p.dtype = dtype_of(q_in, p.on_host);
  check_like(k_in, "k", q_in);
  check_like(v_in, "v", q_in);
  const int64_t batch = q_in.size(0), heads = q_in.size(1), n = q_in.size(2), d = q_in.size(3);
  TORCH_CHECK(n <= kMaxN, kOp, ": n must be at most ", kMaxN, " (the fused kernels hold the sequence on chip), got ",
              n);
  TORCH_CHECK(batch * heads <= 2147483647LL, kOp, ": batch * heads must fit the launch grid, got ", batch * heads);
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, kOp, ": dropout_p must be in [0, 1), got ", dropout_p);
  const Mechanism mech = parse_mechanism(mechanism);
  const bool add = mech == kAdd;
  const at::ScalarType acc = p.dtype == Dtype::kFloat64 ? at::kDouble : at::kFloat;
  p.q = q_in.contiguous();
  p.k = k_in.contiguous();
  p.v = v_in.contiguous();
  Args& a = p.args;
  if (kpm.has_value() && kpm->defined()) {
    TORCH_CHECK(kpm->scalar_type() == at::kBool, kOp, ": key_padding_mask must be bool (True = padding), got ",
                kpm->scalar_type());
    TORCH_CHECK(kpm->dim() == 2 && kpm->size(0) == batch && kpm->size(1) == n, kOp,
                ": key_padding_mask must be (batch, n) = (", batch, ", ", n, "), got shape ", kpm->sizes());
    TORCH_CHECK(kpm->device() == q_in.device(), kOp, ": key_padding_mask must be on the device of q (", q_in.device(),
                "), got ", kpm->device());
    p.kpm = kpm->contiguous();
    a.kpm = p.kpm.data_ptr<bool>();
  }
  if (dropout_p > 0.0) {
    TORCH_CHECK(seed.has_value() && seed->defined() && seed->numel() >= 1 && seed->scalar_type() == at::kLong, kOp,
                ": dropout_p > 0 needs seed, an int64 tensor of one element, got ",
                seed.has_value() && seed->defined() ? seed->toString() : std::string("None"));
    TORCH_CHECK(seed->device() == q_in.device(), kOp, ": seed must be on the device of q (", q_in.device(), "), got ",
                seed->device());
    a.seed = seed->data_ptr<int64_t>();
  }
  if (mech != kNone) {
    at::Tensor rq = check_weight(w_rq, "w_rq", q_in, false, acc);
    at::Tensor rk = check_weight(w_rk, "w_rk", q_in, false, acc);
    TORCH_CHECK(rq.size(-1) == rk.size(-1), kOp, ": w_rk must have the columns of w_rq (", rq.size(-1), "), got ",
                rk.size(-1));
    p.first = add ? rk : rq;
    p.second = add ? rq : rk;
    p.m = at::matmul(p.first, p.second.transpose(-1, -2)).contiguous();
    a.m = p.m.data_ptr();
    a.m_head_stride = p.m.dim() == 3 ? n * n : 0;
    if (mech == kValue) {
      p.w_rv = check_weight(w_rv, "w_rv", q_in, true, acc);
      a.w_rv = p.w_rv.data_ptr();
      a.wrv_head_stride = p.w_rv.dim() == 3 ? n * n : 0;
    }
  }
  TORCH_CHECK(mech == kValue || !(w_rv.has_value() && w_rv->defined()), kOp, ": w_rv is only used by mechanism ",
              "'value', got one with mechanism '", mechanism, "'");
  a.q = p.q.data_ptr();
  a.k = p.k.data_ptr();
  a.v = p.v.data_ptr();
  a.batch = static_cast<int>(batch);
  a.heads = static_cast<int>(heads);
  a.n = static_cast<int>(n);
  a.d = static_cast<int>(d);
  a.scale = scale;
  a.alpha = add ? 0.5 * refine_scale : refine_scale;
  a.beta = add ? 0.5 : 0.0;
  a.dropout_p = static_cast<float>(dropout_p);
  a.mechanism = mech;
  a.refine_scores = refine_scores;
  return p;
}

void run(const Prepared& p, bool backward) {
  if (p.on_host) {
    backward ? backward_host(p.dtype, p.args) : forward_host(p.dtype, p.args);
    return;
  }
  const size_t bytes = smem_elems(p.args.n, p.args.mechanism, backward) * sizeof(float);
  int device = 0, limit = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  TORCH_CHECK(bytes <= static_cast<size_t>(limit), kOp, ": n=", p.args.n, " with mechanism ", p.args.mechanism,
              " needs ", bytes, " bytes of shared memory per block, more than this device's ", limit);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const cudaError_t err =
      backward ? backward_launch(p.dtype, p.args, stream) : forward_launch(p.dtype, p.args, stream);
  TORCH_CHECK(err == cudaSuccess, kOp, backward ? "_bwd" : "_fwd", ": kernel launch failed: ",
              cudaGetErrorString(err));
}

at::Tensor forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const OptTensor& w_rq,
                   const OptTensor& w_rk, const OptTensor& w_rv, const OptTensor& kpm, const OptTensor& seed,
                   std::string mechanism, double scale, double refine_scale, bool refine_scores, double dropout_p) {
  std::optional<c10::cuda::CUDAGuard> guard;
  if (q.is_cuda()) guard.emplace(q.device());
  Prepared p = prepare(q, k, v, w_rq, w_rk, w_rv, kpm, seed, mechanism, scale, refine_scale, refine_scores, dropout_p);
  at::Tensor out = at::empty_like(p.q);
  p.args.out = out.data_ptr();
  run(p, false);
  return out;
}

// (H, n, n) per head or (n, n) shared: the sum over the batch (and the heads) of the per-block partials.
at::Tensor reduce_partials(const at::Tensor& part, bool per_head) {
  return per_head ? part.sum(0) : part.sum(at::IntArrayRef{0, 1});
}

at::Tensor head_reduced(at::Tensor g, const at::Tensor& like) {
  if (like.dim() == 2 && g.dim() == 3) g = g.sum(0);
  return g;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const OptTensor& w_rq,
    const OptTensor& w_rk, const OptTensor& w_rv, const OptTensor& kpm, const OptTensor& seed,
    std::string mechanism, double scale, double refine_scale, bool refine_scores, double dropout_p) {
  std::optional<c10::cuda::CUDAGuard> guard;
  if (q.is_cuda()) guard.emplace(q.device());
  Prepared p = prepare(q, k, v, w_rq, w_rk, w_rv, kpm, seed, mechanism, scale, refine_scale, refine_scores, dropout_p);
  check_like(grad, "grad", q);
  const at::Tensor g = grad.contiguous();
  at::Tensor dq = at::empty_like(p.q), dk = at::empty_like(p.k), dv = at::empty_like(p.v);
  const int64_t batch = q.size(0), heads = q.size(1), n = q.size(2);
  Args& a = p.args;
  a.grad = g.data_ptr();
  a.dq = dq.data_ptr();
  a.dk = dk.data_ptr();
  a.dv = dv.data_ptr();
  at::Tensor dm_part, dwrv_part;
  if (a.mechanism != kNone) {
    dm_part = at::empty({batch, heads, n, n}, p.m.options());
    a.dm_part = dm_part.data_ptr();
  }
  if (a.mechanism == kValue) {
    dwrv_part = at::empty({batch, heads, n, n}, p.m.options());
    a.dwrv_part = dwrv_part.data_ptr();
  }
  run(p, true);
  const at::Tensor none = at::empty({0}, q.options().dtype(at::kFloat));
  at::Tensor dw_rq = none, dw_rk = none, dw_rv = none;
  if (a.mechanism != kNone) {
    const at::Tensor dm = reduce_partials(dm_part, p.m.dim() == 3);
    // M = F S^T: dF = dM S, dS = dM^T F (SPEC §3b), summed over the heads where the weight is shared.
    const at::Tensor d_first = head_reduced(at::matmul(dm, p.second), p.first);
    const at::Tensor d_second = head_reduced(at::matmul(dm.transpose(-1, -2), p.first), p.second);
    const bool add = a.mechanism == kAdd;
    dw_rq = (add ? d_second : d_first).to(w_rq->scalar_type());
    dw_rk = (add ? d_first : d_second).to(w_rk->scalar_type());
  }
  if (a.mechanism == kValue) dw_rv = reduce_partials(dwrv_part, p.w_rv.dim() == 3).to(w_rv->scalar_type());
  return std::make_tuple(dq, dk, dv, dw_rq, dw_rk, dw_rv);
}

}  // namespace

int64_t smem_bytes(int64_t n, std::string mechanism, bool backward) {
  return static_cast<int64_t>(smem_elems(static_cast<int>(n), parse_mechanism(mechanism), backward) * sizeof(float));
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
