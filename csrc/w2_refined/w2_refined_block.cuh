// w2_refined: the work of one thread block, i.e. one (batch, head), forward and backward (SPEC §3, §4).
// The family's own part: the first-order scores S = -scale W2sq(Q_i, K_j) of the diagonal Gaussians,
//   W2sq = sum_c (muQ - muK)^2 + sigQ + sigK - 2 sqrt(max(sigQ, 1e-24)) sqrt(max(sigK, 1e-24)),
// A = softmax(S) (or the masked S); the outputs mu_out = P' mu_V and sig_out = (P' o P') sig_V with
// P' = dropout(P) (STOSA drops before both products); and the backward to the six inputs. Everything
// between A and P is the shared core (common/refine_block.cuh), M_stoc included.
#pragma once

#include <cstdint>

#include "common/block.cuh"
#include "common/refine_block.cuh"
#include "w2_refined/w2_refined.h"

namespace awr_fast {
namespace w2_refined {

using refine::clamped_root;
using refine::Window;

template <typename T>
struct Inputs {
  const T *mu_q, *sig_q, *mu_k, *sig_k, *mu_v, *sig_v;
};

template <typename T>
AWR_HD Inputs<T> inputs_of(const Args& a, int64_t base) {
  return {static_cast<const T*>(a.mu_q) + base, static_cast<const T*>(a.sig_q) + base,
          static_cast<const T*>(a.mu_k) + base, static_cast<const T*>(a.sig_k) + base,
          static_cast<const T*>(a.mu_v) + base, static_cast<const T*>(a.sig_v) + base};
}

// a <- -scale * W2sq(Q_i, K_j) on visible entries (0 elsewhere); then the probabilities unless A = scores.
template <typename T, typename Acc>
AWR_HD void first_order(const Window<Acc>& win, const Inputs<T>& x, Acc scale, bool probs, Acc* a) {
  const int w = win.w, ld = win.ld, d = win.d, f = win.f;
  parallel_for(w * w, [&](int idx) {
    const int i = idx / w, j = idx % w;
    Acc s = Acc(0);
    if (win.visible(i, j)) {
      const int64_t qi = static_cast<int64_t>(f + i) * d, kj = static_cast<int64_t>(f + j) * d;
      for (int c = 0; c < d; ++c) {
        const Acc dm = to_acc(x.mu_q[qi + c]) - to_acc(x.mu_k[kj + c]);
        const Acc sq = to_acc(x.sig_q[qi + c]), sk = to_acc(x.sig_k[kj + c]);
        s += dm * dm + sq + sk - Acc(2) * clamped_root(sq) * clamped_root(sk);
      }
      s *= -scale;
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
  const Inputs<T> x = inputs_of<T>(a, base);
  Acc* abuf = win.buffer(0);
  first_order(win, x, Acc(c.scale), c.mechanism == refine::kNone || !c.refine_scores, abuf);
  Acc* p = refine::refine_forward(win, c, abuf);
  if (c.dropout_p > 0.f) {
    const uint64_t seed = static_cast<uint64_t>(*c.seed);
    const Acc keep_scale = Acc(1) / (Acc(1) - Acc(c.dropout_p));
    parallel_for(w * w, [&](int idx) {
      const int i = idx / w, j = idx % w;
      p[i * ld + j] = win.keep(seed, i, j, c.dropout_p) ? p[i * ld + j] * keep_scale : Acc(0);
    });
  }
  T* out_mu = static_cast<T*>(a.out_mu) + base;
  T* out_sig = static_cast<T*>(a.out_sig) + base;
  parallel_for(n * d, [&](int idx) {
    const int row = idx / d, col = idx % d;
    Acc sm = Acc(0), ss = Acc(0);
    if (row >= f) {
      const int i = row - f;
      for (int j = 0; j <= i; ++j) {
        const Acc pij = p[i * ld + j];
        const int64_t vj = static_cast<int64_t>(f + j) * d + col;
        sm += pij * to_acc(x.mu_v[vj]);
        ss += pij * pij * to_acc(x.sig_v[vj]);
      }
    }
    out_mu[idx] = from_acc<T, Acc>(sm);
    out_sig[idx] = from_acc<T, Acc>(ss);
  });
}

template <typename T, typename Acc>
AWR_HD void backward_block(const Args& a, int64_t bh, Acc* smem) {
  const refine::Core& c = a.core;
  const Window<Acc> win(c, bh, smem);
  const int w = win.w, ld = win.ld, n = win.n, d = win.d, f = win.f;
  const int64_t base = bh * n * d;
  const Inputs<T> x = inputs_of<T>(a, base);
  const T* gm = static_cast<const T*>(a.grad_mu) + base;
  const T* gs = static_cast<const T*>(a.grad_sig) + base;

  Acc* abuf = win.buffer(0);
  first_order(win, x, Acc(c.scale), c.mechanism == refine::kNone || !c.refine_scores, abuf);
  const refine::Saved<Acc> s = refine::refine_recompute(win, c, abuf);
  const Acc* p = s.p;
  Acc* g = s.g;

  // dmu_V = P'^T gm and dsig_V = (P' o P')^T gs (P' staged in g), then g <- dL/dP:
  // dL/dP' = gm_i . mu_V_j + 2 P'_ij gs_i . sig_V_j, times the dropout's keep / (1 - p).
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
  T* d_mu_v = static_cast<T*>(a.d_mu_v) + base;
  T* d_sig_v = static_cast<T*>(a.d_sig_v) + base;
  parallel_for(n * d, [&](int idx) {
    const int row = idx / d, col = idx % d;
    Acc sm = Acc(0), ss = Acc(0);
    if (row >= f) {
      const int j = row - f;
      for (int i = j; i < w; ++i) {
        const Acc pij = pd[i * ld + j];
        const int64_t gi = static_cast<int64_t>(f + i) * d + col;
        sm += pij * to_acc(gm[gi]);
        ss += pij * pij * to_acc(gs[gi]);
      }
    }
    d_mu_v[idx] = from_acc<T, Acc>(sm);
    d_sig_v[idx] = from_acc<T, Acc>(ss);
  });
  parallel_for(w * w, [&](int idx) {
    const int i = idx / w, j = idx % w;
    Acc acc = Acc(0);
    if (win.visible(i, j) && (!dropout || win.keep(seed, i, j, c.dropout_p))) {
      const Acc pdrop = p[i * ld + j] * keep_scale;
      const int64_t gi = static_cast<int64_t>(f + i) * d, vj = static_cast<int64_t>(f + j) * d;
      Acc dot_mu = Acc(0), dot_sig = Acc(0);
      for (int col = 0; col < d; ++col) {
        dot_mu += to_acc(gm[gi + col]) * to_acc(x.mu_v[vj + col]);
        dot_sig += to_acc(gs[gi + col]) * to_acc(x.sig_v[vj + col]);
      }
      acc = (dot_mu + Acc(2) * pdrop * dot_sig) * keep_scale;
    }
    g[i * ld + j] = acc;
  });

  const Acc* ds = refine::refine_backward(win, c, s);
  // dW2 = -scale dS; the W2 gradients to the query and key Gaussians, over all n rows (0 outside the window).
  const Acc coef = -Acc(c.scale);
  T* d_mu_q = static_cast<T*>(a.d_mu_q) + base;
  T* d_sig_q = static_cast<T*>(a.d_sig_q) + base;
  T* d_mu_k = static_cast<T*>(a.d_mu_k) + base;
  T* d_sig_k = static_cast<T*>(a.d_sig_k) + base;
  parallel_for(n * d, [&](int idx) {
    const int row = idx / d, col = idx % d;
    Acc dmq = Acc(0), dsq = Acc(0), dmk = Acc(0), dsk = Acc(0);
    if (row >= f) {
      const int i = row - f;
      const Acc mq = to_acc(x.mu_q[idx]), sq = to_acc(x.sig_q[idx]);
      const Acc mk = to_acc(x.mu_k[idx]), sk = to_acc(x.sig_k[idx]);
      const Acc rq = clamped_root(sq), rk = clamped_root(sk);
      Acc total_q = Acc(0), mean_q = Acc(0), root_q = Acc(0);
      for (int j = 0; j <= i; ++j) {  // row i of dW2: query i against keys j
        const Acc gij = coef * ds[i * ld + j];
        const int64_t kj = static_cast<int64_t>(f + j) * d + col;
        total_q += gij;
        mean_q += gij * to_acc(x.mu_k[kj]);
        root_q += gij * clamped_root(to_acc(x.sig_k[kj]));
      }
      Acc total_k = Acc(0), mean_k = Acc(0), root_k = Acc(0);
      for (int pp = i; pp < w; ++pp) {  // column i of dW2: key i against queries pp
        const Acc gpi = coef * ds[pp * ld + i];
        const int64_t qp = static_cast<int64_t>(f + pp) * d + col;
        total_k += gpi;
        mean_k += gpi * to_acc(x.mu_q[qp]);
        root_k += gpi * clamped_root(to_acc(x.sig_q[qp]));
      }
      dmq = Acc(2) * (total_q * mq - mean_q);
      dsq = total_q - (sq > Acc(refine::kSqrtClamp) ? root_q / rq : Acc(0));
      dmk = Acc(2) * (total_k * mk - mean_k);
      dsk = total_k - (sk > Acc(refine::kSqrtClamp) ? root_k / rk : Acc(0));
    }
    d_mu_q[idx] = from_acc<T, Acc>(dmq);
    d_sig_q[idx] = from_acc<T, Acc>(dsq);
    d_mu_k[idx] = from_acc<T, Acc>(dmk);
    d_sig_k[idx] = from_acc<T, Acc>(dsk);
  });
}

}  // namespace w2_refined
}  // namespace awr_fast
