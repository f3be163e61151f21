"""Triton W2 item scoring (kernels/w2_scores.py) against the float64 reference: values and the gradients of
all four inputs over odd shapes, covariances at and below the clamp, half precision; the fused top-k
against torch.topk of the reference scores (with and without exclusions, k = 1 and k = |V|, ties);
input errors; opcheck and torch.compile(fullgraph=True).

On CPU these run under TRITON_INTERPRET=1 with the tensor-core dot precision emulated (tests/conftest.py).
The tolerance is the shared rule (awr_fast.testing.oracle_errors): at most twice the error the reference
itself makes in the same dtype, plus a floor scaled by the size of the true value.
"""

import pytest
import torch

import awr_fast
from awr_fast import backends, testing
from awr_fast.reference.w2_scores import w2_scores as reference

triton = pytest.importorskip("triton")
from awr_fast.kernels import w2_scores as triton_scores  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _tensors(batch, items, d, seed=0, tiny=None):
    """mu, sig (B, d), item_mu, item_sig (|V|, d): nothing zero, covariances in [0.5, 1.5); `tiny` puts
    those values (at and below the 1e-24 clamp) into a few covariance entries of both sides."""
    g = torch.Generator().manual_seed(seed)
    mu, item_mu = torch.randn(batch, d, generator=g), torch.randn(items, d, generator=g)
    sig, item_sig = torch.rand(batch, d, generator=g) + 0.5, torch.rand(items, d, generator=g) + 0.5
    if tiny is not None:
        values = torch.tensor(tiny)
        for t in (sig, item_sig):
            flat = t.view(-1)
            picks = torch.randperm(flat.numel(), generator=g)[: min(flat.numel() // 2, 3 * len(tiny))]
            flat[picks] = values[torch.arange(len(picks)) % len(values)].to(flat.dtype)
    return {"mu": mu, "sig": sig, "item_mu": item_mu, "item_sig": item_sig}, g


def _leaves(tensors, dtype=None):
    return [t.detach().to(device=DEVICE, dtype=dtype).clone().requires_grad_(True) for t in tensors.values()]


def _case(batch, items, d, dtype=torch.float32, seed=0, tiny=None):
    tensors, g = _tensors(batch, items, d, seed, tiny)
    grad = torch.randn(batch, items, generator=g)
    label = f"w2_scores-B{batch}-V{items}-d{d}"
    return testing.Case("w2_scores", None, tensors, {}, {}, (grad,), label).to(dtype=dtype, device=DEVICE)


# every d in (3, 17, 64, 100), B in (1, 5, 33) and |V| in (1, 7, 130, 257), each with several others; 130
# and 257 items split the backward's item loop and the top-k's scan across programs, 1 and 7 do not
SHAPES = [(1, 1, 3), (5, 7, 17), (33, 130, 3), (5, 257, 64), (1, 130, 100), (33, 7, 64), (5, 1, 100), (33, 257, 17)]


@pytest.mark.parametrize("batch,items,d", SHAPES)
def test_values_and_all_gradients_against_float64(batch, items, d):
    case = _case(batch, items, d, seed=batch + items + d)
    assert testing.oracle_errors(case, "triton") == []


def test_covariances_at_and_below_the_clamp():
    """sqrt(max(sig, 1e-24)): values use the clamp, and the gradient through the root is 0 where it
    clamps (only the plain sum of sig passes it) and 1/sqrt(sig)-sized just above."""
    tiny = [0.0, 1e-30, 5e-25, 3e-24, 1e-22, 1e-16]
    case = _case(5, 130, 17, seed=3, tiny=tiny)
    assert (case.tensors["sig"] < 1e-24).any() and (case.tensors["item_sig"] < 1e-24).any()
    assert testing.oracle_errors(case, "triton") == []


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch,items,d", [(5, 130, 17), (33, 7, 64)])
def test_half_precision_inputs(dtype, batch, items, d):
    """Half inputs are upcast on load (tf32 dots): within the rule's half-precision tolerance, float32
    scores, gradients in the input dtype."""
    case = _case(batch, items, d, dtype=dtype, seed=11)
    assert testing.oracle_errors(case, "triton") == []
    out = awr_fast.w2_scores(*case.tensors.values(), backend="triton")
    assert out.dtype == torch.float32


@pytest.mark.parametrize("layout", ["expanded", "transposed"])
def test_non_contiguous_gradient_is_read_in_place(layout):
    """G reaches the backward expanded over the rows (stride 0) or transposed: read through its strides."""
    tensors, g = _tensors(5, 130, 17, seed=4)
    weights = torch.randn(130, generator=g) if layout == "expanded" else torch.randn(130, 5, generator=g)

    def loss(scores, w):
        return (scores.sum(0) * w).sum() if layout == "expanded" else (scores.t() * w).sum()

    leaves = _leaves(tensors)
    loss(triton_scores.w2_scores(*leaves), weights.to(DEVICE)).backward()
    exact = [t.double().requires_grad_(True) for t in tensors.values()]
    loss(reference(*exact), weights.double()).backward()
    for ours, truth in zip(leaves, exact):
        scale = truth.grad.abs().max().item()
        torch.testing.assert_close(ours.grad.double(), truth.grad.to(DEVICE), rtol=0, atol=4e-5 * scale)


def test_api_dispatch_and_capability_row(backend_log):
    row = backends.capabilities("w2_scores")["triton"]
    assert row.module == "awr_fast.kernels.w2_scores" and row.grad
    tensors, _ = _tensors(3, 9, 5)
    args = [t.to(DEVICE) for t in tensors.values()]
    out = awr_fast.w2_scores(*args, backend="triton")
    assert backend_log() == {"w2_scores": "triton"}
    torch.testing.assert_close(out.double(), reference(*(a.double() for a in args)), rtol=1e-5, atol=1e-5)


# ---- top-k ------------------------------------------------------------------------------------------


def _reference_scores(tensors):
    return reference(*(t.double() for t in tensors.values())).to(DEVICE)


def _topk_inputs(batch, items, d, seed):
    tensors, _ = _tensors(batch, items, d, seed)
    return {name: t.to(DEVICE) for name, t in tensors.items()}


@pytest.mark.parametrize(
    "batch,items,d,k",
    [(5, 130, 17, 10), (33, 257, 3, 1), (1, 7, 64, 7), (5, 1, 3, 1), (3, 100, 100, 100), (4, 257, 8, 128)],
)
def test_topk_matches_torch_topk_of_the_reference(batch, items, d, k):
    tensors = _topk_inputs(batch, items, d, seed=items + k)
    values, indices = triton_scores.w2_topk(*tensors.values(), k)
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
def test_topk_with_exclusions_by_ids_and_by_mask(exclude_padding):
    batch, items, k = 6, 130, 12
    tensors = _topk_inputs(batch, items, 9, seed=5)
    ids, mask = _history(batch, items, 40, seed=6)
    skipped = mask.clone()
    skipped[:, 0] |= exclude_padding
    truth = _reference_scores(tensors).masked_fill(skipped, float("inf")).topk(k, dim=1, largest=False)
    for exclude in (ids, mask, ids.to(torch.int32)):
        values, indices = triton_scores.w2_topk(*tensors.values(), k, exclude, exclude_padding=exclude_padding)
        assert torch.equal(indices, truth.indices)
        torch.testing.assert_close(values.double(), truth.values, rtol=0, atol=1e-4)
    assert not skipped.gather(1, indices).any()
    plain = triton_scores.w2_topk(*tensors.values(), k)[1]
    assert not torch.equal(plain, indices)  # the exclusions did change the answer


def test_topk_rows_with_fewer_items_than_k_end_with_inf_and_minus_one():
    tensors = _topk_inputs(2, 7, 4, seed=8)
    ids = torch.tensor([[2, 5, -1], [-1, -1, -1]], device=DEVICE)
    values, indices = triton_scores.w2_topk(*tensors.values(), 7, ids, exclude_padding=True)
    scores = _reference_scores(tensors)
    left = [i for i in range(1, 7) if i not in (2, 5)]
    order = sorted(left, key=lambda i: scores[0, i].item())
    assert indices[0].tolist() == order + [-1, -1, -1]
    assert torch.isinf(values[0, 4:]).all() and torch.isfinite(values[0, :4]).all()
    assert indices[1, -1].item() == -1 and sorted(indices[1, :6].tolist()) == list(range(1, 7))


@pytest.mark.parametrize("k", [1, 5, 64])
def test_topk_ties_rank_the_lower_index_first(k):
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
    values, indices = triton_scores.w2_topk(*tensors.values(), k)
    assert torch.equal(indices, stable.indices[:, :k])
    assert torch.equal(values.double(), stable.values[:, :k])


def test_topk_half_precision_values():
    tensors = _topk_inputs(5, 130, 17, seed=9)
    truth = _reference_scores(tensors).topk(8, dim=1, largest=False)
    for dtype in (torch.bfloat16, torch.float16):
        half = {n: t.to(dtype) for n, t in tensors.items()}
        values, indices = triton_scores.w2_topk(*half.values(), 8)
        exact = _reference_scores(half)  # the half inputs' own distances, in float64
        torch.testing.assert_close(values.double(), exact.gather(1, indices), rtol=0, atol=0.05)
        assert (values.double() - truth.values).abs().max().item() < 0.5


def test_topk_rejects_bad_k_and_bad_exclude():
    tensors = _topk_inputs(3, 7, 4, seed=1)
    args = list(tensors.values())
    for k in (0, 8, -1):
        with pytest.raises(ValueError, match=r"^k: expected 1 <= k <= \|V\| = 7"):
            triton_scores.w2_topk(*args, k)
    for k in (2.0, True, None):
        with pytest.raises(TypeError, match="^k: expected an int"):
            triton_scores.w2_topk(*args, k)
    big = _topk_inputs(2, 200, 4, seed=1)
    with pytest.raises(ValueError, match="k: expected 1 <= k <= 128"):
        triton_scores.w2_topk(*big.values(), 129)
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
            triton_scores.w2_topk(*args, 2, exclude.to(DEVICE))
            pytest.fail(what)
    with pytest.raises(TypeError, match="^exclude: expected a torch.Tensor"):
        triton_scores.w2_topk(*args, 2, [[1, 2]] * 3)
    with pytest.raises(TypeError, match="item_sig: expected dtype"):
        triton_scores.w2_topk(*args[:3], args[3].double(), 2)


# ---- custom op and torch.compile ---------------------------------------------------------------------


def test_opcheck():
    tensors, _ = _tensors(5, 19, 6)
    args = tuple(_leaves(tensors))
    torch.library.opcheck(torch.ops.awr_fast.w2_scores_fwd.default, args)


def test_torch_compile_fullgraph_no_graph_break():
    """A full-softmax loss over W2 scores, as a trainer would compile it: same loss and gradients."""
    backends.preload("w2_scores")
    tensors, g = _tensors(4, 23, 8, seed=2)
    targets = torch.randint(0, 23, (4,), generator=g).to(DEVICE)

    def loss(mu, sig, item_mu, item_sig):
        scores = awr_fast.w2_scores(mu, sig, item_mu, item_sig, backend="triton")
        return torch.nn.functional.cross_entropy(-scores, targets)

    def run(fn):
        leaves = _leaves(tensors)
        value = fn(*leaves)
        return [value, *torch.autograd.grad(value, leaves)]

    eager = run(loss)
    compiled = run(torch.compile(loss, fullgraph=True, backend="aot_eager"))
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b)
