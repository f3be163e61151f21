"""Readable PyTorch reference: causal dot-product attention with AWRSR refinement (SPEC §2, §3, §3b).

Layout (B, H, n, d_h) like SDPA. This is the float64 oracle every fast backend is checked against, so
it is written for clarity: every n x n product is spelled out. The fast eager form of the same function
(A M A^T, triangular blocks, length buckets) is the eager backend, awr_fast.eager.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from ..ops.dot_refined import default_scale
from .masking import masked_softmax, visible_mask, zero_padded_queries


def expand_refine_weight(w: torch.Tensor) -> torch.Tensor:
    """(n, n) shared or (H, n, n) per-head -> broadcastable against (B, H, n, n)."""
    return w[None, None] if w.dim() == 2 else w[None]


def refinement_input(scores: torch.Tensor, probs: torch.Tensor, visible: torch.Tensor, refine_input: str):
    """A of SPEC §3: the post-softmax probabilities, or the masked logits with masked entries 0."""
    if refine_input == "probs":
        return probs
    return torch.where(visible, scores, torch.zeros_like(scores))


def second_order_scores(a, w_rq, w_rk, c):
    """c (A W_RQ)(A W_RK)^T, spelled out."""
    return c * (a @ expand_refine_weight(w_rq)) @ (a @ expand_refine_weight(w_rk)).transpose(-1, -2)


def refine_scores(a, visible, *, mechanism, w_rq, w_rk, w_rv, c):
    """B of SPEC §3 for the dot-product family (not yet masked)."""
    if mechanism == "simp":
        return second_order_scores(a, w_rq, w_rk, c)
    if mechanism == "add":
        return 0.5 * (second_order_scores(a, w_rk, w_rq, c) + a)
    if mechanism == "value":
        inner = masked_softmax(second_order_scores(a, w_rq, w_rk, c), visible)
        return inner @ (a @ expand_refine_weight(w_rv))
    if mechanism == "value_literal":
        # B = (W_RV A) softmax((W_RK A)^T (W_RQ A)): mixes rows of future positions on purpose.
        inner = torch.softmax(
            c * (expand_refine_weight(w_rk) @ a).transpose(-1, -2) @ (expand_refine_weight(w_rq) @ a), dim=-1
        )
        return (expand_refine_weight(w_rv) @ a) @ inner
    raise ValueError(f"mechanism: expected one of ['add', 'simp', 'value', 'value_literal'], got {mechanism!r}")


def dot_refined(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mechanism: str = "none",
    w_rq: torch.Tensor | None = None,
    w_rk: torch.Tensor | None = None,
    w_rv: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    refine_scale: float | None = None,
    refine_input: str = "probs",
    dropout_p: float = 0.0,
    return_weights: bool = False,
):
    """Causal multi-head attention, optionally AWRSR-refined. Inputs are assumed validated.

    Returns out (B, H, n, d_h), or (out, weights) with weights = {"A": first-order input to the
    refinement (or P), "B": second-order scores, "P": final weights before dropout}.
    """
    n, d_h = q.shape[-2], q.shape[-1]
    scale = default_scale(d_h) if scale is None else scale
    c = default_scale(d_h) if refine_scale is None else refine_scale
    visible = visible_mask(n, key_padding_mask, q.device)

    scores = (q @ k.transpose(-1, -2)) * scale
    probs = masked_softmax(scores, visible)
    weights = {"A": probs}
    if mechanism != "none":
        if mechanism == "value_literal":
            warnings.warn(
                "mechanism='value_literal' mixes rows of future positions (it is not causal); "
                "use mechanism='value' for the causal-safe reading",
                stacklevel=2,
            )
        a = refinement_input(scores, probs, visible, refine_input)
        b = refine_scores(a, visible, mechanism=mechanism, w_rq=w_rq, w_rk=w_rk, w_rv=w_rv, c=c)
        probs = masked_softmax(b, visible)
        weights.update(A=a, B=b)
    weights["P"] = probs
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p, training=True)
    out = zero_padded_queries(probs @ v, key_padding_mask)
    return (out, weights) if return_weights else out
