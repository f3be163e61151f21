"""Ranking metrics for leave-one-out sequential recommendation (SPEC §6).

Scores are a float tensor ``(B, num_items + 1)``, higher is better; column 0 is the padding item
and is never ranked (its score is ignored), so a model may leave any value there.

**Rank and ties.** The rank of the target is 0-based: the number of *competing* items (columns
``1..num_items`` other than the target and not excluded) whose score is **strictly greater** than
the target's score. Items tied with the target therefore do not push it down (optimistic tie
rule). With float32 scores from a trained model exact ties are rare, but a degenerate model
(constant scores, e.g. after a collapse) would look perfect under this rule, and low-precision
(bf16/fp16) scores tie often: compute evaluation scores in float32, and use ``ties="pessimistic"``
(every tied item counts as ranked above the target) as a sanity check when in doubt.
NaN scores raise ValueError rather than silently producing ranks.

**Metrics** from a 0-based rank ``r`` (one relevant item per user):
``recall@k = 1[r < k]`` (equal to HR@k), ``ndcg@k = 1[r < k] / log2(r + 2)``, ``mrr = 1 / (r + 1)``
(untruncated). Means are taken over users.

**Protocols.** Full ranking over all items is the default. ``exclude`` (``exclude_history=True``,
STOSA) drops the items the user saw before the target; the target itself is never dropped. The
sampled protocol (target + 100 uniform negatives, drawn without replacement from items outside
the exclusion set) is always reported under ``sampled_``-prefixed keys so the two scales are
never mixed.
"""

from __future__ import annotations

import math
from typing import Dict, Iterable, Optional, Sequence, Union

import numpy as np
import torch

__all__ = [
    "DEFAULT_KS",
    "MetricAccumulator",
    "exclusion_mask",
    "csr_exclusion_mask",
    "metrics_from_ranks",
    "popularity_scores",
    "rank_of_target",
    "sample_negatives",
    "sampled_rank_of_target",
]

DEFAULT_KS = (1, 5, 10, 20)
TIE_RULES = ("optimistic", "pessimistic")

Exclude = Union[None, torch.Tensor, Sequence[Iterable[int]]]


def exclusion_mask(
    items_per_row: Sequence[Iterable[int]], num_columns: int, device: Union[str, torch.device, None] = None
) -> torch.Tensor:
    """bool ``(len(items_per_row), num_columns)`` with True at each listed item id."""
    return _exclusion_mask(items_per_row, num_columns, device, "items_per_row")


def _out_of_range(ids, lo: int, hi: int) -> int:
    """The first id outside ``lo..hi`` (there is one)."""
    ids = torch.as_tensor(ids).reshape(-1)
    return int(ids[(ids < lo) | (ids > hi)][0])


def _exclusion_mask(items_per_row, num_columns: int, device, name: str) -> torch.Tensor:
    rows, cols = [], []
    for r, items in enumerate(items_per_row):
        items = [int(i) for i in (items.tolist() if hasattr(items, "tolist") else items)]
        rows.extend([r] * len(items))
        cols.extend(items)
    mask = torch.zeros((len(items_per_row), num_columns), dtype=torch.bool, device=device)
    if cols:
        c = torch.tensor(cols, dtype=torch.long, device=device)
        if int(c.min()) < 0 or int(c.max()) >= num_columns:
            raise ValueError(
                f"{name}: expected item ids in 0..{num_columns - 1}, got {_out_of_range(c, 0, num_columns - 1)}"
            )
        mask[torch.tensor(rows, dtype=torch.long, device=device), c] = True
    return mask


def csr_exclusion_mask(
    indptr: np.ndarray,
    indices: np.ndarray,
    num_columns: int,
    rows: Optional[np.ndarray] = None,
    device: Union[str, torch.device, None] = None,
) -> torch.Tensor:
    """bool mask ``(R, num_columns)`` from a CSR history (e.g. ``SeqDataset.history_csr``).

    Args:
        indptr, indices: CSR arrays; row ``i`` holds ``indices[indptr[i]:indptr[i+1]]``.
        rows: optional subset (positions into the CSR rows) in the output order; default all.
    """
    indptr = np.asarray(indptr, dtype=np.int64)
    indices = np.asarray(indices, dtype=np.int64)
    rows = np.arange(indptr.shape[0] - 1) if rows is None else np.asarray(rows, dtype=np.int64)
    lens = indptr[rows + 1] - indptr[rows]
    total = int(lens.sum())
    starts = np.repeat(indptr[rows], lens)
    offsets = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(lens) - lens, lens)
    cols = indices[starts + offsets]
    r = np.repeat(np.arange(rows.shape[0], dtype=np.int64), lens)
    mask = torch.zeros((rows.shape[0], num_columns), dtype=torch.bool, device=device)
    if total:
        if cols.min() < 0 or cols.max() >= num_columns:
            raise ValueError(
                f"indices: expected item ids in 0..{num_columns - 1}, "
                f"got {_out_of_range(torch.from_numpy(cols), 0, num_columns - 1)}"
            )
        mask[torch.from_numpy(r).to(device), torch.from_numpy(cols).to(device)] = True
    return mask


