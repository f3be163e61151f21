// w2_scores (SPEC §4): checks, allocation and the registration of awr_fast::w2_scores_cuda, its
// backward w2_scores_cuda_bwd and the fused top-k w2_topk_cuda (schemas in csrc/registration.cpp, fake kernels in awr_fast/_ext.py, autograd
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
#include <ATen/ops/topk.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>
#include <optional>
#include <tuple>
#include <utility>

#include "w2_scores/w2_scores.h"

namespace awr_fast {
namespace {

void check_input(const char* op, const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor (this op is the CUDA backend), got device ",
              t.device());
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be 2-d, got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " must have the dtype of ", ref_name, " (",
              ref.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " must be on the device of ", ref_name, " (", ref.device(),
              "), got ", t.device());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous (call .contiguous())");
}

W2Dtype w2_dtype(const at::Tensor& mu, const char* op) {
  switch (mu.scalar_type()) {
    case at::kFloat: return W2Dtype::kFloat32;
    case at::kHalf: return W2Dtype::kFloat16;
    case at::kBFloat16: return W2Dtype::kBFloat16;
    default: TORCH_CHECK(false, op, ": mu must be float32, float16 or bfloat16, got ", mu.scalar_type());
  }
}

at::Tensor w2_scores_cuda(const at::Tensor& mu, const at::Tensor& sig, const at::Tensor& item_mu,
                          const at::Tensor& item_sig) {
  check_input("w2_scores_cuda", mu, "mu", mu, "mu");
  check_input("w2_scores_cuda", sig, "sig", mu, "mu");
  check_input("w2_scores_cuda", item_mu, "item_mu", mu, "mu");
  check_input("w2_scores_cuda", item_sig, "item_sig", mu, "mu");
  const W2Dtype dtype = w2_dtype(mu, "w2_scores_cuda");
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

// (values float32 (B, k), indices int64 (B, k)) of the k items nearest each query, ascending squared W2,
// ties to the lower index; "no item" left for a row -> (+inf, -1). exclude: None, a bool (B, V) mask
// (True = skip), or int32/int64 (B, L) item ids padded with -1; ids outside [0, V) are skipped here (the
// Python entry, awr_fast.cuda.w2_scores.w2_topk, rejects them with a clear error first). CPU tensors run
// the kernel's host emulation (AWR_FAST_CUDA_EMULATE=1 lets the Python entry take them).
std::tuple<at::Tensor, at::Tensor> w2_topk_cuda(const at::Tensor& mu, const at::Tensor& sig,
                                                const at::Tensor& item_mu, const at::Tensor& item_sig, int64_t k,
                                                const std::optional<at::Tensor>& exclude, bool exclude_padding) {
  constexpr const char* op = "w2_topk_cuda";
  TORCH_CHECK(mu.is_cuda() || mu.is_cpu(), op, ": mu must be a CUDA tensor (or a CPU one for the host emulation), "
              "got device ", mu.device());
  const bool on_host = mu.is_cpu();
  for (auto [t, name] : {std::pair{&mu, "mu"}, {&sig, "sig"}, {&item_mu, "item_mu"}, {&item_sig, "item_sig"}}) {
    TORCH_CHECK(t->device() == mu.device(), op, ": ", name, " must be on the device of mu (", mu.device(), "), got ",
                t->device());
    TORCH_CHECK(t->dim() == 2, op, ": ", name, " must be 2-d, got shape ", t->sizes());
    TORCH_CHECK(t->scalar_type() == mu.scalar_type(), op, ": ", name, " must have the dtype of mu (",
                mu.scalar_type(), "), got ", t->scalar_type());
    TORCH_CHECK(t->is_contiguous(), op, ": ", name, " must be contiguous (call .contiguous())");
  }
  const W2Dtype dtype = w2_dtype(mu, op);
  TORCH_CHECK(sig.sizes() == mu.sizes(), op, ": sig must have the shape of mu ", mu.sizes(), ", got ", sig.sizes());
  TORCH_CHECK(item_sig.sizes() == item_mu.sizes(), op, ": item_sig must have the shape of item_mu ", item_mu.sizes(),
              ", got ", item_sig.sizes());
  TORCH_CHECK(item_mu.size(1) == mu.size(1), op, ": item_mu must have ", mu.size(1),
              " columns (the width of mu), got shape ", item_mu.sizes());
  const int64_t B = mu.size(0), V = item_mu.size(0), d = mu.size(1);
  const int64_t limit = V < kTopkMaxK ? V : kTopkMaxK;
  TORCH_CHECK(1 <= k && k <= limit, op, ": k must be in [1, ", limit, "] (min(|V|, ", kTopkMaxK, ")), got ", k);

  std::optional<c10::cuda::CUDAGuard> guard;
  if (!on_host) guard.emplace(mu.device());
  const cudaStream_t stream = on_host ? nullptr : c10::cuda::getCurrentCUDAStream().stream();
  TopkArgs args;
  at::Tensor ex;
  if (exclude.has_value() && exclude->numel() > 0) {
    const at::Tensor& e = *exclude;
    TORCH_CHECK(e.device() == mu.device(), op, ": exclude must be on the device of mu (", mu.device(), "), got ",
                e.device());
    if (e.scalar_type() == at::kBool) {
      TORCH_CHECK(e.dim() == 2 && e.size(0) == B && e.size(1) == V, op, ": exclude as a bool mask must be (B, V) = (",
                  B, ", ", V, "), got shape ", e.sizes());
      args.mode = TopkExclude::kBytes;
      ex = e.contiguous();
      args.ex_stride = V;
    } else {
      TORCH_CHECK(e.scalar_type() == at::kLong || e.scalar_type() == at::kInt, op,
                  ": exclude must be a bool (B, V) mask or int32/int64 (B, L) item ids, got ", e.scalar_type());
      TORCH_CHECK(e.dim() == 2 && e.size(0) == B, op, ": exclude as item ids must be (B, L) with B = ", B,
                  ", got shape ", e.sizes());
      const at::Tensor ids = e.to(at::kLong).contiguous();
      args.ex_stride = (V + 31) / 32;
      ex = at::zeros({B, args.ex_stride}, mu.options().dtype(at::kInt));
      auto* bits = static_cast<uint32_t*>(ex.data_ptr());
      if (on_host) {
        w2_exclusion_bits_host(ids.data_ptr<int64_t>(), bits, B, ids.size(1), V, args.ex_stride);
      } else {
        const cudaError_t err =
            w2_exclusion_bits_launch(ids.data_ptr<int64_t>(), bits, B, ids.size(1), V, args.ex_stride, stream);
        TORCH_CHECK(err == cudaSuccess, op, ": exclusion kernel launch failed: ", cudaGetErrorString(err));
      }
      args.mode = TopkExclude::kBits;
    }
    args.ex = ex.data_ptr();
  }

  // Enough blocks for a small batch: split the items so the grid reaches about two blocks per SM of an
  // H100/H200 (a constant, not a device query, as the Triton launcher), no split empty.
  constexpr int64_t kTargetBlocks = 256;
  const int64_t row_blocks = (B + 63) / 64, chunks = (V + 63) / 64;
  int64_t per = chunks;
  if (chunks > 1 && row_blocks < kTargetBlocks) {
    const int64_t want = (kTargetBlocks + row_blocks - 1) / row_blocks;
    const int64_t splits_wanted = want < chunks ? want : chunks;
    per = (chunks + splits_wanted - 1) / splits_wanted;
  }
  args.splits = (chunks + per - 1) / per;
  args.span = per * 64;
  args.k_pad = k <= 32 ? 32 : (k <= 64 ? 64 : 128);
  at::Tensor keys = at::empty({args.splits, B, args.k_pad}, mu.options().dtype(at::kLong));
  args.mu = mu.data_ptr();
  args.sig = sig.data_ptr();
  args.item_mu = item_mu.data_ptr();
  args.item_sig = item_sig.data_ptr();
  args.skip_padding = exclude_padding;
  args.keys = keys.data_ptr<int64_t>();
  args.B = B;
  args.V = V;
  args.d = d;
  if (on_host) {
    w2_topk_host(dtype, args);
  } else {
    const cudaError_t err = w2_topk_launch(dtype, args, stream);
    TORCH_CHECK(err == cudaSuccess, op, ": kernel launch failed: ", cudaGetErrorString(err));
  }

  // Keys are unique per row (they hold the index), so topk's order is fully determined.
  const at::Tensor best = args.splits == 1
                              ? keys.select(0, 0).narrow(1, 0, k)
                              : std::get<0>(at::topk(keys.transpose(0, 1).reshape({B, args.splits * args.k_pad}), k, 1,
                                                     /*largest=*/false, /*sorted=*/true));
  const at::Tensor high = best.__rshift__(32);
  const at::Tensor bits = high.__xor__(high.__rshift__(31).__and__(0x7FFFFFFF)).to(at::kInt);
  const at::Tensor empty = best.eq(kTopkEmpty);
  const at::Tensor values = bits.view(at::kFloat).masked_fill(empty, std::numeric_limits<float>::infinity());
  const at::Tensor indices = best.__and__(0xFFFFFFFFLL).masked_fill(empty, -1);
  return std::make_tuple(values, indices);
}

}  // namespace

int64_t w2_topk_cuda_smem_bytes(int64_t k) {
  TORCH_CHECK(1 <= k && k <= kTopkMaxK, "w2_topk_cuda_smem_bytes: k must be in [1, ", kTopkMaxK, "], got ", k);
  return w2_topk_smem_bytes(k <= 32 ? 32 : (k <= 64 ? 64 : 128));
}

}  // namespace awr_fast

TORCH_LIBRARY_IMPL(awr_fast, CUDA, m) {
  m.impl("w2_scores_cuda", &awr_fast::w2_scores_cuda);
  m.impl("w2_scores_cuda_bwd", &awr_fast::w2_scores_cuda_bwd);
  m.impl("w2_topk_cuda", &awr_fast::w2_topk_cuda);
}

TORCH_LIBRARY_IMPL(awr_fast, CPU, m) {
  m.impl("w2_scores_cuda", &awr_fast::w2_scores_cuda);
  m.impl("w2_scores_cuda_bwd", &awr_fast::w2_scores_cuda_bwd);
  m.impl("w2_topk_cuda", &awr_fast::w2_topk_cuda);
}
