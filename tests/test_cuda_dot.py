"""CUDA backend of dot_refined (csrc/dot_refined/) against the float64 reference: values and every gradient.

Without a GPU the ops run their kernels' block code on the host (AWR_FAST_CUDA_EMULATE=1, tests/conftest.py):
the same source as the GPU kernel, phase by phase, so these tests check the kernels' arithmetic, masking,
windows and dropout stream in CI. float64 inputs run the emulation in float64, which must match the
reference to rounding. With a GPU the same grid runs on the device, plus a comparison with Triton.
Tolerance: the shared rule of awr_fast.testing (2x the reference's own error in that dtype plus a floor).
"""

import pytest
import torch

import awr_fast
from awr_fast.backends import UnsupportedInputError, capabilities
from awr_fast.ops.dot_refined import CAUSAL_MECHANISMS, CUDA_MAX_N, default_scale
from awr_fast.reference.dot_refined import dot_refined as reference
from awr_fast.testing import PADDINGS, WEIGHT_KINDS, assert_matches_oracle, grid, make_case

_ext = pytest.importorskip("awr_fast._ext")
if _ext.load_cuda_extension()[0] is None:
    pytest.skip(f"CUDA extension not built: {_ext.load_cuda_extension()[1]}", allow_module_level=True)

from awr_fast.cuda import emulate  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
if not ON_GPU and not emulate():
    pytest.skip("no GPU and AWR_FAST_CUDA_EMULATE is off", allow_module_level=True)

FWD = torch.ops.awr_fast.dot_refined_cuda_fwd
BWD = torch.ops.awr_fast.dot_refined_cuda_bwd
gpu_only = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")


def case_id(kw: dict) -> str:
    return "-".join(map(str, kw.values()))


def call_op(case, *, dropout_p=0.0, seed=None, mechanism=None):
    """(out, grads by leaf name) of the raw op on a make_case Case (autograd through the registered rule)."""
    mechanism = case.mechanism if mechanism is None else mechanism
    leaves = {name: t.detach().clone().requires_grad_(True) for name, t in {**case.tensors, **case.weights}.items()}
    d_h = case.tensors["q"].shape[-1]
    out = FWD(
        leaves["q"],
        leaves["k"],
        leaves["v"],
        leaves.get("w_rq"),
        leaves.get("w_rk"),
        leaves.get("w_rv"),
        case.options["key_padding_mask"],
        seed,
        mechanism,
        default_scale(d_h),
        default_scale(d_h),
        case.options["refine_input"] == "scores",
        dropout_p,
    )
    grads = torch.autograd.grad(out, list(leaves.values()), case.grad_outputs[0])
    return out.detach(), dict(zip(leaves, grads))


# ------------------------------------------------------------------------------------ against the oracle


@pytest.mark.parametrize("kw", grid("dot_refined", CAUSAL_MECHANISMS), ids=case_id)
def test_float32_grid_matches_oracle(kw):
    """The shared grid (every mechanism, n 1/7/37, every padding kind, weight kind and refine input)."""
    assert_matches_oracle(make_case("dot_refined", **kw, dtype=torch.float32, device=DEVICE), "cuda")


@pytest.mark.parametrize("mechanism", CAUSAL_MECHANISMS)
@pytest.mark.parametrize("n", (50, 63, 64))
@pytest.mark.parametrize("padding", ("left", "arbitrary"))
def test_long_windows_match_oracle(mechanism, n, padding):
    """SASRec's n=50 and the kernels' limit, with a head width of 64 (the model's d_h)."""
    case = make_case("dot_refined", mechanism, n=n, d_h=64, batch=3, padding=padding, dtype=torch.float32)
    assert_matches_oracle(case.to(device=DEVICE), "cuda")


@pytest.mark.parametrize("mechanism", CAUSAL_MECHANISMS)
def test_past_shared_memory_matches_oracle(mechanism):
    """n > 64: on a GPU the blocks keep their matrices in global scratch instead of shared memory (the
    same block code); n = 200 is the longest Beauty/ML-1M setting, 256 the limit."""
    for n, padding in ((200, "left"), (256, "arbitrary")):
        case = make_case("dot_refined", mechanism, n=n, d_h=8, batch=2, heads=1, padding=padding, dtype=torch.float32)
        assert_matches_oracle(case.to(device=DEVICE), "cuda")


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
@pytest.mark.parametrize(
    "kw", grid("dot_refined", CAUSAL_MECHANISMS, small=True), ids=lambda kw: "-".join(map(str, kw.values()))
)
def test_half_precision_matches_oracle(dtype, kw):
    assert_matches_oracle(make_case("dot_refined", **kw, dtype=dtype, device=DEVICE), "cuda")


