"""Triton W2 family (kernels/w2_refined.py) against the float64 reference: values and the gradients of all
six inputs and every refinement weight, for none/simp/add/value on the fused kernels (n <= 64).

On CPU these run under TRITON_INTERPRET=1 with the tensor-core dot precision emulated (tests/conftest.py);
the shared grid over paddings and weight kinds runs in tests/test_backends.py.
"""

import pytest
import torch

import awr_fast
from awr_fast import testing
from awr_fast.backends import UnsupportedInputError, capabilities
from awr_fast.reference.w2_refined import w2_refined as reference

triton = pytest.importorskip("triton")
from awr_fast.kernels import w2_refined as triton_w2  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ROW = capabilities("w2_refined")["triton"]
MECHANISMS = ROW.mechanisms


@pytest.mark.parametrize("mechanism", MECHANISMS)
@pytest.mark.parametrize("n", [16, 29, 33, 50, 64])
def test_every_window_against_float64(mechanism, n):
    """Lengths that take each fused window (16, 32, N_PAD), short left padding so a batch mixes them."""
    case = testing.make_case(
        "w2_refined", mechanism, n=n, d_h=16, batch=3, padding="left_short", dtype=torch.float32, device=DEVICE
    )
    assert testing.oracle_errors(case, "triton") == []


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_refine_input_scores_per_head_weights(mechanism):
    case = testing.make_case(
        "w2_refined",
        mechanism,
        n=21,
        d_h=8,
        padding="arbitrary",
        weights="per_head",
        refine_input="scores" if mechanism != "none" else "probs",
        dtype=torch.float32,
        device=DEVICE,
    )
    assert testing.oracle_errors(case, "triton") == []


