"""The Triton calibrated family (kernels/calibrated.py): its forward against the float64 reference
(both calibrators, every AWRSR refinement of P_fin, shared and per-head weights, every window size, odd n,
padding and fully padded rows, fp32/bf16/fp16), causality, and what its capability row refuses. The
backward and dropout: tests/test_triton_calibrated_backward.py.

On CPU these run under TRITON_INTERPRET=1 (tests/conftest.py); the shared backend grid of
tests/test_backends.py also runs the row on the spatial and adversarial cases."""

import pytest
import torch

import awr_fast
from awr_fast import backends, testing
from awr_fast.kernels import _common
from awr_fast.kernels import calibrated as triton_cal
from awr_fast.ops.calibrated import REFINE_WEIGHTS

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _case(n, lengths, *, adversarial=True, refine="none", per_head=False, d_h=16, seed=0):
    """Inputs of one call in float64 (nothing zero); refinement weights of xavier-like scale x 4."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    batch, heads = len(lengths), 2
    shape = (batch, heads, n, d_h)
    kwargs = {name: randn(*shape) for name in ("q", "k", "v")}
    kwargs.update(w_oq=randn(d_h), w_ok=randn(d_h), w_dq=randn(d_h, scale=0.3), w_dk=randn(d_h, scale=0.3))
    kwargs.update(b_o=randn(()), b_d=randn(()), dist_scale=randn(()))
    if adversarial:
        kwargs.update(q_adv=randn(*shape), k_adv=randn(*shape), gate_logits=randn(batch, n, n))
        kwargs["noise"] = randn(batch, heads, n, n)
    if refine != "none":
        w_shape = (heads, n, n) if per_head else (n, n)
        kwargs.update({name: randn(*w_shape, scale=4.0 / (2 * n) ** 0.5) for name in REFINE_WEIGHTS[refine]})
        kwargs["refine"] = refine
    kwargs["key_padding_mask"] = testing.left_padding_mask(lengths, n)
    return kwargs


def _call(kwargs, dtype, backend):
    moved = {
        k: v.to(device=DEVICE, dtype=dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
        for k, v in kwargs.items()
    }
    moved["key_padding_mask"] = moved["key_padding_mask"].to(DEVICE)
    q, k, v = (moved.pop(name) for name in ("q", "k", "v"))
    with torch.no_grad():
        return [t for t in awr_fast.calibrated_attention(q, k, v, **moved, backend=backend) if t is not None]


def _assert_matches(kwargs, dtype=torch.float32):
    """The testing module's tolerance rule: within 2x the same-dtype reference's error plus a floor."""
    exact = _call(kwargs, torch.float64, "reference")
    same = _call(kwargs, dtype, "reference")
    ours = _call(kwargs, dtype, "triton")
    assert len(ours) == len(exact)
    for i, (got, truth, ref) in enumerate(zip(ours, exact, same)):
        assert torch.isfinite(got).all(), i
        err = (got.double().cpu() - truth.cpu()).abs().max().item()
        ref_err = (ref.double().cpu() - truth.cpu()).abs().max().item()
        bound = 2.0 * ref_err + testing.FLOOR[dtype] * max(1.0, truth.abs().max().item())
        assert err <= bound, f"output {i}: error {err:.3e} > bound {bound:.3e} (reference in {dtype}: {ref_err:.3e})"


# window 16, 32 and the padded n (64) all run: lengths around each boundary, a fully padded row, odd n
SHAPES = [(7, [7, 3, 0]), (37, [37, 17, 1]), (50, [50, 33, 16, 0]), (64, [64, 31, 2])]


@pytest.mark.parametrize("adversarial", [True, False])
@pytest.mark.parametrize("n,lengths", SHAPES, ids=[f"n{n}" for n, _ in SHAPES])
def test_matches_reference(adversarial, n, lengths):
    _assert_matches(_case(n, lengths, adversarial=adversarial))


@pytest.mark.parametrize("refine", ["simp", "add", "value"])
@pytest.mark.parametrize("per_head", [False, True])
def test_refinement_matches_reference(refine, per_head):
    _assert_matches(_case(50, [50, 20, 9], refine=refine, per_head=per_head, seed=1))
    _assert_matches(_case(13, [13, 5], adversarial=False, refine=refine, per_head=per_head, seed=2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("staged", [True, False], ids=["staged", "registers"])
@pytest.mark.parametrize("refine", ["none", "simp", "add", "value"])
def test_both_window_paths_match_reference(refine, staged, dtype, monkeypatch):
    """The fused forward's two ways of holding its (n, n) tiles (kernels/_common.py's _stages_forward with
    extra_live_tiles: staged through scratch slots for fp32 and for refined half inputs before Hopper,
    in registers elsewhere), each forced: every window (lengths 50, 33, 16 and a fully padded row), both
    calibrators, every refinement of P_fin."""
    monkeypatch.setattr(_common, "STAGED_FORWARD", staged)
    seed = 5 + ["none", "simp", "add", "value"].index(refine)
    _assert_matches(_case(50, [50, 33, 16, 0], refine=refine, seed=seed), dtype)
    _assert_matches(_case(29, [29, 9], adversarial=False, refine=refine, per_head=True, seed=seed), dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_matches_reference(dtype):
    _assert_matches(_case(37, [37, 12, 0], refine="simp", seed=3), dtype)


def test_outputs_of_padding_are_zero_and_the_mask_is_the_reference_mask():
    kwargs = _case(40, [40, 6, 0], seed=4)
    out_cal, out_att, perturb = _call(kwargs, torch.float32, "triton")
    pad = kwargs["key_padding_mask"].to(DEVICE)
    for out in (out_cal, out_att):
        assert (out[pad[:, None, :].expand(out.shape[:3])] == 0).all()
    ref = _call(kwargs, torch.float64, "reference")[2]
    torch.testing.assert_close(perturb.double().cpu(), ref.cpu(), rtol=1e-5, atol=1e-6)  # zeros outside too
    assert perturb[1, :, :34].abs().max() == 0 and perturb[1, :, 34:].abs().max() > 0


def test_causal():
    kwargs = _case(50, [50, 41], refine="value", seed=5)
    base = _call(kwargs, torch.float32, "triton")
    t = 20
    changed = dict(kwargs)
    g = torch.Generator().manual_seed(8)
    for name in ("q", "k", "v", "q_adv", "k_adv"):
        x = kwargs[name].clone()
        x[..., t + 1 :, :] = torch.randn(x[..., t + 1 :, :].shape, generator=g, dtype=x.dtype)
        changed[name] = x
    out = _call(changed, torch.float32, "triton")
    for a, b in zip(out[:2], base[:2]):
        torch.testing.assert_close(a[..., : t + 1, :], b[..., : t + 1, :], rtol=0, atol=0)
        assert (a[..., t + 1 :, :] - b[..., t + 1 :, :]).abs().max() > 1e-3


def test_row_refuses_what_it_lacks():
    """n <= 256 and the kernel dtypes: "auto" sends longer sequences and float64 to the reference, and
    naming the backend says why; training and dropout, refined or not, it takes."""
    kwargs = _case(7, [7, 3], refine="simp")
    q, k, v = (kwargs.pop(name).requires_grad_(True) for name in ("q", "k", "v"))
    with pytest.raises(Exception, match="dtype torch.float64 is not supported"):
        awr_fast.calibrated_attention(q, k, v, **kwargs, backend="triton")
    rest = {key: t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for key, t in kwargs.items()}
    inputs = awr_fast.ops.calibrated.make_inputs(q.float(), k.float(), v.float(), **rest, dropout_p=0.1)
    assert inputs.requires_grad()
    assert backends.capabilities("calibrated")["triton"].table_reasons(inputs) == []
    long = _case(257, [257], d_h=4)
    q2, k2, v2 = (long.pop(name).float() for name in ("q", "k", "v"))
    rest2 = {key: value.float() if value.is_floating_point() else value for key, value in long.items()}
    inputs = awr_fast.ops.calibrated.make_inputs(q2, k2, v2, **rest2)
    assert any("n=257" in r for r in backends.capabilities("calibrated")["triton"].table_reasons(inputs))


def test_torch_compile_fullgraph_no_graph_break():
    """Evaluation of AC-SASRec's calibrated layer on the Triton backend traces without a graph break."""
    from awr_fast.nn.calibrated import CalibratedAttention

    torch.manual_seed(0)
    layer = CalibratedAttention(16, 2, 10, refine="simp", backend="triton").to(DEVICE).eval()
    x = torch.randn(3, 10, 16, device=DEVICE)
    mask = testing.left_padding_mask([10, 4, 0], 10).to(DEVICE)
    noise = torch.randn(3, 2, 10, 10, device=DEVICE)
    with torch.no_grad():
        eager = layer(x, mask, noise=noise)
        compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")(x, mask, noise=noise)
        reference = CalibratedAttention(16, 2, 10, refine="simp").to(DEVICE).eval()
        reference.load_state_dict(layer.state_dict())
        expected = reference(x, mask, noise=noise)
    for a, b, c in zip(compiled, eager, expected):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-4)