def _as_mask(exclude: Exclude, shape, device) -> Optional[torch.Tensor]:
    if exclude is None:
        return None
    if isinstance(exclude, torch.Tensor):
        if exclude.dtype != torch.bool or tuple(exclude.shape) != tuple(shape):
            raise ValueError(
                f"exclude: expected a torch.bool mask of shape {tuple(shape)}, got "
                f"{exclude.dtype} {tuple(exclude.shape)}"
            )
        return exclude.to(device)
    if len(exclude) != shape[0]:
        raise ValueError(f"exclude: expected {shape[0]} rows (one per score row), got {len(exclude)}")
    return _exclusion_mask(exclude, shape[1], device, "exclude")


def _check_inputs(scores: torch.Tensor, targets: torch.Tensor, ties: str) -> torch.Tensor:
    if ties not in TIE_RULES:
        raise ValueError(f"ties: expected one of {list(TIE_RULES)}, got {ties!r}")
    if scores.ndim != 2 or scores.shape[1] < 2:
        raise ValueError(f"scores: expected shape (B, num_items + 1) with num_items >= 1, got {tuple(scores.shape)}")
    targets = torch.as_tensor(targets, device=scores.device).long().reshape(-1)
    if targets.shape[0] != scores.shape[0]:
        raise ValueError(f"targets: expected {scores.shape[0]} item ids (one per score row), got {targets.shape[0]}")
    if targets.numel() and (int(targets.min()) < 1 or int(targets.max()) >= scores.shape[1]):
        raise ValueError(
            f"targets: expected item ids in 1..{scores.shape[1] - 1} (0 is padding), "
            f"got {_out_of_range(targets, 1, scores.shape[1] - 1)}"
        )
    nan = torch.isnan(scores[:, 1:])
    if nan.any():
        row, col = (int(i) for i in nan.nonzero()[0])
        raise ValueError(
            f"scores: expected no NaN outside the padding column 0, got {int(nan.sum())} NaN "
            f"(the first at row {row}, column {col + 1})"
        )
    return targets


@torch.no_grad()
def rank_of_target(scores: torch.Tensor, targets, exclude: Exclude = None, *, ties: str = "optimistic") -> torch.Tensor:
    """0-based full-ranking rank of each target.

    Args:
        scores: float ``(B, num_items + 1)``; column 0 (padding) is ignored.
        targets: int ``(B,)`` item ids in ``1..num_items``.
        exclude: items to drop from the ranking per row: a bool ``(B, num_items + 1)`` mask
            (True = drop) or a length-B sequence of item-id collections. The target is never
            dropped, even if listed.
        ties: ``"optimistic"`` (default): count only strictly greater scores;
            ``"pessimistic"``: also count competitors whose score equals the target's.

    Returns:
        int64 ``(B,)`` ranks on ``scores.device``: 0 means the target is ranked first.
    """
    targets = _check_inputs(scores, targets, ties)
    t = scores.gather(1, targets[:, None])
    above = scores >= t if ties == "pessimistic" else scores > t
    above[:, 0] = False
    above.scatter_(1, targets[:, None], False)
    mask = _as_mask(exclude, scores.shape, scores.device)
    if mask is not None:
        above &= ~mask
    return above.sum(dim=1)


