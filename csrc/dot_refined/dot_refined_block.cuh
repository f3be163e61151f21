// dot_refined: the work of one thread block, i.e. one (batch, head), forward and backward (SPEC §1-3).
//
// The block holds the sequence's window on chip: positions f..n-1, f the first non-padding position
// (left padding: the window is the real sequence, so the work follows the real length). Every n x n
// quantity (A, M's window block, T = A M, the refined scores, P, the gradients) lives in shared memory
// as a W x W matrix with row stride W + 1; q, k, v and the gradients are read from global memory.
// Written as phases of parallel_for (common/block.cuh), so the same source is the GPU kernel and the
// CPU emulation. Notation as in SPEC §3b: B = alpha A M A^T + beta A; "value": R = softmax(c A M A^T),
// B = R (A W_RV). Every softmax is over the visible entries (j <= i, both real); invisible entries are
// exact zeros, so the products below sum over the triangle only.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/block.cuh"
#include "dot_refined/dot_refined.h"

namespace awr_fast {
namespace dot_refined {

AWR_HD int buffers(int mechanism, bool backward) {
  if (mechanism == kNone) return backward ? 2 : 1;
  if (!backward) return 4;
  return mechanism == kValue ? 7 : 5;
}

AWR_HD size_t smem_elems_for(int n, int mechanism, bool backward) {
  return static_cast<size_t>(n) + static_cast<size_t>(buffers(mechanism, backward)) * n * (n + 1);
}

AWR_HD float exp_acc(float x) { return expf(x); }
AWR_HD double exp_acc(double x) { return exp(x); }

// The per-block view of Args: typed pointers for (batch, head) bh, the window and its visibility.
template <typename T, typename Acc>
struct Block {
  const T* q;
  const T* k;
  const T* v;
  const Acc* m;
  const Acc* w_rv;
  int n, d, f, w, ld;
  int64_t bh;
  const Acc* real;  // shared: 1 for a real position of the window, 0 for padding
  Acc* buf;         // shared: the W x W buffers, buffer i at buf + i * n * (n + 1)

  AWR_HD Block(const Args& a, int64_t bh_, Acc* smem) : bh(bh_) {
    n = a.n;
    d = a.d;
    const int64_t b = bh / a.heads, h = bh % a.heads;
    const int64_t base = bh * n * d;
    q = static_cast<const T*>(a.q) + base;
    k = static_cast<const T*>(a.k) + base;
    v = static_cast<const T*>(a.v) + base;
    m = a.m ? static_cast<const Acc*>(a.m) + h * a.m_head_stride : nullptr;
    w_rv = a.w_rv ? static_cast<const Acc*>(a.w_rv) + h * a.wrv_head_stride : nullptr;
    // Every thread finds the first real position itself (n reads): no reduction phase needed.
    f = 0;
    if (a.kpm) {
      f = n;
      for (int i = 0; i < n; ++i) {
        if (!a.kpm[b * n + i]) {
          f = i;
          break;
        }
      }
    }
    w = n - f;
    ld = w + 1;  // odd row stride: column walks hit distinct banks
    Acc* real_rw = smem;
    buf = smem + n;
    const bool* kpm = a.kpm ? a.kpm + b * n + f : nullptr;
    parallel_for(w, [&](int i) { real_rw[i] = (kpm && kpm[i]) ? Acc(0) : Acc(1); });
    real = real_rw;
  }

  AWR_HD Acc* buffer(int i) const { return buf + static_cast<size_t>(i) * n * (n + 1); }
  AWR_HD bool visible(int i, int j) const { return j <= i && real[i] != Acc(0) && real[j] != Acc(0); }
  // Offset of window entry (i, j) in the call's dropout stream: by absolute position, as every backend.
  AWR_HD uint64_t rng_offset(int i, int j) const {
    return static_cast<uint64_t>(bh) * n * n + static_cast<uint64_t>(f + i) * n + (f + j);
  }

