"""dot_refined on the eager backend: the refinement in its factored form (SPEC §3b) through factored.py."""

from __future__ import annotations

from ..ops.dot_refined import WEIGHTS, default_scale
from . import factored


def dot_refined(
    q,
    k,
    v,
    *,
    mechanism,
    w_rq=None,
    w_rk=None,
    w_rv=None,
    key_padding_mask=None,
    scale=None,
    refine_scale=None,
    refine_input="probs",
    dropout_p=0.0,
    return_weights=False,
):
    """The reference's dot_refined for mechanisms simp, add and value (inputs validated by the API).

    Returns out (B, H, n, d_h), or (out, {"A", "B", "P"}) each (B, H, n, n) with return_weights.
    """
    d_h = q.shape[-1]
    scale = default_scale(d_h) if scale is None else scale
    c = default_scale(d_h) if refine_scale is None else refine_scale
    given = {"w_rq": w_rq, "w_rk": w_rk, "w_rv": w_rv}
    weights = {name: given[name] for name in WEIGHTS[mechanism]}

    def core(window, x):
        a, probs, plan = factored.refine(
            window,
            window.group(x["q"]) * scale,
            window.group(x["k"]),
            mechanism=mechanism,
            weights=weights,
            c=c,
            refine_input=refine_input,
        )
        values = window.group(x["v"])
        return [factored.apply_probs(factored.dropout_blocks(probs, dropout_p), plan, values)], a, probs, plan

    (out,), weights_fn = factored.run_buckets(key_padding_mask, {"q": q, "k": k, "v": v}, weights, core)
    if not return_weights:
        return out
    maps = weights_fn()
    maps["B"] = factored.dense_second_order(maps["A"], mechanism, weights, c, key_padding_mask)
    return out, maps
