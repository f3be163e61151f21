// The fused top-k of W2 item scoring (SPEC §4) for STOSA's full-ranking evaluation: the k items nearest
// each query without writing the (B, |V|) distance matrix.
//
// One block of 256 threads per (64 query rows, split of the items). Per 64-item chunk it computes the
// 64 x 64 distance tile exactly as w2_scores_kernel (w2_tile.cuh), writes it to shared memory, and each
// of the 8 warps merges the chunk into the running top-k_pad of its 8 rows: a row's keys stay sorted
// ascending in shared memory; the chunk's keys below the row's current k_pad-th are inserted one at a
// time (found by a ballot, so the warp's control flow stays uniform), each insertion a shift of the
// entries above it, k_pad / 32 per lane. After the first chunks few keys beat the k_pad-th, so the merge
// costs little beside the tile's arithmetic. Splits over the items give a small batch enough blocks;
// the host merges their lists (w2_scores.cpp).

#include <cuda_runtime.h>

#include "w2_scores/w2_scores.h"
#include "w2_scores/w2_tile.cuh"

namespace awr_fast {
namespace {

using namespace w2_tile;

constexpr int kWarps = kThreads / 32;
constexpr unsigned kFull = 0xffffffffu;

// The order-preserving key of (distance, item).
__device__ __forceinline__ int64_t make_key(float w2, int64_t item) {
  if (w2 == 0.f) w2 = 0.f;                      // -0 -> +0: equal distances, equal high words
  if (w2 != w2) w2 = __int_as_float(0x7fc00000);  // one NaN, positive: after +inf, as torch.topk
  int bits = __float_as_int(w2);
  bits ^= (bits >> 31) & 0x7fffffff;
  const uint64_t high = static_cast<uint64_t>(static_cast<uint32_t>(bits)) << 32;
  return static_cast<int64_t>(high | static_cast<uint64_t>(static_cast<uint32_t>(item)));
}

__device__ __forceinline__ bool excluded(TopkExclude mode, const void* ex, int64_t ex_stride, int64_t row,
                                         int64_t item) {
  if (mode == TopkExclude::kBits) {
    const uint32_t word = static_cast<const uint32_t*>(ex)[row * ex_stride + (item >> 5)];
    return (word >> (item & 31)) & 1u;
  }
  if (mode == TopkExclude::kBytes) return static_cast<const uint8_t*>(ex)[row * ex_stride + item] != 0;
  return false;
}

// Inserts `cand` (below best[k_pad - 1], not present) into the ascending list best[0, 32 * E): each lane
// owns the positions lane + 32 j, reads its old entry and its left neighbour, then writes.
template <int E>
__device__ __forceinline__ void insert_sorted(int64_t* best, int64_t cand, int lane) {
  int64_t next[E];
#pragma unroll
  for (int j = 0; j < E; ++j) {
    const int p = lane + 32 * j;
    const int64_t old = best[p];
    const int64_t left = p > 0 ? best[p - 1] : INT64_MIN;
    next[j] = old < cand ? old : (left < cand ? cand : left);
  }
  __syncwarp();
#pragma unroll
  for (int j = 0; j < E; ++j) best[lane + 32 * j] = next[j];
  __syncwarp();
}

// E = k_pad / 32. One block: 64 query rows x the items [split * span, min(V, (split + 1) * span)).
template <typename T, int E>
__global__ void __launch_bounds__(kThreads, 1)
w2_topk_kernel(const T* __restrict__ mu, const T* __restrict__ sig, const T* __restrict__ item_mu,
               const T* __restrict__ item_sig, TopkExclude mode, const void* __restrict__ ex, int64_t ex_stride,
               bool skip_padding, int64_t* __restrict__ keys, int64_t B, int64_t V, int64_t d, int64_t span) {
  constexpr int kPadK = 32 * E;
  __shared__ TileShared s;
  __shared__ float dist[kTile][kTile + 1];
  extern __shared__ int64_t running[];  // [kTile][kPadK], each row ascending

  const int tid = threadIdx.x;
  const int lane = tid % 32;
  const int warp = tid / 32;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t split = blockIdx.y;
  const int64_t lo = split * span;
  const int64_t hi = lo + span < V ? lo + span : V;

  for (int p = tid; p < kTile * kPadK; p += kThreads) running[p] = kTopkEmpty;
  __syncthreads();

  const int ty = tid / 16;
  const int tx = tid % 16;
  for (int64_t col0 = lo; col0 < hi; col0 += kTile) {
    float acc[kPerThread][kPerThread];
    tile_products(mu, sig, item_mu, item_sig, B, hi, d, row0, col0, s, acc);
#pragma unroll
    for (int i = 0; i < kPerThread; ++i)
#pragma unroll
      for (int j = 0; j < kPerThread; ++j)
        dist[ty + 16 * i][tx + 16 * j] = s.q_norm[ty + 16 * i] + s.i_norm[tx + 16 * j] - 2.f * acc[i][j];
    __syncthreads();

    for (int r = warp; r < kTile; r += kWarps) {
      const int64_t row = row0 + r;
      if (row >= B) break;  // rows grow with r: the rest of this warp's rows are out too
      int64_t* best = running + r * kPadK;
      int64_t cand[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int c = lane + 32 * h;
        const int64_t item = col0 + c;
        const bool ok = item < hi && !(skip_padding && item == 0) && !excluded(mode, ex, ex_stride, row, item);
        cand[h] = ok ? make_key(dist[r][c], item) : kTopkEmpty;
      }
      int64_t worst = best[kPadK - 1];
      // the two candidates of each lane in turn (separate loops: no dynamically indexed local array)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        unsigned pending = __ballot_sync(kFull, cand[h] < worst);
        while (pending) {
          const int src = __ffs(pending) - 1;
          pending &= pending - 1;
          const int64_t key = __shfl_sync(kFull, cand[h], src);
          if (key < worst) {  // uniform: every lane holds the same key and worst
            insert_sorted<E>(best, key, lane);
            worst = best[kPadK - 1];
          }
        }
      }
    }
    __syncthreads();  // dist and the stage buffers are rewritten by the next chunk
  }