  // Row-wise masked softmax of x in place; rows without a visible entry become zeros.
  AWR_HD void softmax_rows(Acc* x) const {
    parallel_for(w, [&](int i) {
      Acc* row = x + i * ld;
      Acc top = Acc(0);
      bool any = false;
      for (int j = 0; j <= i; ++j) {
        if (visible(i, j) && (!any || row[j] > top)) top = row[j];
        any = any || visible(i, j);
      }
      Acc total = Acc(0);
      for (int j = 0; j < w; ++j) {
        const Acc e = visible(i, j) ? exp_acc(row[j] - top) : Acc(0);
        row[j] = e;
        total += e;
      }
      const Acc inv = total > Acc(0) ? Acc(1) / total : Acc(0);
      for (int j = 0; j < w; ++j) row[j] *= inv;
    });
  }

  // Softmax backward in place: g <- p * (g - rowsum(g * p)) on visible entries, 0 elsewhere.
  AWR_HD void softmax_backward_rows(const Acc* p, Acc* g) const {
    parallel_for(w, [&](int i) {
      const Acc* prow = p + i * ld;
      Acc* grow = g + i * ld;
      Acc dot = Acc(0);
      for (int j = 0; j <= i; ++j) dot += prow[j] * grow[j];
      for (int j = 0; j < w; ++j) grow[j] = visible(i, j) ? prow[j] * (grow[j] - dot) : Acc(0);
    });
  }

  // a <- scale * Q K^T on visible entries (0 elsewhere); then the probabilities unless A = scores.
  AWR_HD void first_order(Acc* a, Acc scale, bool probs) const {
    parallel_for(w * w, [&](int idx) {
      const int i = idx / w, j = idx % w;
      Acc s = Acc(0);
      if (visible(i, j)) {
        const T* qi = q + static_cast<int64_t>(f + i) * d;
        const T* kj = k + static_cast<int64_t>(f + j) * d;
        for (int c = 0; c < d; ++c) s += to_acc(qi[c]) * to_acc(kj[c]);
        s *= scale;
      }
      a[i * ld + j] = s;
    });
    if (probs) softmax_rows(a);
  }

  // mb <- M's window block; t <- A M; x <- alpha * T A^T + beta * A (visible entries), softmaxed.
  AWR_HD void refined_scores(const Acc* a, Acc* mb, Acc* t, Acc* x, Acc alpha, Acc beta) const {
    parallel_for(w * w, [&](int idx) {
      const int r = idx / w, c = idx % w;
      mb[r * ld + c] = m[static_cast<int64_t>(f + r) * n + (f + c)];
    });
    parallel_for(w * w, [&](int idx) {
      const int i = idx / w, l = idx % w;
      Acc s = Acc(0);
      for (int kk = 0; kk <= i; ++kk) s += a[i * ld + kk] * mb[kk * ld + l];
      t[i * ld + l] = s;
    });
    parallel_for(w * w, [&](int idx) {
      const int i = idx / w, j = idx % w;
      Acc s = Acc(0);
      if (visible(i, j)) {
        for (int l = 0; l <= j; ++l) s += t[i * ld + l] * a[j * ld + l];
        s = alpha * s + beta * a[i * ld + j];
      }
      x[i * ld + j] = s;
    });
    softmax_rows(x);
  }

  // u <- A W_RV's window block; p <- softmax(R U) (visible entries). R is x.
  AWR_HD void value_scores(const Acc* a, const Acc* r, Acc* u, Acc* p) const {
    parallel_for(w * w, [&](int idx) {
      const int j = idx / w, c = idx % w;
      Acc s = Acc(0);
      for (int kk = 0; kk <= j; ++kk) s += a[j * ld + kk] * w_rv[static_cast<int64_t>(f + kk) * n + (f + c)];
      u[j * ld + c] = s;
    });
    parallel_for(w * w, [&](int idx) {
      const int i = idx / w, j = idx % w;
      Acc s = Acc(0);
      if (visible(i, j)) {
        for (int jj = 0; jj <= i; ++jj) s += r[i * ld + jj] * u[jj * ld + j];
      }
      p[i * ld + j] = s;
    });
    softmax_rows(p);
  }

