// w2_refined (SPEC §3, §4): the launch interface of the CUDA kernels of STOSA's Wasserstein attention,
// free of torch headers. w2_refined.cpp checks the arguments, allocates, and calls these.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include <cuda_runtime_api.h>

#include "common/block.cuh"
#include "common/refine_block.cuh"

namespace awr_fast {
namespace w2_refined {

// One call's arguments, type-erased: the refinement core and the six (B, H, n, d) inputs (means and
// diagonal covariances of Q, K, V), the two output gradients, the two outputs and six input gradients.
struct Args {
  refine::Core core;
  const void* mu_q = nullptr;
  const void* sig_q = nullptr;
  const void* mu_k = nullptr;
  const void* sig_k = nullptr;
  const void* mu_v = nullptr;
  const void* sig_v = nullptr;
  const void* grad_mu = nullptr;
  const void* grad_sig = nullptr;
  void* out_mu = nullptr;
  void* out_sig = nullptr;
  void* d_mu_q = nullptr;
  void* d_sig_q = nullptr;
  void* d_mu_k = nullptr;
  void* d_sig_k = nullptr;
  void* d_mu_v = nullptr;
  void* d_sig_v = nullptr;
};

// Shared memory of one block in bytes of float (r: the columns of M_stoc's weights, else 0).
int64_t smem_bytes(int64_t n, std::string mechanism, bool backward, int64_t r);

cudaError_t forward_launch(Dtype dtype, const Args& args, cudaStream_t stream);
cudaError_t backward_launch(Dtype dtype, const Args& args, cudaStream_t stream);
void forward_host(Dtype dtype, const Args& args);
void backward_host(Dtype dtype, const Args& args);

}  // namespace w2_refined
}  // namespace awr_fast
