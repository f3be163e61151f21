// dot_refined: the work of one thread block, i.e. one (batch, head), forward and backward (SPEC §1-3).
// The family's own part: the first-order scores S = scale Q K^T with A = softmax(S) (or the masked S),
// the output P V, and the backward dS -> dQ, dK; everything between A and P is the shared core
// (common/refine_block.cuh). q, k, v and the gradients are read from global memory.
#pragma once

#include <cstdint>

#include "common/block.cuh"
#include "common/refine_block.cuh"
#include "dot_refined/dot_refined.h"

namespace awr_fast {
namespace dot_refined {

using refine::Window;

// a <- scale * Q K^T on visible entries (0 elsewhere); then the probabilities unless A = scores.
template <typename T, typename Acc>
AWR_HD void first_order(const Window<Acc>& win, const T* q, const T* k, Acc scale, bool probs, Acc* a) {
  const int w = win.w, ld = win.ld, d = win.d, f = win.f;
  parallel_for(w * w, [&](int idx) {
    const int i = idx / w, j = idx % w;
    Acc s = Acc(0);
    if (win.visible(i, j)) {
      const T* qi = q + static_cast<int64_t>(f + i) * d;
      const T* kj = k + static_cast<int64_t>(f + j) * d;
      for (int c = 0; c < d; ++c) s += to_acc(qi[c]) * to_acc(kj[c]);
      s *= scale;
    }
    a[i * ld + j] = s;
  });
  if (probs) win.softmax_rows(a);
}

template <typename T, typename Acc>
AWR_HD void forward_block(const Args& a, int64_t bh, Acc* smem) {
  const refine::Core& c = a.core;
  const Window<Acc> win(c, bh, smem);
  const int w = win.w, ld = win.ld, n = win.n, d = win.d, f = win.f;
  const int64_t base = bh * n * d;
  const T* q = static_cast<const T*>(a.q) + base;
  const T* k = static_cast<const T*>(a.k) + base;
  const T* v = static_cast<const T*>(a.v) + base;
  Acc* abuf = win.buffer(0);
  first_order(win, q, k, Acc(c.scale), c.mechanism == refine::kNone || !c.refine_scores, abuf);
  Acc* p = refine::refine_forward(win, c, abuf);
  if (c.dropout_p > 0.f) {
    const uint64_t seed = static_cast<uint64_t>(*c.seed);
    const Acc keep_scale = Acc(1) / (Acc(1) - Acc(c.dropout_p));
    parallel_for(w * w, [&](int idx) {
      const int i = idx / w, j = idx % w;
      p[i * ld + j] = win.keep(seed, i, j, c.dropout_p) ? p[i * ld + j] * keep_scale : Acc(0);
    });
  }
  T* out = static_cast<T*>(a.out) + base;
  parallel_for(n * d, [&](int idx) {
    const int row = idx / d, col = idx % d;
    Acc s = Acc(0);
    if (row >= f) {
      const int i = row - f;
      for (int j = 0; j <= i; ++j) s += p[i * ld + j] * to_acc(v[static_cast<int64_t>(f + j) * d + col]);
    }
    out[idx] = from_acc<T, Acc>(s);
  });
}

template <typename T, typename Acc>
AWR_HD void backward_block(const Args& a, int64_t bh, Acc* smem) {
  const refine::Core& c = a.core;
  const Window<Acc> win(c, bh, smem);
  const int w = win.w, ld = win.ld, n = win.n, d = win.d, f = win.f;
  const int64_t base = bh * n * d;
  const T* q = static_cast<const T*>(a.q) + base;
  const T* k = static_cast<const T*>(a.k) + base;
  const T* v = static_cast<const T*>(a.v) + base;
  const T* grad = static_cast<const T*>(a.grad) + base;

  Acc* abuf = win.buffer(0);
  first_order(win, q, k, Acc(c.scale), c.mechanism == refine::kNone || !c.refine_scores, abuf);
  const refine::Saved<Acc> s = refine::refine_recompute(win, c, abuf);
  const Acc* p = s.p;
  Acc* g = s.g;

  // dV = dropout(P)^T dout (dropout(P) staged in g), then g <- dL/dP = dropout'(dout V^T).
  const bool dropout = c.dropout_p > 0.f;
  const uint64_t seed = dropout ? static_cast<uint64_t>(*c.seed) : 0;
  const Acc keep_scale = dropout ? Acc(1) / (Acc(1) - Acc(c.dropout_p)) : Acc(1);
  const Acc* pd = p;
  if (dropout) {
    parallel_for(w * w, [&](int idx) {
      const int i = idx / w, j = idx % w;
      g[i * ld + j] = win.keep(seed, i, j, c.dropout_p) ? p[i * ld + j] * keep_scale : Acc(0);
    });
    pd = g;
  }
  T* dv = static_cast<T*>(a.dv) + base;
  parallel_for(n * d, [&](int idx) {
    const int row = idx / d, col = idx % d;
    Acc acc = Acc(0);
    if (row >= f) {
      const int j = row - f;
      for (int i = j; i < w; ++i) acc += pd[i * ld + j] * to_acc(grad[static_cast<int64_t>(f + i) * d + col]);
    }
    dv[idx] = from_acc<T, Acc>(acc);
  });
  parallel_for(w * w, [&](int idx) {
    const int i = idx / w, j = idx % w;
    Acc acc = Acc(0);
    if (win.visible(i, j) && (!dropout || win.keep(seed, i, j, c.dropout_p))) {
      const T* gi = grad + static_cast<int64_t>(f + i) * d;
      const T* vj = v + static_cast<int64_t>(f + j) * d;
      for (int col = 0; col < d; ++col) acc += to_acc(gi[col]) * to_acc(vj[col]);
      acc *= keep_scale;
    }
    g[i * ld + j] = acc;
  });

  const Acc* ds = refine::refine_backward(win, c, s);
  // dq = scale dS K, dk = scale dS^T Q, over all n rows (0 outside the window).
  T* dq = static_cast<T*>(a.dq) + base;
  T* dk = static_cast<T*>(a.dk) + base;
  const Acc scale = Acc(c.scale);
  parallel_for(n * d, [&](int idx) {
    const int row = idx / d, col = idx % d;
    Acc sq = Acc(0), sk = Acc(0);
    if (row >= f) {
      const int i = row - f;
      for (int j = 0; j <= i; ++j) sq += ds[i * ld + j] * to_acc(k[static_cast<int64_t>(f + j) * d + col]);
      for (int pp = i; pp < w; ++pp) sk += ds[pp * ld + i] * to_acc(q[static_cast<int64_t>(f + pp) * d + col]);
    }
    dq[idx] = from_acc<T, Acc>(scale * sq);
    dk[idx] = from_acc<T, Acc>(scale * sk);
  });
}

}  // namespace dot_refined
}  // namespace awr_fast
