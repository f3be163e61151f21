"""w2_refined on the eager backend: the W2 scores as one GEMM of feature vectors, then the factored
refinement (SPEC §3b, §4) through factored.py."""

from __future__ import annotations

import torch

from ..ops.w2_refined import SQRT_CLAMP, WEIGHTS, default_scale
from . import factored


def w2_features(mu_q, sig_q, mu_k, sig_k, scale: float):
    """(fq, fk) with fq fk^T = -W2sq(Q, K) * scale: the base scores in one GEMM.

    -scale W2sq = 2 scale [mu_q, sqrt sig_q].[mu_k, sqrt sig_k] - scale (|mu_q|^2 + sum sig_q)
    - scale (|mu_k|^2 + sum sig_k); the two norms ride along as two more feature columns.
    Inputs (G, L, d); outputs (G, L, 2 d + 2).
    """
    norm_q = ((mu_q * mu_q).sum(-1) + sig_q.sum(-1))[..., None]
    norm_k = ((mu_k * mu_k).sum(-1) + sig_k.sum(-1))[..., None]
    root_q, root_k = (torch.sqrt(torch.clamp(s, min=SQRT_CLAMP)) for s in (sig_q, sig_k))
    fq = torch.cat(
        [(2.0 * scale) * mu_q, (2.0 * scale) * root_q, -scale * norm_q, torch.full_like(norm_q, -scale)], dim=-1
    )
    fk = torch.cat([mu_k, root_k, torch.ones_like(norm_k), norm_k], dim=-1)
    return fq, fk


def w2_refined(
    mu_q,
    sig_q,
    mu_k,
    sig_k,
    mu_v,
    sig_v,
    *,
    mechanism,
    w_rq=None,
    w_rk=None,
    w_rv=None,
    w_mu=None,
    w_sigma=None,
    key_padding_mask=None,
    scale=None,
    refine_scale=None,
    refine_input="probs",
    dropout_p=0.0,
    return_weights=False,
):
    """The reference's w2_refined for mechanisms simp, add, value and stoc (inputs validated by the API).

    Returns (mu_out, sig_out), or ((mu_out, sig_out), {"A", "B", "P"}) with return_weights.
    """
    d_h = mu_q.shape[-1]
    scale = default_scale(d_h) if scale is None else scale
    c = default_scale(d_h) if refine_scale is None else refine_scale
    given = {"w_rq": w_rq, "w_rk": w_rk, "w_rv": w_rv, "w_mu": w_mu, "w_sigma": w_sigma}
    weights = {name: given[name] for name in WEIGHTS[mechanism]}

    def core(window, x):
        fq, fk = w2_features(*(window.group(x[name]) for name in ("mu_q", "sig_q", "mu_k", "sig_k")), scale)
        a, probs, plan = factored.refine(
            window, fq, fk, mechanism=mechanism, weights=weights, c=c, refine_input=refine_input, sqrt_clamp=SQRT_CLAMP
        )
        dropped = factored.dropout_blocks(probs, dropout_p)
        outs = [
            factored.apply_probs(dropped, plan, window.group(x["mu_v"])),
            factored.apply_probs(dropped, plan, window.group(x["sig_v"]), square=True),
        ]
        return outs, a, probs, plan

    inputs = {"mu_q": mu_q, "sig_q": sig_q, "mu_k": mu_k, "sig_k": sig_k, "mu_v": mu_v, "sig_v": sig_v}
    outs, weights_fn = factored.run_buckets(key_padding_mask, inputs, weights, core)
    if not return_weights:
        return tuple(outs)
    maps = weights_fn()
    maps["B"] = factored.dense_second_order(maps["A"], mechanism, weights, c, key_padding_mask, SQRT_CLAMP)
    return tuple(outs), maps
