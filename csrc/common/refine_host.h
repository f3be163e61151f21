// Host side shared by the refined-attention ops (dot_refined, w2_refined): the checks of the options and
// refinement weights (each error names the argument), M = W_RQ W_RK^T, the weight-gradient partials and
// their reduction, the shared-memory check against the device. Torch headers: only the ops' .cpp files
// include this.
#pragma once

#include <optional>
#include <string>
#include <tuple>

#include <ATen/core/Tensor.h>

#include "common/block.cuh"
#include "common/refine_block.cuh"

namespace awr_fast {
namespace refine {

using OptTensor = std::optional<at::Tensor>;

// What one call's refinement holds alive while its kernel runs, and the Core the kernel reads.
struct Prepared {
  at::Tensor kpm, m, first, second, w_rv, w_mu, w_sigma;  // the weights in the accumulation dtype
  at::Tensor dm_part, dwrv_part, dwmu_part, dwsigma_part, scratch;
  Core core;
  Dtype dtype = Dtype::kFloat32;
  at::ScalarType acc = at::kFloat;
  bool on_host = false;
  at::Device device = at::kCPU;
};

// t must match lead (device, dtype, shape).
void check_like(const char* op, const at::Tensor& t, const char* name, const at::Tensor& lead, const char* lead_name);

// Checks lead ((batch, heads, n, d_h), a CUDA tensor or a CPU one for the host emulation) and every option
// and weight of the mechanism; fills the Core (but no tensor pointers of the family).
Prepared prepare(const char* op, const at::Tensor& lead, const char* lead_name, bool allow_stoc, const OptTensor& w_rq,
                 const OptTensor& w_rk, const OptTensor& w_rv, const OptTensor& w_mu, const OptTensor& w_sigma,
                 const OptTensor& kpm, const OptTensor& seed, const std::string& mechanism, double scale,
                 double refine_scale, bool refine_scores, double dropout_p);

// Allocates the weight-gradient partials of the mechanism and points the Core at them.
void allocate_partials(Prepared& p);

// (dw_rq, dw_rk, dw_rv, dw_mu, dw_sigma) from the partials, each in its weight's dtype and shape; an empty
// float32 tensor where the mechanism has no such weight.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> weight_grads(
    const Prepared& p, const OptTensor& w_rq, const OptTensor& w_rk, const OptTensor& w_rv, const OptTensor& w_mu,
    const OptTensor& w_sigma);

// Where the blocks of a GPU launch keep their matrices: shared memory for n <= kFusedMaxN when the
// device's opt-in limit holds them, else slices of a global scratch that p keeps alive (at most
// kScratchBytes at a time; the launcher loops over chunks of the grid). Sets c.scratch, c.scratch_blocks.
void place_blocks(Prepared& p, Core& c, bool backward);
constexpr size_t kScratchBytes = size_t{256} << 20;

int parse_mechanism(const char* op, const std::string& name, bool allow_stoc);

}  // namespace refine
}  // namespace awr_fast
