"""The fused top-k of W2 item scoring, `w2_topk` of the Triton backend (kernels/w2_scores.py) and of the
CUDA backend (awr_fast/cuda/w2_scores.py, csrc/w2_scores/w2_topk_kernels.cu), against torch.topk of the
float64 reference scores: with and without exclusions (ids, int32 ids, a bool mask, the padding item),
k from 1 to 128 and k = |V|, rows left with fewer than k items, ties across chunks and splits, half
precision, input errors; and the two backends against each other.

Triton runs everywhere (under TRITON_INTERPRET=1 on CPU, tests/conftest.py). The CUDA op runs wherever
the extension is built: on a GPU its kernel, on CPU tensors the kernel's host emulation
(AWR_FAST_CUDA_EMULATE=1: the same keys, candidates and insertion rule and the same C++ host code, i.e. the
exclusion bits, the merge of the item splits and the decoding; not the warp intrinsics).
"""

import pytest
import torch

from awr_fast._ext import load_cuda_extension
from awr_fast.reference.w2_scores import w2_scores as reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ("triton", "cuda")


def _backend_topk(backend: str):
    if backend == "triton":
        pytest.importorskip("triton")
        from awr_fast.kernels.w2_scores import w2_topk
    else:
        if load_cuda_extension()[0] is None:
            pytest.skip(f"CUDA extension not built: {load_cuda_extension()[1]}")
        from awr_fast.cuda.w2_scores import w2_topk
    return w2_topk


@pytest.fixture(params=BACKENDS)
def topk(request, monkeypatch):
    """Each backend's w2_topk (the CUDA one emulated on the host without a GPU)."""
    if request.param == "cuda" and DEVICE == "cpu":
        monkeypatch.setenv("AWR_FAST_CUDA_EMULATE", "1")
    return _backend_topk(request.param)


def _tensors(batch, items, d, seed):
    """mu, sig (B, d), item_mu, item_sig (|V|, d): nothing zero, covariances in [0.5, 1.5)."""
    g = torch.Generator().manual_seed(seed)
    mu, item_mu = torch.randn(batch, d, generator=g), torch.randn(items, d, generator=g)
    sig, item_sig = torch.rand(batch, d, generator=g) + 0.5, torch.rand(items, d, generator=g) + 0.5
    return {"mu": mu, "sig": sig, "item_mu": item_mu, "item_sig": item_sig}


def _reference_scores(tensors):
    return reference(*(t.double() for t in tensors.values())).to(DEVICE)


def _topk_inputs(batch, items, d, seed):
    tensors = _tensors(batch, items, d, seed)
    return {name: t.to(DEVICE) for name, t in tensors.items()}


@pytest.mark.parametrize(
    "batch,items,d,k",
    [(5, 130, 17, 10), (33, 257, 3, 1), (1, 7, 64, 7), (5, 1, 3, 1), (3, 100, 100, 100), (4, 257, 8, 128)],
)
def test_topk_matches_torch_topk_of_the_reference(topk, batch, items, d, k):
    tensors = _topk_inputs(batch, items, d, seed=items + k)
    values, indices = topk(*tensors.values(), k)
    truth = _reference_scores(tensors).topk(k, dim=1, largest=False)
    assert values.dtype == torch.float32 and indices.dtype == torch.int64 and values.shape == (batch, k)
    assert torch.equal(indices, truth.indices)
    scale = truth.values.abs().max().item()
    torch.testing.assert_close(values.double(), truth.values, rtol=0, atol=2e-5 * max(1.0, scale))


