// Host side shared by the refined-attention ops: see refine_host.h.

#include "common/refine_host.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/sum.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime_api.h>

#include <algorithm>

namespace awr_fast {
namespace refine {
namespace {

Dtype dtype_of(const char* op, const at::Tensor& t, const char* name, bool on_host) {
  switch (t.scalar_type()) {
    case at::kFloat: return Dtype::kFloat32;
    case at::kHalf: return Dtype::kFloat16;
    case at::kBFloat16: return Dtype::kBFloat16;
    case at::kDouble:
      if (on_host) return Dtype::kFloat64;
      [[fallthrough]];
    default:
      TORCH_CHECK(false, op, ": ", name, " must be float32, float16 or bfloat16",
                  on_host ? " (or float64 on the host)" : "", ", got ", t.scalar_type());
  }
}

// A refinement weight: (n, cols) shared or (H, n, cols) per head on lead's device, in the accumulation dtype.
at::Tensor check_weight(const char* op, const OptTensor& w, const char* name, const at::Tensor& lead, bool square,
                        at::ScalarType acc) {
  TORCH_CHECK(w.has_value() && w->defined(), op, ": mechanism needs ", name, ", got None");
  const int64_t heads = lead.size(1), n = lead.size(2);
  const char* cols = square ? "n" : "r";
  TORCH_CHECK(w->device() == lead.device(), op, ": ", name, " must be on the device of the inputs (", lead.device(),
              "), got ", w->device());
  TORCH_CHECK(w->dim() == 2 || (w->dim() == 3 && w->size(0) == heads), op, ": ", name, " must be (n, ", cols,
              ") or (heads=", heads, ", n, ", cols, "), got shape ", w->sizes());
  TORCH_CHECK(w->size(-2) == n && (!square || w->size(-1) == n), op, ": ", name, " must have ", n, " rows",
              square ? " and columns" : "", " (n of the inputs), got shape ", w->sizes());
  TORCH_CHECK(w->is_floating_point(), op, ": ", name, " must be floating point, got ", w->scalar_type());
  return w->to(acc).contiguous();
}

int64_t head_stride(const at::Tensor& w) { return w.dim() == 3 ? w.size(1) * w.size(2) : 0; }

bool given(const OptTensor& t) { return t.has_value() && t->defined(); }

// (H, n, c) per head or (n, c) shared: the sum over the batch (and the heads) of (B, H, n, c) partials.
at::Tensor reduce_partials(const at::Tensor& part, bool per_head) {
  return per_head ? part.sum(0) : part.sum(at::IntArrayRef{0, 1});
}

at::Tensor head_reduced(at::Tensor g, const at::Tensor& like) {
  if (like.dim() == 2 && g.dim() == 3) g = g.sum(0);
  return g;
}

}  // namespace

int parse_mechanism(const char* op, const std::string& name, bool allow_stoc) {
  if (name == "none") return kNone;
  if (name == "simp") return kSimp;
  if (name == "add") return kAdd;
  if (name == "value") return kValue;
  if (name == "stoc" && allow_stoc) return kStoc;
  TORCH_CHECK(false, op, ": mechanism must be one of 'none', 'simp', 'add', 'value'", allow_stoc ? ", 'stoc'" : "",
              " (value_literal is not causal: only the reference runs it), got '", name, "'");
}

void check_like(const char* op, const at::Tensor& t, const char* name, const at::Tensor& lead, const char* lead_name) {
  TORCH_CHECK(t.device() == lead.device(), op, ": ", name, " must be on the device of ", lead_name, " (",
              lead.device(), "), got ", t.device());
  TORCH_CHECK(t.scalar_type() == lead.scalar_type(), op, ": ", name, " must have the dtype of ", lead_name, " (",
              lead.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == lead.sizes(), op, ": ", name, " must have the shape of ", lead_name, " ", lead.sizes(),
              ", got ", t.sizes());
}

Prepared prepare(const char* op, const at::Tensor& lead, const char* lead_name, bool allow_stoc, const OptTensor& w_rq,
                 const OptTensor& w_rk, const OptTensor& w_rv, const OptTensor& w_mu, const OptTensor& w_sigma,
                 const OptTensor& kpm, const OptTensor& seed, const std::string& mechanism, double scale,
                 double refine_scale, bool refine_scores, double dropout_p) {
  Prepared p;
  TORCH_CHECK(lead.is_cuda() || lead.is_cpu(), op, ": ", lead_name, " must be a CUDA tensor (or a CPU tensor for ",
              "the host emulation), got device ", lead.device());
  p.on_host = lead.is_cpu();
  p.device = lead.device();
  TORCH_CHECK(lead.dim() == 4, op, ": ", lead_name, " must be (batch, heads, n, d_h), got shape ", lead.sizes());
  p.dtype = dtype_of(op, lead, lead_name, p.on_host);
  p.acc = p.dtype == Dtype::kFloat64 ? at::kDouble : at::kFloat;
  const int64_t batch = lead.size(0), heads = lead.size(1), n = lead.size(2), d = lead.size(3);
  TORCH_CHECK(n <= kMaxN, op, ": n must be at most ", kMaxN, " (one block holds the sequence), got ", n);
  TORCH_CHECK(batch * heads <= 2147483647LL, op, ": batch * heads must fit the launch grid, got ", batch * heads);
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, op, ": dropout_p must be in [0, 1), got ", dropout_p);
  const int mech = parse_mechanism(op, mechanism, allow_stoc);
  Core& c = p.core;
  if (given(kpm)) {
    TORCH_CHECK(kpm->scalar_type() == at::kBool, op, ": key_padding_mask must be bool (True = padding), got ",
                kpm->scalar_type());
    TORCH_CHECK(kpm->dim() == 2 && kpm->size(0) == batch && kpm->size(1) == n, op,
                ": key_padding_mask must be (batch, n) = (", batch, ", ", n, "), got shape ", kpm->sizes());
    TORCH_CHECK(kpm->device() == lead.device(), op, ": key_padding_mask must be on the device of ", lead_name, " (",
                lead.device(), "), got ", kpm->device());
    p.kpm = kpm->contiguous();
    c.kpm = p.kpm.data_ptr<bool>();
  }
  if (dropout_p > 0.0) {
    TORCH_CHECK(given(seed) && seed->numel() >= 1 && seed->scalar_type() == at::kLong, op,
                ": dropout_p > 0 needs seed, an int64 tensor of one element, got ",
                given(seed) ? seed->toString() : std::string("None"));
    TORCH_CHECK(seed->device() == lead.device(), op, ": seed must be on the device of ", lead_name, " (",
                lead.device(), "), got ", seed->device());
    c.seed = seed->data_ptr<int64_t>();
  }
  const bool uses_m = mech == kSimp || mech == kAdd || mech == kValue;
  TORCH_CHECK(uses_m || !(given(w_rq) || given(w_rk)), op, ": w_rq and w_rk are not used by mechanism '", mechanism,
              "', got one");
  TORCH_CHECK(mech == kValue || !given(w_rv), op, ": w_rv is only used by mechanism 'value', got one with '",
              mechanism, "'");
  TORCH_CHECK(mech == kStoc || !(given(w_mu) || given(w_sigma)), op,
              ": w_mu and w_sigma are only used by mechanism 'stoc', got one with '", mechanism, "'");
  if (uses_m) {
    at::Tensor rq = check_weight(op, w_rq, "w_rq", lead, false, p.acc);
    at::Tensor rk = check_weight(op, w_rk, "w_rk", lead, false, p.acc);
    TORCH_CHECK(rq.size(-1) == rk.size(-1), op, ": w_rk must have the columns of w_rq (", rq.size(-1), "), got ",
                rk.size(-1));
    p.first = mech == kAdd ? rk : rq;
    p.second = mech == kAdd ? rq : rk;
    p.m = at::matmul(p.first, p.second.transpose(-1, -2)).contiguous();
    c.m = p.m.data_ptr();
    c.m_head_stride = head_stride(p.m);
  }
  if (mech == kValue) {
    p.w_rv = check_weight(op, w_rv, "w_rv", lead, true, p.acc);
    c.w_rv = p.w_rv.data_ptr();
    c.wrv_head_stride = head_stride(p.w_rv);
  }
  if (mech == kStoc) {
    p.w_mu = check_weight(op, w_mu, "w_mu", lead, false, p.acc);
    p.w_sigma = check_weight(op, w_sigma, "w_sigma", lead, false, p.acc);
    TORCH_CHECK(p.w_sigma.size(-1) == p.w_mu.size(-1), op, ": w_sigma must have the columns of w_mu (",
                p.w_mu.size(-1), "), got ", p.w_sigma.size(-1));
    TORCH_CHECK(p.w_mu.size(-1) <= kMaxN, op, ": w_mu and w_sigma may have at most ", kMaxN, " columns, got ",
                p.w_mu.size(-1));
    c.w_mu = p.w_mu.data_ptr();
    c.w_sigma = p.w_sigma.data_ptr();
    c.wmu_head_stride = head_stride(p.w_mu);
    c.wsigma_head_stride = head_stride(p.w_sigma);
    c.r = static_cast<int>(p.w_mu.size(-1));
  }
  c.batch = static_cast<int>(batch);
  c.heads = static_cast<int>(heads);
  c.n = static_cast<int>(n);
  c.d = static_cast<int>(d);
  c.scale = scale;
  c.alpha = mech == kAdd ? 0.5 * refine_scale : refine_scale;
  c.beta = mech == kAdd ? 0.5 : 0.0;
  c.dropout_p = static_cast<float>(dropout_p);
  c.mechanism = mech;
  c.refine_scores = refine_scores;
  return p;
}

void allocate_partials(Prepared& p) {
  Core& c = p.core;
  const auto options = at::TensorOptions().dtype(p.acc).device(p.device);
  if (c.mechanism == kNone) return;
  if (c.mechanism == kStoc) {
    p.dwmu_part = at::empty({c.batch, c.heads, c.n, c.r}, options);
    p.dwsigma_part = at::empty({c.batch, c.heads, c.n, c.r}, options);
    c.dwmu_part = p.dwmu_part.data_ptr();
    c.dwsigma_part = p.dwsigma_part.data_ptr();
    return;
  }
  p.dm_part = at::empty({c.batch, c.heads, c.n, c.n}, options);
  c.dm_part = p.dm_part.data_ptr();
  if (c.mechanism == kValue) {
    p.dwrv_part = at::empty({c.batch, c.heads, c.n, c.n}, options);
    c.dwrv_part = p.dwrv_part.data_ptr();
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> weight_grads(
    const Prepared& p, const OptTensor& w_rq, const OptTensor& w_rk, const OptTensor& w_rv, const OptTensor& w_mu,
    const OptTensor& w_sigma) {
  const int mech = p.core.mechanism;
  const at::Tensor none = at::empty({0}, at::TensorOptions().dtype(at::kFloat).device(p.device));
  at::Tensor dw_rq = none, dw_rk = none, dw_rv = none, dw_mu = none, dw_sigma = none;
  if (mech == kSimp || mech == kAdd || mech == kValue) {
    const at::Tensor dm = reduce_partials(p.dm_part, p.m.dim() == 3);
    // M = F S^T: dF = dM S, dS = dM^T F (SPEC §3b), summed over the heads where the weight is shared.
    const at::Tensor d_first = head_reduced(at::matmul(dm, p.second), p.first);
    const at::Tensor d_second = head_reduced(at::matmul(dm.transpose(-1, -2), p.first), p.second);
    const bool add = mech == kAdd;
    dw_rq = (add ? d_second : d_first).to(w_rq->scalar_type());
    dw_rk = (add ? d_first : d_second).to(w_rk->scalar_type());
  }
  if (mech == kValue) dw_rv = reduce_partials(p.dwrv_part, p.w_rv.dim() == 3).to(w_rv->scalar_type());
  if (mech == kStoc) {
    dw_mu = reduce_partials(p.dwmu_part, p.w_mu.dim() == 3).to(w_mu->scalar_type());
    dw_sigma = reduce_partials(p.dwsigma_part, p.w_sigma.dim() == 3).to(w_sigma->scalar_type());
  }
  return std::make_tuple(dw_rq, dw_rk, dw_rv, dw_mu, dw_sigma);
}

void place_blocks(Prepared& p, Core& c, bool backward) {
  c.scratch = nullptr;
  c.scratch_blocks = 0;
  if (p.on_host) return;
  const size_t bytes = smem_elems(c.n, c.mechanism, backward, c.r) * sizeof(float);
  int device = 0, limit = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  if (c.n <= kFusedMaxN && bytes <= static_cast<size_t>(limit)) return;
  const int64_t blocks = static_cast<int64_t>(c.batch) * c.heads;
  const int64_t fit = static_cast<int64_t>(kScratchBytes / bytes);
  c.scratch_blocks = std::max<int64_t>(1, std::min<int64_t>(blocks, fit));
  p.scratch = at::empty({c.scratch_blocks * static_cast<int64_t>(bytes / sizeof(float))},
                        at::TensorOptions().dtype(at::kFloat).device(p.device));
  c.scratch = p.scratch.data_ptr();
}

}  // namespace refine
}  // namespace awr_fast
