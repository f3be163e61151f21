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

namespace awr_fast {
namespace {

constexpr int kTile = 64;          // rows (queries) and columns (items) per block
constexpr int kChunk = 16;         // channels per stage (mu and sqrt(sig): 2 * kChunk combined)
constexpr int kThreads = 256;
constexpr int kPerThread = 4;      // outputs per thread along each axis
constexpr int kPad = 4;            // shared-memory padding against bank conflicts
constexpr float kSigFloor = 1e-24f;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// Loads channels [c0, c0 + kChunk) of row `row` (4 per thread) into the transposed stage tile and
// accumulates the row's norm contribution. Out-of-range rows and channels contribute zeros.
template <typename T>
__device__ __forceinline__ void load_stage(const T* __restrict__ mu, const T* __restrict__ sig, int64_t rows,
                                           int64_t d, int64_t row, int local_row, int c_local, int64_t c0,
                                           float (*tile)[kTile + kPad], float& norm) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t c = c0 + c_local + i;
    float m = 0.f, s = 0.f, root = 0.f;
    if (row < rows && c < d) {
      m = to_float(mu[row * d + c]);
      s = to_float(sig[row * d + c]);
      root = sqrtf(fmaxf(s, kSigFloor));
    }
    norm = fmaf(m, m, norm) + s;
    tile[c_local + i][local_row] = m;
    tile[kChunk + c_local + i][local_row] = root;
  }
}

// At least 2 blocks per SM: ptxas then takes 64 registers and spills nothing (with the bare thread
// bound it picked 48 and spilled 8 B on sm_90; bench/cuda_resources.py --check).
template <typename T>
__global__ void __launch_bounds__(kThreads, 2)
w2_scores_kernel(const T* __restrict__ mu, const T* __restrict__ sig, const T* __restrict__ item_mu,
                 const T* __restrict__ item_sig, float* __restrict__ out, int64_t B, int64_t V, int64_t d) {
  __shared__ float q_tile[2 * kChunk][kTile + kPad];   // [channel][query row]
  __shared__ float i_tile[2 * kChunk][kTile + kPad];   // [channel][item row]
  __shared__ float q_norm[kTile];
  __shared__ float i_norm[kTile];

  const int tid = threadIdx.x;
  const int64_t row0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int64_t col0 = static_cast<int64_t>(blockIdx.x) * kTile;

  // Loader layout: 4 threads per row, 4 consecutive channels each.
  const int load_row = tid / 4;
  const int load_c = (tid % 4) * 4;
  // Compute layout: thread (ty, tx) owns rows ty + 16 i and columns tx + 16 j.
  const int ty = tid / 16;
  const int tx = tid % 16;

  float acc[kPerThread][kPerThread];
#pragma unroll
  for (int i = 0; i < kPerThread; ++i)
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) acc[i][j] = 0.f;
  float q_part = 0.f, i_part = 0.f;

  for (int64_t c0 = 0; c0 < d; c0 += kChunk) {
    load_stage(mu, sig, B, d, row0 + load_row, load_row, load_c, c0, q_tile, q_part);
    load_stage(item_mu, item_sig, V, d, col0 + load_row, load_row, load_c, c0, i_tile, i_part);
    __syncthreads();
#pragma unroll
    for (int k = 0; k < 2 * kChunk; ++k) {
      float a[kPerThread], b[kPerThread];
#pragma unroll
      for (int i = 0; i < kPerThread; ++i) a[i] = q_tile[k][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < kPerThread; ++j) b[j] = i_tile[k][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < kPerThread; ++i)
#pragma unroll
        for (int j = 0; j < kPerThread; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }

  // The 4 loaders of a row are consecutive lanes of one warp.
  q_part += __shfl_xor_sync(0xffffffffu, q_part, 1);
  q_part += __shfl_xor_sync(0xffffffffu, q_part, 2);
  i_part += __shfl_xor_sync(0xffffffffu, i_part, 1);
  i_part += __shfl_xor_sync(0xffffffffu, i_part, 2);
  if (tid % 4 == 0) {
    q_norm[load_row] = q_part;
    i_norm[load_row] = i_part;
  }
  __syncthreads();

#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    const int64_t row = row0 + ty + 16 * i;
    if (row >= B) continue;
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      const int64_t col = col0 + tx + 16 * j;
      if (col < V) out[row * V + col] = q_norm[ty + 16 * i] + i_norm[tx + 16 * j] - 2.f * acc[i][j];
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
