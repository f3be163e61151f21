"""Training losses of the sequential recommenders (SASRec: SPEC §2, STOSA: SPEC §4).

Every loss is taken at each non-padding position t of a left-padded batch (pos[b, t] != 0 is the item
that follows position t) and averaged over those positions; a batch without any target gives 0, not NaN.
Negatives are (B, n) (one per position) or (B, n, k); with k > 1 the negative terms are averaged over k.

The dot-product losses take the hidden states h (B, n, d) and the item embedding table (num_items + 1, d)
(tied weights, row 0 = padding). "ce" and "sampled_ce" first gather the non-padding positions (a boolean
index: one host sync, and a data-dependent shape under torch.compile) so that the (N, |V|) logits of the
full softmax cost only the real positions.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

W2_SQRT_CLAMP = 1e-24  # STOSA clamps covariances before the square root
BPR_EPS = 1e-24  # STOSA: -log sigmoid(W2(h, neg) - W2(h, pos) + 1e-24)


class RoutedLoss(NamedTuple):
    """A loss whose parts update different parameters (AC-SASRec's adversarial training): ``routes`` is
    ((loss, parameters), ...); the trainer backpropagates each loss into its own parameters only, one
    optimiser step for all. ``value`` is what is logged as the training loss."""

    value: torch.Tensor
    routes: tuple


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of values over the True entries of mask (same shape); 0 when mask has no True entry."""
    total = torch.where(mask, values, torch.zeros_like(values)).sum()
    return total / mask.sum().clamp(min=1).to(values.dtype)


def _as_k(neg: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    if neg.shape == pos.shape:
        return neg[..., None]
    if neg.dim() == 3 and neg.shape[:2] == pos.shape:
        return neg
    raise ValueError(f"neg: expected shape {tuple(pos.shape)} or {tuple(pos.shape)} + (k,), got {tuple(neg.shape)}")


def _check_pos(h: torch.Tensor, pos: torch.Tensor) -> None:
    if pos.shape != h.shape[:2]:
        raise ValueError(
            f"pos: expected shape {tuple(h.shape[:2])} (the (B, n) of the hidden states), got {tuple(pos.shape)}"
        )


def bce_loss(h: torch.Tensor, item_emb: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """SASRec's loss (kang205, pmixer): BCE-with-logits of the positive logit against 1 plus that of the
    negative logit(s) against 0, each a mean over the non-padding positions. Logits are <h_t, E[i]>."""
    _check_pos(h, pos)
    neg = _as_k(neg, pos)
    mask = pos != 0
    pos_logits = (h * item_emb[pos]).sum(-1)
    neg_logits = (h[:, :, None, :] * item_emb[neg]).sum(-1)
    pos_term = F.binary_cross_entropy_with_logits(pos_logits, torch.ones_like(pos_logits), reduction="none")
    neg_term = F.binary_cross_entropy_with_logits(neg_logits, torch.zeros_like(neg_logits), reduction="none")
    return masked_mean(pos_term, mask) + masked_mean(neg_term.mean(-1), mask)


def full_ce_loss(h: torch.Tensor, item_emb: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Full softmax cross-entropy over the items 1..num_items (padding column excluded), tied embeddings."""
    _check_pos(h, pos)
    mask = pos != 0
    hs = h[mask]
    if hs.shape[0] == 0:
        return h.sum() * 0.0
    logits = hs @ item_emb[1:].transpose(0, 1)
    return F.cross_entropy(logits, pos[mask] - 1)


def sampled_ce_loss(h: torch.Tensor, item_emb: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """Sampled softmax cross-entropy over [positive, k negatives] per position (uniform negatives, so no
    log-Q correction is needed: it is the same constant for every candidate)."""
    _check_pos(h, pos)
    neg = _as_k(neg, pos)
    mask = pos != 0
    hs = h[mask]
    if hs.shape[0] == 0:
        return h.sum() * 0.0
    cand = torch.cat([pos[mask][:, None], neg[mask]], dim=1)  # (N, 1 + k)
    logits = (item_emb[cand] @ hs[:, :, None]).squeeze(-1)
    return F.cross_entropy(logits, torch.zeros(cand.shape[0], dtype=torch.long, device=cand.device))


def w2_pair_distance(mu1: torch.Tensor, sig1: torch.Tensor, mu2: torch.Tensor, sig2: torch.Tensor) -> torch.Tensor:
    """Squared 2-Wasserstein distance between diagonal Gaussians, elementwise over the leading dims
    (broadcasting), reduced over the last: |mu1 - mu2|^2 + |sqrt sig1 - sqrt sig2|^2 (STOSA's
    ``wasserstein_distance``, square roots of covariances clamped at 1e-24)."""
    mean = ((mu1 - mu2) ** 2).sum(-1)
    s1 = torch.sqrt(torch.clamp(sig1, min=W2_SQRT_CLAMP))
    s2 = torch.sqrt(torch.clamp(sig2, min=W2_SQRT_CLAMP))
    return mean + ((s1 - s2) ** 2).sum(-1)


def w2_bpr_loss(
    mu: torch.Tensor,
    sig: torch.Tensor,
    item_mu: torch.Tensor,
    item_sig: torch.Tensor,
    pos: torch.Tensor,
    neg: torch.Tensor,
    pvn: float = 0.005,
    *,
    return_terms: bool = False,
):
    """STOSA's loss (SPEC §4, ``bpr_optimization`` + pvn term of the released trainer).

    mu, sig (B, n, d): the sequence Gaussians; item_mu = E_mu (num_items + 1, d) and item_sig =
    ELU(E_sig) + 1 (the raw tables, not the encoder). With W(x, y) the squared W2 distance:
        L = mean_t[-log sigmoid(W(h_t, neg) - W(h_t, pos) + 1e-24)] + pvn * mean_t[max(0, W(h_t, pos) - W(pos, neg))]
    -log sigmoid is computed as -logsigmoid (the same function, without the overflow to inf that
    log(sigmoid(x)) has for x < -88 in float32). Returns the scalar L, or (L, bpr, pvn_term) with
    return_terms=True (pvn_term unweighted).
    """
    _check_pos(mu, pos)
    neg = _as_k(neg, pos)
    mask = pos != 0
    pos_mu, pos_sig = item_mu[pos], item_sig[pos]  # (B, n, d)
    neg_mu, neg_sig = item_mu[neg], item_sig[neg]  # (B, n, k, d)
    d_pos = w2_pair_distance(mu, sig, pos_mu, pos_sig)  # (B, n)
    d_neg = w2_pair_distance(mu[:, :, None], sig[:, :, None], neg_mu, neg_sig)  # (B, n, k)
    d_pos_neg = w2_pair_distance(pos_mu[:, :, None], pos_sig[:, :, None], neg_mu, neg_sig)  # (B, n, k)
    bpr = masked_mean((-F.logsigmoid(d_neg - d_pos[..., None] + BPR_EPS)).mean(-1), mask)
    pvn_term = masked_mean(torch.clamp(d_pos[..., None] - d_pos_neg, min=0.0).mean(-1), mask)
    total = bpr + pvn * pvn_term
    return (total, bpr, pvn_term) if return_terms else total
