"""Readable PyTorch reference: AC-TSR calibrated attention (SPEC §5), the float64 oracle for its kernels.

Layout (B, H, n, d_h) like SDPA. Two calibrators on top of causal dot-product attention:

- spatial: an order term E_o and a distance term E_d are added to Q K^T before the softmax. The released
  code (AIM-SE/AC-TSR, ``AttackRMultiHeadAttention.cal_origin_qkv``) concatenates q_i and k_j into an
  [n, n, 2 d_h] tensor and applies Linear(2 d_h, 1); that linear map is separable, w.[q_i, k_j] + b =
  w_q.q_i + w_k.k_j + b, which is how it is computed here (two (B, H, n) vectors broadcast to n x n).
- adversarial (optional): a perturbation mask M from a second attention over (Q A_q, K A_k), a perturbed
  P_att (noise where M is small) and a calibrated P_fin (P_sp re-weighted by exp(1 - M), gated).

Readings of the SPEC (closest to the released code) chosen here:
- E_o = log(1 - p_o + eps) with eps = 1e-24 (the released constant); in float16, where 1e-24 underflows
  to 0, eps is the dtype's smallest normal number so the log stays finite. The released "target" of the
  order term is 1 only for j > i, never visible, so only the log(1 - p_o) branch is ever used.
- The distance target is log(|i - j| + 1) on absolute (left-padded) positions, as released.
- dropout_p applies to the weights that multiply V: P_fin and P_att (P_sp when there is no adversarial
  calibrator), with independent draws. The released code instead drops P_sp itself (inside ``_func``)
  before it enters the perturbed/calibrated softmaxes; in eval (p = 0) the two are identical.
- perturb_dropout_p is the released ``attn_dropout`` applied to M; the returned ``perturb`` is M after
  that dropout (what the released ``||1 - M||_F`` penalty sees).
- The released maps A_q, A_k are Linear layers with a bias; SPEC §5 (and the module here) use none.
  The released mask is additive -10000 on causal + key padding; here masked entries are exact zeros and
  padding query rows give zero output (SPEC §1).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .dot_refined import refine_scores
from .masking import masked_softmax, visible_mask, zero_padded_queries

ORDER_EPS = 1e-24


def _order_eps(dtype: torch.dtype) -> float:
    return max(ORDER_EPS, torch.finfo(dtype).tiny)


def _pairwise_affine(q, k, w_q, w_k, b):
    """w_q.q_i + w_k.k_j + b for every (i, j): (B, H, n, n), without the [n, n, 2 d_h] concatenation."""
    return (q @ w_q)[..., :, None] + (k @ w_k)[..., None, :] + b.reshape(())


def distance_target(n: int, dtype: torch.dtype, device) -> torch.Tensor:
    """log(|i - j| + 1), (n, n)."""
    pos = torch.arange(n, device=device)
    return torch.log((pos[:, None] - pos[None, :]).abs().to(dtype) + 1.0)


def spatial_logits(q, k, visible, *, w_oq, w_ok, b_o, w_dq, w_dk, b_d, dist_scale):
    """Q K^T + E_o + E_d of SPEC §5 (not yet scaled or masked); E_o is 0 on masked entries."""
    n = q.shape[-2]
    p_o = torch.sigmoid(_pairwise_affine(q, k, w_oq, w_ok, b_o))
    e_o = torch.log(1.0 - p_o + _order_eps(q.dtype))
    e_o = torch.where(visible, e_o, torch.zeros_like(e_o))
    p_d = _pairwise_affine(q, k, w_dq, w_dk, b_d)
    e_d = -torch.square(distance_target(n, q.dtype, q.device) - p_d) * torch.square(dist_scale.reshape(())) / 2.0
    return q @ k.transpose(-1, -2) + e_o + e_d


def calibrated(
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
    return_weights: bool = False,
):
    """AC-TSR calibrated attention. Inputs are assumed validated.

    P_sp  = masked_softmax((Q K^T + E_o + E_d) * scale)
    M     = dropout(masked_softmax(q_adv k_adv^T * scale), perturb_dropout_p)
    P_att = masked_softmax(P_sp o M + noise o (1 - M))           noise ~ N(0, 1), drawn when None
    P_cal = masked_softmax(P_sp o exp(1 - M))
    P_fin = masked_softmax(G o P_sp + (1 - G) o P_cal)           G = sigmoid(gate_logits)[:, None]
    out_cal = dropout(P_fin) V, out_att = dropout(P_att) V; padding query rows are zeros.

    Without the adversarial calibrator (q_adv None) out_cal = dropout(P_sp) V and out_att, perturb are None.
    refine (SPEC §3, "simp" / "add" / "value" with w_rq, w_rk (, w_rv) and c = refine_scale, default
    1/sqrt(d_h)): AWRSR refinement of the weights out_cal uses, A = P_fin (P_sp without the adversarial
    calibrator): B as dot_refined's, P = masked_softmax(B); out_att is not refined.
    Returns (out_cal, out_att, perturb), or that tuple and a dict of the weights before dropout
    {"P_sp", "M", "P_att", "P_cal", "P_fin"} (the last four absent without the adversarial calibrator),
    plus "B" and "P" (the refined weights out_cal uses) with a refinement.
    """
    n, d_h = q.shape[-2], q.shape[-1]
    scale = 1.0 / math.sqrt(d_h) if scale is None else scale
    visible = visible_mask(n, key_padding_mask, q.device)

    logits = spatial_logits(
        q, k, visible, w_oq=w_oq, w_ok=w_ok, b_o=b_o, w_dq=w_dq, w_dk=w_dk, b_d=b_d, dist_scale=dist_scale
    )
    p_sp = masked_softmax(logits * scale, visible)
    weights = {"P_sp": p_sp}
    c = 1.0 / math.sqrt(d_h) if refine_scale is None else refine_scale

    def refined(p):  # the final weights of out_cal
        if refine == "none":
            return p
        b = refine_scores(p, visible, mechanism=refine, w_rq=w_rq, w_rk=w_rk, w_rv=w_rv, c=c)
        weights["B"] = b
        weights["P"] = masked_softmax(b, visible)
        return weights["P"]

    if q_adv is None:
        p_sp = refined(p_sp)
        p_out = F.dropout(p_sp, p=dropout_p, training=True) if dropout_p > 0.0 else p_sp
        result = (zero_padded_queries(p_out @ v, key_padding_mask), None, None)
        return (result, weights) if return_weights else result

    if noise is None:
        noise = torch.randn_like(p_sp)
    m = masked_softmax((q_adv @ k_adv.transpose(-1, -2)) * scale, visible)
    if perturb_dropout_p > 0.0:
        m = F.dropout(m, p=perturb_dropout_p, training=True)
    p_att = masked_softmax(p_sp * m + noise * (1.0 - m), visible)
    p_cal = masked_softmax(p_sp * torch.exp(1.0 - m), visible)
    gate = torch.sigmoid(gate_logits)[:, None]
    p_fin = masked_softmax(gate * p_sp + (1.0 - gate) * p_cal, visible)
    weights.update(M=m, P_att=p_att, P_cal=p_cal, P_fin=p_fin)
    p_fin = refined(p_fin)
    if dropout_p > 0.0:
        p_fin = F.dropout(p_fin, p=dropout_p, training=True)
        p_att = F.dropout(p_att, p=dropout_p, training=True)
    result = (zero_padded_queries(p_fin @ v, key_padding_mask), zero_padded_queries(p_att @ v, key_padding_mask), m)
    return (result, weights) if return_weights else result
