// W2 item scoring (SPEC §4): the CUDA launcher, free of torch headers so the .cu compiles fast.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace awr_fast {

enum class W2Dtype : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// out[b, v] = ||mu_b - item_mu_v||^2 + sum_c (sig_bc + item_sig_vc - 2 sqrt(max(sig_bc, 1e-24)) sqrt(max(item_sig_vc, 1e-24)))
// All inputs row-major contiguous of one dtype: mu, sig (B, d); item_mu, item_sig (V, d). out is float32 (B, V).
cudaError_t w2_scores_launch(W2Dtype dtype, const void* mu, const void* sig, const void* item_mu,
                             const void* item_sig, float* out, int64_t B, int64_t V, int64_t d,
                             cudaStream_t stream);

// The fused top-k of w2_topk_cuda (w2_topk_kernels.cu). Keys pack (distance, index) into one int64 whose
// integer order is the distance order with ties to the lower index: the float32 bits made
// order-preserving as an int32 (negative floats get their 31 low bits flipped; -0 -> +0, NaN -> one
// positive NaN, ranked after +inf) in the high word, the item index in the low word; kTopkEmpty is
// "no item" (excluded, padding, out of range), above every real key.
constexpr int64_t kTopkEmpty = INT64_MAX;
constexpr int kTopkMaxK = 128;   // k_pad is 32, 64 or 128: the running keys of 64 rows in shared memory
enum class TopkExclude : int { kNone = 0, kBits = 1, kBytes = 2 };

// Dynamic shared memory of one top-k block (bytes) for keys of width k_pad; the op
// awr_fast::w2_topk_cuda_smem_bytes(k) gives it for a k (the resource report's request).
int64_t w2_topk_smem_bytes(int k_pad);
int64_t w2_topk_cuda_smem_bytes(int64_t k);

// One top-k call: the scoring inputs (row-major, one dtype), the exclusion, and keys (splits, B, k_pad)
// int64, which receives per row the k_pad smallest keys of the items [s * span, (s + 1) * span) of split s,
// ascending (span a multiple of 64). exclude: kBits -> ex is (B, ex_stride) uint32 words of packed bits
// (bit v % 32 of word v / 32 set = item v excluded); kBytes -> (B, ex_stride) bytes, nonzero = excluded;
// skip_padding also excludes item 0.
struct TopkArgs {
  const void* mu = nullptr;
  const void* sig = nullptr;
  const void* item_mu = nullptr;
  const void* item_sig = nullptr;
  TopkExclude mode = TopkExclude::kNone;
  const void* ex = nullptr;
  int64_t ex_stride = 0;
  bool skip_padding = false;
  int64_t* keys = nullptr;
  int k_pad = 32;
  int64_t B = 0, V = 0, d = 0, splits = 1, span = 64;
};

cudaError_t w2_topk_launch(W2Dtype dtype, const TopkArgs& args, cudaStream_t stream);
// The host emulation of the same (CPU pointers; AWR_FAST_CUDA_EMULATE=1).
void w2_topk_host(W2Dtype dtype, const TopkArgs& args);

// bits (B, words) uint32 |= 1 << (id % 32) at word id / 32 for every id of ids (B, L) in [0, V);
// bits must be zeroed by the caller. Other ids (the -1 padding) are skipped.
cudaError_t w2_exclusion_bits_launch(const int64_t* ids, uint32_t* bits, int64_t B, int64_t L, int64_t V,
                                     int64_t words, cudaStream_t stream);
void w2_exclusion_bits_host(const int64_t* ids, uint32_t* bits, int64_t B, int64_t L, int64_t V, int64_t words);

}  // namespace awr_fast
