// Launch plumbing shared by the fused families: one block of kBlockThreads per (batch, head) with the
// core's dynamic shared memory, and the host loop of the emulation. Included by the families' .cu files.
#pragma once

#include <vector>

#include <cuda_runtime.h>

#include "common/block.cuh"
#include "common/refine_block.cuh"

namespace awr_fast {
namespace refine {

template <typename Kernel, typename Args>
cudaError_t launch_blocks(Kernel kernel, const Args& args, bool backward, cudaStream_t stream) {
  const Core& c = args.core;
  const int64_t blocks = static_cast<int64_t>(c.batch) * c.heads;
  if (blocks == 0) return cudaSuccess;
  if (blocks > 2147483647) return cudaErrorInvalidConfiguration;
  if (c.scratch) {  // the global-memory path: chunks of the grid, one scratch slice per block
    if (c.scratch_blocks <= 0) return cudaErrorInvalidValue;
    for (int64_t first = 0; first < blocks; first += c.scratch_blocks) {
      Args chunk = args;
      chunk.core.bh_offset = first;
      const int64_t count = blocks - first < c.scratch_blocks ? blocks - first : c.scratch_blocks;
      kernel<<<static_cast<unsigned>(count), kBlockThreads, 0, stream>>>(chunk);
      const cudaError_t err = cudaGetLastError();
      if (err != cudaSuccess) return err;
    }
    return cudaSuccess;
  }
  const size_t bytes = smem_elems(c.n, c.mechanism, backward, c.r) * sizeof(float);
  if (bytes > 48 * 1024) {  // above the default: opt in (the host checked the device's limit)
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
    if (err != cudaSuccess) return err;
  }
  kernel<<<static_cast<unsigned>(blocks), kBlockThreads, bytes, stream>>>(args);
  return cudaGetLastError();
}

// The emulation: every block in turn, on one host buffer standing in for shared memory.
template <typename Acc, typename Args, typename Block>
void host_blocks(const Args& args, bool backward, Block block) {
  const Core& c = args.core;
  std::vector<Acc> smem(smem_elems(c.n, c.mechanism, backward, c.r));
  const int64_t blocks = static_cast<int64_t>(c.batch) * c.heads;
  for (int64_t bh = 0; bh < blocks; ++bh) block(args, bh, smem.data());
}

// Where a block keeps its matrices: shared memory, or its slice of the global scratch (n > kFusedMaxN).
__device__ __forceinline__ float* block_memory(const Core& c, bool backward, float* smem) {
  if (!c.scratch) return smem;
  return static_cast<float*>(c.scratch) + static_cast<size_t>(blockIdx.x) * smem_elems(c.n, c.mechanism, backward, c.r);
}

// A family is a struct with `using Args`, and static templates forward<T, Acc> and backward<T, Acc>(args,
// bh, smem) doing one block's work. These kernels and dispatchers serve every family.
template <typename Family, typename T>
__global__ void __launch_bounds__(kBlockThreads) forward_kernel(const typename Family::Args args) {
  extern __shared__ float smem_fwd[];
  Family::template forward<T, float>(args, args.core.bh_offset + blockIdx.x, block_memory(args.core, false, smem_fwd));
}

template <typename Family, typename T>
__global__ void __launch_bounds__(kBlockThreads) backward_kernel(const typename Family::Args args) {
  extern __shared__ float smem_bwd[];
  Family::template backward<T, float>(args, args.core.bh_offset + blockIdx.x, block_memory(args.core, true, smem_bwd));
}

template <typename Family>
cudaError_t launch(Dtype dtype, const typename Family::Args& args, bool backward, cudaStream_t stream) {
  switch (dtype) {
    case Dtype::kFloat32:
      return backward ? launch_blocks(backward_kernel<Family, float>, args, true, stream)
                      : launch_blocks(forward_kernel<Family, float>, args, false, stream);
    case Dtype::kFloat16:
      return backward ? launch_blocks(backward_kernel<Family, __half>, args, true, stream)
                      : launch_blocks(forward_kernel<Family, __half>, args, false, stream);
    case Dtype::kBFloat16:
      return backward ? launch_blocks(backward_kernel<Family, __nv_bfloat16>, args, true, stream)
                      : launch_blocks(forward_kernel<Family, __nv_bfloat16>, args, false, stream);
    default: return cudaErrorInvalidValue;
  }
}

template <typename Family, typename T, typename Acc>
void host_typed(const typename Family::Args& args, bool backward) {
  if (backward) {
    host_blocks<Acc>(args, true, Family::template backward<T, Acc>);
  } else {
    host_blocks<Acc>(args, false, Family::template forward<T, Acc>);
  }
}

template <typename Family>
void host(Dtype dtype, const typename Family::Args& args, bool backward) {
  switch (dtype) {
    case Dtype::kFloat32: host_typed<Family, float, float>(args, backward); break;
    case Dtype::kFloat16: host_typed<Family, __half, float>(args, backward); break;
    case Dtype::kBFloat16: host_typed<Family, __nv_bfloat16, float>(args, backward); break;
    case Dtype::kFloat64: host_typed<Family, double, double>(args, backward); break;
  }
}

}  // namespace refine
}  // namespace awr_fast
