"""Triton dot-product family against the float64 reference: values and every gradient.

On CPU these run under TRITON_INTERPRET=1 (tests/conftest.py); with a GPU the same cases run natively,
plus the half-precision grid. Tolerance (flash-attention's rule): the kernel's error against float64 is
at most 2x the error the eager PyTorch reference makes in the same dtype, plus a small floor.
"""

import math

import pytest
import torch

import awr_fast
from awr_fast.backends import capabilities
from awr_fast.ops.dot_refined import WEIGHTS
from awr_fast.reference.dot_refined import dot_refined as reference
from helpers import left_padding_mask, random_lengths

triton = pytest.importorskip("triton")
from awr_fast.kernels import dot_refined as triton_dot  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MECHANISMS = capabilities("dot_refined")["triton"].mechanisms
FLOOR = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}
GRID_N = (1, 7, 37, 50, 64, 97, 128, 200, 256)
GRID_D = (16, 50, 64)


def make_case(mechanism, n, d_h, *, batch=3, heads=2, per_head=False, padded=True, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, n, d_h, generator=g) for _ in range(3))
    weights = {}
    if mechanism != "none":
        names = WEIGHTS[mechanism]
        shape = (heads, n, n) if per_head else (n, n)
        # xavier-like scale keeps the second-order scores O(1) as in a trained model
        weights = {name: torch.randn(*shape, generator=g) * math.sqrt(2.0 / (2 * n)) * 4 for name in names}
    mask = left_padding_mask(random_lengths(batch, n, generator=g), n) if padded else None
    grad = torch.randn(batch, heads, n, d_h, generator=g)
    to = dict(device=DEVICE)
    return (
        {"q": q.to(dtype=dtype, **to), "k": k.to(dtype=dtype, **to), "v": v.to(dtype=dtype, **to)},
        {name: w.to(dtype=dtype, **to) for name, w in weights.items()},
        None if mask is None else mask.to(DEVICE),
        grad.to(dtype=dtype, **to),
    )


def run(fn, tensors, weights, mask, grad, **options):
    leaves = {name: t.detach().clone().requires_grad_(True) for name, t in {**tensors, **weights}.items()}
    out = fn(
        leaves["q"],
        leaves["k"],
        leaves["v"],
        key_padding_mask=mask,
        **{name: leaves[name] for name in weights},
        **options,
    )
    grads = torch.autograd.grad(out, list(leaves.values()), grad)
    return {"out": out.detach(), **{f"d{name}": g for name, g in zip(leaves, grads)}}


def assert_matches_reference(mechanism, tensors, weights, mask, grad, **options):
    dtype = tensors["q"].dtype
    ours = run(triton_dot.dot_refined, tensors, weights, mask, grad, mechanism=mechanism, **options)
    eager = run(reference, tensors, weights, mask, grad, mechanism=mechanism, **options)
    as64 = lambda d: {name: t.double() for name, t in d.items()}  # noqa: E731
    exact = run(reference, as64(tensors), as64(weights), mask, grad.double(), mechanism=mechanism, **options)
    for name, truth in exact.items():
        assert torch.isfinite(ours[name]).all(), f"{name} has non-finite values"
        err = (ours[name].double() - truth).abs().max().item()
        eager_err = (eager[name].double() - truth).abs().max().item()
        bound = 2 * eager_err + FLOOR[dtype] * max(1.0, truth.abs().max().item())
        assert err <= bound, f"{name}: error {err:.3e} > bound {bound:.3e} (eager {eager_err:.3e})"


def grid_cases():
    cases = []
    for m_index, mechanism in enumerate(MECHANISMS):
        for n_index, n in enumerate(GRID_N):
            d_h = GRID_D[(n_index + m_index) % 3]
            per_head = (n_index % 2 == 1) and mechanism != "none"
            cases.append(
                pytest.param(mechanism, n, d_h, per_head, id=f"{mechanism}-n{n}-d{d_h}-{'H' if per_head else 'S'}")
            )
    return cases


@pytest.mark.parametrize("mechanism,n,d_h,per_head", grid_cases())
def test_grid_fp32(mechanism, n, d_h, per_head):
    batch, heads = (4, 2) if n <= 128 else (3, 1)
    tensors, weights, mask, grad = make_case(
        mechanism, n, d_h, batch=batch, heads=heads, per_head=per_head, seed=n * 7 + d_h
    )
    assert_matches_reference(mechanism, tensors, weights, mask, grad)


@pytest.mark.parametrize("mechanism", MECHANISMS)
@pytest.mark.parametrize("d_h", GRID_D)
def test_head_dims_without_padding(mechanism, d_h):
    tensors, weights, mask, grad = make_case(mechanism, 37, d_h, padded=False, seed=d_h)
    assert_matches_reference(mechanism, tensors, weights, mask, grad)


