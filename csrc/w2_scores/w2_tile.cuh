// The W2 scoring tile shared by w2_scores_kernels.cu and w2_topk_kernels.cu (SPEC §4): constants,
// dtype conversion and the stage loader of the 64 x 64 SIMT "GEMM" over the concatenated channels
// [mu, sqrt(max(sig, 1e-24))]. No torch header: the launchers' .cu files compile fast.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace awr_fast {
namespace w2_tile {

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

// The stage buffers and norms of one 64 x 64 tile (static shared memory of the kernels that use it).
struct TileShared {
  float q_tile[2 * kChunk][kTile + kPad];  // [channel][query row]
  float i_tile[2 * kChunk][kTile + kPad];  // [channel][item row]
  float q_norm[kTile];
  float i_norm[kTile];
};

// acc[i][j] = x_{row0 + ty + 16 i} . y_{col0 + tx + 16 j} over the 2d concatenated channels, with the
// thread (ty, tx) = (tid / 16, tid % 16), and the rows' and columns' norms in s.q_norm / s.i_norm.
// Rows >= rows_end and columns >= cols_end load zeros. Ends with a __syncthreads (norms visible).
template <typename T>
__device__ __forceinline__ void tile_products(const T* __restrict__ mu, const T* __restrict__ sig,
                                              const T* __restrict__ item_mu, const T* __restrict__ item_sig,
                                              int64_t rows_end, int64_t cols_end, int64_t d, int64_t row0,
                                              int64_t col0, TileShared& s, float (&acc)[kPerThread][kPerThread]) {
  const int tid = threadIdx.x;
  // Loader layout: 4 threads per row, 4 consecutive channels each.
  const int load_row = tid / 4;
  const int load_c = (tid % 4) * 4;
  const int ty = tid / 16;
  const int tx = tid % 16;
#pragma unroll
  for (int i = 0; i < kPerThread; ++i)
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) acc[i][j] = 0.f;
  float q_part = 0.f, i_part = 0.f;

  for (int64_t c0 = 0; c0 < d; c0 += kChunk) {
    load_stage(mu, sig, rows_end, d, row0 + load_row, load_row, load_c, c0, s.q_tile, q_part);
    load_stage(item_mu, item_sig, cols_end, d, col0 + load_row, load_row, load_c, c0, s.i_tile, i_part);
    __syncthreads();
#pragma unroll
    for (int k = 0; k < 2 * kChunk; ++k) {
      float a[kPerThread], b[kPerThread];
#pragma unroll
      for (int i = 0; i < kPerThread; ++i) a[i] = s.q_tile[k][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < kPerThread; ++j) b[j] = s.i_tile[k][tx + 16 * j];
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
    s.q_norm[load_row] = q_part;
    s.i_norm[load_row] = i_part;
  }
  __syncthreads();
}

}  // namespace w2_tile
}  // namespace awr_fast