@pytest.mark.skipif(ON_GPU, reason="float64 is the host emulation's")
@pytest.mark.parametrize("mechanism", CAUSAL_MECHANISMS)
@pytest.mark.parametrize("weights", WEIGHT_KINDS)
@pytest.mark.parametrize("refine_input", ("probs", "scores"))
def test_float64_emulation_is_exact(mechanism, weights, refine_input):
    """In float64 the block code must equal the reference to rounding: any slip in an index, a window or
    a mask shows as an error far above 1e-10."""
    for n, padding in ((1, "none"), (9, "left"), (33, "arbitrary"), (64, "left_short"), (97, "left")):
        case = make_case(
            "dot_refined", mechanism, n=n, d_h=5, padding=padding, weights=weights, refine_input=refine_input
        )
        out, grads = call_op(case)
        leaves = {name: t.detach().clone().requires_grad_(True) for name, t in {**case.tensors, **case.weights}.items()}
        expected = reference(
            leaves["q"],
            leaves["k"],
            leaves["v"],
            mechanism=mechanism,
            **{name: leaves[name] for name in case.weights},
            **case.options,
        )
        expected_grads = torch.autograd.grad(expected, list(leaves.values()), case.grad_outputs[0])
        torch.testing.assert_close(out, expected.detach(), rtol=0, atol=1e-10)
        for name, g in zip(leaves, expected_grads):
            torch.testing.assert_close(grads[name], g, rtol=0, atol=1e-9, msg=lambda m, name=name: f"d{name}: {m}")


def test_fully_padded_rows_are_zero_with_zero_gradients():
    case = make_case("dot_refined", "value", n=12, d_h=4, padding="left", dtype=torch.float32)
    mask = case.options["key_padding_mask"]
    out, grads = call_op(case)
    assert torch.isfinite(out).all()
    assert (out[mask[:, None, :, None].expand_as(out)] == 0).all()
    for name in ("q", "k", "v"):
        assert (grads[name][mask[:, None, :, None].expand_as(out)] == 0).all(), name
        assert torch.isfinite(grads[name]).all()
    assert mask[1].all() and (out[1] == 0).all()  # the fully padded sequence of make_case's "left" kind


@pytest.mark.parametrize("mechanism", CAUSAL_MECHANISMS)
def test_causal_no_position_sees_the_future(mechanism):
    """Changing q, k, v at positions after t changes no output at t or before, nor the gradient that a
    loss on those outputs sends to positions up to t."""
    n, t = 11, 5
    base = make_case("dot_refined", mechanism, n=n, d_h=4, padding="none", weights="per_head", batch=2)
    future = {name: x.clone() for name, x in base.tensors.items()}
    for x in future.values():
        x[:, :, t + 1 :] = torch.randn_like(x[:, :, t + 1 :]) * 3
    grad = base.grad_outputs[0].clone()
    grad[:, :, t + 1 :] = 0
    first = type(base)(base.op, mechanism, base.tensors, base.weights, base.options, (grad,))
    second = type(base)(base.op, mechanism, future, base.weights, base.options, (grad,))
    out1, g1 = call_op(first)
    out2, g2 = call_op(second)
    assert (out1[:, :, t + 1 :] - out2[:, :, t + 1 :]).abs().max() > 1e-3  # the future did change
    torch.testing.assert_close(out1[:, :, : t + 1], out2[:, :, : t + 1], rtol=0, atol=1e-12)
    for name in ("q", "k", "v"):
        torch.testing.assert_close(g1[name][:, :, : t + 1], g2[name][:, :, : t + 1], rtol=0, atol=1e-12)


# -------------------------------------------------------------------------------------------- dropout


