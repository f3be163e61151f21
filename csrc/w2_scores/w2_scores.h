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

}  // namespace awr_fast
