"""Embedded synthetic sequential-recommendation data (no files, seeded numpy).

The generator produces sequences with structure a sequential model can learn quickly and a
popularity model cannot. Items are split at random into groups of about ``group_size`` items
("genres"); transitions act on groups, which keeps them sparse but low-rank, as in real data
(similar items have similar successors), so a small SASRec picks them up in a few epochs:

* **first order**: every group has ``branching`` successor groups (a sparse random transition
  graph with fixed decreasing weights); the next item's group follows the *previous* item's group;
* **second order**: a second sparse table maps the group of the item *two steps back* to its own
  successor groups, so part of the next-item mass depends on ``s[t-2]`` and not on ``s[t-1]``;
* **user clusters**: each user belongs to one of ``num_clusters`` latent clusters with its own
  preferred groups (a long-range, per-user signal);
* **popularity skew**: within a group the item is drawn by a global Zipf law (random item
  permutation), the remaining mass follows that law directly, and successor groups are drawn
  with a bias towards popular groups (``successor_skew``).

At each step the next item comes from the first-order table with probability ``p_first``, the
second-order table with ``p_second``, the user's cluster with ``p_cluster`` and global popularity
otherwise. The result is an :data:`~awr_fast.data.readers.Interactions` mapping (raw user ids
``1..num_users``, raw item ids ``1..num_items``, increasing integer timestamps), which
:func:`awr_fast.data.dataset.load_dataset` sends through the same preprocessing and split as
files. The default size (2000 users, 500 items, lengths 10..60, ~70k interactions) makes an
epoch of a d=64, n=50 SASRec take seconds on two CPU cores.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Dict

import numpy as np

from .readers import Interactions

__all__ = ["SYNTHETIC_VERSION", "make_synthetic", "synthetic_config", "synthetic_hash"]

#: Bump when the generator changes in a way that alters its output for the same arguments.
SYNTHETIC_VERSION = 2


def synthetic_config(
    num_users: int = 2000,
    num_items: int = 500,
    seed: int = 0,
    *,
    min_len: int = 10,
    max_len: int = 60,
    group_size: int = 8,
    branching: int = 2,
    num_clusters: int = 8,
    p_first: float = 0.6,
    p_second: float = 0.25,
    p_cluster: float = 0.1,
    zipf_a: float = 0.8,
    successor_skew: float = 0.5,
) -> Dict[str, Any]:
    """Validated, complete argument dict for :func:`make_synthetic` (also what gets hashed)."""
    cfg = dict(
        num_users=int(num_users),
        num_items=int(num_items),
        seed=int(seed),
        min_len=int(min_len),
        max_len=int(max_len),
        group_size=int(group_size),
        branching=int(branching),
        num_clusters=int(num_clusters),
        p_first=float(p_first),
        p_second=float(p_second),
        p_cluster=float(p_cluster),
        zipf_a=float(zipf_a),
        successor_skew=float(successor_skew),
    )
    for name in ("num_users", "group_size", "branching"):
        if cfg[name] < 1:
            raise ValueError(f"{name}: expected an int >= 1, got {cfg[name]}")
    groups = cfg["num_items"] // cfg["group_size"]
    if groups < cfg["branching"] + 1:
        raise ValueError(
            f"num_items: expected num_items // group_size >= branching + 1 = {cfg['branching'] + 1} "
            f"groups, got {cfg['num_items']} // {cfg['group_size']} = {groups}"
        )
    if not 1 <= cfg["min_len"] <= cfg["max_len"]:
        raise ValueError(f"min_len: expected 1 <= min_len <= max_len = {cfg['max_len']}, got {cfg['min_len']}")
    if not 1 <= cfg["num_clusters"] <= groups:
        raise ValueError(
            f"num_clusters: expected 1..{groups} (the number of groups, num_items // group_size), "
            f"got {cfg['num_clusters']}"
        )
    probs = {name: cfg[name] for name in ("p_first", "p_second", "p_cluster")}
    for name, p in probs.items():
        if p < 0:
            raise ValueError(f"{name}: expected a probability >= 0, got {p}")
    if sum(probs.values()) > 1 + 1e-12:
        raise ValueError(
            f"p_first + p_second + p_cluster: expected at most 1, got {sum(probs.values()):.6g} "
            f"({' + '.join(str(p) for p in probs.values())})"
        )
    for name in ("zipf_a", "successor_skew"):
        if cfg[name] < 0:
            raise ValueError(f"{name}: expected a float >= 0, got {cfg[name]}")
    return cfg


def synthetic_hash(**kwargs) -> str:
    """sha256 identifying the synthetic data set for these arguments (and generator version)."""
    cfg = synthetic_config(**kwargs)
    blob = json.dumps({"generator": "awr_fast.synthetic", "version": SYNTHETIC_VERSION, **cfg}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _successor_table(rng: np.random.Generator, weights: np.ndarray, branching: int) -> np.ndarray:
    """(G, branching) distinct successor groups per group, drawn without replacement ∝ weights,
    never the group itself."""
    n = weights.shape[0]
    table = np.empty((n, branching), dtype=np.int64)
    for g in range(n):
        w = weights.copy()
        w[g] = 0.0
        table[g] = rng.choice(n, size=branching, replace=False, p=w / w.sum())
    return table


def _row_sampler(rows: np.ndarray, weights: np.ndarray):
    """Sampler over ragged rows: ``rows`` (R, K) item ids padded with -1, ``weights`` (R, K)."""
    w = np.where(rows >= 0, weights, 0.0)
    cdf = np.cumsum(w / w.sum(axis=1, keepdims=True), axis=1)
    last = (rows >= 0).sum(axis=1) - 1

    def sample(row_idx: np.ndarray, u: np.ndarray) -> np.ndarray:
        col = np.minimum((u[:, None] > cdf[row_idx]).sum(axis=1), last[row_idx])
        return rows[row_idx, col]

    return sample


def make_synthetic(num_users: int = 2000, num_items: int = 500, seed: int = 0, **kwargs) -> Interactions:
    """Generate the synthetic interactions (see the module docstring for the model).

    Args:
        num_users, num_items: size (raw ids ``1..num_users`` / ``1..num_items``; items that end up
            unused or below the k-core threshold disappear in preprocessing).
        seed: numpy ``default_rng`` seed; the output is a pure function of the arguments.
        **kwargs: ``min_len``, ``max_len`` (sequence length range, uniform), ``group_size``,
            ``branching``, ``num_clusters``, ``p_first``, ``p_second``, ``p_cluster``, ``zipf_a``,
            ``successor_skew``; see :func:`synthetic_config` for defaults.

    Returns:
        ``user -> [(item, timestamp), ...]`` in chronological order.
    """
    cfg = synthetic_config(num_users, num_items, seed, **kwargs)
    rng = np.random.default_rng(cfg["seed"])
    U, n_items, b = cfg["num_users"], cfg["num_items"], cfg["branching"]

    # Popularity: Zipf over a random permutation of the items.
    pop = 1.0 / np.power(rng.permutation(n_items) + 1.0, cfg["zipf_a"])
    pop /= pop.sum()
    pop_cdf = np.cumsum(pop)

    # Groups: a random partition into G groups whose sizes differ by at most one.
    G = n_items // cfg["group_size"]
    group_of = np.empty(n_items, dtype=np.int64)
    group_of[rng.permutation(n_items)] = np.arange(n_items) % G
    K = int(np.bincount(group_of, minlength=G).max())
    members = np.full((G, K), -1, dtype=np.int64)
    for g in range(G):
        idx = np.nonzero(group_of == g)[0]
        members[g, : idx.size] = idx
    in_group = _row_sampler(members, np.where(members >= 0, pop[np.maximum(members, 0)], 0.0))
    group_pop = np.bincount(group_of, weights=pop, minlength=G)

    succ_w = np.power(group_pop, cfg["successor_skew"])
    first = _successor_table(rng, succ_w, b)
    second = _successor_table(rng, succ_w, b)
    branch_w = np.arange(b, 0, -1, dtype=np.float64)
    branch_cdf = np.cumsum(branch_w / branch_w.sum())

    # Clusters: each prefers about 2*G/C groups, uniformly.
    C = cfg["num_clusters"]
    n_pref = max(1, min(G, (2 * G) // C))
    cluster_groups = np.stack([rng.choice(G, size=n_pref, replace=False) for _ in range(C)])
    user_cluster = rng.integers(0, C, size=U)

    lengths = rng.integers(cfg["min_len"], cfg["max_len"] + 1, size=U)
    T = int(lengths.max())
    seq = np.zeros((U, T), dtype=np.int64)

    def from_cluster() -> np.ndarray:
        g = cluster_groups[user_cluster, rng.integers(0, n_pref, size=U)]
        return in_group(g, rng.random(U))

    def from_pop() -> np.ndarray:
        return np.minimum(np.searchsorted(pop_cdf, rng.random(U), side="right"), n_items - 1)

    seq[:, 0] = np.where(rng.random(U) < 0.5, from_cluster(), from_pop())
    p1 = cfg["p_first"]
    p2 = p1 + cfg["p_second"]
    p3 = p2 + cfg["p_cluster"]
    for t in range(1, T):
        mode = rng.random(U)
        branch = np.minimum(np.searchsorted(branch_cdf, rng.random(U), side="right"), b - 1)
        prev = seq[:, t - 1]
        prev2 = seq[:, t - 2] if t >= 2 else prev
        nxt_first = in_group(first[group_of[prev], branch], rng.random(U))
        nxt_second = in_group(second[group_of[prev2], branch], rng.random(U))
        nxt_cluster = from_cluster()
        nxt_pop = from_pop()
        seq[:, t] = np.where(
            mode < p1, nxt_first, np.where(mode < p2, nxt_second, np.where(mode < p3, nxt_cluster, nxt_pop))
        )

    gaps = rng.integers(1, 3600, size=(U, T))
    times = 1_000_000_000 + np.cumsum(gaps, axis=1)
    out: Interactions = {}
    for u in range(U):
        L = int(lengths[u])
        out[u + 1] = list(zip((seq[u, :L] + 1).tolist(), times[u, :L].tolist()))
    return out
