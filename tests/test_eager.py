"""The eager backend's own machinery (awr_fast.eager.factored): row blocks, length buckets and the
hand-written backward, driven into their multi-block and multi-bucket code paths, against the float64
oracle. Its plain grid runs in tests/test_backends.py with every other backend."""

import pytest
import torch

import awr_fast
from awr_fast import testing
from awr_fast.eager import factored

OPS = {"dot_refined": ("simp", "add", "value"), "w2_refined": ("simp", "add", "value", "stoc")}


@pytest.fixture
def small_blocks(monkeypatch):
    """Row blocks of about 3 rows and length buckets of single sequences: every n >= 5 runs the
    multi-block code and every padded batch the bucketed one (by default one block below 75 positions, one
    bucket below 32 sequences or below length 64)."""
    monkeypatch.setattr(factored, "BLOCK_TARGET", 3)
    monkeypatch.setattr(factored, "BUCKET_MIN", 1)
    monkeypatch.setattr(factored, "BUCKET_MIN_LENGTH", 1)


def _small_grid():
    return [
        pytest.param(op, kwargs, id=f"{op}-" + "-".join(str(v) for v in kwargs.values()))
        for op, mechanisms in OPS.items()
        for kwargs in testing.grid(op, mechanisms)
        if kwargs["n"] > 1
    ]


@pytest.mark.parametrize("op,kwargs", _small_grid())
def test_multi_block_and_bucket_paths_match_oracle(op, kwargs, small_blocks):
    testing.assert_matches_oracle(testing.make_case(op, **kwargs, batch=5), "eager")


