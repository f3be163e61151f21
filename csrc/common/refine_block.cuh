// The shared core of the fused refined-attention blocks (the CUDA counterpart of kernels/_refine.py):
// everything that acts on the first-order weights A, whatever family produced them (dot product or W2).
//
// One thread block works on one (batch, head) and holds the sequence's window on chip: positions
// f..n-1, f the first non-padding position (left padding: the window is the real sequence, so the work
// follows the real length). Every n x n quantity (A, M's window block, T = A M, the refined scores, P,
// their gradients) is a W x W matrix in shared memory with row stride W + 1; the W x r matrices of M_stoc
// use stride r + 1. Notation as SPEC §3, §3b: B = alpha A M A^T + beta A (simp: c, 0; add: c/2, 1/2 with
// M^T); "value": R = softmax(c A M A^T), B = R (A W_RV); "stoc": B = -c W2sq of the Gaussians
// (A W_mu, ELU(A W_sigma) + 1). Every softmax is over the visible entries (j <= i, both real); invisible
// entries are exact zeros, so the products sum over the triangle only. Written as parallel_for phases
// (common/block.cuh): the same source is the GPU kernel and the host emulation.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/block.cuh"

namespace awr_fast {
namespace refine {

// The mechanisms the kernels run (value_literal is not causal: only the reference runs it).
enum Mechanism : int { kNone = 0, kSimp = 1, kAdd = 2, kValue = 3, kStoc = 4 };

// One block holds one sequence. Up to kFusedMaxN its W x W matrices live in shared memory; longer
// sequences (up to kMaxN, and r <= kMaxN for M_stoc's weights) run the same block code on a per-block
// slice of global scratch (L2-resident at these sizes), since 7 matrices of 256 x 257 floats (1.8 MB)
// exceed any shared memory.
constexpr int kFusedMaxN = 64;
constexpr int kMaxN = 256;
constexpr double kSqrtClamp = 1e-24;  // STOSA clamps covariances here before the square root

// What the refinement and the window need of one call, type-erased: Acc pointers (float32 on the GPU,
// float64 on the host emulation of float64 inputs). m, w_rv: (n, n) or (H, n, n) (head stride 0 or n*n);
// w_mu, w_sigma: (n, r) or (H, n, r); kpm: bool (B, n), True = padding, or null; the partials are
// (B, H, n, n) (dM, dW_RV) and (B, H, n, r) (dW_mu, dW_sigma).
struct Core {
  const void* m = nullptr;  // M = W_RQ W_RK^T (W_RK W_RQ^T for add)
  const void* w_rv = nullptr;
  const void* w_mu = nullptr;
  const void* w_sigma = nullptr;
  int64_t m_head_stride = 0, wrv_head_stride = 0, wmu_head_stride = 0, wsigma_head_stride = 0;
  int r = 0;  // columns of w_mu and w_sigma
  const bool* kpm = nullptr;
  const int64_t* seed = nullptr;  // one int64 (device memory on the GPU), read only when dropout_p > 0
  void* dm_part = nullptr;
  void* dwrv_part = nullptr;
  void* dwmu_part = nullptr;
  void* dwsigma_part = nullptr;
  void* scratch = nullptr;     // n > kFusedMaxN on the GPU: scratch_blocks slices of smem_elems floats
  int64_t scratch_blocks = 0;  // blocks per launch (the launcher loops over chunks of the grid)
  int64_t bh_offset = 0;       // first (batch, head) of this launch
  int batch = 0, heads = 0, n = 0, d = 0;
  double scale = 1.0;
  double alpha = 1.0;
  double beta = 0.0;
  float dropout_p = 0.f;
  int mechanism = kNone;
  bool refine_scores = false;  // A = masked scores instead of the probabilities
};

AWR_HD int buffers(int mechanism, bool backward) {
  if (mechanism == kNone) return backward ? 2 : 1;
  if (!backward) return 4;
  return mechanism == kSimp || mechanism == kAdd ? 5 : 7;
}

// Shared memory of one block, in elements of the accumulation type.
AWR_HD size_t smem_elems(int n, int mechanism, bool backward, int r) {
  const int cap = r > n ? r : n;
  return static_cast<size_t>(n) + static_cast<size_t>(buffers(mechanism, backward)) * n * (cap + 1);
}

AWR_HD float exp_acc(float x) { return expf(x); }
AWR_HD double exp_acc(double x) { return exp(x); }
AWR_HD float sqrt_acc(float x) { return sqrtf(x); }
AWR_HD double sqrt_acc(double x) { return sqrt(x); }

// sqrt(max(s, 1e-24)) and its derivative factor: d sqrt(max(s, eps)) / ds = 0.5 / root where s > eps.
template <typename Acc>
AWR_HD Acc clamped_root(Acc s) {
  return sqrt_acc(s > Acc(kSqrtClamp) ? s : Acc(kSqrtClamp));
}

// The buffers a backward pass recomputed, by role (null where the mechanism has none).
template <typename Acc>
struct Saved {
  Acc *a, *mb, *t, *x, *u, *p, *g, *mu, *sig, *dmu, *dpre;
};

template <typename Acc>
struct Window {
  int n, d, f, w, ld, r, rld;
  int64_t bh;
  const Acc* m;
  const Acc* w_rv;
  const Acc* w_mu;
  const Acc* w_sigma;
  const Acc* real;  // shared: 1 for a real position of the window, 0 for padding
  Acc* buf;
  size_t stride;  // elements per buffer

