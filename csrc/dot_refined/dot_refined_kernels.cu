// dot_refined: the fused CUDA kernels (one block per (batch, head), n <= 64) and their host emulation.
// The work of a block is dot_refined_block.cuh; this file only launches it (or loops over it).

#include <vector>

#include <cuda_runtime.h>

#include "dot_refined/dot_refined.h"
#include "dot_refined/dot_refined_block.cuh"

namespace awr_fast {
namespace dot_refined {
namespace {

template <typename T>
__global__ void __launch_bounds__(kBlockThreads) forward_kernel(const Args args) {
  extern __shared__ float smem_fwd[];
  forward_block<T, float>(args, blockIdx.x, smem_fwd);
}

template <typename T>
__global__ void __launch_bounds__(kBlockThreads) backward_kernel(const Args args) {
  extern __shared__ float smem_bwd[];
  backward_block<T, float>(args, blockIdx.x, smem_bwd);
}

template <typename Kernel>
cudaError_t launch(Kernel kernel, const Args& args, bool backward, cudaStream_t stream) {
  const int64_t blocks = static_cast<int64_t>(args.batch) * args.heads;
  if (blocks == 0) return cudaSuccess;
  if (blocks > 2147483647) return cudaErrorInvalidConfiguration;
  const size_t bytes = smem_elems(args.n, args.mechanism, backward) * sizeof(float);
  if (bytes > 48 * 1024) {  // above the default: opt in (checked against the device's limit by the caller)
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                 static_cast<int>(bytes));
    if (err != cudaSuccess) return err;
  }
  kernel<<<static_cast<unsigned>(blocks), kBlockThreads, bytes, stream>>>(args);
  return cudaGetLastError();
}

template <typename T, typename Acc, bool kBackward>
void host_loop(const Args& args) {
  std::vector<Acc> smem(smem_elems(args.n, args.mechanism, kBackward));
  const int64_t blocks = static_cast<int64_t>(args.batch) * args.heads;
  for (int64_t bh = 0; bh < blocks; ++bh) {
    if (kBackward) {
      backward_block<T, Acc>(args, bh, smem.data());
    } else {
      forward_block<T, Acc>(args, bh, smem.data());
    }
  }
}

}  // namespace

size_t smem_elems(int n, int mechanism, bool backward) { return smem_elems_for(n, mechanism, backward); }

cudaError_t forward_launch(Dtype dtype, const Args& args, cudaStream_t stream) {
  switch (dtype) {
    case Dtype::kFloat32: return launch(forward_kernel<float>, args, false, stream);
    case Dtype::kFloat16: return launch(forward_kernel<__half>, args, false, stream);
    case Dtype::kBFloat16: return launch(forward_kernel<__nv_bfloat16>, args, false, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t backward_launch(Dtype dtype, const Args& args, cudaStream_t stream) {
  switch (dtype) {
    case Dtype::kFloat32: return launch(backward_kernel<float>, args, true, stream);
    case Dtype::kFloat16: return launch(backward_kernel<__half>, args, true, stream);
    case Dtype::kBFloat16: return launch(backward_kernel<__nv_bfloat16>, args, true, stream);
    default: return cudaErrorInvalidValue;
  }
}

void forward_host(Dtype dtype, const Args& args) {
  switch (dtype) {
    case Dtype::kFloat32: host_loop<float, float, false>(args); break;
    case Dtype::kFloat16: host_loop<__half, float, false>(args); break;
    case Dtype::kBFloat16: host_loop<__nv_bfloat16, float, false>(args); break;
    case Dtype::kFloat64: host_loop<double, double, false>(args); break;
  }
}

void backward_host(Dtype dtype, const Args& args) {
  switch (dtype) {
    case Dtype::kFloat32: host_loop<float, float, true>(args); break;
    case Dtype::kFloat16: host_loop<__half, float, true>(args); break;
    case Dtype::kBFloat16: host_loop<__nv_bfloat16, float, true>(args); break;
    case Dtype::kFloat64: host_loop<double, double, true>(args); break;
  }
}

}  // namespace dot_refined
}  // namespace awr_fast
