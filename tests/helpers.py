"""Shared test helpers."""

import torch


def left_padding_mask(lengths, n, device="cpu"):
    """bool (B, n), True = padding, for left-padded sequences of the given lengths."""
    lengths = torch.as_tensor(lengths, device=device)
    return torch.arange(n, device=device)[None, :] < (n - lengths)[:, None]


def random_lengths(batch, n, generator=None):
    """Random lengths in [0, n] with the edge cases placed first: n (full), 0 (fully padded), then
    random ones, and 1 last when batch >= 4."""
    lengths = torch.randint(0, n + 1, (batch,), generator=generator)
    lengths[0] = n
    if batch > 1:
        lengths[1] = 0
    if batch > 3:
        lengths[-1] = 1
    return lengths
