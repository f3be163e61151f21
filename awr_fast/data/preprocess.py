"""Preprocessing: time ordering, k-core filtering, id remapping, leave-one-out split, padding.

Pipeline (SPEC §6)::

    interactions (reader output)
      -> preprocess(): stable sort by timestamp per user, k-core filter, remap ids to 1..N
      -> Sequences   : chronological per-user item sequences in CSR form
      -> train_arrays() / eval_arrays() / history_csr() / train_item_counts()

Conventions (all arrays are numpy ``int64``):

* Item ids are ``1..num_items`` and user ids ``1..num_users``; **0 is padding** for both.
  Raw ids are mapped in sorted order (numerically when every raw id is an ``int``, else as
  strings), so a file that already uses ``1..N`` keeps its ids.
* CSR rows are indexed by ``user_id - 1``: user ``u``'s chronological sequence is
  ``items[indptr[u - 1]:indptr[u]]``.
* Leave-one-out: for a sequence ``s`` of length ``L >= 3``, train = ``s[:-2]``, valid target =
  ``s[-2]``, test target = ``s[-1]``. Users with ``L < 3`` are train only (train = ``s``) and are not
  evaluated.
* Padded arrays are **left padded** with 0 and truncated on the left to ``max_len``, so column
  ``max_len - 1`` always holds the most recent item.
"""

from __future__ import annotations

from dataclasses import dataclass
from operator import itemgetter
from typing import Hashable, Iterable, List, Optional, Tuple

import numpy as np

from .readers import Interactions

__all__ = [
    "KCORE_MODES",
    "SPLITS",
    "Sequences",
    "eval_arrays",
    "history_csr",
    "kcore_mask",
    "left_pad",
    "preprocess",
    "sequences_from_lists",
    "sort_by_time",
    "train_arrays",
    "train_item_counts",
    "train_lengths",
]

KCORE_MODES = ("iterative", "single", "none")
SPLITS = ("train", "valid", "test")


@dataclass(frozen=True, eq=False)
class Sequences:
    """Per-user chronological item sequences after filtering and remapping (CSR layout).

    Attributes:
        indptr: int64 ``(num_users + 1,)``; user ``u`` owns ``items[indptr[u-1]:indptr[u]]``.
        items: int64 ``(num_interactions,)``; item ids in ``1..num_items``, oldest first per user.
        user_ids: raw id of each new user id, ``(num_users + 1,)``; entry 0 is a placeholder
            (-1 or ""), entry ``u`` is the raw id of user ``u``. int64 or unicode.
        item_ids: raw id of each new item id, ``(num_items + 1,)``, same convention.
    """

    indptr: np.ndarray
    items: np.ndarray
    user_ids: np.ndarray
    item_ids: np.ndarray

    @property
    def num_users(self) -> int:
        return int(self.indptr.shape[0] - 1)

    @property
    def num_items(self) -> int:
        return int(self.item_ids.shape[0] - 1)

    @property
    def num_interactions(self) -> int:
        return int(self.items.shape[0])

    @property
    def lengths(self) -> np.ndarray:
        """int64 ``(num_users,)`` sequence length per user (row ``u - 1``)."""
        return np.diff(self.indptr)

    def sequence(self, user: int) -> np.ndarray:
        """The chronological item sequence of ``user`` (1-based id)."""
        if not 1 <= user <= self.num_users:
            raise IndexError(f"user: expected a user id in 1..{self.num_users}, got {user}")
        return self.items[self.indptr[user - 1] : self.indptr[user]]

    def validate(self) -> None:
        """Check the structural invariants; raise ValueError if one fails."""
        ip, it = self.indptr, self.items
        if ip.dtype != np.int64 or it.dtype != np.int64:
            raise ValueError(f"indptr, items: expected int64 arrays, got {ip.dtype} and {it.dtype}")
        if ip.ndim != 1 or ip.shape[0] < 1 or ip[0] != 0 or ip[-1] != it.shape[0] or np.any(np.diff(ip) < 1):
            got = (
                f"shape {ip.shape}"
                if ip.ndim != 1 or ip.shape[0] < 1
                else f"{ip[0]}..{ip[-1]}" + (f", smallest step {int(np.diff(ip).min())}" if ip.shape[0] > 1 else "")
            )
            raise ValueError(
                f"indptr: expected a 1-d array from 0 to len(items)={it.shape[0]} that gives every "
                f"user >= 1 item, got {got}"
            )
        if it.size and (it.min() < 1 or it.max() > self.num_items):
            raise ValueError(f"items: expected item ids in 1..{self.num_items}, got min {it.min()}, max {it.max()}")
        if self.user_ids.shape[0] != self.num_users + 1:
            raise ValueError(
                f"user_ids: expected num_users + 1 = {self.num_users + 1} entries, got {self.user_ids.shape[0]}"
            )


