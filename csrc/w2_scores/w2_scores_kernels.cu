// W2 item scoring for STOSA's full-ranking evaluation (SPEC §4), one CUDA kernel.
//
// With x_b = [mu_b, sqrt(max(sig_b, 1e-24))] and y_v likewise (2d channels),
//     W2sq(b, v) = n_b + n_v - 2 x_b . y_v,      n = ||mu||^2 + sum(sig),
// i.e. one dot product over the concatenated channels plus two norms. The kernel is a tiled SIMT "GEMM":
// a 64 x 64 output tile per block, 256 threads with 4 x 4 outputs each, channels staged through shared
// memory 16 at a time (32 combined), float32 accumulation whatever the input dtype. The norms are
// accumulated by the threads that load the tiles, so every input element is read once per block.
// No torch header is included here: w2_scores.cpp does the checks and allocation.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "w2_scores/w2_scores.h"
#include "w2_scores/w2_tile.cuh"

namespace awr_fast {
namespace {

using namespace w2_tile;

// At least 2 blocks per SM: ptxas then takes 64 registers and spills nothing (with the bare thread
// bound it picked 48 and spilled 8 B on sm_90; bench/cuda_resources.py --check).
template <typename T>
__global__ void __launch_bounds__(kThreads, 2)
w2_scores_kernel(const T* __restrict__ mu, const T* __restrict__ sig, const T* __restrict__ item_mu,
                 const T* __restrict__ item_sig, float* __restrict__ out, int64_t B, int64_t V, int64_t d) {
  __shared__ TileShared s;
  const int64_t row0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int64_t col0 = static_cast<int64_t>(blockIdx.x) * kTile;
  float acc[kPerThread][kPerThread];
  tile_products(mu, sig, item_mu, item_sig, B, V, d, row0, col0, s, acc);

  // Compute layout: thread (ty, tx) owns rows ty + 16 i and columns tx + 16 j.
  const int ty = threadIdx.x / 16;
  const int tx = threadIdx.x % 16;
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    const int64_t row = row0 + ty + 16 * i;
    if (row >= B) continue;
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      const int64_t col = col0 + tx + 16 * j;
      if (col < V) out[row * V + col] = s.q_norm[ty + 16 * i] + s.i_norm[tx + 16 * j] - 2.f * acc[i][j];
    }
  }
}

template <typename T>
cudaError_t launch(const void* mu, const void* sig, const void* item_mu, const void* item_sig, float* out,
                   int64_t B, int64_t V, int64_t d, cudaStream_t stream) {
  const int64_t col_blocks = (V + kTile - 1) / kTile;
  if (col_blocks > 2147483647) return cudaErrorInvalidConfiguration;
  constexpr int64_t kMaxRows = int64_t{65535} * kTile;  // grid.y limit: larger B runs in row slabs
  for (int64_t r0 = 0; r0 < B; r0 += kMaxRows) {
    const int64_t rows = B - r0 < kMaxRows ? B - r0 : kMaxRows;
    const dim3 grid(static_cast<unsigned>(col_blocks), static_cast<unsigned>((rows + kTile - 1) / kTile));
    w2_scores_kernel<T><<<grid, kThreads, 0, stream>>>(
        static_cast<const T*>(mu) + r0 * d, static_cast<const T*>(sig) + r0 * d, static_cast<const T*>(item_mu),
        static_cast<const T*>(item_sig), out + r0 * V, rows, V, d);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace

cudaError_t w2_scores_launch(W2Dtype dtype, const void* mu, const void* sig, const void* item_mu,
                             const void* item_sig, float* out, int64_t B, int64_t V, int64_t d,
                             cudaStream_t stream) {
  if (B == 0 || V == 0) return cudaSuccess;
  switch (dtype) {
    case W2Dtype::kFloat32: return launch<float>(mu, sig, item_mu, item_sig, out, B, V, d, stream);
    case W2Dtype::kFloat16: return launch<__half>(mu, sig, item_mu, item_sig, out, B, V, d, stream);
    case W2Dtype::kBFloat16: return launch<__nv_bfloat16>(mu, sig, item_mu, item_sig, out, B, V, d, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace awr_fast
