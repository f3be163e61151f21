"""The fused kernels' two ways of holding their (n, n) tiles, for the dot and W2 families: staged through
scratch slots with every product summed over K-slices read back (_staged_refine_fwd / _bwd, the
_window_*_staged kernels) and in registers. The launchers pick one per direction, dtype, mechanism and
target (kernels/_common.py's _stages_forward, _stages_backward); here both run in fp32 and bf16, every
mechanism, against the float64 reference (outputs and every gradient), on the 64-position window (n = 50)
and the smaller ones (left padding with short lengths), with padded and fully padded rows. Under the
interpreter on the CPU."""

import pytest
import torch

from awr_fast import testing
from awr_fast.kernels import _common
from awr_fast.kernels import dot_refined as triton_dot
from awr_fast.kernels import w2_refined as triton_w2

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MECHANISMS = ("none", "simp", "add", "value")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@pytest.mark.parametrize("padding", ["left", "left_short"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("staged", [True, False], ids=["staged", "registers"])
@pytest.mark.parametrize("mechanism", MECHANISMS)
@pytest.mark.parametrize("op", ["dot_refined", "w2_refined"])
def test_both_paths_match_the_reference(op, mechanism, staged, dtype, padding, monkeypatch):
    monkeypatch.setattr(_common, "STAGED_FORWARD", staged)
    monkeypatch.setattr(_common, "STAGED_BACKWARD", staged)
    seed = MECHANISMS.index(mechanism) + 7 * (padding == "left")
    case = testing.make_case(op, mechanism, n=50, d_h=16, batch=3, heads=1, padding=padding, dtype=dtype, seed=seed)
    assert testing.oracle_errors(case.to(device=DEVICE), "triton") == []


@pytest.mark.parametrize("op", ["dot_refined", "w2_refined"])
def test_staged_kernels_with_dropout_draw_one_mask(op, monkeypatch):
    """With dropout the staged backward drops the same entries as the staged forward: the gradient of a
    linear function of the output equals a finite difference taken with the same seed."""
    monkeypatch.setattr(_common, "STAGED_FORWARD", True)
    monkeypatch.setattr(_common, "STAGED_BACKWARD", True)
    torch.manual_seed(3)
    n, d = 40, 8
    shape = (2, 1, n, d)
    if op == "dot_refined":
        inputs = [torch.randn(shape, dtype=torch.float32, device=DEVICE) for _ in range(3)]
    else:
        inputs = [
            torch.randn(shape, device=DEVICE) if i % 2 == 0 else torch.rand(shape, device=DEVICE) + 0.5
            for i in range(6)
        ]
    w_rq = (torch.randn(n, n, device=DEVICE) * 0.3).requires_grad_(True)
    w_rk = (torch.randn(n, n, device=DEVICE) * 0.3).requires_grad_(True)
    weights = dict(mechanism="simp", w_rq=w_rq, w_rk=w_rk, dropout_p=0.3)
    probe = torch.randn(shape, device=DEVICE)

    def loss(w):
        torch.manual_seed(11)  # the dropout seed is drawn from the global generator
        if op == "dot_refined":
            out = triton_dot.dot_refined(*inputs, **{**weights, "w_rq": w})
        else:
            out = triton_w2.w2_refined(*inputs, **{**weights, "w_rq": w})[0]
        return (out * probe).sum()

    loss(w_rq).backward()
    direction = torch.randn(n, n, device=DEVICE)
    eps = 1e-2
    with torch.no_grad():
        numeric = (loss(w_rq + eps * direction) - loss(w_rq - eps * direction)) / (2 * eps)
    analytic = (w_rq.grad * direction).sum()
    torch.testing.assert_close(analytic, numeric, rtol=2e-2, atol=2e-3)


def test_the_launchers_choice(monkeypatch):
    """The backward stages fp32 and "value" (and every refinement before Hopper); half precision without
    "value" keeps its tiles in registers on sm_90. The forward stages fp32 on pre-Hopper targets and with
    dropout. The families with more live tiles (extra_live_tiles) stage more. The overrides win. A staged
    backward sums its products over 16-wide K-slices for fp32 (tf32x3 operands), 32-wide for half inputs."""
    q = torch.zeros(1, 1, 50, 8)

    def staged(dtype, mechanism, forward=False):
        launch = _common._Launch(q.to(dtype), None, mechanism, 0.0)
        return _common._stages_forward(launch) if forward else _common._stages_backward(launch, mechanism)

    monkeypatch.setitem(_common._TARGET_ARCH, ("cpu", None), 90)
    assert staged(torch.float32, "simp") and staged(torch.float32, "none") and staged(torch.bfloat16, "value")
    assert not staged(torch.bfloat16, "simp") and not staged(torch.float16, "none")
    assert not staged(torch.float32, "simp", forward=True)
    monkeypatch.setitem(_common._TARGET_ARCH, ("cpu", None), 80)
    assert staged(torch.bfloat16, "simp") and not staged(torch.bfloat16, "none")
    assert staged(torch.float32, "value", forward=True)
    assert not staged(torch.bfloat16, "value", forward=True)
    # the calibrated forward (extra live tiles): fp32 on every target, refined half inputs before Hopper
    calibrated = lambda dtype, mechanism: _common._stages_forward(  # noqa: E731
        _common._Launch(q.to(dtype), None, mechanism, 0.0), extra_live_tiles=True
    )
    assert calibrated(torch.bfloat16, "simp") and not calibrated(torch.bfloat16, "none")
    monkeypatch.setitem(_common._TARGET_ARCH, ("cpu", None), 90)
    assert calibrated(torch.float32, "none") and not calibrated(torch.float16, "value")
    # W2's backward (extra live tiles: the covariance product): plain attention too before Hopper
    monkeypatch.setitem(_common._TARGET_ARCH, ("cpu", None), 80)
    w2_backward = lambda dtype: _common._stages_backward(  # noqa: E731
        _common._Launch(q.to(dtype), None, "none", 0.0), "none", extra_live_tiles=True
    )
    assert w2_backward(torch.float16) and not staged(torch.float16, "none")
    monkeypatch.setitem(_common._TARGET_ARCH, ("cpu", None), 90)
    assert not w2_backward(torch.float16) and w2_backward(torch.float32)
    # dropout (the keep mask's Philox state): fp32 forwards stage on sm_90 too, and W2's backward does
    dropped = lambda dtype, mechanism: _common._Launch(q.to(dtype), None, mechanism, 0.1)  # noqa: E731
    assert _common._stages_forward(dropped(torch.float32, "simp")) and not staged(torch.float32, "simp", True)
    assert not _common._stages_forward(dropped(torch.bfloat16, "simp"))
    assert _common._stages_backward(dropped(torch.bfloat16, "simp"), "simp", extra_live_tiles=True)
    assert not _common._stages_backward(dropped(torch.bfloat16, "simp"), "simp")
    monkeypatch.setitem(_common._TARGET_ARCH, ("cpu", None), None)  # the interpreter: never
    assert not calibrated(torch.float32, "value") and not staged(torch.float32, "value", forward=True)
    monkeypatch.setitem(_common._TARGET_ARCH, ("cpu", None), 80)
    k_slice = [_common._staged_k_slice(_common._Launch(q.to(dt), None, "simp", 0.0)) for dt in DTYPES]
    assert k_slice == [16, 32, 32]
    monkeypatch.setattr(_common, "STAGED_BACKWARD", False)
    monkeypatch.setattr(_common, "STAGED_FORWARD", True)
    assert not staged(torch.float32, "value") and staged(torch.bfloat16, "none", forward=True)