  // The partial sum of dM of this block: alpha * A^T (dB A), written over the whole n x n (0 outside
  // the window). y holds dB A.
  AWR_HD void store_dm(const Acc* a, const Acc* db, Acc* y, Acc alpha, Acc* dm) const {
    parallel_for(w * w, [&](int idx) {
      const int p = idx / w, j = idx % w;
      Acc s = Acc(0);
      for (int qq = j; qq <= p; ++qq) s += db[p * ld + qq] * a[qq * ld + j];
      y[p * ld + j] = s;
    });
    parallel_for(n * n, [&](int idx) {
      const int r = idx / n, c = idx % n;
      Acc s = Acc(0);
      if (r >= f && c >= f) {
        const int i = r - f, j = c - f;
        for (int p = i; p < w; ++p) s += a[p * ld + i] * y[p * ld + j];
        s *= alpha;
      }
      dm[idx] = s;
    });
  }

  // da (+)= alpha * (dB (A M^T) + dB^T T) + beta * dB on visible entries; amt receives A M^T.
  AWR_HD void refined_backward(const Acc* a, const Acc* mb, const Acc* t, const Acc* db, Acc* amt, Acc* da,
                               Acc alpha, Acc beta, bool accumulate) const {
    parallel_for(w * w, [&](int idx) {
      const int j = idx / w, kk = idx % w;
      Acc s = Acc(0);
      for (int l = 0; l <= j; ++l) s += a[j * ld + l] * mb[kk * ld + l];
      amt[j * ld + kk] = s;
    });
    parallel_for(w * w, [&](int idx) {
      const int i = idx / w, kk = idx % w;
      Acc s = Acc(0);
      if (visible(i, kk)) {
        for (int j = 0; j <= i; ++j) s += db[i * ld + j] * amt[j * ld + kk];
        for (int j = i; j < w; ++j) s += db[j * ld + i] * t[j * ld + kk];
        s = alpha * s + beta * db[i * ld + kk];
      }
      da[i * ld + kk] = accumulate ? da[i * ld + kk] + s : s;
    });
  }

