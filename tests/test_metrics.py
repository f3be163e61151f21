"""Tests for awr_fast.metrics against hand-computed values and a brute-force reference."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from awr_fast.data import build_dataset, sequences_from_lists
from awr_fast.metrics import (
    DEFAULT_KS,
    MetricAccumulator,
    csr_exclusion_mask,
    exclusion_mask,
    metrics_from_ranks,
    popularity_scores,
    rank_of_target,
    sample_negatives,
    sampled_rank_of_target,
)

# column:              0(pad) 1    2    3    4    5
SCORES = torch.tensor([[100.0, 0.1, 0.5, 0.3, 0.5, 0.2]])


def test_rank_by_hand_and_padding_ignored():
    assert rank_of_target(SCORES, torch.tensor([3])).tolist() == [2]  # items 2 and 4 score higher
    assert rank_of_target(SCORES, torch.tensor([1])).tolist() == [4]
    # the padding column's score is irrelevant, whatever it is
    for pad in (-math.inf, 0.3, 1e9, math.inf):
        s = SCORES.clone()
        s[0, 0] = pad
        assert rank_of_target(s, [3]).tolist() == [2]
    with pytest.raises(ValueError, match=r"^targets: expected item ids in 1\.\.5 \(0 is padding\), got 0$"):
        rank_of_target(SCORES, torch.tensor([0]))
    with pytest.raises(ValueError, match=r"^targets: expected item ids in 1\.\.5 \(0 is padding\), got 6$"):
        rank_of_target(SCORES, torch.tensor([6]))


def test_tie_rule():
    # target 2 ties with item 4 (both 0.5): optimistic ignores the tie, pessimistic counts it
    assert rank_of_target(SCORES, [2]).tolist() == [0]
    assert rank_of_target(SCORES, [2], ties="pessimistic").tolist() == [1]
    assert rank_of_target(SCORES, [4], ties="pessimistic").tolist() == [1]
    const = torch.zeros(1, 6)  # a collapsed model: perfect under the optimistic rule, worst otherwise
    assert rank_of_target(const, [3]).tolist() == [0]
    assert rank_of_target(const, [3], ties="pessimistic").tolist() == [4]
    with pytest.raises(ValueError, match=r"^ties: expected one of \['optimistic', 'pessimistic'\], got 'average'$"):
        rank_of_target(SCORES, [2], ties="average")
    # NDCG with ties, by hand: ranks 0 (optimistic) vs 1 (pessimistic)
    opt = metrics_from_ranks(rank_of_target(SCORES, [2]))
    pes = metrics_from_ranks(rank_of_target(SCORES, [2], ties="pessimistic"))
    assert opt["ndcg@5"] == pytest.approx(1.0) and opt["recall@1"] == 1.0
    assert pes["ndcg@5"] == pytest.approx(1 / math.log2(3)) and pes["recall@1"] == 0.0


def test_nan_scores_are_rejected():
    s = SCORES.clone()
    s[0, 5] = float("nan")
    with pytest.raises(
        ValueError,
        match=r"^scores: expected no NaN outside the padding column 0, got 1 NaN "
        r"\(the first at row 0, column 5\)$",
    ):
        rank_of_target(s, [3])
    s = SCORES.clone()
    s[0, 0] = float("nan")  # padding column may hold anything
    assert rank_of_target(s, [3]).tolist() == [2]


def test_exclude_history_mask_and_index_forms():
    mask = torch.zeros(1, 6, dtype=torch.bool)
    mask[0, 2] = True
    assert rank_of_target(SCORES, [3], exclude=mask).tolist() == [1]
    assert rank_of_target(SCORES, [3], exclude=[[2]]).tolist() == [1]
    assert rank_of_target(SCORES, [3], exclude=[torch.tensor([2, 4])]).tolist() == [0]
    # the target is never excluded, listing it changes nothing
    assert rank_of_target(SCORES, [3], exclude=[[3]]).tolist() == [2]
    assert rank_of_target(SCORES, [3], exclude=[[0, 3, 1]]).tolist() == [2]
    with pytest.raises(
        ValueError,
        match=r"^exclude: expected a torch\.bool mask of shape \(1, 6\), "
        r"got torch\.bool \(1, 5\)$",
    ):
        rank_of_target(SCORES, [3], exclude=torch.zeros(1, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"^exclude: expected 1 rows \(one per score row\), got 2$"):
        rank_of_target(SCORES, [3], exclude=[[1], [2]])


def test_csr_mask_matches_index_mask_and_dataset_history():
    indptr = np.array([0, 2, 2, 5])
    indices = np.array([1, 3, 2, 2, 4])
    a = csr_exclusion_mask(indptr, indices, 6)
    b = exclusion_mask([[1, 3], [], [2, 2, 4]], 6)
    assert torch.equal(a, b)
    assert torch.equal(csr_exclusion_mask(indptr, indices, 6, rows=np.array([2, 0])), b[[2, 0]])
    ds = build_dataset(sequences_from_lists([[1, 2, 3, 4, 5], [3, 1, 3, 2]]), max_len=4)
    m = ds.history_mask("test")
    assert m.shape == (2, 6)
    assert m[0].nonzero().flatten().tolist() == [1, 2, 3, 4] and m[1].nonzero().flatten().tolist() == [1, 3]
    # repeat consumption: user 2's test target 2 ... valid target 3 is in the valid history too
    vm = ds.history_mask("valid")
    assert vm[1].nonzero().flatten().tolist() == [1, 3]


@given(st.lists(st.lists(st.integers(0, 4), min_size=7, max_size=7), min_size=1, max_size=6), st.data())
def test_rank_matches_brute_force(rows, data):
    scores = torch.tensor(rows, dtype=torch.float32)
    B, C = scores.shape
    targets = [data.draw(st.integers(1, C - 1)) for _ in range(B)]
    excl = [data.draw(st.lists(st.integers(0, C - 1), max_size=4)) for _ in range(B)]
    for ties in ("optimistic", "pessimistic"):
        got = rank_of_target(scores, torch.tensor(targets), exclude=excl, ties=ties).tolist()
        for r in range(B):
            t = targets[r]
            comp = [j for j in range(1, C) if j != t and j not in excl[r]]
            st_ = rows[r][t]
            want = sum(rows[r][j] > st_ or (ties == "pessimistic" and rows[r][j] == st_) for j in comp)
            assert got[r] == want


def test_accumulator_hand_values_and_batching():
    ranks = [0, 2, 9, 30]
    expected = {
        "recall@1": 0.25,
        "recall@5": 0.5,
        "recall@10": 0.75,
        "recall@20": 0.75,
        "ndcg@1": 0.25,
        "ndcg@5": (1 + 1 / math.log2(4)) / 4,
        "ndcg@10": (1 + 1 / math.log2(4) + 1 / math.log2(11)) / 4,
        "ndcg@20": (1 + 1 / math.log2(4) + 1 / math.log2(11)) / 4,
        "mrr": (1 + 1 / 3 + 1 / 10 + 1 / 31) / 4,
    }
    acc = MetricAccumulator()
    acc.update(torch.tensor(ranks[:1]))
    acc.update(np.array(ranks[1:3]))
    acc.update(ranks[3:])
    res = acc.result()
    assert set(res) == set(expected) and acc.count == 4
    for k, v in expected.items():
        assert res[k] == pytest.approx(v, abs=1e-12), k
    assert metrics_from_ranks(ranks) == pytest.approx(res)
    assert DEFAULT_KS == (1, 5, 10, 20)
    assert all(math.isnan(v) for v in MetricAccumulator().result().values())
    sampled = MetricAccumulator(ks=(10,), prefix="sampled_")
    sampled.update([0])
    assert sampled.result() == {"sampled_recall@10": 1.0, "sampled_ndcg@10": 1.0, "sampled_mrr": 1.0}
    with pytest.raises(ValueError, match=r"^ranks: expected finite values >= 0, got -1\.0$"):
        acc.update([-1])
    with pytest.raises(ValueError, match=r"^ranks: expected finite values >= 0, got nan$"):
        acc.update([0, float("nan")])


def test_sampled_protocol_is_deterministic_and_respects_history():
    n_items, B = 300, 8
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(B, n_items + 1, generator=g)
    targets = torch.randint(1, n_items + 1, (B,), generator=g)
    hist = [torch.randint(1, n_items + 1, (40,), generator=g) for _ in range(B)]
    n1 = sample_negatives(targets, n_items, hist, generator=torch.Generator().manual_seed(7))
    n2 = sample_negatives(targets, n_items, hist, generator=torch.Generator().manual_seed(7))
    n3 = sample_negatives(targets, n_items, hist, generator=torch.Generator().manual_seed(8))
    assert torch.equal(n1, n2) and not torch.equal(n1, n3)
    assert n1.shape == (B, 100) and n1.dtype == torch.int64
    for r in range(B):
        negs = set(n1[r].tolist())
        assert len(negs) == 100 and 0 not in negs and int(targets[r]) not in negs
        assert not negs & set(hist[r].tolist())
    r1 = sampled_rank_of_target(scores, targets, hist, generator=torch.Generator().manual_seed(7))
    r2 = sampled_rank_of_target(scores, targets, hist, generator=torch.Generator().manual_seed(7))
    assert torch.equal(r1, r2)
    want = (scores.gather(1, n1) > scores.gather(1, targets[:, None])).sum(1)
    assert torch.equal(r1, want)
    assert int(r1.min()) >= 0 and int(r1.max()) <= 100
    # a target with the best score is ranked first among its candidates
    best = scores.clone()
    best[torch.arange(B), targets] = 1e6
    assert sampled_rank_of_target(best, targets, hist).tolist() == [0] * B
    with pytest.raises(
        ValueError,
        match=r"^num_negatives: expected at most the number of eligible negative items "
        r"of every row \(49 in the poorest row\), got 100$",
    ):
        sample_negatives(torch.tensor([1]), 50, None, num_negatives=100)


def test_popularity_scores_break_ties_by_id():
    counts = np.array([0, 5, 9, 5, 0, 9])
    s = popularity_scores(counts)
    assert s.dtype == torch.float32 and s.shape == (6,) and s[0] == -math.inf
    order = torch.argsort(s[1:], descending=True) + 1
    assert order.tolist() == [2, 5, 1, 3, 4]
    full = s.expand(3, -1)
    assert rank_of_target(full, [2, 5, 4]).tolist() == [0, 1, 4]
    assert rank_of_target(full, [2, 5, 4], ties="pessimistic").tolist() == [0, 1, 4]


@pytest.mark.parametrize(
    "call,match",
    [
        (
            lambda: rank_of_target(SCORES[0], [3]),
            r"^scores: expected shape \(B, num_items \+ 1\) with num_items >= 1, "
            r"got \(6,\)$",
        ),
        (lambda: rank_of_target(SCORES, [3, 4]), r"^targets: expected 1 item ids \(one per score row\), got 2$"),
        (lambda: rank_of_target(SCORES, [3], exclude=[[7]]), r"^exclude: expected item ids in 0\.\.5, got 7$"),
        (lambda: exclusion_mask([[1], [-1]], 6), r"^items_per_row: expected item ids in 0\.\.5, got -1$"),
        (
            lambda: csr_exclusion_mask(np.array([0, 2]), np.array([1, 9]), 6),
            r"^indices: expected item ids in 0\.\.5, got 9$",
        ),
        (
            lambda: MetricAccumulator(ks=(5, 0)),
            r"^ks: expected a non-empty sequence of positive integers, got \(5, 0\)$",
        ),
        (
            lambda: popularity_scores([3]),
            r"^train_counts: expected num_items \+ 1 >= 2 entries \(entry 0 = padding\), "
            r"got 1$",
        ),
    ],
)
def test_bad_inputs_name_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()