def _history(batch, items, length, seed):
    """(B, L) int64 ids padded with -1 (some duplicated), and the same exclusions as a bool mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, items, (batch, length), generator=g)
    ids[:, 1] = ids[:, 0]  # a duplicate in every row
    ids[torch.rand(batch, length, generator=g) < 0.3] = -1
    ids[0] = -1  # a row that excludes nothing
    mask = torch.zeros(batch, items, dtype=torch.bool)
    rows, cols = (ids >= 0).nonzero(as_tuple=True)
    mask[rows, ids[rows, cols]] = True
    return ids.to(DEVICE), mask.to(DEVICE)


@pytest.mark.parametrize("exclude_padding", [False, True])
def test_topk_with_exclusions_by_ids_and_by_mask(topk, exclude_padding):
    batch, items, k = 6, 130, 12
    tensors = _topk_inputs(batch, items, 9, seed=5)
    ids, mask = _history(batch, items, 40, seed=6)
    skipped = mask.clone()
    skipped[:, 0] |= exclude_padding
    truth = _reference_scores(tensors).masked_fill(skipped, float("inf")).topk(k, dim=1, largest=False)
    for exclude in (ids, mask, ids.to(torch.int32)):
        values, indices = topk(*tensors.values(), k, exclude, exclude_padding=exclude_padding)
        assert torch.equal(indices, truth.indices)
        torch.testing.assert_close(values.double(), truth.values, rtol=0, atol=1e-4)
    assert not skipped.gather(1, indices).any()
    plain = topk(*tensors.values(), k)[1]
    assert not torch.equal(plain, indices)  # the exclusions did change the answer


def test_topk_rows_with_fewer_items_than_k_end_with_inf_and_minus_one(topk):
    tensors = _topk_inputs(2, 7, 4, seed=8)
    ids = torch.tensor([[2, 5, -1], [-1, -1, -1]], device=DEVICE)
    values, indices = topk(*tensors.values(), 7, ids, exclude_padding=True)
    scores = _reference_scores(tensors)
    left = [i for i in range(1, 7) if i not in (2, 5)]
    order = sorted(left, key=lambda i: scores[0, i].item())
    assert indices[0].tolist() == order + [-1, -1, -1]
    assert torch.isinf(values[0, 4:]).all() and torch.isfinite(values[0, :4]).all()
    assert indices[1, -1].item() == -1 and sorted(indices[1, :6].tolist()) == list(range(1, 7))


@pytest.mark.parametrize("k", [1, 5, 64])
def test_topk_ties_rank_the_lower_index_first(topk, k):
    """Integer means and covariances 1 or 4 make every distance an exact integer in fp32 (also in TF32):
    many ties, across chunks and across the programs the scan is split over; the order must be a stable
    sort's."""
    g = torch.Generator().manual_seed(k)
    batch, items, d = 5, 300, 3
    mu = torch.randint(-1, 2, (batch, d), generator=g).float()
    item_mu = torch.randint(-1, 2, (items, d), generator=g).float()
    sig = torch.randint(0, 2, (batch, d), generator=g).float() * 3 + 1
    item_sig = torch.randint(0, 2, (items, d), generator=g).float() * 3 + 1
    tensors = {n: t.to(DEVICE) for n, t in zip(("mu", "sig", "item_mu", "item_sig"), (mu, sig, item_mu, item_sig))}
    scores = _reference_scores(tensors)
    assert scores.unique().numel() < items // 10  # ties indeed
    stable = torch.sort(scores, dim=1, stable=True)
    values, indices = topk(*tensors.values(), k)
    assert torch.equal(indices, stable.indices[:, :k])
    assert torch.equal(values.double(), stable.values[:, :k])


def test_topk_half_precision_values(topk):
    tensors = _topk_inputs(5, 130, 17, seed=9)
    truth = _reference_scores(tensors).topk(8, dim=1, largest=False)
    for dtype in (torch.bfloat16, torch.float16):
        half = {n: t.to(dtype) for n, t in tensors.items()}
        values, indices = topk(*half.values(), 8)
        exact = _reference_scores(half)  # the half inputs' own distances, in float64
        torch.testing.assert_close(values.double(), exact.gather(1, indices), rtol=0, atol=0.05)
        assert (values.double() - truth.values).abs().max().item() < 0.5


