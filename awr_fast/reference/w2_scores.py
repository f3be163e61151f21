"""Readable PyTorch reference: W2 scoring of query Gaussians against every item (SPEC §4, eval and loss)."""

from __future__ import annotations

import torch

from .w2_refined import w2_distance


def w2_scores(mu: torch.Tensor, sig: torch.Tensor, item_mu: torch.Tensor, item_sig: torch.Tensor) -> torch.Tensor:
    """Squared W2 between B query Gaussians (mu, sig: (B, d)) and |V| items (item_mu, item_sig: (|V|, d)).

    Returns (B, |V|), a distance: rank items by ascending value. Inputs are assumed validated.
    """
    return w2_distance(mu, sig, item_mu, item_sig)
