"""Triton W2 item scoring (kernels/w2_scores.py) against the float64 reference: values and the gradients of
all four inputs over odd shapes, covariances at and below the clamp, half precision; opcheck and
torch.compile(fullgraph=True). The fused top-k (both backends) is tested in tests/test_w2_topk.py.

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
