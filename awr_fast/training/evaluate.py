"""Batched leave-one-out evaluation (SPEC §6): full ranking by default, sampled-100 as an option.

Users are scored in chunks of ``batch_size`` rows (``model.score_all``: one ``(B, num_items + 1)``
matrix per chunk) and the target's rank is computed for the whole chunk at once
(:func:`awr_fast.metrics.rank_of_target`); there is no per-user Python loop. Metric keys are
``recall@k``, ``ndcg@k`` (k in 1, 5, 10, 20) and ``mrr``; the sampled protocol (target + 100
uniform negatives outside the user's history) adds the same keys prefixed ``sampled_`` so the two
scales never mix. ``exclude_history=True`` drops the items the user saw before the target from
the ranking (both protocols); the choice is recorded next to the metrics by the caller.

Scores are computed in float32 (no autocast): ties are then rare and the optimistic tie rule of
:mod:`awr_fast.metrics` is safe. Under data parallelism each rank scores the chunks
``rank, rank + world, ...`` and the ranks are gathered, so every rank gets the same metrics; the
sampled negatives of a chunk come from a generator seeded by ``(sampled_seed, chunk)``, so the
results do not depend on the number of processes.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ..metrics import DEFAULT_KS, metrics_from_ranks, popularity_scores, rank_of_target, sampled_rank_of_target
from .distributed import DistInfo, all_gather_objects
from .loop import trailing_widths

__all__ = [
    "HEADLINE_METRICS",
    "PROTOCOLS",
    "evaluate",
    "evaluate_popularity",
    "evaluate_scores",
    "headline_keys",
    "metric_prefix",
    "selection_key",
    "SELECT_METRICS",
]

PROTOCOLS = ("full", "sampled100")
#: The valid metrics that may select the best epoch (TrainConfig.select_metric), without the protocol prefix.
SELECT_METRICS = (*(f"ndcg@{k}" for k in DEFAULT_KS), *(f"recall@{k}" for k in DEFAULT_KS), "mrr")
SAMPLED_NEGATIVES = 100

ScoreFn = Callable[[torch.Tensor], torch.Tensor]


def metric_prefix(protocol: str) -> str:
    """The prefix of the metric keys a protocol is judged by: ``""`` (full) or ``"sampled_"`` (sampled100)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol: expected one of {list(PROTOCOLS)}, got {protocol!r}")
    return "" if protocol == "full" else "sampled_"


def selection_key(protocol: str, metric: str = "ndcg@5") -> str:
    """The metric early stopping watches: ``metric`` (one of SELECT_METRICS; full) or ``sampled_<metric>``
    (sampled100)."""
    if metric not in SELECT_METRICS:
        raise ValueError(f"select_metric: expected one of {list(SELECT_METRICS)}, got {metric!r}")
    return f"{metric_prefix(protocol)}{metric}"


#: The metrics of the per-epoch progress lines (the first one is the selection metric).
HEADLINE_METRICS = ("ndcg@5", "ndcg@10", "recall@10")


def headline_keys(protocol: str) -> tuple[str, ...]:
    """:data:`HEADLINE_METRICS` under ``protocol``'s keys (``sampled_ndcg@5``, ... for sampled100): the
    metrics that select the best epoch, and so the ones the progress lines show."""
    return tuple(metric_prefix(protocol) + k for k in HEADLINE_METRICS)


def _split_arrays(dataset, split: str) -> tuple[np.ndarray, np.ndarray]:
    if split not in ("valid", "test"):
        raise ValueError(f"split: expected 'valid' or 'test', got {split!r}")
    return getattr(dataset, f"{split}_input"), getattr(dataset, f"{split}_target")


@torch.no_grad()
def evaluate_scores(
    score_fn: ScoreFn,
    dataset,
    split: str,
    *,
    batch_size: int = 256,
    exclude_history: bool = False,
    protocol: str = "full",
    device=None,
    sampled_seed: int = 0,
    dist: DistInfo | None = None,
    ks=DEFAULT_KS,
    trim_padding: bool = True,
) -> dict[str, float]:
    """Metrics of ``score_fn`` (``(B, n) LongTensor -> (B, num_items + 1)`` scores) on ``split``.

    trim_padding: hand each chunk to ``score_fn`` without its all-padding columns (the last
    ``max(length)`` positions; the models take such batches and compute the same function).

    Returns:
        ``{"recall@k", "ndcg@k", "mrr"}`` (full ranking), plus ``"sampled_"``-prefixed keys when
        ``protocol == "sampled100"``; floats, means over the split's users.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol: expected one of {list(PROTOCOLS)}, got {protocol!r}")
    dist = dist or DistInfo()
    device = torch.device(device) if device is not None else torch.device("cpu")
    inputs, targets = _split_arrays(dataset, split)
    num_rows = int(inputs.shape[0])
    num_chunks = -(-num_rows // batch_size)
    mine: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}
    for chunk in range(dist.rank, num_chunks, dist.world_size):
        lo, hi = chunk * batch_size, min(num_rows, (chunk + 1) * batch_size)
        chunk_inputs = inputs[lo:hi]
        if trim_padding:
            chunk_inputs = chunk_inputs[:, -max(int(trailing_widths(chunk_inputs).max(initial=0)), 1) :]
        seq = torch.from_numpy(np.ascontiguousarray(chunk_inputs)).to(device)
        tgt = torch.from_numpy(np.ascontiguousarray(targets[lo:hi])).to(device)
        scores = score_fn(seq).float()
        exclude = dataset.history_mask(split, np.arange(lo, hi), device=device) if exclude_history else None
        full = rank_of_target(scores, tgt, exclude).cpu().numpy()
        sampled = None
        if protocol == "sampled100":
            g = torch.Generator().manual_seed(int(sampled_seed) * 1_000_003 + chunk)
            sampled = (
                sampled_rank_of_target(scores, tgt, exclude, num_negatives=SAMPLED_NEGATIVES, generator=g).cpu().numpy()
            )
        mine[chunk] = (full, sampled)
    merged: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}
    for part in all_gather_objects(mine, dist):
        merged.update(part)
    order = sorted(merged)
    empty = np.zeros(0, dtype=np.int64)
    full = np.concatenate([merged[c][0] for c in order]) if order else empty
    out = metrics_from_ranks(full, ks)
    if protocol == "sampled100":
        sampled = np.concatenate([merged[c][1] for c in order]) if order else empty
        out.update(metrics_from_ranks(sampled, ks, prefix="sampled_"))
    return out


def evaluate(model, dataset, split: str, **kwargs) -> dict[str, float]:
    """:func:`evaluate_scores` of ``model.score_all`` (model put in eval mode, then restored).

    Keyword arguments are those of :func:`evaluate_scores` (``batch_size``, ``exclude_history``,
    ``protocol``, ``device``, ``sampled_seed``, ``dist``).
    """
    was_training = model.training
    model.eval()
    try:
        return evaluate_scores(model.score_all, dataset, split, **kwargs)
    finally:
        model.train(was_training)


def evaluate_popularity(dataset, split: str, **kwargs) -> dict[str, float]:
    """Metrics of the popularity baseline (training counts, see
    :func:`awr_fast.metrics.popularity_scores`) under the same protocol."""
    device = kwargs.get("device")
    pop = popularity_scores(dataset.item_counts, device=device)
    return evaluate_scores(lambda seq: pop.expand(seq.shape[0], -1), dataset, split, **kwargs)