  AWR_HD Window(const Core& c, int64_t bh_, Acc* smem) : bh(bh_) {
    n = c.n;
    d = c.d;
    r = c.r;
    rld = r + 1;
    const int64_t b = bh / c.heads, h = bh % c.heads;
    m = c.m ? static_cast<const Acc*>(c.m) + h * c.m_head_stride : nullptr;
    w_rv = c.w_rv ? static_cast<const Acc*>(c.w_rv) + h * c.wrv_head_stride : nullptr;
    w_mu = c.w_mu ? static_cast<const Acc*>(c.w_mu) + h * c.wmu_head_stride : nullptr;
    w_sigma = c.w_sigma ? static_cast<const Acc*>(c.w_sigma) + h * c.wsigma_head_stride : nullptr;
    // Every thread finds the first real position itself (n reads): no reduction phase needed.
    f = 0;
    if (c.kpm) {
      f = n;
      for (int i = 0; i < n; ++i) {
        if (!c.kpm[b * n + i]) {
          f = i;
          break;
        }
      }
    }
    w = n - f;
    ld = w + 1;  // odd row stride: column walks hit distinct banks
    stride = static_cast<size_t>(n) * ((r > n ? r : n) + 1);
    Acc* real_rw = smem;
    buf = smem + n;
    const bool* kpm = c.kpm ? c.kpm + b * n + f : nullptr;
    parallel_for(w, [&](int i) { real_rw[i] = (kpm && kpm[i]) ? Acc(0) : Acc(1); });
    real = real_rw;
  }

