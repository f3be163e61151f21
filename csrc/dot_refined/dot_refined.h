// dot_refined (SPEC §1-3, §3b): the launch interface of the CUDA kernels, free of torch headers so the
// .cu compiles fast. dot_refined.cpp checks the arguments, allocates, and calls these.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include <cuda_runtime_api.h>

#include "common/block.cuh"

namespace awr_fast {
namespace dot_refined {

// The mechanisms the kernels run (value_literal is not causal: only the reference runs it).
enum Mechanism : int { kNone = 0, kSimp = 1, kAdd = 2, kValue = 3 };

// The fused kernels hold one sequence per block: n <= kMaxN.
constexpr int kMaxN = 64;

// One call's arguments, type-erased: the pointers are T (inputs, outputs) or Acc (the float32 -- float64
// on the host emulation -- refinement matrices and the weight-gradient partials). All tensors are
// contiguous; q, k, v, grad, out, dq, dk, dv are (B, H, n, d); m and w_rv are (n, n) or (H, n, n)
// (head stride 0 or n*n); kpm is bool (B, n), True = padding, or null; the partials are (B, H, n, n).
struct Args {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  const void* grad = nullptr;  // dL/dout (backward)
  const void* m = nullptr;     // M = W_RQ W_RK^T (W_RK W_RQ^T for add); null for none
  const void* w_rv = nullptr;  // value only
  int64_t m_head_stride = 0;
  int64_t wrv_head_stride = 0;
  const bool* kpm = nullptr;
  const int64_t* seed = nullptr;  // one int64 (device memory on the GPU), read only when dropout_p > 0
  void* out = nullptr;
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
  void* dm_part = nullptr;    // per-block partial sums of dM (refined mechanisms)
  void* dwrv_part = nullptr;  // per-block partial sums of dW_RV (value)
  int batch = 0, heads = 0, n = 0, d = 0;
  double scale = 1.0;
  double alpha = 1.0;  // B = alpha * A M A^T + beta * A (simp, value: c and 0; add: c/2 and 1/2)
  double beta = 0.0;
  float dropout_p = 0.f;
  int mechanism = kNone;
  bool refine_scores = false;  // A = masked scores instead of the probabilities
};

// Shared memory one block needs, in elements of the accumulation type (float on the GPU).
size_t smem_elems(int n, int mechanism, bool backward);

// The same in bytes of float, for a mechanism by name (the op dot_refined_cuda_smem_bytes; the resource
// report reads it).
int64_t smem_bytes(int64_t n, std::string mechanism, bool backward);

// The GPU kernels (dtype float32, float16 or bfloat16; float32 accumulation). Return the launch error.
cudaError_t forward_launch(Dtype dtype, const Args& args, cudaStream_t stream);
cudaError_t backward_launch(Dtype dtype, const Args& args, cudaStream_t stream);

// The same block code run on the host, block after block (AWR_FAST_CUDA_EMULATE=1: CI's check of the
// kernels' arithmetic). float64 inputs accumulate in float64, the others in float32 as on the GPU.
void forward_host(Dtype dtype, const Args& args);
void backward_host(Dtype dtype, const Args& args);

}  // namespace dot_refined
}  // namespace awr_fast