@pytest.mark.parametrize("op,mechanism", [(op, m) for op, ms in OPS.items() for m in ms])
@pytest.mark.parametrize(
    "padding,weights,refine_input",
    [("left", "shared", "probs"), ("arbitrary", "per_head", "probs"), ("left", "rectangular", "scores")],
)
def test_gradcheck(op, mechanism, padding, weights, refine_input, small_blocks):
    """The hand-written backward against finite differences (n = 7: row blocks (0, 2), (2, 5), (5, 7))."""
    case = testing.make_case(
        op, mechanism, batch=4, heads=2, n=7, d_h=2, padding=padding, weights=weights, refine_input=refine_input, seed=1
    )
    leaves = {name: t.clone().requires_grad_(True) for name, t in {**case.tensors, **case.weights}.items()}
    names = list(leaves)
    positional = 3 if op == "dot_refined" else 6
    function = testing.FUNCTIONS[op]

    def fn(*args):
        return function(
            *args[:positional],
            mechanism=mechanism,
            **dict(zip(names[positional:], args[positional:])),
            **case.options,
            refine_scale=0.7,
            backend="eager",
        )

    # gradcheck's fast mode (random projections u^T J v of the Jacobian) keeps each case near a second
    assert torch.autograd.gradcheck(fn, tuple(leaves.values()), eps=1e-6, atol=1e-6, fast_mode=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("op,mechanism", [(op, m) for op, ms in OPS.items() for m in ms])
@pytest.mark.parametrize("padding", ["left", "arbitrary"])
def test_padded_rows_are_zero_and_finite(dtype, op, mechanism, padding, monkeypatch):
    monkeypatch.setattr(factored, "BLOCK_TARGET", 4)
    monkeypatch.setattr(factored, "BUCKET_MIN", 1)
    monkeypatch.setattr(factored, "BUCKET_MIN_LENGTH", 1)
    case = testing.make_case(op, mechanism, batch=4, n=9, d_h=4, padding=padding, dtype=dtype, seed=2)
    mask = case.options["key_padding_mask"]  # sequence 1 is fully padded in both kinds
    leaves = {name: t.clone().requires_grad_(True) for name, t in {**case.tensors, **case.weights}.items()}
    positional = list(leaves.values())[: 3 if op == "dot_refined" else 6]
    weights = {name: leaves[name] for name in case.weights}
    outs = testing.FUNCTIONS[op](*positional, mechanism=mechanism, **weights, **case.options, backend="eager")
    outs = (outs,) if isinstance(outs, torch.Tensor) else outs
    for out in outs:
        assert torch.isfinite(out).all()
        assert (out.transpose(1, 2)[mask] == 0).all()  # every padded query row, the fully padded sequence too
    sum(((o.float() * torch.randn(o.shape)).sum() for o in outs)).backward()
    for t in leaves.values():
        assert torch.isfinite(t.grad).all()
    for t in positional:
        assert (t.grad[1] == 0).all()
        assert (t.grad.transpose(1, 2)[mask] == 0).all()  # padded positions get no gradient


@pytest.mark.parametrize("op", list(OPS))
def test_dropout_is_random_and_unbiased(op):
    case = testing.make_case(op, "simp", batch=2, n=9, d_h=4, padding="none")
    mask = testing.left_padding_mask([9, 5], 9)
    options = {**case.options, "key_padding_mask": mask}
    function = testing.FUNCTIONS[op]

    def call(dropout_p):
        out = function(
            *case.tensors.values(), mechanism="simp", **case.weights, **options, dropout_p=dropout_p, backend="eager"
        )
        return out if isinstance(out, torch.Tensor) else out[0]

    torch.manual_seed(0)
    outs = torch.stack([call(0.3) for _ in range(300)])
    assert not torch.equal(outs[0], outs[1])
    assert (outs[:, 1, :, :4] == 0).all()  # padded queries stay zero under dropout
    torch.testing.assert_close(outs.mean(0), call(0.0), atol=0.15, rtol=0)


@pytest.mark.parametrize("mechanism", ["simp", "add", "value"])
@pytest.mark.parametrize("backend", ["reference", "eager"])
@pytest.mark.parametrize("per_head", [False, True])
def test_window_of_a_longer_model_equals_its_padded_batch(mechanism, backend, per_head):
    """The last n of N positions with the rows W[N-n:, :] of (N, N) projections (and W_RV[N-n:, N-n:])
    is the padded computation without the padding: outputs and every gradient agree."""
    big, n = 11, 6
    case = testing.make_case(
        "dot_refined", mechanism, batch=3, n=big, padding="none", weights="per_head" if per_head else "shared"
    )
    mask = testing.left_padding_mask([6, 2, 0], big)
    grad = torch.randn(3, 2, big, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    off = big - n

    def run(tensors, weights, key_padding_mask, g):
        leaves = [t.clone().requires_grad_(True) for t in (*tensors, *weights.values())]
        out = awr_fast.refined_attention(
            *leaves[:3],
            mechanism=mechanism,
            key_padding_mask=key_padding_mask,
            backend=backend,
            **dict(zip(weights, leaves[3:])),
        )
        return out, torch.autograd.grad(out, leaves, g)

    q, k, v = case.tensors.values()
    full, full_grads = run((q, k, v), case.weights, mask, grad)
    window = {name: (w[..., off:, off:] if name == "w_rv" else w[..., off:, :]) for name, w in case.weights.items()}
    part, part_grads = run((q[:, :, off:], k[:, :, off:], v[:, :, off:]), window, mask[:, off:], grad[:, :, off:])
    torch.testing.assert_close(part, full[:, :, off:], rtol=1e-12, atol=1e-12)
    for g_part, g_full in zip(part_grads[:3], full_grads[:3]):
        torch.testing.assert_close(g_part, g_full[:, :, off:], rtol=1e-12, atol=1e-12)
        assert (g_full[:, :, :off] == 0).all()
    for name, g_part, g_full in zip(case.weights, part_grads[3:], full_grads[3:]):
        rows = g_full[..., off:, off:] if name == "w_rv" else g_full[..., off:, :]
        torch.testing.assert_close(g_part, rows, rtol=1e-12, atol=1e-12, msg=name)
        assert torch.count_nonzero(g_full) == torch.count_nonzero(rows), name  # nothing outside the window


@pytest.mark.parametrize("length", [1, 2, 7, 50, 74, 76, 200, 333])
def test_row_blocks_tile_the_window(length):
    blocks = factored.row_blocks(length, factored.BLOCK_TARGET)
    assert blocks[0][0] == 0 and blocks[-1][1] == length
    assert all(e0 == s1 for (_, e0), (s1, _) in zip(blocks[:-1], blocks[1:]))
    sizes = [e - s for s, e in blocks]
    assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1


def test_buckets_split_by_length_and_merge_back():
    """Sorted by length, a bucket holds sequences down to BUCKET_RATIO of its longest (at least BUCKET_MIN),
    and the ones shorter than BUCKET_MIN_LENGTH share the last: the outputs come back in the caller's order."""
    n, few = 100, factored.BUCKET_MIN
    assert factored.BUCKET_MIN_LENGTH <= 80 < n
    lengths = torch.tensor([100] * few + [80] * few + [30] * few + [5] * 3)
    lengths = lengths[torch.randperm(len(lengths), generator=torch.Generator().manual_seed(0))]
    batch = len(lengths)
    order, sizes, _ = factored.split_batch(testing.left_padding_mask(lengths, n), batch, n)
    assert sizes == [2 * few, few + 3]  # 100 and 80 (>= 0.7 x 100) together; 30 and 5 (< 64) together
    assert (lengths[order[: sizes[0]]] >= 80).all() and (lengths[order[sizes[0] :]] <= 30).all()
    short, _, _ = factored.split_batch(testing.left_padding_mask(lengths.clamp(max=50), n), batch, n)
    assert short is None  # every sequence below BUCKET_MIN_LENGTH: one bucket
    case = testing.make_case("dot_refined", "simp", batch=batch, heads=1, n=n, d_h=4, padding="none")
    options = {**case.options, "key_padding_mask": testing.left_padding_mask(lengths, n)}
    eager = awr_fast.refined_attention(
        *case.tensors.values(), mechanism="simp", **case.weights, **options, backend="eager"
    )
    oracle = awr_fast.refined_attention(
        *case.tensors.values(), mechanism="simp", **case.weights, **options, backend="reference"
    )
    torch.testing.assert_close(eager, oracle, rtol=1e-12, atol=1e-12)