  AWR_HD Acc* buffer(int i) const { return buf + static_cast<size_t>(i) * stride; }
  AWR_HD bool visible(int i, int j) const { return j <= i && real[i] != Acc(0) && real[j] != Acc(0); }
  // Dropout draw of window entry (i, j): by absolute position, so the stream does not depend on f.
  AWR_HD bool keep(uint64_t seed, int i, int j, float p) const {
    return dropout_keep(seed, static_cast<uint64_t>(bh) * n * n + static_cast<uint64_t>(f + i) * n + (f + j), p);
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

  // mb <- M's window block; t <- A M; x <- softmax(alpha * T A^T + beta * A) (visible entries).
  AWR_HD void refined_scores(const Acc* a, Acc* mb, Acc* t, Acc* x, Acc alpha, Acc beta) const {
    parallel_for(w * w, [&](int idx) {
      const int i = idx / w, c = idx % w;
      mb[i * ld + c] = m[static_cast<int64_t>(f + i) * n + (f + c)];
    });
    parallel_for(w * w, [&](int idx) {
      const int i = idx / w, l = idx % w;
      Acc s = Acc(0);
      for (int k = 0; k <= i; ++k) s += a[i * ld + k] * mb[k * ld + l];
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

  // u <- A W_RV's window block; p <- softmax(R U) (visible entries).
  AWR_HD void value_scores(const Acc* a, const Acc* rr, Acc* u, Acc* p) const {
    parallel_for(w * w, [&](int idx) {
      const int j = idx / w, c = idx % w;
      Acc s = Acc(0);
      for (int k = 0; k <= j; ++k) s += a[j * ld + k] * w_rv[static_cast<int64_t>(f + k) * n + (f + c)];
      u[j * ld + c] = s;
    });
    parallel_for(w * w, [&](int idx) {
      const int i = idx / w, j = idx % w;
      Acc s = Acc(0);
      if (visible(i, j)) {
        for (int jj = 0; jj <= i; ++jj) s += rr[i * ld + jj] * u[jj * ld + j];
      }
      p[i * ld + j] = s;
    });
    softmax_rows(p);
  }

  // M_stoc: mu <- A W_mu, sig <- ELU(A W_sigma) + 1 (W x r, stride r + 1); x <- softmax(-c W2sq).
  AWR_HD void stochastic_scores(const Acc* a, Acc* mu, Acc* sig, Acc* x, Acc c) const {
    parallel_for(w * r, [&](int idx) {
      const int k = idx / r, col = idx % r;
      Acc sm = Acc(0), ss = Acc(0);
      for (int l = 0; l <= k; ++l) {
        sm += a[k * ld + l] * w_mu[static_cast<int64_t>(f + l) * r + col];
        ss += a[k * ld + l] * w_sigma[static_cast<int64_t>(f + l) * r + col];
      }
      mu[k * rld + col] = sm;
      sig[k * rld + col] = (ss > Acc(0) ? ss : exp_acc(ss) - Acc(1)) + Acc(1);
    });
    parallel_for(w * w, [&](int idx) {
      const int k = idx / w, t = idx % w;
      Acc s = Acc(0);
      if (visible(k, t)) {
        for (int col = 0; col < r; ++col) {
          const Acc dm = mu[k * rld + col] - mu[t * rld + col];
          const Acc sk = sig[k * rld + col], st = sig[t * rld + col];
          s += dm * dm + sk + st - Acc(2) * clamped_root(sk) * clamped_root(st);
        }
        s *= -c;
      }
      x[k * ld + t] = s;
    });
    softmax_rows(x);
  }

  // dM partial of this block: alpha * A^T (dB A), over the whole n x n (0 outside the window); y <- dB A.
  AWR_HD void store_dm(const Acc* a, const Acc* db, Acc* y, Acc alpha, Acc* dm) const {
    parallel_for(w * w, [&](int idx) {
      const int p = idx / w, j = idx % w;
      Acc s = Acc(0);
      for (int q = j; q <= p; ++q) s += db[p * ld + q] * a[q * ld + j];
      y[p * ld + j] = s;
    });
    parallel_for(n * n, [&](int idx) {
      const int row = idx / n, col = idx % n;
      Acc s = Acc(0);
      if (row >= f && col >= f) {
        const int i = row - f, j = col - f;
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
      const int j = idx / w, k = idx % w;
      Acc s = Acc(0);
      for (int l = 0; l <= j; ++l) s += a[j * ld + l] * mb[k * ld + l];
      amt[j * ld + k] = s;
    });
    parallel_for(w * w, [&](int idx) {
      const int i = idx / w, k = idx % w;
      Acc s = Acc(0);
      if (visible(i, k)) {
        for (int j = 0; j <= i; ++j) s += db[i * ld + j] * amt[j * ld + k];
        for (int j = i; j < w; ++j) s += db[j * ld + i] * t[j * ld + k];
        s = alpha * s + beta * db[i * ld + k];
      }
      da[i * ld + k] = accumulate ? da[i * ld + k] + s : s;
    });
  }

  // M_stoc backward from dB (in g): gsym <- dW2 + dW2^T with dW2 = -c dB; dmu, dpre <- dL/d(A W_mu),
  // dL/d(A W_sigma); the weight partials; da <- dmu W_mu^T + dpre W_sigma^T (visible entries).
  AWR_HD void stochastic_backward(const Acc* a, const Acc* mu, const Acc* sig, const Acc* g, Acc* gsym, Acc* dmu,
                                  Acc* dpre, Acc* da, Acc c, Acc* dwmu, Acc* dwsigma) const {
    parallel_for(w * w, [&](int idx) {
      const int k = idx / w, t = idx % w;
      gsym[k * ld + t] = -c * (g[k * ld + t] + g[t * ld + k]);
    });
    parallel_for(w * r, [&](int idx) {
      const int k = idx / r, col = idx % r;
      Acc total = Acc(0), sm = Acc(0), sr = Acc(0);
      for (int t = 0; t < w; ++t) {
        const Acc gk = gsym[k * ld + t];
        total += gk;
        sm += gk * mu[t * rld + col];
        sr += gk * clamped_root(sig[t * rld + col]);
      }
      const Acc sk = sig[k * rld + col];
      dmu[k * rld + col] = Acc(2) * (total * mu[k * rld + col] - sm);
      const Acc dsig = total - (sk > Acc(kSqrtClamp) ? sr / clamped_root(sk) : Acc(0));
      dpre[k * rld + col] = dsig * (sk > Acc(1) ? Acc(1) : sk);  // ELU'(x) = ELU(x) + 1 for x <= 0
    });
    parallel_for(n * r, [&](int idx) {
      const int row = idx / r, col = idx % r;
      Acc s1 = Acc(0), s2 = Acc(0);
      if (row >= f) {
        const int l = row - f;
        for (int k = l; k < w; ++k) {
          s1 += a[k * ld + l] * dmu[k * rld + col];
          s2 += a[k * ld + l] * dpre[k * rld + col];
        }
      }
      dwmu[idx] = s1;
      dwsigma[idx] = s2;
    });
    parallel_for(w * w, [&](int idx) {
      const int k = idx / w, l = idx % w;
      Acc s = Acc(0);
      if (visible(k, l)) {
        for (int col = 0; col < r; ++col) {
          s += dmu[k * rld + col] * w_mu[static_cast<int64_t>(f + l) * r + col];
          s += dpre[k * rld + col] * w_sigma[static_cast<int64_t>(f + l) * r + col];
        }
      }
      da[k * ld + l] = s;
    });
  }
};

// The refinement forward from A (buffer 0, first-order weights or masked scores): P (before dropout).
template <typename Acc>
AWR_HD Acc* refine_forward(const Window<Acc>& win, const Core& c, Acc* a) {
  const int mech = c.mechanism;
  if (mech == kNone) return a;
  Acc* x = win.buffer(3);
  if (mech == kStoc) {
    x = win.buffer(1);
    win.stochastic_scores(a, win.buffer(2), win.buffer(3), x, Acc(c.alpha));
    return x;
  }
  Acc* mb = win.buffer(1);
  Acc* t = win.buffer(2);
  win.refined_scores(a, mb, t, x, Acc(c.alpha), Acc(c.beta));
  if (mech != kValue) return x;
  win.value_scores(a, x, t, mb);  // T and M are no longer needed: U -> t, P -> mb
  return mb;
}

// The backward pass's recomputation from A: every buffer the backward reads, and g, the buffer the
// family fills with dL/dP (dropout applied) before refine_backward.
template <typename Acc>
AWR_HD Saved<Acc> refine_recompute(const Window<Acc>& win, const Core& c, Acc* a) {
  Saved<Acc> s{a, nullptr, nullptr, nullptr, nullptr, a, nullptr, nullptr, nullptr, nullptr, nullptr};
  const int mech = c.mechanism;
  if (mech == kNone) {
    s.g = win.buffer(1);
  } else if (mech == kStoc) {
    s.x = s.p = win.buffer(1);
    s.g = win.buffer(2);
    s.mu = win.buffer(3);
    s.sig = win.buffer(4);
    s.dmu = win.buffer(5);
    s.dpre = win.buffer(6);
    win.stochastic_scores(a, s.mu, s.sig, s.x, Acc(c.alpha));
  } else {
    s.mb = win.buffer(1);
    s.t = win.buffer(2);
    s.x = s.p = win.buffer(3);
    s.g = win.buffer(4);
    win.refined_scores(a, s.mb, s.t, s.x, Acc(c.alpha), Acc(c.beta));
    if (mech == kValue) {
      s.u = win.buffer(4);
      s.p = win.buffer(5);
      s.g = win.buffer(6);
      win.value_scores(a, s.x, s.u, s.p);
    }
  }
  return s;
}

// From dL/dP in s.g to dS, the gradient of the first-order scores (masked), returned in place of a
// dead buffer; writes this block's weight-gradient partials.
template <typename Acc>
AWR_HD Acc* refine_backward(const Window<Acc>& win, const Core& c, const Saved<Acc>& s) {
  const int w = win.w, ld = win.ld, n = win.n;
  const int mech = c.mechanism;
  const Acc alpha = Acc(c.alpha), beta = Acc(c.beta);
  Acc* g = s.g;
  win.softmax_backward_rows(s.p, g);  // g: dS (none), dB (simp, add, stoc), dB2 of B2 = R U (value)
  if (mech == kNone) return g;
  Acc* da = g;
  const int64_t part = win.bh * n * n;
  if (mech == kSimp || mech == kAdd) {
    // P is dead: A M^T -> x; dA -> mb (M is dead once A M^T is formed); dB A -> t (T dead after dA).
    win.refined_backward(s.a, s.mb, s.t, g, s.x, s.mb, alpha, beta, false);
    win.store_dm(s.a, g, s.t, alpha, static_cast<Acc*>(c.dm_part) + part);
    da = s.mb;
  } else if (mech == kStoc) {
    // P is dead: dW2 + dW2^T -> x, then dA -> x once that is read.
    const int64_t rpart = win.bh * n * win.r;
    win.stochastic_backward(s.a, s.mu, s.sig, g, s.x, s.dmu, s.dpre, s.x, alpha,
                            static_cast<Acc*>(c.dwmu_part) + rpart, static_cast<Acc*>(c.dwsigma_part) + rpart);
    da = s.x;
  } else {  // value
    Acc* rr = s.x;
    Acc* u = s.u;
    Acc* p = s.p;
    // dR = dB2 U^T -> p (P dead); dU = R^T dB2 -> u (U dead after dR).
    parallel_for(w * w, [&](int idx) {
      const int i = idx / w, jj = idx % w;
      Acc acc = Acc(0);
      if (win.visible(i, jj)) {
        for (int j = 0; j <= i; ++j) acc += g[i * ld + j] * u[jj * ld + j];
      }
      p[i * ld + jj] = acc;
    });
    parallel_for(w * w, [&](int idx) {
      const int jj = idx / w, col = idx % w;
      Acc acc = Acc(0);
      for (int i = jj; i < w; ++i) acc += rr[i * ld + jj] * g[i * ld + col];
      u[jj * ld + col] = acc;
    });
    // dW_RV partial = A^T dU over the whole n x n; dA = dU W_RV^T -> g (dB2 is dead).
    Acc* dwrv = static_cast<Acc*>(c.dwrv_part) + part;
    parallel_for(n * n, [&](int idx) {
      const int row = idx / n, cc = idx % n;
      Acc acc = Acc(0);
      if (row >= win.f && cc >= win.f) {
        const int k = row - win.f, col = cc - win.f;
        for (int jj = k; jj < w; ++jj) acc += s.a[jj * ld + k] * u[jj * ld + col];
      }
      dwrv[idx] = acc;
    });
    parallel_for(w * w, [&](int idx) {
      const int jj = idx / w, k = idx % w;
      Acc acc = Acc(0);
      if (win.visible(jj, k)) {
        for (int col = 0; col < w; ++col) {
          acc += u[jj * ld + col] * win.w_rv[static_cast<int64_t>(win.f + k) * n + (win.f + col)];
        }
      }
      g[jj * ld + k] = acc;
    });
    win.softmax_backward_rows(rr, p);  // p: dX of the inner scores X = c A M A^T
    // A M^T -> x (R dead); dA += c (dX (A M^T) + dX^T T); dX A -> t; dM partial.
    win.refined_backward(s.a, s.mb, s.t, p, s.x, g, alpha, Acc(0), true);
    win.store_dm(s.a, p, s.t, alpha, static_cast<Acc*>(c.dm_part) + part);
    da = g;
  }
  if (!c.refine_scores) win.softmax_backward_rows(s.a, da);  // A = softmax(S)
  return da;
}

}  // namespace refine
}  // namespace awr_fast
