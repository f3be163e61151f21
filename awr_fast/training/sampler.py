"""Training batches and the per-epoch seeds: batch order is a pure function of ``(seed, epoch)``.

:func:`epoch_seed` ``(seed, epoch)`` (``seed * 1000 + epoch``) seeds everything random in an
epoch, never state carried over from earlier epochs: :func:`epoch_generator` gives the stream-0
generator that orders and groups the batches here and the stream-1 seed from which
:func:`awr_fast.training.loop.train_epoch` reseeds the negative-sampling generator;
:func:`awr_fast.training.loop.seed_epoch` reseeds the global torch RNG (dropout). A run resumed
from the checkpoint of epoch ``e`` therefore replays epoch ``e + 1`` exactly, without replaying the
earlier epochs (see :mod:`awr_fast.training.checkpoint`).

**Length bucketing** (:class:`LengthBucketBatchSampler`, on by default): the epoch's random
permutation of the training rows is cut into pools of ``bucket_batches`` batches; inside a pool
the rows are ordered by sequence length, longest first (ties keep the random order), and cut into
batches; the batches of all pools are then shuffled. Compared with plain shuffled batches
(:class:`RandomBatchSampler`, ``--no-length-bucketing``):

* unchanged: the set of rows of an epoch (every row exactly once), each row's data (input,
  positives; negatives are drawn per batch from the same distribution), the batch size (only
  the last batch of a pool can be smaller), the number of batches (up to one extra per pool);
* changed: which rows share a batch and the order of the batches.

Rows are left-padded to ``max_len``. With ``trim_padding`` (the default) the trainer keeps only a
batch's last ``max(length)`` columns (:func:`awr_fast.training.loop.batch_width`; the models
compute the same function on the narrower batch), so the work of a batch follows its longest
sequence and grouping rows of similar length is what turns that into speed. Without it every
batch keeps all ``max_len`` columns.

Under data parallelism every rank builds the same global batches and takes its share with
:func:`shard_batch`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = [
    "LengthBucketBatchSampler",
    "RandomBatchSampler",
    "epoch_generator",
    "epoch_seed",
    "make_batch_sampler",
    "shard_batch",
]


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of everything random in epoch ``epoch`` (1-based) of a run seeded ``seed``."""
    return int(seed) * 1000 + int(epoch)


def epoch_generator(seed: int, epoch: int, stream: int = 0, device=None) -> torch.Generator:
    """A ``torch.Generator`` (CPU unless ``device``) for epoch ``epoch``; ``stream`` separates
    independent uses (0: shuffle and batching, 1: negative sampling)."""
    gen = torch.Generator(device=device) if device is not None else torch.Generator()
    return gen.manual_seed(epoch_seed(seed, epoch) + 7_919_000_003 * int(stream))


class RandomBatchSampler:
    """Shuffled batches of row indices (a new permutation per epoch, from ``(seed, epoch)``)."""

    def __init__(self, num_rows: int, batch_size: int, seed: int, *, drop_last: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size: expected an int >= 1, got {batch_size!r}")
        self.num_rows, self.batch_size, self.seed, self.drop_last = int(num_rows), int(batch_size), int(seed), drop_last

    def batches(self, epoch: int) -> list[np.ndarray]:
        perm = torch.randperm(self.num_rows, generator=epoch_generator(self.seed, epoch)).numpy()
        out = [perm[i : i + self.batch_size] for i in range(0, self.num_rows, self.batch_size)]
        if self.drop_last and out and len(out[-1]) < self.batch_size:
            out.pop()
        return out

    def __len__(self) -> int:
        full, rest = divmod(self.num_rows, self.batch_size)
        return full + (rest > 0 and not self.drop_last)


class LengthBucketBatchSampler:
    """Batches of rows of similar sequence length (see the module docstring).

    Args:
        lengths: ``(R,)`` number of non-padding items of each training row.
        batch_size: rows per batch.
        seed: run seed; ``batches(epoch)`` depends only on ``(seed, epoch)``.
        bucket_batches: pool size in batches; larger pools group lengths more tightly, smaller
            pools keep batches more random. ``bucket_batches >= R / batch_size`` sorts the whole
            epoch by length (ties in random order).
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, *, bucket_batches: int = 50):
        if batch_size < 1:
            raise ValueError(f"batch_size: expected an int >= 1, got {batch_size!r}")
        if bucket_batches < 1:
            raise ValueError(f"bucket_batches: expected an int >= 1, got {bucket_batches!r}")
        self.lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
        self.num_rows = int(self.lengths.shape[0])
        self.batch_size, self.seed, self.bucket_batches = int(batch_size), int(seed), int(bucket_batches)

    def batches(self, epoch: int) -> list[np.ndarray]:
        g = epoch_generator(self.seed, epoch)
        perm = torch.randperm(self.num_rows, generator=g).numpy()
        pool = self.batch_size * self.bucket_batches
        out: list[np.ndarray] = []
        for start in range(0, self.num_rows, pool):
            rows = perm[start : start + pool]
            # longest first inside a pool; a stable sort keeps the random order among equal lengths
            rows = rows[np.argsort(-self.lengths[rows], kind="stable")]
            out.extend(rows[i : i + self.batch_size] for i in range(0, len(rows), self.batch_size))
        order = torch.randperm(len(out), generator=g).numpy()
        return [out[i] for i in order]

    def __len__(self) -> int:
        pool = self.batch_size * self.bucket_batches
        full, rest = divmod(self.num_rows, pool)
        return full * self.bucket_batches + -(-rest // self.batch_size)


def make_batch_sampler(
    lengths: Sequence[int], batch_size: int, seed: int, *, length_bucketing: bool = True, bucket_batches: int = 50
):
    """The training batch sampler: length-bucketed (default) or plain shuffled."""
    if length_bucketing:
        return LengthBucketBatchSampler(lengths, batch_size, seed, bucket_batches=bucket_batches)
    return RandomBatchSampler(len(lengths), batch_size, seed)


def shard_batch(batch: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """This rank's share of a global batch (``batch[rank::world_size]``, DistributedSampler style).

    Every rank gets the same number of rows (so all ranks run the same number of steps and
    comparable work): a batch with fewer than ``world_size`` rows, or one that does not divide
    evenly, is padded by repeating its own rows cyclically, as DistributedSampler pads the epoch.
    """
    if world_size <= 1:
        return batch
    per_rank = -(-len(batch) // world_size)
    total = per_rank * world_size
    if total != len(batch):
        batch = np.resize(batch, total)  # cyclic repetition
    return batch[rank::world_size]