def test_dropout_mask_is_exact_and_drops_the_right_share():
    """With V = the identity (d_h = n) the output rows are the dropped weights themselves: every visible
    entry is either 0 or P / (1 - p), about a share p of them 0, and the same seed draws the same mask."""
    n, p = 24, 0.3
    case = make_case("dot_refined", "simp", n=n, d_h=n, batch=6, padding="left", dtype=torch.float32)
    eye = torch.eye(n).expand(6, 2, n, n).contiguous()
    case = type(case)(case.op, "simp", {**case.tensors, "v": eye}, case.weights, case.options, case.grad_outputs)
    seed = torch.tensor([1234], dtype=torch.int64)
    plain, _ = call_op(case)
    dropped, _ = call_op(case, dropout_p=p, seed=seed)
    again, _ = call_op(case, dropout_p=p, seed=seed)
    other, _ = call_op(case, dropout_p=p, seed=torch.tensor([99], dtype=torch.int64))
    assert torch.equal(dropped, again)
    assert not torch.equal(dropped, other)
    visible = plain > 0
    kept = dropped[visible] != 0
    torch.testing.assert_close(dropped[visible][kept], plain[visible][kept] / (1 - p), rtol=1e-5, atol=1e-7)
    assert (dropped[~visible] == 0).all()
    share = 1 - kept.float().mean().item()
    assert abs(share - p) < 0.03, share


@pytest.mark.skipif(ON_GPU, reason="float64 gradcheck runs on the host emulation")
@pytest.mark.parametrize("mechanism", CAUSAL_MECHANISMS)
def test_dropout_backward_uses_the_forward_mask(mechanism):
    """gradcheck of the op with dropout and a fixed seed: the backward's mask is the forward's."""
    case = make_case("dot_refined", mechanism, n=6, d_h=3, batch=2, padding="left", weights="mixed")
    seed = torch.tensor([7], dtype=torch.int64)
    names = list(case.tensors) + list(case.weights)
    values = [t.clone().requires_grad_(True) for t in (*case.tensors.values(), *case.weights.values())]

    def fn(*xs):
        named = dict(zip(names, xs))
        return FWD(
            named["q"],
            named["k"],
            named["v"],
            named.get("w_rq"),
            named.get("w_rk"),
            named.get("w_rv"),
            case.options["key_padding_mask"],
            seed,
            mechanism,
            0.5,
            0.5,
            False,
            0.4,
        )

    assert torch.autograd.gradcheck(fn, values, eps=1e-6, atol=1e-6)


def test_dropout_runs_through_the_api():
    case = make_case("dot_refined", "add", n=9, d_h=4, padding="left", dtype=torch.float32, device=DEVICE)
    q, k, v = (t.clone().requires_grad_(True) for t in case.tensors.values())
    out = awr_fast.refined_attention(
        q, k, v, mechanism="add", **case.weights, **case.options, dropout_p=0.5, backend="cuda"
    )
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0


# --------------------------------------------------------------------------------- compile, errors


def test_compiled_fullgraph_matches_eager():
    case = make_case("dot_refined", "value", n=10, d_h=4, padding="left", dtype=torch.float32, device=DEVICE)

    def fn(q, k, v, w_rq, w_rk, w_rv):
        out = awr_fast.refined_attention(
            q, k, v, mechanism="value", w_rq=w_rq, w_rk=w_rk, w_rv=w_rv, **case.options, backend="cuda"
        )
        return out

    leaves = [t.clone().requires_grad_(True) for t in (*case.tensors.values(), *case.weights.values())]
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out = compiled(*leaves)
    grads = torch.autograd.grad(out, leaves, case.grad_outputs[0])
    leaves2 = [t.detach().clone().requires_grad_(True) for t in leaves]
    out2 = fn(*leaves2)
    grads2 = torch.autograd.grad(out2, leaves2, case.grad_outputs[0])
    torch.testing.assert_close(out, out2)
    for g, g2 in zip(grads, grads2):
        torch.testing.assert_close(g, g2)


def test_capability_row_and_refusals():
    row = capabilities("dot_refined")["cuda"]
    assert row.max_n == CUDA_MAX_N and row.not_auto  # auto keeps Triton until a GPU run says otherwise
    long = make_case("dot_refined", "simp", n=CUDA_MAX_N + 1, d_h=4, dtype=torch.float32, device=DEVICE)
    with pytest.raises(UnsupportedInputError, match=f"n={CUDA_MAX_N + 1} exceeds"):
        awr_fast.refined_attention(*long.tensors.values(), mechanism="simp", **long.weights, backend="cuda")
    literal = make_case("dot_refined", "value_literal", n=5, d_h=4, dtype=torch.float32, device=DEVICE)
    with pytest.raises(UnsupportedInputError, match="not causal"):
        awr_fast.refined_attention(
            *literal.tensors.values(), mechanism="value_literal", **literal.weights, backend="cuda"
        )


