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
// the host merges their lists (w2_scores.cpp). CPU tensors run a host emulation of the same keys,
// candidates and insertion rule (AWR_FAST_CUDA_EMULATE=1: CI's check of the op without a GPU).

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include <cuda_runtime.h>

#include "common/block.cuh"
#include "w2_scores/w2_scores.h"
#include "w2_scores/w2_tile.cuh"

#if defined(__CUDACC__)
#define AWR_TOPK_HD __host__ __device__ __forceinline__
#else
#define AWR_TOPK_HD inline
#endif

namespace awr_fast {
namespace {

using namespace w2_tile;

constexpr int kWarps = kThreads / 32;
constexpr unsigned kFull = 0xffffffffu;

AWR_TOPK_HD int32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_int(x);
#else
  int32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  return bits;
#endif
}

// The order-preserving key of (distance, item).
AWR_TOPK_HD int64_t make_key(float w2, int64_t item) {
  if (w2 == 0.f) w2 = 0.f;                            // -0 -> +0: equal distances, equal high words
  int32_t bits = w2 != w2 ? 0x7fc00000 : float_bits(w2);  // one NaN, positive: after +inf, as torch.topk
  bits ^= (bits >> 31) & 0x7fffffff;
  const uint64_t high = static_cast<uint64_t>(static_cast<uint32_t>(bits)) << 32;
  return static_cast<int64_t>(high | static_cast<uint64_t>(static_cast<uint32_t>(item)));
}

AWR_TOPK_HD bool excluded(TopkExclude mode, const void* ex, int64_t ex_stride, int64_t row, int64_t item) {
  if (mode == TopkExclude::kBits) {
    const uint32_t word = static_cast<const uint32_t*>(ex)[row * ex_stride + (item >> 5)];
    return (word >> (item & 31)) & 1u;
  }
  if (mode == TopkExclude::kBytes) return static_cast<const uint8_t*>(ex)[row * ex_stride + item] != 0;
  return false;
}

// The candidate key of (row, item) at distance w2: "no item" unless the item is in range and kept.
AWR_TOPK_HD int64_t candidate_key(const TopkArgs& a, int64_t row, int64_t item, int64_t hi, float w2) {
  const bool ok = item < hi && !(a.skip_padding && item == 0) && !excluded(a.mode, a.ex, a.ex_stride, row, item);
  return ok ? make_key(w2, item) : kTopkEmpty;
}

// Entry p of an ascending list after inserting `cand` (absent from it, below its last entry), from the
// entry's old value and its left neighbour's (INT64_MIN at p = 0); the last entry falls off.
AWR_TOPK_HD int64_t inserted_entry(int64_t old, int64_t left, int64_t cand) {
  return old < cand ? old : (left < cand ? cand : left);
}

// Inserts `cand` (below best[k_pad - 1], not present) into the ascending list best[0, 32 * E): each lane
// owns the positions lane + 32 j, reads its old entry and its left neighbour, then writes.
template <int E>
__device__ __forceinline__ void insert_sorted(int64_t* best, int64_t cand, int lane) {
  int64_t next[E];
#pragma unroll
  for (int j = 0; j < E; ++j) {
    const int p = lane + 32 * j;
    next[j] = inserted_entry(best[p], p > 0 ? best[p - 1] : INT64_MIN, cand);
  }
  __syncwarp();
#pragma unroll
  for (int j = 0; j < E; ++j) best[lane + 32 * j] = next[j];
  __syncwarp();
}

// E = k_pad / 32. One block: 64 query rows x the items [split * span, min(V, (split + 1) * span)).
template <typename T, int E>
__global__ void __launch_bounds__(kThreads, 1) w2_topk_kernel(const TopkArgs a) {
  constexpr int kPadK = 32 * E;
  const T* mu = static_cast<const T*>(a.mu);
  const T* sig = static_cast<const T*>(a.sig);
  const T* item_mu = static_cast<const T*>(a.item_mu);
  const T* item_sig = static_cast<const T*>(a.item_sig);
  const int64_t B = a.B, V = a.V, d = a.d;
  __shared__ TileShared s;
  __shared__ float dist[kTile][kTile + 1];
  extern __shared__ int64_t running[];  // [kTile][kPadK], each row ascending

  const int tid = threadIdx.x;
  const int lane = tid % 32;
  const int warp = tid / 32;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t split = blockIdx.y;
  const int64_t lo = split * a.span;
  const int64_t hi = lo + a.span < V ? lo + a.span : V;

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
      for (int h = 0; h < 2; ++h) cand[h] = candidate_key(a, row, col0 + lane + 32 * h, hi, dist[r][lane + 32 * h]);
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
    if (row < B) a.keys[(split * B + row) * kPadK + p % kPadK] = running[p];
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
cudaError_t launch_topk(const TopkArgs& a, cudaStream_t stream) {
  const int64_t row_blocks = (a.B + kTile - 1) / kTile;
  if (row_blocks > 2147483647 || a.splits > 65535) return cudaErrorInvalidConfiguration;
  const int bytes = static_cast<int>(w2_topk_smem_bytes(32 * E));
  auto kernel = w2_topk_kernel<T, E>;
  if (bytes > 48 * 1024) {  // above the default: opt in (at most 64 KB, within every supported GPU's limit)
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
    if (err != cudaSuccess) return err;
  }
  kernel<<<dim3(static_cast<unsigned>(row_blocks), static_cast<unsigned>(a.splits)), kThreads, bytes, stream>>>(a);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_width(const TopkArgs& a, cudaStream_t stream) {
  switch (a.k_pad) {
    case 32: return launch_topk<T, 1>(a, stream);
    case 64: return launch_topk<T, 2>(a, stream);
    case 128: return launch_topk<T, 4>(a, stream);
  }
  return cudaErrorInvalidValue;
}

// ---- host emulation (AWR_FAST_CUDA_EMULATE=1, CPU tensors): the same keys, candidates and insertion
// rule, block after block; the distance tile in float32 as on the GPU (summation order aside).

template <typename T>
void topk_block_host(const TopkArgs& a, int64_t row0, int64_t split, std::vector<int64_t>& running) {
  const T* mu = static_cast<const T*>(a.mu);
  const T* sig = static_cast<const T*>(a.sig);
  const T* item_mu = static_cast<const T*>(a.item_mu);
  const T* item_sig = static_cast<const T*>(a.item_sig);
  const int k_pad = a.k_pad;
  const int64_t lo = split * a.span;
  const int64_t hi = lo + a.span < a.V ? lo + a.span : a.V;
  const int64_t rows = a.B - row0 < kTile ? a.B - row0 : kTile;
  running.assign(static_cast<size_t>(rows) * k_pad, kTopkEmpty);
  auto norm_and_root = [&](const T* m, const T* s, int64_t row, std::vector<float>& root) {
    float norm = 0.f;
    for (int64_t c = 0; c < a.d; ++c) {
      const float mv = to_acc(m[row * a.d + c]), sv = to_acc(s[row * a.d + c]);
      norm = std::fma(mv, mv, norm) + sv;
      root[c] = std::sqrt(std::fmax(sv, kSigFloor));
    }
    return norm;
  };
  std::vector<float> q_root(a.d), i_root(a.d);
  std::vector<int64_t> next(k_pad);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t row = row0 + r;
    const float q_norm = norm_and_root(mu, sig, row, q_root);
    int64_t* best = running.data() + r * k_pad;
    for (int64_t item = lo; item < hi; ++item) {
      const float i_norm = norm_and_root(item_mu, item_sig, item, i_root);
      float dot = 0.f;
      for (int64_t c = 0; c < a.d; ++c) dot = std::fma(to_acc(mu[row * a.d + c]), to_acc(item_mu[item * a.d + c]), dot);
      for (int64_t c = 0; c < a.d; ++c) dot = std::fma(q_root[c], i_root[c], dot);
      const int64_t key = candidate_key(a, row, item, hi, q_norm + i_norm - 2.f * dot);
      if (key >= best[k_pad - 1]) continue;
      for (int p = 0; p < k_pad; ++p) next[p] = inserted_entry(best[p], p > 0 ? best[p - 1] : INT64_MIN, key);
      std::copy(next.begin(), next.end(), best);
    }
  }
}

template <typename T>
void topk_host(const TopkArgs& a) {
  std::vector<int64_t> running;
  for (int64_t row0 = 0; row0 < a.B; row0 += kTile) {
    for (int64_t split = 0; split < a.splits; ++split) {
      topk_block_host<T>(a, row0, split, running);
      std::copy(running.begin(), running.end(), a.keys + (split * a.B + row0) * a.k_pad);
    }
  }
}

}  // namespace

int64_t w2_topk_smem_bytes(int k_pad) { return static_cast<int64_t>(kTile) * k_pad * sizeof(int64_t); }

cudaError_t w2_topk_launch(W2Dtype dtype, const TopkArgs& args, cudaStream_t stream) {
  if (args.B == 0) return cudaSuccess;
  if (args.span <= 0 || args.span % kTile != 0) return cudaErrorInvalidValue;
  switch (dtype) {
    case W2Dtype::kFloat32: return launch_width<float>(args, stream);
    case W2Dtype::kFloat16: return launch_width<__half>(args, stream);
    case W2Dtype::kBFloat16: return launch_width<__nv_bfloat16>(args, stream);
  }
  return cudaErrorInvalidValue;
}

void w2_topk_host(W2Dtype dtype, const TopkArgs& args) {
  switch (dtype) {
    case W2Dtype::kFloat32: topk_host<float>(args); break;
    case W2Dtype::kFloat16: topk_host<__half>(args); break;
    case W2Dtype::kBFloat16: topk_host<__nv_bfloat16>(args); break;
  }
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

void w2_exclusion_bits_host(const int64_t* ids, uint32_t* bits, int64_t B, int64_t L, int64_t V, int64_t words) {
  for (int64_t i = 0; i < B * L; ++i) {
    const int64_t id = ids[i];
    if (id >= 0 && id < V) bits[(i / L) * words + (id >> 5)] |= 1u << (id & 31);
  }
}

}  // namespace awr_fast