def _inputs(n, d_h, batch=2, heads=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    mus = [torch.randn(batch, heads, n, d_h, generator=g) for _ in range(3)]
    sigs = [torch.nn.functional.elu(torch.randn(batch, heads, n, d_h, generator=g)) + 1.0 for _ in range(3)]
    return [x.to(DEVICE) for pair in zip(mus, sigs) for x in pair]


def _weights(mechanism, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {
        name: (torch.randn(n, n, generator=g) * 0.4).to(DEVICE)
        for name in testing.SPECS["w2_refined"].WEIGHTS[mechanism]
    }


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_causality(mechanism):
    """Changing every input at positions > t changes no output at positions <= t."""
    n, t = 23, 11
    inputs, weights = _inputs(n, 8), _weights(mechanism, n)
    mask = testing.left_padding_mask([n, 17], n).to(DEVICE)
    before = awr_fast.wasserstein_attention(
        *inputs, mechanism=mechanism, key_padding_mask=mask, backend="triton", **weights
    )
    changed = []
    for i, x in enumerate(inputs):
        y = x.clone()
        y[:, :, t + 1 :] = y[:, :, t + 1 :] * 3.0 + (1.0 if i % 2 else 0.5)  # covariances stay positive
        changed.append(y)
    after = awr_fast.wasserstein_attention(
        *changed, mechanism=mechanism, key_padding_mask=mask, backend="triton", **weights
    )
    for b, a in zip(before, after):
        torch.testing.assert_close(a[:, :, : t + 1], b[:, :, : t + 1], rtol=0, atol=0)
        assert not torch.allclose(a[:, :, t + 1 :], b[:, :, t + 1 :])  # the change did reach the future rows


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_fully_padded_rows_are_zero_and_gradients_finite(mechanism):
    n = 12
    inputs = [x.requires_grad_(True) for x in _inputs(n, 8)]
    weights = {k: w.requires_grad_(True) for k, w in _weights(mechanism, n).items()}
    mask = testing.left_padding_mask([0, 5], n).to(DEVICE)  # the first sequence is all padding
    mu, sig = awr_fast.wasserstein_attention(
        *inputs, mechanism=mechanism, key_padding_mask=mask, backend="triton", **weights
    )
    assert (mu[0] == 0).all() and (sig[0] == 0).all() and (mu[1, :, : n - 5] == 0).all()
    (mu.square().sum() + sig.sum()).backward()
    for leaf in [*inputs, *weights.values()]:
        assert torch.isfinite(leaf.grad).all()
    assert (inputs[0].grad[0] == 0).all()


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_dropout_forward_and_backward_share_one_mask(mechanism):
    """With mu_v = I the mean output is P' = dropout(P) itself: the kernel's mask, recovered; values and
    every gradient then match the float64 reference with that mask applied."""
    p, seed, n = 0.25, 99, 13
    inputs, weights = _inputs(n, n, seed=3), _weights(mechanism, n)
    mask = testing.left_padding_mask([n, 9], n).to(DEVICE)
    eye = torch.eye(n, device=DEVICE).expand_as(inputs[4]).contiguous()
    torch.manual_seed(seed)
    dropped, _ = triton_w2.w2_refined(
        *inputs[:4], eye, inputs[5], mechanism=mechanism, key_padding_mask=mask, dropout_p=p, **weights
    )
    as64 = [x.double() for x in inputs]
    _, ref_w = reference(
        *as64,
        mechanism=mechanism,
        key_padding_mask=mask,
        return_weights=True,
        **{k: w.double() for k, w in weights.items()},
    )
    probs = ref_w["P"]
    keep = dropped.double() != 0
    visible = probs > 0
    torch.testing.assert_close(dropped.double()[keep], probs[keep] / (1 - p), rtol=1e-4, atol=1e-6)
    assert 0.1 < 1 - keep[visible].float().mean().item() < 0.4
    scale_mask = (keep | ~visible).double() / (1 - p)

    def masked_reference(*xs, **w):
        _, rw = reference(*xs, mechanism=mechanism, key_padding_mask=mask, return_weights=True, **w)
        pd = rw["P"] * scale_mask
        pad = mask[:, None, :, None]
        return (pd @ xs[4]).masked_fill(pad, 0.0), ((pd * pd) @ xs[5]).masked_fill(pad, 0.0)

    def grads(fn, xs, ws):
        leaves = [x.detach().clone().requires_grad_(True) for x in xs]
        wl = {k: w.detach().clone().requires_grad_(True) for k, w in ws.items()}
        mu, sig = fn(*leaves, **wl)
        g = torch.autograd.grad(mu.sum() + (sig * sig).sum(), [*leaves, *wl.values()])
        return [mu, sig, *g]

    torch.manual_seed(seed)
    ours = grads(
        lambda *xs, **w: triton_w2.w2_refined(*xs, mechanism=mechanism, key_padding_mask=mask, dropout_p=p, **w),
        inputs,
        weights,
    )
    exact = grads(masked_reference, as64, {k: w.double() for k, w in weights.items()})
    for i, (a, b) in enumerate(zip(ours, exact)):
        torch.testing.assert_close(a.double(), b, rtol=2e-4, atol=2e-5, msg=f"output/gradient {i}")


def test_triton_refuses_stoc_and_long_sequences():
    case = testing.make_case("w2_refined", "stoc", n=7, dtype=torch.float32, device=DEVICE)
    with pytest.raises(UnsupportedInputError, match="ELU covariance"):
        testing.run(case, "triton")
    long = testing.make_case("w2_refined", "simp", n=ROW.max_n + 1, d_h=4, batch=1, heads=1, dtype=torch.float32)
    with pytest.raises(UnsupportedInputError, match=f"n <= {ROW.max_n}|n={ROW.max_n + 1}"):
        testing.run(long, "triton")


@pytest.mark.parametrize("mechanism", ["none", "value"])
def test_opcheck(mechanism):
    n = 9
    inputs = [x.requires_grad_(True) for x in _inputs(n, 8)]
    weights = _weights(mechanism, n)
    w_rq, w_rk = (
        None if weights.get(name) is None else weights[name].requires_grad_(True) for name in ("w_rq", "w_rk")
    )
    w_rv = weights.get("w_rv")
    args = (
        *inputs,
        w_rq,
        w_rk,
        None if w_rv is None else w_rv.requires_grad_(True),
        testing.left_padding_mask([n, 4], n).to(DEVICE),
        torch.zeros(1, dtype=torch.int64, device=DEVICE),
        mechanism,
        0.3,
        0.3,
        False,
        0.0,
    )
    torch.library.opcheck(torch.ops.awr_fast.w2_refined_fwd.default, args)


def test_torch_compile_fullgraph_no_graph_break():
    from awr_fast.nn.wasserstein import WassersteinAttention

    torch.manual_seed(0)
    layer = WassersteinAttention(16, 2, 10, "simp", backend="triton", hidden_dropout=0.0).to(DEVICE)
    mu = torch.randn(3, 10, 16, device=DEVICE, requires_grad=True)
    sig = (torch.rand(3, 10, 16, device=DEVICE) + 0.5).requires_grad_(True)
    mask = testing.left_padding_mask([10, 4, 0], 10).to(DEVICE)
    eager = layer(mu, sig, key_padding_mask=mask)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    out = compiled(mu, sig, key_padding_mask=mask)
    for a, b in zip(out, eager):
        torch.testing.assert_close(a, b)
    (out[0].sum() + out[1].sum()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters() if p.requires_grad)


def test_stosa_model_compiles_fullgraph_on_triton():
    """The whole STOSA model on the Triton backend (W2 attention and the W2 item scoring) traces without
    a graph break: its training loss (given negatives) and its full-ranking scores match eager."""
    from awr_fast import backends
    from awr_fast.models import build_model

    torch.manual_seed(0)
    model = build_model(
        "stosa", num_items=30, max_len=10, d_model=16, n_heads=2, attention="simp", backend="triton", dropout=0.0
    ).to(DEVICE)
    seq = torch.randint(1, 31, (3, 10), device=DEVICE)
    pos = torch.randint(1, 31, (3, 10), device=DEVICE)
    for row, cut in ((1, 4), (2, 8)):
        seq[row, :cut] = 0
        pos[row, :cut] = 0
    neg = torch.randint(1, 31, (3, 10), device=DEVICE)
    backends.USED.clear()
    loss = torch.compile(lambda s, p, q: model.loss(s, p, q), fullgraph=True, backend="aot_eager")(seq, pos, neg)
    torch.testing.assert_close(loss, model.loss(seq, pos, neg))
    loss.backward()
    with torch.no_grad():
        scores = torch.compile(model.score_all, fullgraph=True, backend="aot_eager")(seq)
        torch.testing.assert_close(scores[:, 1:], model.score_all(seq)[:, 1:])
    used = backends.used_backends()
    assert used.get("w2_refined") == "triton" and used.get("w2_scores") == "triton", used