# ---- the row-block path (n > FUSED_MAX_N; rows_only forces it at any n) --------------------------------


@pytest.fixture
def rows_only(monkeypatch):
    monkeypatch.setattr(triton_cal, "FUSED_MAX_N", 0)


ROW_SHAPES = [(97, [97, 40, 0]), (200, [200, 77, 1]), (256, [256, 130])]


@pytest.mark.parametrize("adversarial", [True, False])
@pytest.mark.parametrize("n,lengths", ROW_SHAPES, ids=[f"n{n}" for n, _ in ROW_SHAPES])
def test_row_blocks_match_reference(adversarial, n, lengths):
    """Past the fused limit: several 16-row blocks and 32-key blocks, a fully padded row, n = 256."""
    _assert_matches(_case(n, lengths, adversarial=adversarial, d_h=8, seed=n))


@pytest.mark.parametrize("refine", ["simp", "add", "value"])
def test_row_blocks_with_refinement(refine):
    """P_fin written out and refined by the dot family's tiled core (shared and per-head weights)."""
    _assert_matches(_case(97, [97, 30, 0], refine=refine, d_h=8, seed=6))
    _assert_matches(_case(70, [70, 9], adversarial=False, refine=refine, per_head=True, d_h=8, seed=7))


@pytest.mark.parametrize("n,lengths", SHAPES, ids=[f"n{n}" for n, _ in SHAPES])
def test_row_blocks_forced_at_short_lengths(rows_only, n, lengths):
    _assert_matches(_case(n, lengths, refine="simp" if n % 2 else "none", seed=n))