# ----------------------------------------------------------------------------------------------
# ordering, filtering, remapping


def sort_by_time(interactions: Interactions) -> Interactions:
    """Return a copy with each user's interactions stably sorted by timestamp.

    A user whose interactions all carry timestamps is sorted (equal timestamps keep file order);
    a user whose interactions have no timestamps at all keeps file order. Mixing ``None`` and
    timestamps within one user raises ValueError.
    """
    out: Interactions = {}
    key = itemgetter(1)
    for user, lst in interactions.items():
        n_none = sum(1 for _, t in lst if t is None)
        if n_none == 0:
            out[user] = sorted(lst, key=key)  # sorted() is stable
        elif n_none == len(lst):
            out[user] = list(lst)
        else:
            raise ValueError(
                f"interactions: expected timestamps on all or none of a user's interactions, "
                f"got user {user!r} with {n_none} of {len(lst)} without one"
            )
    return out


def kcore_mask(
    user_idx: np.ndarray, item_idx: np.ndarray, *, user_min: int = 5, item_min: int = 5, mode: str = "iterative"
) -> np.ndarray:
    """Boolean keep-mask over interactions for k-core filtering.

    Counts are numbers of interactions (a repeated user-item pair counts each time).

    Args:
        user_idx, item_idx: int arrays ``(nnz,)`` of dense codes (any non-negative integers).
        user_min, item_min: minimum interactions per user / per item.
        mode: ``"iterative"`` drops users and items below the thresholds and repeats until every
            remaining user and item meets them (a true k-core); ``"single"`` does one pass on the
            original counts, keeping an interaction iff its user and its item both met the
            thresholds before filtering (SASRec's ``DataProcessing.py``; survivors may fall below
            the thresholds); ``"none"`` keeps everything.
    """
    if mode not in KCORE_MODES:
        raise ValueError(f"mode: expected one of {list(KCORE_MODES)}, got {mode!r}")
    for name, value in (("user_min", user_min), ("item_min", item_min)):
        if value < 0:
            raise ValueError(f"{name}: expected an int >= 0, got {value!r}")
    user_idx = np.asarray(user_idx, dtype=np.int64)
    item_idx = np.asarray(item_idx, dtype=np.int64)
    keep = np.ones(user_idx.shape[0], dtype=bool)
    if mode == "none" or user_idx.size == 0:
        return keep
    nu = int(user_idx.max()) + 1
    ni = int(item_idx.max()) + 1
    while True:
        uc = np.bincount(user_idx[keep], minlength=nu)
        ic = np.bincount(item_idx[keep], minlength=ni)
        ok = (uc[user_idx] >= user_min) & (ic[item_idx] >= item_min)
        new_keep = keep & ok
        if mode == "single" or new_keep.sum() == keep.sum():
            return new_keep
        keep = new_keep