@pytest.mark.parametrize("mechanism", ["simp", "add", "value"])
def test_refine_input_scores_and_custom_scales(mechanism):
    tensors, weights, mask, grad = make_case(mechanism, 50, 16, seed=5)
    assert_matches_reference(
        mechanism, tensors, weights, mask, grad, refine_input="scores", scale=0.2, refine_scale=0.05
    )


def test_arbitrary_padding_not_only_left():
    """key_padding_mask may mark any position (e.g. a masked item inside the sequence)."""
    tensors, weights, mask, grad = make_case("simp", 29, 16, padded=False, seed=11)
    g = torch.Generator().manual_seed(1)
    mask = (torch.rand(3, 29, generator=g) < 0.3).to(DEVICE)
    mask[0] = True  # and one fully padded sequence
    assert_matches_reference("simp", tensors, weights, mask, grad)


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_batch_equals_each_sequence_alone(mechanism):
    tensors, weights, mask, grad = make_case(mechanism, 40, 16, batch=4, seed=3)
    together = triton_dot.dot_refined(**tensors, mechanism=mechanism, key_padding_mask=mask, **weights)
    for b in range(4):
        alone = triton_dot.dot_refined(
            **{k: t[b : b + 1] for k, t in tensors.items()},
            mechanism=mechanism,
            key_padding_mask=mask[b : b + 1],
            **weights,
        )
        torch.testing.assert_close(together[b : b + 1], alone, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_fully_padded_rows_zero_and_finite(mechanism):
    tensors, weights, _, grad = make_case(mechanism, 9, 16, batch=2, padded=False, seed=2)
    mask = left_padding_mask([0, 2], 9).to(DEVICE)
    res = run(triton_dot.dot_refined, tensors, weights, mask, grad, mechanism=mechanism)
    assert all(torch.isfinite(t).all() for t in res.values())
    assert (res["out"][0] == 0).all() and (res["out"][1, :, :7] == 0).all()
    assert (res["dq"][0] == 0).all() and (res["dk"][0] == 0).all() and (res["dv"][0] == 0).all()


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_causality(mechanism):
    tensors, weights, mask, _ = make_case(mechanism, 21, 16, batch=2, padded=False, seed=4)
    out = triton_dot.dot_refined(**tensors, mechanism=mechanism, **weights)
    t = 9
    perturbed = {k: x.clone() for k, x in tensors.items()}
    for x in perturbed.values():
        x[:, :, t + 1 :] += 3.0 * torch.randn_like(x[:, :, t + 1 :])
    out2 = triton_dot.dot_refined(**perturbed, mechanism=mechanism, **weights)
    assert torch.equal(out2[:, :, : t + 1], out[:, :, : t + 1])
    assert not torch.equal(out2[:, :, t + 1 :], out[:, :, t + 1 :])


# ---- the two kernel paths: fused single-program (n <= FUSED_MAX_N) and tiled ---------------------------


@pytest.fixture
def tiled_only(monkeypatch):
    """Force the tiled kernels for every n (as AWR_FAST_TRITON_FUSED_MAX_N=0 does)."""
    monkeypatch.setattr(triton_dot, "FUSED_MAX_N", 0)


def test_fused_path_is_taken_up_to_its_limit():
    assert triton_dot.uses_fused_kernels(1) and triton_dot.uses_fused_kernels(triton_dot.FUSED_MAX_N)
    assert not triton_dot.uses_fused_kernels(triton_dot.FUSED_MAX_N + 1)


@pytest.mark.parametrize("mechanism", MECHANISMS)
@pytest.mark.parametrize("n", [7, 50])
def test_tiled_path_at_short_lengths(tiled_only, mechanism, n):
    tensors, weights, mask, grad = make_case(mechanism, n, 16, batch=4, per_head=mechanism == "add", seed=n + 1)
    assert_matches_reference(mechanism, tensors, weights, mask, grad)


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_fused_windows_every_length_class(mechanism):
    """The fused kernels pick a window of 16, 32 or 64 trailing positions from each sequence's length:
    lengths on both sides of every boundary, plus 0 and 1, in one batch."""
    n = 64
    tensors, weights, _, grad = make_case(mechanism, n, 16, batch=8, heads=1, padded=False, seed=21)
    mask = left_padding_mask([64, 0, 1, 16, 17, 32, 33, 63], n).to(DEVICE)
    assert_matches_reference(mechanism, tensors, weights, mask, grad)


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_fused_forward_saves_no_square_tensors(mechanism):
    """The fused path recomputes A, T, B and P in the backward: nothing (B, H, n, n) is kept alive."""
    n = 24
    tensors, weights, mask, _ = make_case(mechanism, n, 16, batch=3, seed=6)
    leaves = {k: t.clone().requires_grad_(True) for k, t in {**tensors, **weights}.items()}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        triton_dot.dot_refined(
            leaves["q"],
            leaves["k"],
            leaves["v"],
            mechanism=mechanism,
            key_padding_mask=mask,
            **{k: leaves[k] for k in weights},
        )
    assert saved, "nothing saved: the hook did not see the autograd function"
    assert all(tuple(shape[-2:]) != (n, n) or len(shape) < 4 for shape in saved), saved


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_fused_and_tiled_paths_draw_the_same_dropout(mechanism, monkeypatch):
    """Both paths key Philox by (batch*head, i, j): the same seed gives the same output and gradients."""
    tensors, weights, mask, grad = make_case(mechanism, 29, 16, batch=3, seed=12)

    def dropped():
        torch.manual_seed(77)
        return run(triton_dot.dot_refined, tensors, weights, mask, grad, mechanism=mechanism, dropout_p=0.3)

    fused = dropped()
    monkeypatch.setattr(triton_dot, "FUSED_MAX_N", 0)
    tiled = dropped()
    for name in fused:
        torch.testing.assert_close(fused[name], tiled[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("mechanism", ["simp", "add", "value"])
@pytest.mark.parametrize("n", [20, 70])
def test_rectangular_projections(mechanism, n):
    """W_RQ, W_RK of shape (n, r), r != n (a window of a longer model's matrices): M = W_RQ W_RK^T is
    still (n, n), on the fused (n=20) and the tiled (n=70) path."""
    tensors, weights, mask, grad = make_case(mechanism, n, 16, batch=3, seed=n + 3)
    g = torch.Generator().manual_seed(n)
    r = n + 9
    for name in ("w_rq", "w_rk"):
        weights[name] = (torch.randn(n, r, generator=g) * math.sqrt(2.0 / (2 * r)) * 4).to(DEVICE)
    assert_matches_reference(mechanism, tensors, weights, mask, grad)


def test_fused_max_n_env_is_validated(monkeypatch):
    monkeypatch.setenv("AWR_FAST_TRITON_FUSED_MAX_N", "lots")
    with pytest.raises(ValueError, match="AWR_FAST_TRITON_FUSED_MAX_N"):
        triton_dot._fused_max_n_from_env()
    monkeypatch.setenv("AWR_FAST_TRITON_FUSED_MAX_N", "0")
    assert triton_dot._fused_max_n_from_env() == 0


# ---- dropout: same Philox mask in forward and backward ------------------------------------------------


def recover_dropped_weights(mechanism, tensors, weights, mask, p, seed):
    """With V = identity (d_h >= n) the output *is* the dropped weight matrix."""
    n = tensors["q"].shape[2]
    eye_v = torch.zeros_like(tensors["v"])
    eye_v[..., :n] = torch.eye(n, device=eye_v.device)
    torch.manual_seed(seed)
    return triton_dot.dot_refined(
        tensors["q"], tensors["k"], eye_v, mechanism=mechanism, key_padding_mask=mask, dropout_p=p, **weights
    )[..., :n]


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_dropout_forward_and_backward_share_one_mask(mechanism):
    p, seed = 0.25, 1234
    tensors, weights, mask, grad = make_case(mechanism, 13, 16, batch=3, seed=8)
    dropped = recover_dropped_weights(mechanism, tensors, weights, mask, p, seed).double()
    _, ref_w = reference(
        *(tensors[k].double() for k in "qkv"),
        mechanism=mechanism,
        key_padding_mask=mask,
        return_weights=True,
        **{k: w.double() for k, w in weights.items()},
    )
    probs = ref_w["P"]
    keep = dropped != 0
    # kept entries are P / (1 - p), dropped ones 0, and about p of the visible entries are dropped
    torch.testing.assert_close(dropped[keep], probs[keep] / (1 - p), rtol=1e-4, atol=1e-6)
    visible = probs > 0
    assert 0.1 < 1 - keep[visible].float().mean().item() < 0.4

    # the float64 reference with that mask: values and gradients of the kernel must match it
    zmask = (keep | ~visible).double() / (1 - p)

    def masked_reference(q, k, v, key_padding_mask=None, **w):
        _, rw = reference(q, k, v, mechanism=mechanism, key_padding_mask=mask, return_weights=True, **w)
        out = (rw["P"] * zmask) @ v
        return out.masked_fill(mask[:, None, :, None], 0.0) if mask is not None else out

    torch.manual_seed(seed)
    ours = run(triton_dot.dot_refined, tensors, weights, mask, grad, mechanism=mechanism, dropout_p=p)
    as64 = lambda d: {k: t.double() for k, t in d.items()}  # noqa: E731
    exact = run(masked_reference, as64(tensors), as64(weights), mask, grad.double())
    for name, truth in exact.items():
        torch.testing.assert_close(ours[name].double(), truth, rtol=2e-4, atol=2e-5, msg=name)


def test_dropout_differs_between_calls():
    tensors, weights, mask, _ = make_case("simp", 13, 16, batch=2, seed=8)
    a = triton_dot.dot_refined(**tensors, mechanism="simp", key_padding_mask=mask, dropout_p=0.5, **weights)
    b = triton_dot.dot_refined(**tensors, mechanism="simp", key_padding_mask=mask, dropout_p=0.5, **weights)
    assert not torch.equal(a, b)


# ---- hypothesis sweep -------------------------------------------------------------------------------

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies


@hypothesis.given(
    mechanism=st.sampled_from(MECHANISMS),
    batch=st.integers(1, 3),
    heads=st.integers(1, 3),
    n=st.integers(1, 80),
    d_h=st.sampled_from([16, 24, 32, 50, 64]),
    per_head=st.booleans(),
    padded=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_hypothesis_sweep(mechanism, batch, heads, n, d_h, per_head, padded, seed):
    tensors, weights, mask, grad = make_case(
        mechanism, n, d_h, batch=batch, heads=heads, per_head=per_head and mechanism != "none", padded=padded, seed=seed
    )
    assert_matches_reference(mechanism, tensors, weights, mask, grad)


# ---- dispatch, custom ops, torch.compile ------------------------------------------------------------


def test_public_api_selects_triton():
    tensors, weights, mask, _ = make_case("simp", 13, 16, seed=1)
    via_api = awr_fast.refined_attention(
        **tensors, mechanism="simp", key_padding_mask=mask, backend="triton", **weights
    )
    direct = triton_dot.dot_refined(**tensors, mechanism="simp", key_padding_mask=mask, **weights)
    assert torch.equal(via_api, direct)


@pytest.mark.parametrize(
    "case,match",
    [
        ("value_literal", "literal M_value is not causal"),
        ("float64", "dtype torch.float64 is not supported"),
        ("long", "n=300 exceeds this backend's limit of 256"),
    ],
)
def test_triton_backend_explains_refusals(case, match):
    mechanism, n, dtype = {
        "value_literal": ("value_literal", 7, torch.float32),
        "float64": ("simp", 7, torch.float64),
        "long": ("none", 300, torch.float32),
    }[case]
    tensors, weights, mask, _ = make_case(
        "value" if mechanism == "value_literal" else mechanism, n, 16, batch=1, heads=1, dtype=dtype, padded=False
    )
    with pytest.raises(awr_fast.UnsupportedInputError, match=match):
        awr_fast.refined_attention(**tensors, mechanism=mechanism, backend="triton", **weights)


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_opcheck(mechanism):
    tensors, weights, mask, grad = make_case(mechanism, 11, 16, batch=2, seed=9)
    w_rq, w_rk = (
        None if weights.get(name) is None else weights[name].requires_grad_(True) for name in ("w_rq", "w_rk")
    )
    w_rv = weights.get("w_rv")
    args = (
        tensors["q"].requires_grad_(True),
        tensors["k"].requires_grad_(True),
        tensors["v"].requires_grad_(True),
        w_rq,
        w_rk,
        None if w_rv is None else w_rv.requires_grad_(True),
        mask,
        torch.zeros(1, dtype=torch.int64, device=DEVICE),
        mechanism,
        0.25,
        0.25,
        False,
        0.0,
    )
    torch.library.opcheck(torch.ops.awr_fast.dot_refined_fwd.default, args)


def test_torch_compile_fullgraph_no_graph_break():
    from awr_fast.nn.dot import RefinedMultiheadAttention

    torch.manual_seed(0)
    layer = RefinedMultiheadAttention(32, 2, 12, "simp", backend="triton").to(DEVICE)
    x = torch.randn(3, 12, 32, device=DEVICE, requires_grad=True)
    mask = left_padding_mask([12, 5, 0], 12).to(DEVICE)
    eager = layer(x, key_padding_mask=mask)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    out = compiled(x, key_padding_mask=mask)
    torch.testing.assert_close(out, eager)
    out.sum().backward()
    assert layer.w_rq.grad is not None and torch.isfinite(layer.w_rq.grad).all()


# ---- GPU: the grid natively in half precision (skips without CUDA) ---------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("mechanism,n,d_h,per_head", grid_cases())
def test_grid_gpu_dtypes(dtype, mechanism, n, d_h, per_head):
    tensors, weights, mask, grad = make_case(
        mechanism, n, d_h, batch=8, heads=2, per_head=per_head, dtype=dtype, seed=n + d_h
    )
    assert_matches_reference(mechanism, tensors, weights, mask, grad)
