// dot_refined (SPEC §1-3, §3b): the launch interface of the CUDA kernels, free of torch headers so the
// .cu compiles fast. dot_refined.cpp checks the arguments, allocates, and calls these.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include <cuda_runtime_api.h>

#include "common/block.cuh"
#include "common/refine_block.cuh"

namespace awr_fast {
namespace dot_refined {

// One call's arguments, type-erased: the refinement core, and q, k, v, grad, out, dq, dk, dv, all
// contiguous (B, H, n, d) of the call's dtype.
struct Args {
  refine::Core core;
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  const void* grad = nullptr;  // dL/dout (backward)
  void* out = nullptr;
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
};

// Shared memory of one block in bytes of float, for a mechanism by name (the op
// dot_refined_cuda_smem_bytes; the resource report reads it).
int64_t smem_bytes(int64_t n, std::string mechanism, bool backward);

// The GPU kernels (dtype float32, float16 or bfloat16; float32 accumulation). Return the launch error.
cudaError_t forward_launch(Dtype dtype, const Args& args, cudaStream_t stream);
cudaError_t backward_launch(Dtype dtype, const Args& args, cudaStream_t stream);

// The same block code run on the host, block after block (AWR_FAST_CUDA_EMULATE=1: CI's check of the
// kernels' arithmetic). float64 inputs accumulate in float64, the others in float32 as on the GPU.
void forward_host(Dtype dtype, const Args& args);
void backward_host(Dtype dtype, const Args& args);

}  // namespace dot_refined
}  // namespace awr_fast