def _raw_id_array(values: List[Hashable]) -> np.ndarray:
    """Raw ids as int64 when they are all python ints that fit, else as unicode strings."""
    if all(type(v) is int for v in values):  # noqa: E721 (bool must not count as int)
        try:
            return np.array(values, dtype=np.int64)
        except OverflowError:
            pass
    return np.array([str(v) for v in values], dtype=str)


def _placeholder(arr: np.ndarray) -> np.ndarray:
    pad = np.array([-1], dtype=np.int64) if arr.dtype == np.int64 else np.array([""], dtype=arr.dtype)
    return np.concatenate([pad, arr])


def preprocess(
    interactions: Interactions, *, kcore: str = "iterative", user_min: int = 5, item_min: int = 5, sort: bool = True
) -> Sequences:
    """Turn reader output into remapped chronological :class:`Sequences`.

    Steps: (1) stable sort by timestamp per user (``sort=True`` and timestamps present);
    (2) k-core filtering (:func:`kcore_mask`); (3) remap users and items to ``1..N`` in sorted
    raw-id order; users left without interactions disappear.

    Raises:
        ValueError: nothing survives the filter, or an invalid option.
    """
    if kcore not in KCORE_MODES:
        raise ValueError(f"kcore: expected one of {list(KCORE_MODES)}, got {kcore!r}")
    if sort:
        interactions = sort_by_time(interactions)
    users = list(interactions.keys())
    lengths = np.fromiter((len(interactions[u]) for u in users), dtype=np.int64, count=len(users))
    raw_items = [it for u in users for it, _ in interactions[u]]
    if not raw_items:
        raise ValueError(f"interactions: expected at least one interaction, got none ({len(users)} users)")
    user_code = np.repeat(np.arange(len(users), dtype=np.int64), lengths)
    item_raw = _raw_id_array(raw_items)
    item_uniq, item_code = np.unique(item_raw, return_inverse=True)
    item_code = item_code.reshape(-1).astype(np.int64)

    keep = kcore_mask(user_code, item_code, user_min=user_min, item_min=item_min, mode=kcore)
    if not keep.any():
        raise ValueError(
            f"user_min/item_min: expected thresholds that leave some interactions after {kcore} "
            f"k-core filtering, got none left with user_min={user_min}, item_min={item_min}"
        )
    user_code, item_code = user_code[keep], item_code[keep]

    # Items: np.unique already sorted the raw ids; keep the surviving ones in that order.
    kept_items = np.unique(item_code)
    item_new = np.zeros(item_uniq.shape[0], dtype=np.int64)
    item_new[kept_items] = np.arange(1, kept_items.shape[0] + 1)
    # Users: sort the surviving users by raw id.
    user_raw = _raw_id_array(users)
    kept_users = np.unique(user_code)
    order = kept_users[np.argsort(user_raw[kept_users], kind="stable")]
    user_new = np.zeros(len(users), dtype=np.int64)
    user_new[order] = np.arange(1, order.shape[0] + 1)

    new_u = user_new[user_code]
    perm = np.argsort(new_u, kind="stable")  # groups by new user id, keeps time order within
    items = item_new[item_code][perm]
    counts = np.bincount(new_u, minlength=order.shape[0] + 1)[1:]
    indptr = np.zeros(order.shape[0] + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    seqs = Sequences(
        indptr=indptr,
        items=items.astype(np.int64, copy=False),
        user_ids=_placeholder(user_raw[order]),
        item_ids=_placeholder(item_uniq[kept_items]),
    )
    seqs.validate()
    return seqs


def sequences_from_lists(seqs: Iterable[Iterable[int]], num_items: Optional[int] = None) -> Sequences:
    """Build :class:`Sequences` directly from already-remapped item lists (user ``k+1`` = list k).

    Item ids must be in ``1..num_items`` (``num_items`` defaults to the largest id). Useful for
    tests and for data that is already preprocessed; no sorting, filtering or remapping happens.
    """
    lists = [np.asarray(list(s), dtype=np.int64) for s in seqs]
    lens = np.array([len(s) for s in lists], dtype=np.int64)
    indptr = np.zeros(len(lists) + 1, dtype=np.int64)
    np.cumsum(lens, out=indptr[1:])
    items = np.concatenate(lists) if lists else np.zeros(0, dtype=np.int64)
    n_items = int(num_items) if num_items is not None else (int(items.max()) if items.size else 0)
    user_ids = np.arange(len(lists) + 1, dtype=np.int64)
    item_ids = np.arange(n_items + 1, dtype=np.int64)
    user_ids[0] = item_ids[0] = -1
    out = Sequences(indptr=indptr, items=items, user_ids=user_ids, item_ids=item_ids)
    out.validate()
    return out


# ----------------------------------------------------------------------------------------------
# split and padding


def left_pad(values: np.ndarray, starts: np.ndarray, ends: np.ndarray, max_len: int) -> np.ndarray:
    """Gather ``values[starts[r]:ends[r]]`` for every row r, keep the last ``max_len`` entries and
    right-align them in an int64 ``(R, max_len)`` array whose remaining (left) cells are 0."""
    if max_len < 1:
        raise ValueError(f"max_len: expected an int >= 1, got {max_len}")
    starts = np.asarray(starts, dtype=np.int64)
    ends = np.asarray(ends, dtype=np.int64)
    rows = starts.shape[0]
    if rows == 0 or values.size == 0:
        return np.zeros((rows, max_len), dtype=np.int64)
    idx = ends[:, None] - max_len + np.arange(max_len, dtype=np.int64)[None, :]
    valid = idx >= starts[:, None]
    out = values[np.clip(idx, 0, values.size - 1)].astype(np.int64, copy=False)
    return np.where(valid, out, 0)


def train_lengths(seqs: Sequences) -> np.ndarray:
    """Length of each user's training sequence: ``L - 2`` if ``L >= 3`` else ``L`` (``(U,)``)."""
    lens = seqs.lengths
    return np.where(lens >= 3, lens - 2, lens)


def train_arrays(seqs: Sequences, max_len: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """SASRec-style training arrays.

    For each user whose training sequence ``t`` has at least 2 items: input = ``t[:-1]``,
    positives = ``t[1:]`` (the next item at every position), both left padded / truncated to
    ``max_len`` so they stay aligned (``pos[r, j]`` is the item that follows ``input[r, j]``;
    both are 0 at the same padded positions).

    Returns:
        users int64 ``(R,)`` (1-based ids), input int64 ``(R, max_len)``, pos int64 ``(R, max_len)``.
    """
    tl = train_lengths(seqs)
    rows = np.nonzero(tl >= 2)[0]
    starts = seqs.indptr[rows]
    ends = starts + tl[rows]
    inp = left_pad(seqs.items, starts, ends - 1, max_len)
    pos = left_pad(seqs.items, starts + 1, ends, max_len)
    return rows + 1, inp, pos


def prefix_arrays(seqs: Sequences, max_len: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every prefix of every training sequence as its own sample (RecBole's augmentation, used by AC-TSR).

    For each user with training sequence ``t`` (>= 2 items) and each k in 1 .. len(t) - 1: input =
    ``t[:k]`` (its last ``max_len`` items, left padded), target ``t[k]``, stored as a ``pos`` row that is
    0 everywhere but the last column. A loss over the non-zero entries of ``pos`` is then the loss at the
    last position of each prefix. Rows are ordered by user, then prefix length.

    Returns:
        users int64 ``(R,)``, input int64 ``(R, max_len)``, pos int64 ``(R, max_len)``.
    """
    tl = train_lengths(seqs)
    users = np.nonzero(tl >= 2)[0]
    per_user = tl[users] - 1  # prefixes of each user
    starts = np.repeat(seqs.indptr[users], per_user)
    first = np.cumsum(per_user) - per_user  # each user's first row
    k = np.arange(int(per_user.sum()), dtype=np.int64) - np.repeat(first, per_user) + 1
    inp = left_pad(seqs.items, starts, starts + k, max_len)
    pos = np.zeros_like(inp)
    if inp.shape[0]:
        pos[:, -1] = seqs.items[starts + k]
    return np.repeat(users + 1, per_user), inp, pos


def eval_arrays(seqs: Sequences, split: str, max_len: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Leave-one-out evaluation arrays for ``split`` in ``("valid", "test")``.

    Only users with at least 3 items are evaluated. Valid: input = train sequence ``s[:-2]``,
    target = ``s[-2]``. Test: input = ``s[:-1]`` (train + valid item), target = ``s[-1]``.

    Returns:
        users int64 ``(R,)``, input int64 ``(R, max_len)`` (left padded), target int64 ``(R,)``.
    """
    if split not in ("valid", "test"):
        raise ValueError(f"split: expected one of ['valid', 'test'], got {split!r}")
    lens = seqs.lengths
    rows = np.nonzero(lens >= 3)[0]
    starts = seqs.indptr[rows]
    ends = seqs.indptr[rows + 1] - (2 if split == "valid" else 1)  # exclusive end of the input
    inp = left_pad(seqs.items, starts, ends, max_len)
    target = seqs.items[ends] if rows.size else np.zeros(0, dtype=np.int64)
    return rows + 1, inp, target.astype(np.int64, copy=False)


def history_csr(seqs: Sequences, split: str, users: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Items each user saw before ``split``'s target, in CSR form (rows follow ``users``).

    ``"train"``: the training sequence (for negative sampling); ``"valid"``: ``s[:-2]``;
    ``"test"``: ``s[:-1]``. This is exactly what ``exclude_history`` must drop (STOSA's
    convention) without leaking later items. Repeated items are kept (harmless for masks).

    Args:
        users: 1-based user ids; default: the users :func:`eval_arrays` returns for ``split``
            (all users with a non-empty training sequence for ``"train"``).

    Returns:
        indptr int64 ``(len(users) + 1,)``, indices int64 (item ids).
    """
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {list(SPLITS)}, got {split!r}")
    lens = seqs.lengths
    if users is None:
        rows = np.nonzero(lens >= (1 if split == "train" else 3))[0]
    else:
        rows = np.asarray(users, dtype=np.int64) - 1
        if rows.size and (rows.min() < 0 or rows.max() >= seqs.num_users):
            bad = rows[(rows < 0) | (rows >= seqs.num_users)][0] + 1
            raise IndexError(f"users: expected user ids in 1..{seqs.num_users}, got {bad}")
    if split == "train":
        hl = train_lengths(seqs)[rows]
    else:
        if rows.size and lens[rows].min() < 3:
            short = rows[lens[rows] < 3][0]
            raise ValueError(
                f"users: expected users with >= 3 items for the {split} history, got user {short + 1} "
                f"with {lens[short]} (fewer than 3: a train-only user)"
            )
        hl = lens[rows] - (2 if split == "valid" else 1)
    indptr = np.zeros(rows.shape[0] + 1, dtype=np.int64)
    np.cumsum(hl, out=indptr[1:])
    total = int(indptr[-1])
    offsets = np.arange(total, dtype=np.int64) - np.repeat(indptr[:-1], hl)
    indices = seqs.items[np.repeat(seqs.indptr[rows], hl) + offsets]
    return indptr, indices.astype(np.int64, copy=False)


def train_item_counts(seqs: Sequences) -> np.ndarray:
    """Interaction count of every item in the training sequences, int64 ``(num_items + 1,)``;
    entry 0 (padding) is 0. This is the popularity used by the popularity baseline."""
    indptr, indices = history_csr(seqs, "train", users=np.arange(1, seqs.num_users + 1))
    counts = np.bincount(indices, minlength=seqs.num_items + 1).astype(np.int64)
    counts[0] = 0
    return counts
