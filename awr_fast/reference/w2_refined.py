"""Readable PyTorch reference: STOSA Wasserstein attention with AWRSR refinement (SPEC §3, §4).

Layout (B, H, n, d_h) like SDPA; covariances are diagonal and positive (ELU(.) + 1 in STOSA). This is the
float64 oracle for the W2 kernels, written for clarity: the squared 2-Wasserstein distance is the fused
form of SPEC §4 (two dot products plus norms, clamp at 1e-24 before the square root, as STOSA's
``wasserstein_distance_matmul``), and the refinement reuses the dot-product family's mechanisms
(``dot_refined.refine_scores``) on the W2 probabilities A. form="factored" instead runs the same function
through factored.py, the fast eager path.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import factored
from .dot_refined import expand_refine_weight, refine_scores, refinement_input
from .masking import masked_softmax, visible_mask, zero_padded_queries

MECHANISMS = ("none", "simp", "add", "value", "stoc")
SQRT_CLAMP = 1e-24  # STOSA clamps covariances at 1e-24 before the square root


def _sqrt_cov(sig: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(torch.clamp(sig, min=SQRT_CLAMP))


def _cov_term(sig1: torch.Tensor, sig2: torch.Tensor) -> torch.Tensor:
    """sum_c (s1_ic + s2_jc - 2 sqrt(s1_ic s2_jc)) as |sqrt s1_i|^2 + |sqrt s2_j|^2 - 2 sqrt(s1_i).sqrt(s2_j)."""
    return (sig1.sum(-1)[..., :, None] + sig2.sum(-1)[..., None, :]
            - 2.0 * _sqrt_cov(sig1) @ _sqrt_cov(sig2).transpose(-1, -2))


def w2_distance(mu1: torch.Tensor, sig1: torch.Tensor, mu2: torch.Tensor, sig2: torch.Tensor) -> torch.Tensor:
    """Pairwise squared W2 between diagonal Gaussians along the last dim: (..., n1, d) x (..., n2, d) -> (..., n1, n2).

    W2sq(i, j) = |mu1_i|^2 + |mu2_j|^2 - 2 mu1_i.mu2_j
               + |sqrt sig1_i|^2 + |sqrt sig2_j|^2 - 2 sqrt(sig1_i).sqrt(sig2_j),
    exactly STOSA's matmul form (not clamped at 0: rounding may leave tiny negatives on the diagonal).
    """
    mean = ((mu1 * mu1).sum(-1)[..., :, None] + (mu2 * mu2).sum(-1)[..., None, :]
            - 2.0 * mu1 @ mu2.transpose(-1, -2))
    return mean + _cov_term(sig1, sig2)


def w2_features(mu_q, sig_q, mu_k, sig_k, scale: float):
    """(fq, fk) with fq fk^T = -W2sq(Q, K) * scale, for the factored path's one-GEMM base scores.

    w2_distance regrouped: -scale W2sq = 2 scale [mu_q, sqrt sig_q].[mu_k, sqrt sig_k]
    - scale (|mu_q|^2 + sum sig_q) - scale (|mu_k|^2 + sum sig_k); the two norms ride along as two more
    feature columns. Inputs (G, L, d); outputs (G, L, 2 d + 2).
    """
    norm_q = ((mu_q * mu_q).sum(-1) + sig_q.sum(-1))[..., None]
    norm_k = ((mu_k * mu_k).sum(-1) + sig_k.sum(-1))[..., None]
    fq = torch.cat([(2.0 * scale) * mu_q, (2.0 * scale) * _sqrt_cov(sig_q), -scale * norm_q,
                    torch.full_like(norm_q, -scale)], dim=-1)
    fk = torch.cat([mu_k, _sqrt_cov(sig_k), torch.ones_like(norm_k), norm_k], dim=-1)
    return fq, fk


def w2_refined_factored(mu_q, sig_q, mu_k, sig_k, mu_v, sig_v, *, mechanism, weights, key_padding_mask, scale, c,
                        refine_input, dropout_p):
    """w2_refined(form="factored") through factored.py: ((mu_out, sig_out), weights_fn), where weights_fn()
    builds {"A", "P"} as (B, H, n, n) (for return_weights)."""
    def core(window, x):
        fq, fk = w2_features(*(window.group(x[name]) for name in ("mu_q", "sig_q", "mu_k", "sig_k")), scale)
        a, probs, plan = factored.refine(window, fq, fk, mechanism=mechanism, weights=weights, c=c,
                                         refine_input=refine_input, sqrt_clamp=SQRT_CLAMP)
        dropped = factored.dropout_blocks(probs, dropout_p)
        outs = [factored.apply_probs(dropped, plan, window.group(x["mu_v"])),
                factored.apply_probs(dropped, plan, window.group(x["sig_v"]), square=True)]
        return outs, a, probs, plan

    inputs = {"mu_q": mu_q, "sig_q": sig_q, "mu_k": mu_k, "sig_k": sig_k, "mu_v": mu_v, "sig_v": sig_v}
    outs, weights_fn = factored.run_buckets(key_padding_mask, inputs, weights, core)
    return tuple(outs), weights_fn


def stochastic_scores(a, w_mu, w_sigma, c, form="naive"):
    """B of M_stoc (SPEC §3), not yet masked: B_kt = -c W2sq((A_k W_mu, ELU(A_k W_sigma) + 1), (A_t W_mu, ...)).

    form="factored" computes the mean part from the Gram matrix A (W_mu W_mu^T) A^T (SPEC §3b); the ELU
    covariance part has no such shortcut.
    """
    sig = F.elu(a @ expand_refine_weight(w_sigma)) + 1.0
    if form == "factored":
        gram = (a @ expand_refine_weight(w_mu @ w_mu.transpose(-1, -2))) @ a.transpose(-1, -2)
        sq = gram.diagonal(dim1=-2, dim2=-1)
        mean = sq[..., :, None] + sq[..., None, :] - 2.0 * gram
        return -c * (mean + _cov_term(sig, sig))
    mu = a @ expand_refine_weight(w_mu)
    return -c * w2_distance(mu, sig, mu, sig)


def w2_refined(
    mu_q: torch.Tensor,
    sig_q: torch.Tensor,
    mu_k: torch.Tensor,
    sig_k: torch.Tensor,
    mu_v: torch.Tensor,
    sig_v: torch.Tensor,
    *,
    mechanism: str = "none",
    w_rq: torch.Tensor | None = None,
    w_rk: torch.Tensor | None = None,
    w_rv: torch.Tensor | None = None,
    w_mu: torch.Tensor | None = None,
    w_sigma: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    refine_scale: float | None = None,
    refine_input: str = "probs",
    dropout_p: float = 0.0,
    form: str = "naive",
    return_weights: bool = False,
):
    """Causal STOSA Wasserstein attention, optionally AWRSR-refined. Inputs are assumed validated.

    P = masked_softmax(-W2sq(Q, K) * scale); the refinement (mechanism simp/add/value as in dot_refined,
    or stoc) turns A (= P, or the masked logits -W2sq * scale with masked entries 0 for
    refine_input="scores") into B and P_final = masked_softmax(B). With P' = dropout(P_final), as STOSA
    applies attention dropout before both products: mu_out = P' mu_v, sig_out = (P' o P') sig_v.
    Padding query rows are zeros. scale and refine_scale (c) default to 1/sqrt(d_h). form="factored" runs
    the same function through the fast eager path of factored.py (SPEC §3b; stoc's mean part through the
    Gram matrix A W_mu W_mu^T A^T).

    Returns (mu_out, sig_out), each (B, H, n, d_h), or ((mu_out, sig_out), weights) with weights =
    {"A": refinement input (or P), "B": second-order scores, "P": final weights before dropout}.
    """
    if mechanism not in MECHANISMS:
        raise ValueError(f"mechanism: expected one of {list(MECHANISMS)}, got {mechanism!r}")
    n, d_h = mu_q.shape[-2], mu_q.shape[-1]
    scale = 1.0 / math.sqrt(d_h) if scale is None else scale
    c = 1.0 / math.sqrt(d_h) if refine_scale is None else refine_scale
    if form == "factored" and mechanism in factored.MECHANISMS:
        given = {"w_rq": w_rq, "w_rk": w_rk, "w_rv": w_rv, "w_mu": w_mu, "w_sigma": w_sigma}
        weights = {name: given[name] for name in factored.WEIGHT_NAMES[mechanism]}
        outs, weights_fn = w2_refined_factored(mu_q, sig_q, mu_k, sig_k, mu_v, sig_v, mechanism=mechanism,
                                               weights=weights, key_padding_mask=key_padding_mask, scale=scale, c=c,
                                               refine_input=refine_input, dropout_p=dropout_p)
        if not return_weights:
            return outs
        weights = weights_fn()
        visible = visible_mask(n, key_padding_mask, mu_q.device)
        if mechanism == "stoc":
            weights["B"] = stochastic_scores(weights["A"], w_mu, w_sigma, c, form)
        else:
            weights["B"] = refine_scores(weights["A"], visible, mechanism=mechanism, w_rq=w_rq, w_rk=w_rk, w_rv=w_rv,
                                         c=c, form=form)
        return outs, weights
    visible = visible_mask(n, key_padding_mask, mu_q.device)

    scores = -w2_distance(mu_q, sig_q, mu_k, sig_k) * scale
    probs = masked_softmax(scores, visible)
    weights = {"A": probs}
    if mechanism != "none":
        a = refinement_input(scores, probs, visible, refine_input)
        if mechanism == "stoc":
            b = stochastic_scores(a, w_mu, w_sigma, c, form)
        else:
            b = refine_scores(a, visible, mechanism=mechanism, w_rq=w_rq, w_rk=w_rk, w_rv=w_rv, c=c, form=form)
        probs = masked_softmax(b, visible)
        weights.update(A=a, B=b)
    weights["P"] = probs
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p, training=True)
    mu_out = zero_padded_queries(probs @ mu_v, key_padding_mask)
    sig_out = zero_padded_queries((probs * probs) @ sig_v, key_padding_mask)
    return ((mu_out, sig_out), weights) if return_weights else (mu_out, sig_out)