def sample_negatives(
    targets,
    num_items: int,
    exclude: Exclude = None,
    *,
    num_negatives: int = 100,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Draw ``num_negatives`` distinct uniform negatives per row from ``1..num_items`` minus the
    target and the excluded items (the user's history).

    Sampling is without replacement (uniform random keys, smallest kept), deterministic for a
    given generator state. Pass one ``torch.Generator`` across all batches of an evaluation; with
    ``generator=None`` a fresh generator seeded with 0 is used (same draws on every call).

    Returns:
        int64 ``(B, num_negatives)`` item ids on the generator's device.

    Raises:
        ValueError: a row has fewer than ``num_negatives`` eligible items.
    """
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    device = generator.device
    targets = torch.as_tensor(targets).long().reshape(-1).to(device)
    B = targets.shape[0]
    keys = torch.rand((B, num_items + 1), generator=generator, device=device)
    forbidden = torch.zeros((B, num_items + 1), dtype=torch.bool, device=device)
    forbidden[:, 0] = True
    forbidden.scatter_(1, targets[:, None], True)
    mask = _as_mask(exclude, (B, num_items + 1), device)
    if mask is not None:
        forbidden |= mask
    eligible = int((~forbidden).sum(dim=1).min()) if B else num_negatives
    if eligible < num_negatives:
        raise ValueError(
            f"num_negatives: expected at most the number of eligible negative items of every row "
            f"({eligible} in the poorest row), got {num_negatives}"
        )
    keys.masked_fill_(forbidden, 2.0)
    return keys.topk(num_negatives, dim=1, largest=False).indices


@torch.no_grad()
def sampled_rank_of_target(
    scores: torch.Tensor,
    targets,
    exclude: Exclude = None,
    *,
    num_negatives: int = 100,
    generator: Optional[torch.Generator] = None,
    ties: str = "optimistic",
) -> torch.Tensor:
    """0-based rank of each target among itself and ``num_negatives`` sampled negatives
    (SASRec's protocol, uniform, without replacement, never from the exclusion set).

    ``scores`` is the full ``(B, num_items + 1)`` score matrix; see :func:`sample_negatives` for
    the generator and :func:`rank_of_target` for the tie rule. Report the results with
    ``MetricAccumulator(prefix="sampled_")``.
    """
    targets = _check_inputs(scores, targets, ties)
    neg = sample_negatives(targets, scores.shape[1] - 1, exclude, num_negatives=num_negatives, generator=generator).to(
        scores.device
    )
    t = scores.gather(1, targets[:, None])
    s = scores.gather(1, neg)
    above = s >= t if ties == "pessimistic" else s > t
    return above.sum(dim=1)


def metrics_from_ranks(ranks, ks: Sequence[int] = DEFAULT_KS, prefix: str = "") -> Dict[str, float]:
    """Mean Recall@k, NDCG@k and MRR of 0-based ranks (see :class:`MetricAccumulator`)."""
    acc = MetricAccumulator(ks, prefix=prefix)
    acc.update(ranks)
    return acc.result()


class MetricAccumulator:
    """Accumulates Recall@k, NDCG@k and MRR over batches of 0-based ranks.

    ``result()`` returns ``{f"{prefix}recall@{k}", f"{prefix}ndcg@{k}" for k in ks} | {f"{prefix}mrr"}``
    as Python floats (means over all ranks seen; NaN when nothing was seen). Use
    ``prefix="sampled_"`` for the sampled protocol. ``count`` is the number of ranks seen.
    """

    def __init__(self, ks: Sequence[int] = DEFAULT_KS, prefix: str = ""):
        ks = tuple(int(k) for k in ks)
        if not ks or min(ks) < 1:
            raise ValueError(f"ks: expected a non-empty sequence of positive integers, got {ks}")
        self.ks = ks
        self.prefix = prefix
        self.reset()

    def reset(self) -> None:
        self.count = 0
        self._recall = {k: 0.0 for k in self.ks}
        self._ndcg = {k: 0.0 for k in self.ks}
        self._rr = 0.0

    def update(self, ranks) -> None:
        """Add a batch of 0-based ranks (tensor on any device, numpy array or sequence)."""
        if isinstance(ranks, torch.Tensor):
            r = ranks.detach().to("cpu", torch.float64).numpy().reshape(-1)
        else:
            r = np.asarray(ranks, dtype=np.float64).reshape(-1)
        if r.size and (r.min() < 0 or not np.all(np.isfinite(r))):
            raise ValueError(f"ranks: expected finite values >= 0, got {r[~(np.isfinite(r) & (r >= 0))][0]}")
        gain = 1.0 / np.log2(r + 2.0)
        for k in self.ks:
            hit = r < k
            self._recall[k] += float(hit.sum())
            self._ndcg[k] += float(gain[hit].sum())
        self._rr += float((1.0 / (r + 1.0)).sum())
        self.count += int(r.size)

    def result(self) -> Dict[str, float]:
        n = self.count
        out: Dict[str, float] = {}
        for k in self.ks:
            out[f"{self.prefix}recall@{k}"] = self._recall[k] / n if n else math.nan
        for k in self.ks:
            out[f"{self.prefix}ndcg@{k}"] = self._ndcg[k] / n if n else math.nan
        out[f"{self.prefix}mrr"] = self._rr / n if n else math.nan
        return out


def popularity_scores(train_counts, device: Union[str, torch.device, None] = None) -> torch.Tensor:
    """Scores ``(num_items + 1,)`` float32 for the popularity baseline.

    Items are ordered by training count (descending), ties broken by smaller item id, and scored
    by that order so that no two items tie (the baseline is then well defined under either tie
    rule). Column 0 (padding) is ``-inf``. Use ``popularity_scores(c).expand(B, -1)`` as a
    score matrix.
    """
    counts = np.asarray(train_counts, dtype=np.int64).reshape(-1)
    if counts.shape[0] < 2:
        raise ValueError(
            f"train_counts: expected num_items + 1 >= 2 entries (entry 0 = padding), got {counts.shape[0]}"
        )
    n_items = counts.shape[0] - 1
    ids = np.arange(1, n_items + 1)
    order = np.lexsort((ids, -counts[1:]))  # most popular first, then smaller id
    scores = np.empty(n_items + 1, dtype=np.float32)
    scores[0] = -np.inf
    scores[1 + order] = np.arange(n_items, 0, -1, dtype=np.float32)
    return torch.from_numpy(scores).to(device)
