"""Triton W2 family (kernels/w2_refined.py) against the float64 reference: values and the gradients of all
six inputs and every refinement weight, for none/simp/add/value on the fused kernels (n <= 64) and the
tiled ones (longer n, and any n with W2_FUSED_MAX_N forced to 0).

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


# ---- the tiled path (n > W2_FUSED_MAX_N; the fixture forces it at any n) ------------------------------


@pytest.fixture
def tiled_only(monkeypatch):
    monkeypatch.setattr(triton_w2, "W2_FUSED_MAX_N", 0)


@pytest.fixture(params=["fused", "tiled"])
def path(request, monkeypatch):
    if request.param == "tiled":
        monkeypatch.setattr(triton_w2, "W2_FUSED_MAX_N", 0)
    return request.param


def test_fused_path_is_taken_up_to_its_limit():
    assert triton_w2.uses_fused_kernels(triton_w2.W2_FUSED_MAX_N)
    assert not triton_w2.uses_fused_kernels(triton_w2.W2_FUSED_MAX_N + 1)
    assert ROW.max_n == 256 > triton_w2.W2_FUSED_MAX_N


@pytest.mark.parametrize("mechanism", MECHANISMS)
@pytest.mark.parametrize("n", [7, 37])
def test_tiled_path_against_float64(tiled_only, mechanism, n):
    case = testing.make_case(
        "w2_refined", mechanism, n=n, d_h=16, batch=3, padding="left_short", dtype=torch.float32, device=DEVICE
    )
    assert testing.oracle_errors(case, "triton") == []


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_tiled_path_past_the_fused_limit(mechanism):
    """n = 97 (odd, several row and key blocks) takes the tiled kernels without any forcing."""
    assert not triton_w2.uses_fused_kernels(97)
    case = testing.make_case(
        "w2_refined", mechanism, n=97, d_h=8, batch=2, heads=1, padding="arbitrary", dtype=torch.float32, device=DEVICE
    )
    assert testing.oracle_errors(case, "triton") == []


@pytest.mark.parametrize("mechanism", ["none", "value", "stoc"])
@pytest.mark.parametrize("n", [200, 256])
def test_tiled_path_longest_sequences(mechanism, n):
    """The longest sequences the family takes (several 32-row blocks; stoc's 256-wide row Gaussians read in
    64-column chunks), arbitrary padding with a fully padded row."""
    case = testing.make_case(
        "w2_refined", mechanism, n=n, d_h=8, batch=2, heads=1, padding="arbitrary", dtype=torch.float32
    )
    assert testing.oracle_errors(case.to(device=DEVICE), "triton") == []


@pytest.mark.parametrize("d_h", [50, 64])
@pytest.mark.parametrize("n", [1, 37])
def test_head_widths_on_both_paths(path, d_h, n):
    """d_h not a power of two (50) and the widest common one (64), at n = 1 and an odd n."""
    case = testing.make_case("w2_refined", "simp", n=n, d_h=d_h, batch=2, heads=2, padding="left", dtype=torch.float32)
    assert testing.oracle_errors(case.to(device=DEVICE), "triton") == []


@pytest.mark.parametrize("mechanism", ["simp", "add", "value"])
def test_tiled_refine_input_scores_per_head_weights(tiled_only, mechanism):
    case = testing.make_case(
        "w2_refined",
        mechanism,
        n=21,
        d_h=8,
        padding="arbitrary",
        weights="per_head",
        refine_input="scores",
        dtype=torch.float32,
        device=DEVICE,
    )
    assert testing.oracle_errors(case, "triton") == []


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mechanism", ["none", "value"])
def test_tiled_path_half_precision(tiled_only, mechanism, dtype):
    case = testing.make_case(
        "w2_refined", mechanism, n=19, d_h=16, batch=2, padding="left_short", dtype=dtype, device=DEVICE
    )
    assert testing.oracle_errors(case, "triton") == []


# ---- M_stoc (tiled at every n: its row Gaussians A W_mu, ELU(A W_sigma) + 1 are (n, r) GEMMs) -----------


@pytest.mark.parametrize("weights", ["rectangular", "mixed", "per_head"])
def test_stoc_weight_kinds(weights):
    """(n, r) with r != n, per-head W_mu beside a shared W_sigma, and both per head."""
    case = testing.make_case(
        "w2_refined", "stoc", n=23, d_h=8, batch=3, padding="arbitrary", weights=weights, dtype=torch.float32
    )
    assert case.weights["w_mu"].shape[-1] != 23 or weights != "rectangular"
    assert testing.oracle_errors(case.to(device=DEVICE), "triton") == []


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stoc_half_precision(dtype):
    case = testing.make_case("w2_refined", "stoc", n=19, d_h=16, batch=2, padding="left_short", dtype=dtype)
    assert testing.oracle_errors(case.to(device=DEVICE), "triton") == []


def test_stoc_long_sequence_and_scores_input():
    case = testing.make_case(
        "w2_refined", "stoc", n=97, d_h=8, batch=2, heads=1, padding="arbitrary", refine_input="scores"
    )
    assert testing.oracle_errors(case.to(dtype=torch.float32, device=DEVICE), "triton") == []


def test_stoc_vanishing_covariance_stays_finite():
    """A strongly negative A W_sigma drives ELU + 1 towards 0 (below the 1e-24 clamp): values match the
    reference and every gradient is finite."""
    n = 12
    inputs = [x.requires_grad_(True) for x in _inputs(n, 8)]
    w_mu = (torch.randn(n, n) * 0.4).to(DEVICE).requires_grad_(True)
    w_sigma = torch.full((n, n), -200.0, device=DEVICE).requires_grad_(True)
    mu, sig = triton_w2.w2_refined(*inputs, mechanism="stoc", w_mu=w_mu, w_sigma=w_sigma)
    ref_mu, ref_sig = reference(
        *(x.double() for x in inputs), mechanism="stoc", w_mu=w_mu.double(), w_sigma=w_sigma.double()
    )
    torch.testing.assert_close(mu.double(), ref_mu, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sig.double(), ref_sig, rtol=1e-4, atol=1e-5)
    (mu.square().sum() + sig.sum()).backward()
    for leaf in [*inputs, w_mu, w_sigma]:
        assert torch.isfinite(leaf.grad).all()


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_fused_and_tiled_paths_draw_the_same_dropout(mechanism, monkeypatch):
    """Both paths key the draw by (batch*head, i, j): the same seed gives the same outputs and gradients."""
    n = 19
    inputs, weights = _inputs(n, 8, seed=5), _weights(mechanism, n)
    mask = testing.left_padding_mask([n, 11], n).to(DEVICE)

    def dropped():
        leaves = [x.clone().requires_grad_(True) for x in inputs]
        wl = {k: w.clone().requires_grad_(True) for k, w in weights.items()}
        torch.manual_seed(77)
        mu, sig = triton_w2.w2_refined(*leaves, mechanism=mechanism, key_padding_mask=mask, dropout_p=0.3, **wl)
        grads = torch.autograd.grad(mu.square().sum() + sig.sum(), [*leaves, *wl.values()])
        return [mu, sig, *grads]

    fused = dropped()
    monkeypatch.setattr(triton_w2, "W2_FUSED_MAX_N", 0)
    tiled = dropped()
    assert (fused[0] == 0).float().mean() < 0.5  # the outputs are not trivially zero
    for i, (a, b) in enumerate(zip(fused, tiled)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f"output/gradient {i}")


@pytest.mark.parametrize("mechanism", ["none", "value"])
def test_tiled_forward_saves_float32_weights_only_where_needed(tiled_only, mechanism):
    """The tiled forward keeps A (and for a refinement T, P and, for "value", U and R) as float32 (n, n)
    tensors for its backward; the fused one keeps none (test_cuda/test_triton_dot check the same)."""
    n = 11
    inputs, weights = _inputs(n, 8), _weights(mechanism, n)
    leaves = [x.clone().requires_grad_(True) for x in inputs]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        triton_w2.w2_refined(*leaves, mechanism=mechanism, **weights)
    squares = [t for t in saved if t.dim() == 4 and tuple(t.shape[-2:]) == (n, n)]
    assert len(squares) == (1 if mechanism == "none" else 5)
    assert all(t.dtype == torch.float32 for t in squares)


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
def test_causality(mechanism, path):
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
def test_fully_padded_rows_are_zero_and_gradients_finite(mechanism, path):
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
def test_dropout_forward_and_backward_share_one_mask(mechanism, path):
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


def test_triton_refuses_wide_stoc_weights_and_long_sequences():
    case = testing.make_case("w2_refined", "stoc", n=7, d_h=4, batch=1, heads=1, dtype=torch.float32)
    wide = {name: torch.randn(7, ROW.max_n + 1) for name in ("w_mu", "w_sigma")}
    with pytest.raises(UnsupportedInputError, match=f"w_mu has {ROW.max_n + 1} columns"):
        awr_fast.wasserstein_attention(*case.tensors.values(), mechanism="stoc", backend="triton", **wide)
    long = testing.make_case("w2_refined", "simp", n=ROW.max_n + 1, d_h=4, batch=1, heads=1, dtype=torch.float32)
    with pytest.raises(UnsupportedInputError, match=f"n <= {ROW.max_n}|n={ROW.max_n + 1}"):
        testing.run(long, "triton")


@pytest.mark.parametrize("mechanism", ["none", "value", "stoc"])
def test_opcheck(mechanism, path):
    n = 9
    inputs = [x.requires_grad_(True) for x in _inputs(n, 8)]
    weights = _weights(mechanism, n)
    w_rq, w_rk = (
        None if weights.get(name) is None else weights[name].requires_grad_(True) for name in ("w_rq", "w_rk")
    )
    w_rv, w_mu, w_sigma = (
        None if weights.get(name) is None else weights[name].requires_grad_(True)
        for name in ("w_rv", "w_mu", "w_sigma")
    )
    args = (
        *inputs,
        w_rq,
        w_rk,
        w_rv,
        w_mu,
        w_sigma,
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


# ---- hypothesis sweep -------------------------------------------------------------------------------

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies


@hypothesis.given(
    mechanism=st.sampled_from(MECHANISMS),
    batch=st.integers(1, 3),
    heads=st.integers(1, 2),
    n=st.integers(1, 80),
    d_h=st.sampled_from([8, 16, 24, 50]),
    weights=st.sampled_from(["shared", "per_head", "rectangular"]),
    padding=st.sampled_from(["none", "left", "arbitrary"]),
    seed=st.integers(0, 10_000),
)
def test_hypothesis_sweep(mechanism, batch, heads, n, d_h, weights, padding, seed):
    """Random shapes across both paths (n > 64 is tiled), weight kinds and paddings, every mechanism."""
    case = testing.make_case(
        "w2_refined",
        mechanism,
        n=n,
        d_h=d_h,
        batch=batch,
        heads=heads,
        padding=padding,
        weights=weights,
        seed=seed,
        dtype=torch.float32,
        device=DEVICE,
    )
    assert testing.oracle_errors(case, "triton") == []
