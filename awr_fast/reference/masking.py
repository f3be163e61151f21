"""Masks and the padding-safe softmax shared by every reference op (SPEC §1).

Visible(i, j) = (j <= i) and key j is not padding and query i is not padding. A query row that is
padding, or that sees no key at all, gets an all-zero probability row (never NaN), forward and
backward, in every dtype.
"""

from __future__ import annotations

import torch


def visible_mask(n: int, key_padding_mask: torch.Tensor | None, device) -> torch.Tensor:
    """Bool mask broadcastable to (B, H, n, n): True where query i may attend to key j."""
    causal = torch.ones(n, n, dtype=torch.bool, device=device).tril_()
    if key_padding_mask is None:
        return causal[None, None]
    keep = ~key_padding_mask  # (B, n) True = real item
    return causal[None, None] & keep[:, None, :, None] & keep[:, None, None, :]


def masked_softmax(scores: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """softmax over the last dim restricted to `visible`; rows without a visible entry are zeros.

    torch's fused softmax on the -inf-filled logits; an empty row is given finite logits before the
    softmax and zeroed after it, so neither the forward nor the backward pass can produce NaN.
    """
    empty = ~visible.any(dim=-1, keepdim=True)
    filled = scores.masked_fill(~visible, float("-inf")).masked_fill(empty, 0.0)
    return torch.softmax(filled, dim=-1).masked_fill(empty, 0.0)


def zero_padded_queries(x: torch.Tensor, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
    """Zero rows of a (B, H, n, ...) tensor whose query position is padding."""
    if key_padding_mask is None:
        return x
    return x.masked_fill(key_padding_mask[:, None, :, None], 0.0)
