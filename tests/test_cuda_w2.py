"""CUDA backend of w2_refined (csrc/w2_refined/, STOSA's Wasserstein attention) against the float64 reference.

As tests/test_cuda_dot.py: without a GPU the ops run their kernels' block code on the host
(AWR_FAST_CUDA_EMULATE=1), so these check the kernels' arithmetic in CI; float64 must match the reference
to rounding. Every mechanism, M_stoc included.
"""

import pytest
import torch

import awr_fast
from awr_fast.backends import UnsupportedInputError
from awr_fast.ops.w2_refined import CUDA_MAX_N, MECHANISMS, TENSORS, default_scale
from awr_fast.reference.w2_refined import w2_refined as reference
from awr_fast.testing import WEIGHT_KINDS, assert_matches_oracle, grid, make_case

_ext = pytest.importorskip("awr_fast._ext")
if _ext.load_cuda_extension()[0] is None:
    pytest.skip(f"CUDA extension not built: {_ext.load_cuda_extension()[1]}", allow_module_level=True)

from awr_fast.cuda import emulate  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
if not ON_GPU and not emulate():
    pytest.skip("no GPU and AWR_FAST_CUDA_EMULATE is off", allow_module_level=True)

FWD = torch.ops.awr_fast.w2_refined_cuda_fwd
WEIGHT_NAMES = ("w_rq", "w_rk", "w_rv", "w_mu", "w_sigma")


def case_id(kw: dict) -> str:
    return "-".join(map(str, kw.values()))


def call_op(case, *, dropout_p=0.0, seed=None):
    """((mu_out, sig_out), grads by leaf name) of the raw op on a make_case Case."""
    leaves = {name: t.detach().clone().requires_grad_(True) for name, t in {**case.tensors, **case.weights}.items()}
    d_h = case.tensors["mu_q"].shape[-1]
    outs = FWD(
        *(leaves[name] for name in TENSORS),
        *(leaves.get(name) for name in WEIGHT_NAMES),
        case.options["key_padding_mask"],
        seed,
        case.mechanism,
        default_scale(d_h),
        default_scale(d_h),
        case.options["refine_input"] == "scores",
        dropout_p,
    )
    grads = torch.autograd.grad(outs, list(leaves.values()), case.grad_outputs)
    return tuple(o.detach() for o in outs), dict(zip(leaves, grads))


@pytest.mark.parametrize("kw", grid("w2_refined"), ids=case_id)
def test_float32_grid_matches_oracle(kw):
    assert_matches_oracle(make_case("w2_refined", **kw, dtype=torch.float32, device=DEVICE), "cuda")


@pytest.mark.parametrize("mechanism", MECHANISMS)
@pytest.mark.parametrize("n", (50, 64))
def test_long_windows_match_oracle(mechanism, n):
    """STOSA's head width 16 (d 64, 4 heads) at SASRec's n=50 and the kernels' limit."""
    case = make_case("w2_refined", mechanism, n=n, d_h=16, batch=3, padding="left", dtype=torch.float32)
    assert_matches_oracle(case.to(device=DEVICE), "cuda")


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_past_shared_memory_matches_oracle(mechanism):
    """n > 64 (on a GPU: global scratch instead of shared memory, the same block code)."""
    case = make_case("w2_refined", mechanism, n=200, d_h=8, batch=2, heads=1, padding="left", dtype=torch.float32)
    assert_matches_oracle(case.to(device=DEVICE), "cuda")


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
@pytest.mark.parametrize("kw", grid("w2_refined", small=True), ids=case_id)
def test_half_precision_matches_oracle(dtype, kw):
    assert_matches_oracle(make_case("w2_refined", **kw, dtype=dtype, device=DEVICE), "cuda")


@pytest.mark.skipif(ON_GPU, reason="float64 is the host emulation's")
@pytest.mark.parametrize("mechanism", MECHANISMS)
@pytest.mark.parametrize("weights", WEIGHT_KINDS)
@pytest.mark.parametrize("refine_input", ("probs", "scores"))
def test_float64_emulation_is_exact(mechanism, weights, refine_input):
    for n, padding in ((1, "none"), (9, "left"), (33, "arbitrary"), (64, "left_short"), (97, "left")):
        case = make_case(
            "w2_refined", mechanism, n=n, d_h=5, padding=padding, weights=weights, refine_input=refine_input
        )
        outs, grads = call_op(case)
        leaves = {name: t.detach().clone().requires_grad_(True) for name, t in {**case.tensors, **case.weights}.items()}
        expected = reference(
            *(leaves[name] for name in TENSORS),
            mechanism=mechanism,
            **{name: leaves[name] for name in case.weights},
            **case.options,
        )
        expected_grads = torch.autograd.grad(expected, list(leaves.values()), case.grad_outputs)
        for got, want in zip(outs, expected):
            torch.testing.assert_close(got, want.detach(), rtol=0, atol=1e-10)
        for name, g in zip(leaves, expected_grads):
            torch.testing.assert_close(grads[name], g, rtol=0, atol=1e-9, msg=lambda m, name=name: f"d{name}: {m}")


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_causal_no_position_sees_the_future(mechanism):
    n, t = 11, 5
    base = make_case("w2_refined", mechanism, n=n, d_h=4, padding="none", weights="per_head", batch=2)
    future = {name: x.clone() for name, x in base.tensors.items()}
    for name, x in future.items():
        noise = (
            torch.rand_like(x[:, :, t + 1 :]) + 0.5 if name.startswith("sig") else torch.randn_like(x[:, :, t + 1 :])
        )
        x[:, :, t + 1 :] = noise * 3
    grads = tuple(g.clone() for g in base.grad_outputs)
    for g in grads:
        g[:, :, t + 1 :] = 0
    first = type(base)(base.op, mechanism, base.tensors, base.weights, base.options, grads)
    second = type(base)(base.op, mechanism, future, base.weights, base.options, grads)
    (mu1, sig1), g1 = call_op(first)
    (mu2, sig2), g2 = call_op(second)
    assert (mu1[:, :, t + 1 :] - mu2[:, :, t + 1 :]).abs().max() > 1e-3  # the future did change
    torch.testing.assert_close(mu1[:, :, : t + 1], mu2[:, :, : t + 1], rtol=0, atol=1e-12)
    torch.testing.assert_close(sig1[:, :, : t + 1], sig2[:, :, : t + 1], rtol=0, atol=1e-12)
    for name in TENSORS:
        torch.testing.assert_close(g1[name][:, :, : t + 1], g2[name][:, :, : t + 1], rtol=0, atol=1e-12)