  // dq = scale dS K, dk = scale dS^T Q, over all n rows (0 outside the window).
  template <typename Out>
  AWR_HD void store_dqk(const Acc* ds, Acc scale, Out* dq, Out* dk) const {
    parallel_for(n * d, [&](int idx) {
      const int r = idx / d, c = idx % d;
      Acc sq = Acc(0), sk = Acc(0);
      if (r >= f) {
        const int i = r - f;
        for (int j = 0; j <= i; ++j) sq += ds[i * ld + j] * to_acc(k[static_cast<int64_t>(f + j) * d + c]);
        for (int p = i; p < w; ++p) sk += ds[p * ld + i] * to_acc(q[static_cast<int64_t>(f + p) * d + c]);
      }
      dq[idx] = from_acc<Out, Acc>(scale * sq);
      dk[idx] = from_acc<Out, Acc>(scale * sk);
    });
  }
};

template <typename T, typename Acc>
AWR_HD void forward_block(const Args& a, int64_t bh, Acc* smem) {
  const Block<T, Acc> blk(a, bh, smem);
  const int w = blk.w, ld = blk.ld, n = blk.n, d = blk.d, f = blk.f;
  Acc* abuf = blk.buffer(0);
  blk.first_order(abuf, Acc(a.scale), a.mechanism == kNone || !a.refine_scores);
  Acc* p = abuf;
  if (a.mechanism != kNone) {
    Acc* mb = blk.buffer(1);
    Acc* t = blk.buffer(2);
    Acc* x = blk.buffer(3);
    blk.refined_scores(abuf, mb, t, x, Acc(a.alpha), Acc(a.beta));
    p = x;
    if (a.mechanism == kValue) {
      blk.value_scores(abuf, x, t, mb);  // T and M are no longer needed: U -> t, P -> mb
      p = mb;
    }
  }
  const bool dropout = a.dropout_p > 0.f;
  if (dropout) {
    const uint64_t seed = static_cast<uint64_t>(*a.seed);
    const Acc keep_scale = Acc(1) / (Acc(1) - Acc(a.dropout_p));
    parallel_for(w * w, [&](int idx) {
      const int i = idx / w, j = idx % w;
      p[i * ld + j] = dropout_keep(seed, blk.rng_offset(i, j), a.dropout_p) ? p[i * ld + j] * keep_scale : Acc(0);
    });
  }
  T* out = static_cast<T*>(a.out) + bh * n * d;
  parallel_for(n * d, [&](int idx) {
    const int r = idx / d, c = idx % d;
    Acc s = Acc(0);
    if (r >= f) {
      const int i = r - f;
      for (int j = 0; j <= i; ++j) s += p[i * ld + j] * to_acc(blk.v[static_cast<int64_t>(f + j) * d + c]);
    }
    out[idx] = from_acc<T, Acc>(s);
  });
}

template <typename T, typename Acc>
AWR_HD void backward_block(const Args& a, int64_t bh, Acc* smem) {
  const Block<T, Acc> blk(a, bh, smem);
  const int w = blk.w, ld = blk.ld, n = blk.n, d = blk.d, f = blk.f;
  const int mech = a.mechanism;
  const Acc alpha = Acc(a.alpha), beta = Acc(a.beta);
  const T* grad = static_cast<const T*>(a.grad) + bh * n * d;

  // Recompute the forward: A, and for the refined mechanisms M's block, T, X (= P or R), U and P.
  Acc* abuf = blk.buffer(0);
  blk.first_order(abuf, Acc(a.scale), mech == kNone || !a.refine_scores);
  Acc *mb = nullptr, *t = nullptr, *x = nullptr, *u = nullptr, *p = abuf, *g = nullptr;
  if (mech == kNone) {
    g = blk.buffer(1);
  } else {
    mb = blk.buffer(1);
    t = blk.buffer(2);
    x = blk.buffer(3);
    blk.refined_scores(abuf, mb, t, x, alpha, beta);
    p = x;
    g = blk.buffer(4);
    if (mech == kValue) {
      u = blk.buffer(4);
      p = blk.buffer(5);
      g = blk.buffer(6);
      blk.value_scores(abuf, x, u, p);
    }
  }

  // dV = dropout(P)^T dout, then dP = dropout'(dout V^T), then through the last softmax.
  const bool dropout = a.dropout_p > 0.f;
  const uint64_t seed = dropout ? static_cast<uint64_t>(*a.seed) : 0;
  const Acc keep_scale = dropout ? Acc(1) / (Acc(1) - Acc(a.dropout_p)) : Acc(1);
  const Acc* pd = p;
  if (dropout) {
    parallel_for(w * w, [&](int idx) {
      const int i = idx / w, j = idx % w;
      g[i * ld + j] = dropout_keep(seed, blk.rng_offset(i, j), a.dropout_p) ? p[i * ld + j] * keep_scale : Acc(0);
    });
    pd = g;
  }
  T* dv = static_cast<T*>(a.dv) + bh * n * d;
  parallel_for(n * d, [&](int idx) {
    const int r = idx / d, c = idx % d;
    Acc s = Acc(0);
    if (r >= f) {
      const int j = r - f;
      for (int i = j; i < w; ++i) s += pd[i * ld + j] * to_acc(grad[static_cast<int64_t>(f + i) * d + c]);
    }
    dv[idx] = from_acc<T, Acc>(s);
  });
  parallel_for(w * w, [&](int idx) {
    const int i = idx / w, j = idx % w;
    Acc s = Acc(0);
    if (blk.visible(i, j) && (!dropout || dropout_keep(seed, blk.rng_offset(i, j), a.dropout_p))) {
      const T* gi = grad + static_cast<int64_t>(f + i) * d;
      const T* vj = blk.v + static_cast<int64_t>(f + j) * d;
      for (int c = 0; c < d; ++c) s += to_acc(gi[c]) * to_acc(vj[c]);
      s *= keep_scale;
    }
    g[i * ld + j] = s;
  });
  blk.softmax_backward_rows(p, g);  // g: dS (none), dB (simp, add), dB2 of B2 = R U (value)

  Acc* da = g;  // dL/dA, then dS
  if (mech == kSimp || mech == kAdd) {
    // P is dead: A M^T -> x; dA -> mb (M is dead once A M^T is formed); dB A -> t (T dead after dA).
    blk.refined_backward(abuf, mb, t, g, x, mb, alpha, beta, false);
    blk.store_dm(abuf, g, t, alpha, static_cast<Acc*>(a.dm_part) + bh * n * n);
    da = mb;
  } else if (mech == kValue) {
    Acc* r = x;
    // dR = dB2 U^T -> p (P dead); dU = R^T dB2 -> u (U dead after dR).
    parallel_for(w * w, [&](int idx) {
      const int i = idx / w, jj = idx % w;
      Acc s = Acc(0);
      if (blk.visible(i, jj)) {
        for (int j = 0; j <= i; ++j) s += g[i * ld + j] * u[jj * ld + j];
      }
      p[i * ld + jj] = s;
    });
    parallel_for(w * w, [&](int idx) {
      const int jj = idx / w, c = idx % w;
      Acc s = Acc(0);
      for (int i = jj; i < w; ++i) s += r[i * ld + jj] * g[i * ld + c];
      u[jj * ld + c] = s;
    });
    // dW_RV partial = A^T dU over the whole n x n; dA = dU W_RV^T -> g (dB2 is dead).
    Acc* dwrv = static_cast<Acc*>(a.dwrv_part) + bh * n * n;
    parallel_for(n * n, [&](int idx) {
      const int rr = idx / n, cc = idx % n;
      Acc s = Acc(0);
      if (rr >= f && cc >= f) {
        const int kk = rr - f, c = cc - f;
        for (int jj = kk; jj < w; ++jj) s += abuf[jj * ld + kk] * u[jj * ld + c];
      }
      dwrv[idx] = s;
    });
    parallel_for(w * w, [&](int idx) {
      const int jj = idx / w, kk = idx % w;
      Acc s = Acc(0);
      if (blk.visible(jj, kk)) {
        for (int c = 0; c < w; ++c) s += u[jj * ld + c] * blk.w_rv[static_cast<int64_t>(f + kk) * n + (f + c)];
      }
      g[jj * ld + kk] = s;
    });
    blk.softmax_backward_rows(r, p);  // p: dX of the inner scores X = c A M A^T
    // A M^T -> x (R dead); dA += c (dX (A M^T) + dX^T T); dX A -> t; dM partial.
    blk.refined_backward(abuf, mb, t, p, x, g, alpha, Acc(0), true);
    blk.store_dm(abuf, p, t, alpha, static_cast<Acc*>(a.dm_part) + bh * n * n);
    da = g;
  }
  if (mech != kNone && !a.refine_scores) blk.softmax_backward_rows(abuf, da);  // A = softmax(S)
  if (mech == kNone) {
    // g already holds dS (P = A).
  }
  blk.store_dqk(da, Acc(a.scale), static_cast<T*>(a.dq) + bh * n * d, static_cast<T*>(a.dk) + bh * n * d);
}

}  // namespace dot_refined
}  // namespace awr_fast