  for (int p = tid; p < kTile * kPadK; p += kThreads) {
    const int64_t row = row0 + p / kPadK;
    if (row < B) keys[(split * B + row) * kPadK + p % kPadK] = running[p];
  }
}

__global__ void __launch_bounds__(kThreads)
exclusion_bits_kernel(const int64_t* __restrict__ ids, uint32_t* __restrict__ bits, int64_t B, int64_t L, int64_t V,
                      int64_t words) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= B * L) return;
  const int64_t id = ids[i];
  if (id < 0 || id >= V) return;
  atomicOr(bits + (i / L) * words + (id >> 5), 1u << (id & 31));  // OR: duplicates are harmless
}

template <typename T, int E>
cudaError_t launch_topk(const void* mu, const void* sig, const void* item_mu, const void* item_sig,
                        TopkExclude mode, const void* ex, int64_t ex_stride, bool skip_padding, int64_t* keys,
                        int64_t B, int64_t V, int64_t d, int64_t splits, int64_t span, cudaStream_t stream) {
  const int64_t row_blocks = (B + kTile - 1) / kTile;
  if (row_blocks > 2147483647 || splits > 65535) return cudaErrorInvalidConfiguration;
  const int bytes = static_cast<int>(w2_topk_smem_bytes(32 * E));
  auto kernel = w2_topk_kernel<T, E>;
  if (bytes > 48 * 1024) {  // above the default: opt in (at most 64 KB, within every supported GPU's limit)
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
    if (err != cudaSuccess) return err;
  }
  const dim3 grid(static_cast<unsigned>(row_blocks), static_cast<unsigned>(splits));
  kernel<<<grid, kThreads, bytes, stream>>>(static_cast<const T*>(mu), static_cast<const T*>(sig),
                                            static_cast<const T*>(item_mu), static_cast<const T*>(item_sig), mode,
                                            ex, ex_stride, skip_padding, keys, B, V, d, span);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_width(int k_pad, const void* mu, const void* sig, const void* item_mu, const void* item_sig,
                         TopkExclude mode, const void* ex, int64_t ex_stride, bool skip_padding, int64_t* keys,
                         int64_t B, int64_t V, int64_t d, int64_t splits, int64_t span, cudaStream_t stream) {
  switch (k_pad) {
    case 32:
      return launch_topk<T, 1>(mu, sig, item_mu, item_sig, mode, ex, ex_stride, skip_padding, keys, B, V, d, splits,
                               span, stream);
    case 64:
      return launch_topk<T, 2>(mu, sig, item_mu, item_sig, mode, ex, ex_stride, skip_padding, keys, B, V, d, splits,
                               span, stream);
    case 128:
      return launch_topk<T, 4>(mu, sig, item_mu, item_sig, mode, ex, ex_stride, skip_padding, keys, B, V, d, splits,
                               span, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

int64_t w2_topk_smem_bytes(int k_pad) { return static_cast<int64_t>(kTile) * k_pad * sizeof(int64_t); }

cudaError_t w2_topk_launch(W2Dtype dtype, const void* mu, const void* sig, const void* item_mu,
                           const void* item_sig, TopkExclude exclude, const void* ex, int64_t ex_stride,
                           bool skip_padding, int64_t* keys, int k_pad, int64_t B, int64_t V, int64_t d,
                           int64_t splits, int64_t span, cudaStream_t stream) {
  if (B == 0) return cudaSuccess;
  if (span <= 0 || span % kTile != 0) return cudaErrorInvalidValue;
  switch (dtype) {
    case W2Dtype::kFloat32:
      return launch_width<float>(k_pad, mu, sig, item_mu, item_sig, exclude, ex, ex_stride, skip_padding, keys, B, V,
                                 d, splits, span, stream);
    case W2Dtype::kFloat16:
      return launch_width<__half>(k_pad, mu, sig, item_mu, item_sig, exclude, ex, ex_stride, skip_padding, keys, B, V,
                                  d, splits, span, stream);
    case W2Dtype::kBFloat16:
      return launch_width<__nv_bfloat16>(k_pad, mu, sig, item_mu, item_sig, exclude, ex, ex_stride, skip_padding, keys,
                                         B, V, d, splits, span, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t w2_exclusion_bits_launch(const int64_t* ids, uint32_t* bits, int64_t B, int64_t L, int64_t V,
                                     int64_t words, cudaStream_t stream) {
  const int64_t total = B * L;
  if (total == 0) return cudaSuccess;
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  if (blocks > 2147483647) return cudaErrorInvalidConfiguration;
  exclusion_bits_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(ids, bits, B, L, V, words);
  return cudaGetLastError();
}

}  // namespace awr_fast