@pytest.mark.skipif(ON_GPU, reason="float64 gradcheck runs on the host emulation")
@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_dropout_backward_uses_the_forward_mask(mechanism):
    """gradcheck with dropout and a fixed seed: the backward's mask is the forward's (both outputs)."""
    case = make_case("w2_refined", mechanism, n=5, d_h=3, batch=2, padding="left", weights="mixed")
    seed = torch.tensor([11], dtype=torch.int64)
    names = list(case.tensors) + list(case.weights)
    values = [t.clone().requires_grad_(True) for t in (*case.tensors.values(), *case.weights.values())]

    def fn(*xs):
        named = dict(zip(names, xs))
        return FWD(
            *(named[name] for name in TENSORS),
            *(named.get(name) for name in WEIGHT_NAMES),
            case.options["key_padding_mask"],
            seed,
            mechanism,
            0.5,
            0.5,
            False,
            0.4,
        )

    assert torch.autograd.gradcheck(fn, values, eps=1e-6, atol=1e-6)


def test_compiled_fullgraph_matches_eager():
    case = make_case("w2_refined", "stoc", n=9, d_h=4, padding="left", dtype=torch.float32, device=DEVICE)

    def fn(*xs):
        named = dict(zip([*case.tensors, *case.weights], xs))
        return awr_fast.wasserstein_attention(
            *(named[name] for name in TENSORS),
            mechanism="stoc",
            w_mu=named["w_mu"],
            w_sigma=named["w_sigma"],
            **case.options,
            backend="cuda",
        )

    leaves = [t.clone().requires_grad_(True) for t in (*case.tensors.values(), *case.weights.values())]
    outs = torch.compile(fn, fullgraph=True, backend="aot_eager")(*leaves)
    grads = torch.autograd.grad(outs, leaves, case.grad_outputs)
    leaves2 = [t.detach().clone().requires_grad_(True) for t in leaves]
    outs2 = fn(*leaves2)
    grads2 = torch.autograd.grad(outs2, leaves2, case.grad_outputs)
    for a, b in zip((*outs, *grads), (*outs2, *grads2)):
        torch.testing.assert_close(a, b)


def test_refusals_and_errors_name_the_argument():
    long = make_case("w2_refined", "simp", n=CUDA_MAX_N + 1, d_h=4, dtype=torch.float32, device=DEVICE)
    with pytest.raises(UnsupportedInputError, match=f"n={CUDA_MAX_N + 1} exceeds"):
        awr_fast.wasserstein_attention(*long.tensors.values(), mechanism="simp", **long.weights, backend="cuda")
    case = make_case("w2_refined", "stoc", n=6, d_h=4, dtype=torch.float32, device=DEVICE)
    wide = {name: torch.randn(6, CUDA_MAX_N + 1, device=DEVICE) for name in ("w_mu", "w_sigma")}
    with pytest.raises(UnsupportedInputError, match=f"w_mu has {CUDA_MAX_N + 1} columns"):
        awr_fast.wasserstein_attention(*case.tensors.values(), mechanism="stoc", **wide, backend="cuda")
    tensors = list(case.tensors.values())
    weights = [case.weights.get(name) for name in WEIGHT_NAMES]
    options = ["stoc", 0.5, 0.5, False, 0.0]
    with pytest.raises(RuntimeError, match="sig_k must have the shape of mu_q"):
        FWD(*tensors[:3], tensors[3][..., :2], *tensors[4:], *weights, None, None, *options)
    with pytest.raises(RuntimeError, match="mechanism needs w_sigma"):
        FWD(*tensors, *weights[:4], None, None, None, *options)
    with pytest.raises(RuntimeError, match="w_rq and w_rk are not used by mechanism 'stoc'"):
        FWD(*tensors, tensors[0][0, 0], *weights[1:], None, None, *options)