def test_row_blocks_half_precision_and_padding_zero(rows_only):
    _assert_matches(_case(37, [37, 12, 0], refine="value", seed=3), torch.bfloat16)
    kwargs = _case(40, [40, 6, 0], seed=4)
    out_cal, out_att, perturb = _call(kwargs, torch.float32, "triton")
    pad = kwargs["key_padding_mask"].to(DEVICE)
    for out in (out_cal, out_att):
        assert (out[pad[:, None, :].expand(out.shape[:3])] == 0).all()
    ref = _call(kwargs, torch.float64, "reference")[2]
    torch.testing.assert_close(perturb.double().cpu(), ref.cpu(), rtol=1e-5, atol=1e-6)  # zeros outside too


def test_row_blocks_causal():
    """Changing every input at positions > t moves no output at positions <= t (n = 97, refined)."""
    kwargs = _case(97, [97, 80], refine="simp", d_h=8, seed=9)
    base = _call(kwargs, torch.float32, "triton")
    t = 45
    changed = dict(kwargs)
    g = torch.Generator().manual_seed(8)
    for name in ("q", "k", "v", "q_adv", "k_adv"):
        x = kwargs[name].clone()
        x[..., t + 1 :, :] = torch.randn(x[..., t + 1 :, :].shape, generator=g, dtype=x.dtype)
        changed[name] = x
    out = _call(changed, torch.float32, "triton")
    for a, b in zip(out[:2], base[:2]):
        torch.testing.assert_close(a[..., : t + 1, :], b[..., : t + 1, :], rtol=0, atol=0)
        assert (a[..., t + 1 :, :] - b[..., t + 1 :, :]).abs().max() > 1e-3