def test_topk_rejects_bad_k_and_bad_exclude(topk):
    tensors = _topk_inputs(3, 7, 4, seed=1)
    args = list(tensors.values())
    for k in (0, 8, -1):
        with pytest.raises(ValueError, match=r"^k: expected 1 <= k <= \|V\| = 7"):
            topk(*args, k)
    for k in (2.0, True, None):
        with pytest.raises(TypeError, match="^k: expected an int"):
            topk(*args, k)
    big = _topk_inputs(2, 200, 4, seed=1)
    with pytest.raises(ValueError, match="k: expected 1 <= k <= 128"):
        topk(*big.values(), 129)
    bad = {
        "wrong rows": torch.zeros(2, 3, dtype=torch.int64),
        "float ids": torch.zeros(3, 3),
        "1-d": torch.zeros(3, dtype=torch.int64),
        "id too large": torch.tensor([[7], [0], [1]]),
        "id below -1": torch.tensor([[-2], [0], [1]]),
        "mask shape": torch.zeros(3, 6, dtype=torch.bool),
    }
    for what, exclude in bad.items():
        with pytest.raises(ValueError, match="^exclude: expected"):
            topk(*args, 2, exclude.to(DEVICE))
            pytest.fail(what)
    with pytest.raises(TypeError, match="^exclude: expected a torch.Tensor"):
        topk(*args, 2, [[1, 2]] * 3)
    with pytest.raises(TypeError, match="item_sig: expected dtype"):
        topk(*args[:3], args[3].double(), 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA kernel needs a GPU")
@pytest.mark.parametrize("k", [10, 100])
def test_cuda_and_triton_agree_at_an_evaluation_size(k):
    """Both backends on one GPU at a shape with many item splits and row blocks, the history excluded: each
    returns k distinct, not excluded items whose float64 distances are the k smallest (to within both
    kernels' rounding, so near-ties may swap), and the two agree on most rows exactly."""
    cuda_topk = _backend_topk("cuda")
    triton_topk = _backend_topk("triton")
    tensors = _topk_inputs(300, 20_000, 64, seed=k)
    ids, mask = _history(300, 20_000, 50, seed=k + 1)
    scores = _reference_scores(tensors).masked_fill(mask, float("inf"))
    truth = scores.topk(k, dim=1, largest=False)
    found = []
    for fn in (cuda_topk, triton_topk):
        values, indices = fn(*tensors.values(), k, ids)
        assert (indices >= 0).all() and not mask.gather(1, indices).any()
        assert (indices.sort(dim=1).values.diff(dim=1) > 0).all()  # distinct
        torch.testing.assert_close(scores.gather(1, indices), truth.values, rtol=0, atol=1e-3)
        torch.testing.assert_close(values.double(), truth.values, rtol=0, atol=1e-3)
        found.append(indices)
    assert (found[0] == found[1]).all(dim=1).float().mean().item() > 0.9


def test_cuda_topk_takes_cpu_tensors_only_when_emulating(monkeypatch):
    cuda_topk = _backend_topk("cuda")
    tensors = _topk_inputs(3, 20, 4, seed=2)
    if DEVICE == "cuda":
        pytest.skip("on a GPU the tensors are CUDA ones")
    monkeypatch.delenv("AWR_FAST_CUDA_EMULATE", raising=False)
    with pytest.raises(ValueError, match="^mu: the CUDA backend's w2_topk needs CUDA tensors, got device cpu"):
        cuda_topk(*tensors.values(), 3)
    monkeypatch.setenv("AWR_FAST_CUDA_EMULATE", "1")
    values, indices = cuda_topk(*tensors.values(), 3)
    assert indices.shape == (3, 3) and torch.equal(indices, _reference_scores(tensors).topk(3, 1, largest=False)[1])


def test_cuda_topk_splits_the_items_of_a_small_batch(topk):
    """B = 2 rows against 700 items: the CUDA launcher splits the 11 item chunks across blocks and merges
    their lists (the host's torch.topk over the splits' keys); Triton splits likewise. Ranks and values as
    torch.topk of the reference, the history excluded."""
    tensors = _topk_inputs(2, 700, 6, seed=3)
    ids, mask = _history(2, 700, 30, seed=4)
    truth = _reference_scores(tensors).masked_fill(mask, float("inf")).topk(40, dim=1, largest=False)
    values, indices = topk(*tensors.values(), 40, ids)
    assert torch.equal(indices, truth.indices)
    torch.testing.assert_close(values.double(), truth.values, rtol=0, atol=1e-4)
