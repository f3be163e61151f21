"""Uniform negative sampling for training (one or k negatives per position), vectorised on the device.

Training negatives follow SASRec and STOSA: uniform over the items 1..num_items, excluding the items the
user is known to have (the input row ``seq`` and its targets ``pos``). Evaluation negatives (the sampled
protocol, drawn without replacement) live in ``awr_fast.metrics.sample_negatives``; this sampler is for
the loss and draws with replacement.
"""

from __future__ import annotations

import torch

MAX_ROUNDS = 20  # rejection rounds; a draw collides with probability |row| / num_items per round


def _draw(size, num_items: int, generator: torch.Generator | None, device) -> torch.Tensor:
    gen_device = generator.device if generator is not None else device
    draw = torch.randint(1, num_items + 1, size, generator=generator, device=gen_device)
    return draw.to(device)


def _in_sorted_rows(sorted_rows: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """bool (B, m): values[b, j] occurs in sorted_rows[b] (each row sorted ascending)."""
    idx = torch.searchsorted(sorted_rows, values).clamp_(max=sorted_rows.shape[1] - 1)
    return sorted_rows.gather(1, idx) == values


def sample_negatives(
    seq: torch.Tensor,
    pos: torch.Tensor | None,
    num_items: int,
    k: int = 1,
    generator: torch.Generator | None = None,
    exclude_seq: bool = True,
    *,
    max_rounds: int = MAX_ROUNDS,
) -> torch.Tensor:
    """Uniform negatives in 1..num_items for every position of a left-padded batch.

    seq (B, n) is the input row, pos (B, n) its next-item targets (0 = padding position) or None.
    With exclude_seq=True a negative is never an item of the user's row (any id in seq or pos): the
    whole (B, n * k) draw is checked at once against each row's sorted items (searchsorted), and the
    colliding entries are redrawn, for at most ``max_rounds`` rounds. Collisions left after the last
    round are accepted as they are: that only happens when a row holds (nearly) every item, where no
    valid negative may exist at all. exclude_seq=False draws plainly uniform items.

    Positions whose target is padding (pos == 0) get negative 0, as in SASRec's data layout, so the
    result is safe to embed and is ignored by every loss.

    generator: a torch.Generator (on any device: the draw happens there and is moved to seq's device)
    makes the result reproducible; None uses the global RNG of seq's device.
    Returns int64 (B, n) for k == 1 and (B, n, k) for k > 1, on seq's device.
    """
    if not isinstance(seq, torch.Tensor) or seq.dim() != 2 or seq.dtype.is_floating_point:
        raise ValueError(f"seq: expected an integer tensor (B, n), got {getattr(seq, 'shape', type(seq))}")
    if pos is not None and (not isinstance(pos, torch.Tensor) or pos.shape != seq.shape):
        raise ValueError(
            f"pos: expected a tensor of shape {tuple(seq.shape)} (that of seq) or None, "
            f"got {getattr(pos, 'shape', type(pos))}"
        )
    if not isinstance(num_items, int) or num_items < 1:
        raise ValueError(f"num_items: expected an int >= 1, got {num_items!r}")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k: expected an int >= 1, got {k!r}")
    if not isinstance(max_rounds, int) or max_rounds < 0:
        raise ValueError(f"max_rounds: expected an int >= 0, got {max_rounds!r}")
    batch, n = seq.shape
    size = (batch, n * k)
    neg = _draw(size, num_items, generator, seq.device)
    if exclude_seq and batch and n:
        row = seq.long() if pos is None else torch.cat([seq.long(), pos.to(seq.device).long()], dim=1)
        row = row.sort(dim=1).values
        for _ in range(max_rounds):
            hit = _in_sorted_rows(row, neg)
            if not bool(hit.any()):
                break
            neg = torch.where(hit, _draw(size, num_items, generator, seq.device), neg)
    neg = neg.view(batch, n, k)
    if pos is not None:
        neg = neg.masked_fill((pos.to(seq.device) == 0)[..., None], 0)
    return neg[..., 0] if k == 1 else neg
