"""The public functional API. Layout (B, H, n, d_h) like SDPA; key_padding_mask is bool (B, n), True =
padding; refinement weights are (n, n) shared by all heads or (H, n, n) per head. The projections
w_rq/w_rk (and w_mu/w_sigma) may be (n, r) with any inner width r: (A W_RQ)(A W_RK)^T only needs one row
per position, so a model of length max_len runs a batch of its last n positions with the rows
W[max_len - n:, :] (and W_RV[max_len - n:, max_len - n:]), without computing the padding.

Each function validates its arguments once (ops.<op>.make_inputs: errors name the argument and what was
expected) into a frozen inputs record, and backends.dispatch hands it to a backend: the named one, or for
``backend="auto"`` the first of cuda, triton, eager, reference that takes it (cuda and triton only for
CUDA tensors). awr_fast.backends.used_backends() says which ran.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import ops
from .backends import dispatch


def refined_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mechanism: str,
    w_rq: torch.Tensor | None = None,
    w_rk: torch.Tensor | None = None,
    w_rv: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
    scale: float | None = None,
    refine_scale: float | None = None,
    refine_input: str = "probs",
    dropout_p: float = 0.0,
    return_weights: bool = False,
    backend: str = "auto",
):
    """Causal dot-product attention (SASRec) with AWRSR refinement of its weights.

    mechanism: "none" (plain attention), "simp", "add", "value" (causal-safe) or "value_literal"
    (the paper's literal M_value, which leaks future positions; reference backend only): ops.dot_refined.
    scale defaults to 1/sqrt(d_h) for Q K^T, refine_scale (c of SPEC §3) to 1/sqrt(d_h).
    dropout_p is applied to the refined weights whenever it is > 0 (pass 0 in eval, as with SDPA).
    lengths (B,) may replace key_padding_mask for left-padded sequences. The fused backends skip the
    left padding, so their work per head follows the real length L (~L^2 d_h + L^3), not n. Values
    outside [0, n] raise for CPU tensors; on a GPU they are clamped into it (a check would make every
    call wait for the device). Returns (B, H, n, d_h); padding query rows and rows with no visible key are zeros. With
    return_weights=True returns (out, weights), weights = {"A": the refinement's input (or P), "B": the
    second-order scores (refined mechanisms), "P": the final weights before dropout}, each (B, H, n, n):
    the eager and reference backends store them, the fused kernels do not.
    """
    inputs = ops.dot_refined.make_inputs(
        q,
        k,
        v,
        mechanism=mechanism,
        w_rq=w_rq,
        w_rk=w_rk,
        w_rv=w_rv,
        key_padding_mask=key_padding_mask,
        lengths=lengths,
        scale=scale,
        refine_scale=refine_scale,
        refine_input=refine_input,
        dropout_p=dropout_p,
        return_weights=return_weights,
    )
    return dispatch("dot_refined", backend, inputs)


def wasserstein_attention(
    mu_q: torch.Tensor,
    sig_q: torch.Tensor,
    mu_k: torch.Tensor,
    sig_k: torch.Tensor,
    mu_v: torch.Tensor,
    sig_v: torch.Tensor,
    *,
    mechanism: str,
    w_rq: torch.Tensor | None = None,
    w_rk: torch.Tensor | None = None,
    w_rv: torch.Tensor | None = None,
    w_mu: torch.Tensor | None = None,
    w_sigma: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
    scale: float | None = None,
    refine_scale: float | None = None,
    refine_input: str = "probs",
    dropout_p: float = 0.0,
    return_weights: bool = False,
    backend: str = "auto",
):
    """STOSA Wasserstein attention (SPEC §4) with AWRSR refinement; returns (mu_out, sig_out).

    sig_* are diagonal covariances (positive, e.g. ELU(.) + 1). Scores are -W2^2 * scale; the mean
    context is P mu_v, the covariance context (P o P) sig_v. mechanism "stoc" takes w_mu and w_sigma
    (each (n, r) or (H, n, r), the same r) instead of w_rq/w_rk. return_weights=True gives
    ((mu_out, sig_out), weights), as refined_attention.
    """
    inputs = ops.w2_refined.make_inputs(
        mu_q,
        sig_q,
        mu_k,
        sig_k,
        mu_v,
        sig_v,
        mechanism=mechanism,
        w_rq=w_rq,
        w_rk=w_rk,
        w_rv=w_rv,
        w_mu=w_mu,
        w_sigma=w_sigma,
        key_padding_mask=key_padding_mask,
        lengths=lengths,
        scale=scale,
        refine_scale=refine_scale,
        refine_input=refine_input,
        dropout_p=dropout_p,
        return_weights=return_weights,
    )
    return dispatch("w2_refined", backend, inputs)


def w2_scores(
    mu: torch.Tensor, sig: torch.Tensor, item_mu: torch.Tensor, item_sig: torch.Tensor, *, backend: str = "auto"
) -> torch.Tensor:
    """Squared 2-Wasserstein distance between B query Gaussians and |V| item Gaussians, (B, |V|).

    A distance: rank items by ascending value (STOSA's full-ranking evaluation).
    """
    return dispatch("w2_scores", backend, ops.w2_scores.make_inputs(mu, sig, item_mu, item_sig))


class CalibratedOutput(NamedTuple):
    """out_cal feeds the next layer; out_att (perturbed) and perturb (the mask M) exist only when the
    adversarial calibrator is used (q_adv/k_adv given)."""

    out_cal: torch.Tensor
    out_att: torch.Tensor | None
    perturb: torch.Tensor | None


def calibrated_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    w_oq: torch.Tensor,
    w_ok: torch.Tensor,
    b_o: torch.Tensor,
    w_dq: torch.Tensor,
    w_dk: torch.Tensor,
    b_d: torch.Tensor,
    dist_scale: torch.Tensor,
    q_adv: torch.Tensor | None = None,
    k_adv: torch.Tensor | None = None,
    gate_logits: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    perturb_dropout_p: float = 0.0,
    refine: str = "none",
    w_rq: torch.Tensor | None = None,
    w_rk: torch.Tensor | None = None,
    w_rv: torch.Tensor | None = None,
    refine_scale: float | None = None,
    backend: str = "auto",
) -> CalibratedOutput:
    """AC-TSR calibrated attention (SPEC §5).

    Spatial calibrator: w_oq, w_ok, w_dq, w_dk are (d_h,) vectors shared by the heads, b_o, b_d and
    dist_scale (s) scalars. Adversarial calibrator (optional): q_adv = split(Q A_q), k_adv = split(K A_k)
    as (B, H, n, d_h), gate_logits = Linear(d -> n)(Q) as (B, n, n), noise the N(0, 1) draw (B, H, n, n)
    (drawn here when None). refine: AWRSR refinement ("simp", "add", "value"; weights and refine_scale as
    refined_attention's) of the weights out_cal uses, A = P_fin (P_sp without the adversarial calibrator).
    """
    inputs = ops.calibrated.make_inputs(
        q,
        k,
        v,
        w_oq=w_oq,
        w_ok=w_ok,
        b_o=b_o,
        w_dq=w_dq,
        w_dk=w_dk,
        b_d=b_d,
        dist_scale=dist_scale,
        q_adv=q_adv,
        k_adv=k_adv,
        gate_logits=gate_logits,
        noise=noise,
        key_padding_mask=key_padding_mask,
        scale=scale,
        dropout_p=dropout_p,
        perturb_dropout_p=perturb_dropout_p,
        refine=refine,
        w_rq=w_rq,
        w_rk=w_rk,
        w_rv=w_rv,
        refine_scale=refine_scale,
    )
    return CalibratedOutput(*dispatch("calibrated", backend, inputs))
