"""Readable PyTorch reference: STOSA Wasserstein attention with AWRSR refinement (SPEC §3, §4).

Layout (B, H, n, d_h) like SDPA; covariances are diagonal and positive (ELU(.) + 1 in STOSA). This is the
float64 oracle for the W2 kernels, written for clarity: the squared 2-Wasserstein distance is the fused
form of SPEC §4 (two dot products plus norms, clamp at 1e-24 before the square root, as STOSA's
``wasserstein_distance_matmul``), and the refinement reuses the dot-product family's mechanisms
(``dot_refined.refine_scores``) on the W2 probabilities A. The fast eager form is awr_fast.eager.w2_refined.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops.w2_refined import SQRT_CLAMP, default_scale
from .dot_refined import expand_refine_weight, refine_scores, refinement_input
from .masking import masked_softmax, visible_mask, zero_padded_queries


def _sqrt_cov(sig: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(torch.clamp(sig, min=SQRT_CLAMP))


def _cov_term(sig1: torch.Tensor, sig2: torch.Tensor) -> torch.Tensor:
    """sum_c (s1_ic + s2_jc - 2 sqrt(s1_ic s2_jc)) as |sqrt s1_i|^2 + |sqrt s2_j|^2 - 2 sqrt(s1_i).sqrt(s2_j)."""
    return (
        sig1.sum(-1)[..., :, None]
        + sig2.sum(-1)[..., None, :]
        - 2.0 * _sqrt_cov(sig1) @ _sqrt_cov(sig2).transpose(-1, -2)
    )


def w2_distance(mu1: torch.Tensor, sig1: torch.Tensor, mu2: torch.Tensor, sig2: torch.Tensor) -> torch.Tensor:
    """Pairwise squared W2 between diagonal Gaussians along the last dim: (..., n1, d) x (..., n2, d) -> (..., n1, n2).

    W2sq(i, j) = |mu1_i|^2 + |mu2_j|^2 - 2 mu1_i.mu2_j
               + |sqrt sig1_i|^2 + |sqrt sig2_j|^2 - 2 sqrt(sig1_i).sqrt(sig2_j),
    exactly STOSA's matmul form (not clamped at 0: rounding may leave tiny negatives on the diagonal).
    """
    mean = (mu1 * mu1).sum(-1)[..., :, None] + (mu2 * mu2).sum(-1)[..., None, :] - 2.0 * mu1 @ mu2.transpose(-1, -2)
    return mean + _cov_term(sig1, sig2)


def stochastic_scores(a, w_mu, w_sigma, c):
    """B of M_stoc (SPEC §3), not yet masked: B_kt = -c W2sq((A_k W_mu, ELU(A_k W_sigma) + 1), (A_t W_mu, ...))."""
    sig = F.elu(a @ expand_refine_weight(w_sigma)) + 1.0
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
    return_weights: bool = False,
):
    """Causal STOSA Wasserstein attention, optionally AWRSR-refined. Inputs are assumed validated.

    P = masked_softmax(-W2sq(Q, K) * scale); the refinement (mechanism simp/add/value as in dot_refined,
    or stoc) turns A (= P, or the masked logits -W2sq * scale with masked entries 0 for
    refine_input="scores") into B and P_final = masked_softmax(B). With P' = dropout(P_final), as STOSA
    applies attention dropout before both products: mu_out = P' mu_v, sig_out = (P' o P') sig_v.
    Padding query rows are zeros. scale and refine_scale (c) default to 1/sqrt(d_h).

    Returns (mu_out, sig_out), each (B, H, n, d_h), or ((mu_out, sig_out), weights) with weights =
    {"A": refinement input (or P), "B": second-order scores, "P": final weights before dropout}.
    """
    n, d_h = mu_q.shape[-2], mu_q.shape[-1]
    scale = default_scale(d_h) if scale is None else scale
    c = default_scale(d_h) if refine_scale is None else refine_scale
    visible = visible_mask(n, key_padding_mask, mu_q.device)

    scores = -w2_distance(mu_q, sig_q, mu_k, sig_k) * scale
    probs = masked_softmax(scores, visible)
    weights = {"A": probs}
    if mechanism != "none":
        a = refinement_input(scores, probs, visible, refine_input)
        if mechanism == "stoc":
            b = stochastic_scores(a, w_mu, w_sigma, c)
        else:
            b = refine_scores(a, visible, mechanism=mechanism, w_rq=w_rq, w_rk=w_rk, w_rv=w_rv, c=c)
        probs = masked_softmax(b, visible)
        weights.update(A=a, B=b)
    weights["P"] = probs
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p, training=True)
    mu_out = zero_padded_queries(probs @ mu_v, key_padding_mask)
    sig_out = zero_padded_queries((probs * probs) @ sig_v, key_padding_mask)
    return ((mu_out, sig_out), weights) if return_weights else (mu_out, sig_out)
