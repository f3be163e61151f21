"""The public functional API. Layout (B, H, n, d_h) like SDPA; key_padding_mask is bool (B, n), True =
padding; refinement weights are (n, n) shared by all heads or (H, n, n) per head. The projections
w_rq/w_rk (and w_mu/w_sigma) may be (n, r) with any inner width r: (A W_RQ)(A W_RK)^T only needs one row
per position, so a model of length max_len runs a batch of its last n positions with the rows
W[max_len - n:, :] (and W_RV[max_len - n:, max_len - n:]), without computing the padding.

Each function validates its inputs (errors name the argument and what was expected), then hands them to
a backend chosen by ``backends.select``: the named one, or for ``backend="auto"`` the first of cuda,
triton, reference that can take them.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import validation as V
from .backends import select

DOT_MECHANISMS = ("none", "simp", "add", "value", "value_literal")
W2_MECHANISMS = ("none", "simp", "add", "value", "stoc")
REFINE_INPUTS = ("probs", "scores")


def _check_refinement(mechanism, heads, n, device, w_rq, w_rk, w_rv):
    if mechanism == "none":
        V.check_unused(mechanism, w_rq=w_rq, w_rk=w_rk, w_rv=w_rv)
        return
    V.check_refine_weight("w_rq", w_rq, n, heads, device, square=mechanism == "value_literal")
    V.check_refine_weight("w_rk", w_rk, n, heads, device, square=mechanism == "value_literal")
    V.check_same_columns("w_rk", w_rk, "w_rq", w_rq)
    if mechanism in ("value", "value_literal"):
        V.check_refine_weight("w_rv", w_rv, n, heads, device)
    else:
        V.check_unused(mechanism, w_rv=w_rv)


def _check_common(key_padding_mask, batch, n, device, scale, refine_scale, refine_input, dropout_p):
    V.check_key_padding_mask(key_padding_mask, batch, n, device)
    V.check_scale("scale", scale)
    V.check_scale("refine_scale", refine_scale)
    V.check_choice("refine_input", refine_input, REFINE_INPUTS)
    V.check_probability("dropout_p", dropout_p)


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
    backend: str = "auto",
) -> torch.Tensor:
    """Causal dot-product attention (SASRec) with AWRSR refinement of its weights.

    mechanism: "none" (plain attention), "simp", "add", "value" (causal-safe) or "value_literal"
    (the paper's literal M_value, which leaks future positions; reference backend only).
    scale defaults to 1/sqrt(d_h) for Q K^T, refine_scale (c of SPEC §3) to 1/sqrt(d_h).
    dropout_p is applied to the refined weights whenever it is > 0 (pass 0 in eval, as with SDPA).
    lengths (B,) may replace key_padding_mask for left-padded sequences. The fused backends skip the
    left padding, so their work per head follows the real length L (~L^2 d_h + L^3), not n.
    Returns (B, H, n, d_h); padding query rows and rows with no visible key are zeros.
    """
    batch, heads, n, _ = V.check_heads_layout(("q", "k", "v"), (q, k, v))
    key_padding_mask = V.lengths_to_padding_mask(lengths, key_padding_mask, batch, n, q.device)
    V.check_choice("mechanism", mechanism, DOT_MECHANISMS)
    _check_refinement(mechanism, heads, n, q.device, w_rq, w_rk, w_rv)
    _check_common(key_padding_mask, batch, n, q.device, scale, refine_scale, refine_input, dropout_p)
    inputs = dict(q=q, k=k, v=v, mechanism=mechanism, w_rq=w_rq, w_rk=w_rk, w_rv=w_rv,
                  key_padding_mask=key_padding_mask, scale=scale, refine_scale=refine_scale,
                  refine_input=refine_input, dropout_p=dropout_p)
    return select("dot_refined", backend, inputs)(**_cast_weights(inputs, q.dtype))


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
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """STOSA Wasserstein attention (SPEC §4) with AWRSR refinement; returns (mu_out, sig_out).

    sig_* are diagonal covariances (positive, e.g. ELU(.) + 1). Scores are -W2^2 * scale; the mean
    context is P mu_v, the covariance context (P o P) sig_v. mechanism "stoc" takes w_mu and w_sigma
    (each (n, n) or (H, n, n)) instead of w_rq/w_rk.
    """
    names = ("mu_q", "sig_q", "mu_k", "sig_k", "mu_v", "sig_v")
    tensors = (mu_q, sig_q, mu_k, sig_k, mu_v, sig_v)
    batch, heads, n, _ = V.check_heads_layout(names, tensors)
    key_padding_mask = V.lengths_to_padding_mask(lengths, key_padding_mask, batch, n, mu_q.device)
    V.check_choice("mechanism", mechanism, W2_MECHANISMS)
    if mechanism == "stoc":
        V.check_unused(mechanism, w_rq=w_rq, w_rk=w_rk, w_rv=w_rv)
        V.check_refine_weight("w_mu", w_mu, n, heads, mu_q.device, square=False)
        V.check_refine_weight("w_sigma", w_sigma, n, heads, mu_q.device, square=False)
        V.check_same_columns("w_sigma", w_sigma, "w_mu", w_mu)
    else:
        V.check_unused(mechanism, w_mu=w_mu, w_sigma=w_sigma)
        _check_refinement(mechanism, heads, n, mu_q.device, w_rq, w_rk, w_rv)
    _check_common(key_padding_mask, batch, n, mu_q.device, scale, refine_scale, refine_input, dropout_p)
    inputs = dict(zip(names, tensors), mechanism=mechanism, w_rq=w_rq, w_rk=w_rk, w_rv=w_rv, w_mu=w_mu,
                  w_sigma=w_sigma, key_padding_mask=key_padding_mask, scale=scale, refine_scale=refine_scale,
                  refine_input=refine_input, dropout_p=dropout_p)
    return select("w2_refined", backend, inputs)(**_cast_weights(inputs, mu_q.dtype))


def w2_scores(mu: torch.Tensor, sig: torch.Tensor, item_mu: torch.Tensor, item_sig: torch.Tensor, *,
              backend: str = "auto") -> torch.Tensor:
    """Squared 2-Wasserstein distance between B query Gaussians and |V| item Gaussians, (B, |V|).

    A distance: rank items by ascending value (STOSA's full-ranking evaluation).
    """
    V.check_tensor("mu", mu, dim=2)
    V.check_tensor("sig", sig, dim=2)
    V.check_same("sig", sig, "mu", mu)
    V.check_tensor("item_mu", item_mu, dim=2)
    V.check_tensor("item_sig", item_sig, dim=2)
    V.check_same("item_sig", item_sig, "item_mu", item_mu)
    V.check_same("item_mu", item_mu, "mu", mu, shape=False)
    if item_mu.shape[1] != mu.shape[1]:
        raise ValueError(f"item_mu: expected {mu.shape[1]} columns (the width of mu), got shape {tuple(item_mu.shape)}")
    inputs = dict(mu=mu, sig=sig, item_mu=item_mu, item_sig=item_sig)
    return select("w2_scores", backend, inputs)(**inputs)


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
    backend: str = "auto",
) -> CalibratedOutput:
    """AC-TSR calibrated attention (SPEC §5).

    Spatial calibrator: w_oq, w_ok, w_dq, w_dk are (d_h,) vectors shared by the heads, b_o, b_d and
    dist_scale (s) scalars. Adversarial calibrator (optional): q_adv = split(Q A_q), k_adv = split(K A_k)
    as (B, H, n, d_h), gate_logits = Linear(d -> n)(Q) as (B, n, n), noise the N(0, 1) draw (B, H, n, n)
    (drawn here when None).
    """
    batch, heads, n, d_h = V.check_heads_layout(("q", "k", "v"), (q, k, v))
    for name, t in (("w_oq", w_oq), ("w_ok", w_ok), ("w_dq", w_dq), ("w_dk", w_dk)):
        V.check_tensor(name, t, dim=1)
        if t.shape[0] != d_h:
            raise ValueError(f"{name}: expected shape ({d_h},) (d_h of q), got {tuple(t.shape)}")
    for name, t in (("b_o", b_o), ("b_d", b_d), ("dist_scale", dist_scale)):
        V.check_tensor(name, t, dim=(0, 1))
        if t.numel() != 1:
            raise ValueError(f"{name}: expected a scalar tensor, got shape {tuple(t.shape)}")
    adversarial = (q_adv, k_adv, gate_logits)
    if any(t is not None for t in adversarial) and any(t is None for t in adversarial):
        raise ValueError("q_adv, k_adv, gate_logits: give all three (adversarial calibrator) or none")
    if q_adv is not None:
        V.check_heads_layout(("q", "q_adv", "k_adv"), (q, q_adv, k_adv))
        V.check_tensor("gate_logits", gate_logits, dim=3)
        if tuple(gate_logits.shape) != (batch, n, n):
            raise ValueError(f"gate_logits: expected shape (B, n, n) = ({batch}, {n}, {n}), got {tuple(gate_logits.shape)}")
        if noise is not None:
            V.check_tensor("noise", noise, dim=4)
            if tuple(noise.shape) != (batch, heads, n, n):
                raise ValueError(f"noise: expected shape ({batch}, {heads}, {n}, {n}), got {tuple(noise.shape)}")
    elif noise is not None:
        raise ValueError("noise: only used by the adversarial calibrator (q_adv/k_adv/gate_logits); pass None")
    V.check_key_padding_mask(key_padding_mask, batch, n, q.device)
    V.check_scale("scale", scale)
    V.check_probability("dropout_p", dropout_p)
    V.check_probability("perturb_dropout_p", perturb_dropout_p)
    inputs = dict(q=q, k=k, v=v, w_oq=w_oq, w_ok=w_ok, b_o=b_o, w_dq=w_dq, w_dk=w_dk, b_d=b_d,
                  dist_scale=dist_scale, q_adv=q_adv, k_adv=k_adv, gate_logits=gate_logits, noise=noise,
                  key_padding_mask=key_padding_mask, scale=scale, dropout_p=dropout_p,
                  perturb_dropout_p=perturb_dropout_p)
    out_cal, out_att, perturb = select("calibrated", backend, inputs)(**_cast_weights(inputs, q.dtype))
    return CalibratedOutput(out_cal, out_att, perturb)


_WEIGHT_NAMES = ("w_rq", "w_rk", "w_rv", "w_mu", "w_sigma", "w_oq", "w_ok", "b_o", "w_dq", "w_dk", "b_d",
                 "dist_scale", "gate_logits", "noise")


def _cast_weights(inputs: dict, dtype: torch.dtype) -> dict:
    """Parameters may stay float32 under mixed precision; the math runs in the activations' dtype."""
    return {key: (val.to(dtype) if key in _WEIGHT_NAMES and isinstance(val, torch.Tensor) and val.dtype != dtype
                  else val) for key, val in inputs.items()}
