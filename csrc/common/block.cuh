// What every awr_fast CUDA kernel shares: dtype conversion, the dropout keep mask, and the block-level
// parallel loop in which the fused kernels are written.
//
// A fused kernel is one thread block per (batch, head), written as a sequence of phases
// `parallel_for(count, body)`: body(i) for every i in [0, count), then a barrier. Inside a phase the
// iterations are independent (they only read what earlier phases wrote), so the same source runs two
// ways: on the GPU the block's threads share the iterations and __syncthreads() ends the phase; compiled
// for the host (the CPU emulation CI uses, AWR_FAST_CUDA_EMULATE=1) the iterations run in order. That is
// how the kernels' arithmetic is checked against the float64 reference on a machine without a GPU.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#if defined(__CUDACC__)
#define AWR_HD __host__ __device__ __forceinline__
#else
#define AWR_HD inline
#endif

namespace awr_fast {

enum class Dtype : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

AWR_HD float to_acc(float x) { return x; }
AWR_HD double to_acc(double x) { return x; }
AWR_HD float to_acc(__half x) { return __half2float(x); }
AWR_HD float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T, typename Acc>
AWR_HD T from_acc(Acc x) {
  return static_cast<T>(x);
}
template <>
AWR_HD __half from_acc<__half, float>(float x) {
  return __float2half_rn(x);
}
template <>
AWR_HD __nv_bfloat16 from_acc<__nv_bfloat16, float>(float x) {
  return __float2bfloat16_rn(x);
}

// Threads of a fused block; the launch bounds promise this many.
constexpr int kBlockThreads = 256;

// One phase: body(i) for i in [0, count), then a block-wide barrier. Every thread of the block must
// call it (the kernels call it from uniform control flow only).
template <typename Body>
AWR_HD void parallel_for(int count, Body body) {
#if defined(__CUDA_ARCH__)
  for (int i = static_cast<int>(threadIdx.x); i < count; i += static_cast<int>(blockDim.x)) body(i);
  __syncthreads();
#else
  for (int i = 0; i < count; ++i) body(i);
#endif
}

// Dropout keep draw for entry `offset` of a call seeded `seed`: a splitmix64 hash of (seed, offset),
// the top 24 bits as a uniform in [0, 1). Forward and backward draw the same bits for the same entry.
AWR_HD bool dropout_keep(uint64_t seed, uint64_t offset, float p) {
  uint64_t z = seed * 0x9E3779B97F4A7C15ull + offset + 0x632BE59BD9B4E019ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  const float u = static_cast<float>(z >> 40) * (1.0f / 16777216.0f);
  return u >= p;
}

}  // namespace awr_fast