def _raw_args(n=6, d=4, mechanism="simp", **over):
    q = torch.randn(2, 2, n, d, device=DEVICE)
    args = dict(
        q=q,
        k=torch.randn_like(q),
        v=torch.randn_like(q),
        w_rq=torch.randn(n, n, device=DEVICE),
        w_rk=torch.randn(n, n, device=DEVICE),
        w_rv=None,
        key_padding_mask=None,
        seed=None,
        mechanism=mechanism,
        scale=0.5,
        refine_scale=0.5,
        refine_scores=False,
        dropout_p=0.0,
    )
    args.update(over)
    return list(args.values())


@pytest.mark.parametrize(
    "over, message",
    [
        (dict(q=torch.randn(2, 2, 257, 4)), "n must be at most 256"),
        (dict(q=torch.randn(2, 6, 4)), r"q must be \(batch, heads, n, d_h\)"),
        (dict(k=torch.randn(2, 2, 6, 3)), "k must have the shape of q"),
        (dict(v=torch.randn(2, 2, 6, 4, dtype=torch.float64)), "v must have the dtype of q"),
        (dict(key_padding_mask=torch.zeros(2, 6)), "key_padding_mask must be bool"),
        (dict(key_padding_mask=torch.zeros(2, 5, dtype=torch.bool)), r"key_padding_mask must be \(batch, n\)"),
        (dict(mechanism="value_literal"), "value_literal is not causal"),
        (dict(mechanism="value"), "mechanism needs w_rv"),
        (dict(w_rq=None), "mechanism needs w_rq"),
        (dict(w_rk=torch.randn(6, 3)), "w_rk must have the columns of w_rq"),
        (dict(w_rq=torch.randn(5, 6)), "w_rq must have 6 rows"),
        (dict(dropout_p=0.2), "dropout_p > 0 needs seed"),
        (dict(dropout_p=1.0), r"dropout_p must be in \[0, 1\)"),
    ],
)
def test_bad_input_raises_a_python_error_naming_the_argument(over, message):
    over = {name: t.to(DEVICE) if isinstance(t, torch.Tensor) else t for name, t in over.items()}
    if "q" in over and over["q"].dim() == 4 and over["q"].shape[2] != 6:
        n = over["q"].shape[2]
        over.update(k=torch.randn_like(over["q"]), v=torch.randn_like(over["q"]))
        over.update(w_rq=torch.randn(n, n, device=DEVICE), w_rk=torch.randn(n, n, device=DEVICE))
    with pytest.raises(RuntimeError, match=message):
        FWD(*_raw_args(**over))


def test_smem_bytes_follow_the_buffer_count():
    """The shared memory the launcher asks for: n + buffers * n (n + 1) floats (the report reads this)."""
    smem = torch.ops.awr_fast.dot_refined_cuda_smem_bytes
    assert smem(50, "none", False) == 4 * (50 + 50 * 51)
    assert smem(64, "value", True) == 4 * (64 + 7 * 64 * 65)
    assert smem(64, "simp", True) == 4 * (64 + 5 * 64 * 65)


# ------------------------------------------------------------------------------------------- GPU only


@gpu_only
@pytest.mark.parametrize("mechanism", CAUSAL_MECHANISMS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("n", (50, 200))  # shared memory, global scratch
def test_gpu_cuda_agrees_with_triton(mechanism, dtype, n):
    pytest.importorskip("triton")
    case = make_case("dot_refined", mechanism, n=n, d_h=64, batch=8, padding="left", dtype=dtype, device="cuda")
    from awr_fast.testing import run

    ours, theirs = run(case, "cuda"), run(case, "triton")
    tol = 2e-4 if dtype == torch.float32 else 3e-2
    for name, value in theirs.items():
        torch.testing.assert_close(
            ours[name].float(), value.float(), rtol=tol, atol=tol, msg=lambda m, n=name: f"{n}: {m}"
        )


@gpu_only
@pytest.mark.parametrize("padding", PADDINGS)
def test_gpu_bf16_at_sasrec_shape(padding):
    for mechanism in CAUSAL_MECHANISMS:
        case = make_case("dot_refined", mechanism, n=50, d_h=32, batch=16, padding=padding, dtype=torch.bfloat16)
        assert_matches_oracle(case.to(device="cuda"), "cuda")
