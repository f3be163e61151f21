"""The shared Triton core's weight-gradient launch (kernels/_refine.py refinement_weight_grads): a fused
backward's per-program partials of dM and dW_RV become dW_RQ, dW_RK and dW_RV in one launch.

Checked directly against float64 torch on random partials (not zeros: every program's partial is dense),
over every combination of shared and per-head factors, "add"'s swapped roles, rectangular weights wider
than one column block, a length that is not a multiple of the row block, and half-precision weights
(the gradients keep each weight's dtype and shape). On CPU under TRITON_INTERPRET=1 (tests/conftest.py).
"""

import pytest
import torch

triton = pytest.importorskip("triton")
from awr_fast.kernels import _refine  # noqa: E402
from awr_fast.kernels._common import _Launch  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _expected(mechanism, dm_part, drv_part, w_rq, w_rk, w_rv):
    """SPEC §3b in float64: dM_h = sum_b partial[b, h]; dW_F = dM W_S, dW_S = dM^T W_F for M = W_F W_S^T,
    summed over the heads where a weight is shared."""
    first, second = (w_rk, w_rq) if mechanism == "add" else (w_rq, w_rk)
    dm = dm_part.double().sum(0)  # (H, n, n)
    d_first = dm @ second.double()  # (H, n, r): a shared second broadcasts
    d_second = dm.transpose(-1, -2) @ first.double()
    d_first = d_first if first.dim() == 3 else d_first.sum(0)
    d_second = d_second if second.dim() == 3 else d_second.sum(0)
    d_rq, d_rk = (d_second, d_first) if mechanism == "add" else (d_first, d_second)
    d_rv = None
    if w_rv is not None:
        d_rv = drv_part.double().sum(0)
        d_rv = d_rv if w_rv.dim() == 3 else d_rv.sum(0)
    return d_rq, d_rk, d_rv


@pytest.mark.parametrize("mechanism", ["simp", "add", "value"])
@pytest.mark.parametrize(
    "kinds", [("shared", "shared"), ("per_head", "shared"), ("shared", "per_head"), ("per_head", "per_head")]
)
@pytest.mark.parametrize("n,r", [(23, 23), (50, 97), (7, 5)])
def test_weight_grads_against_float64(mechanism, kinds, n, r):
    g = torch.Generator().manual_seed(n * 131 + r)
    batch, heads = 3, 2

    def weight(kind, cols):
        shape = (heads, n, cols) if kind == "per_head" else (n, cols)
        return torch.randn(*shape, generator=g).to(DEVICE)

    w_rq, w_rk = weight(kinds[0], r), weight(kinds[1], r)
    w_rv = weight(kinds[0], n) if mechanism == "value" else None
    dm_part = torch.randn(batch, heads, n, n, generator=g).to(DEVICE)
    drv_part = torch.randn(batch, heads, n, n, generator=g).to(DEVICE) if w_rv is not None else None
    L = _Launch(torch.empty(batch, heads, n, 8, device=DEVICE), None, mechanism, 0.0)
    got = _refine.refinement_weight_grads(L, mechanism, dm_part, drv_part, w_rq, w_rk, w_rv)
    want = _expected(mechanism, dm_part, drv_part, w_rq, w_rk, w_rv)
    for name, x, w, ref in zip(("dW_RQ", "dW_RK", "dW_RV"), got, (w_rq, w_rk, w_rv), want):
        if w is None:
            assert x is None, name
            continue
        assert x.shape == w.shape and x.dtype == w.dtype, name
        torch.testing.assert_close(x.double(), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item(), msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_weight_grads_keep_half_weights_dtype(dtype):
    g = torch.Generator().manual_seed(7)
    n, batch, heads = 19, 2, 2
    w_rq, w_rk = (torch.randn(n, n, generator=g).to(DEVICE, dtype) for _ in range(2))
    w_rv = torch.randn(heads, n, n, generator=g).to(DEVICE, dtype)
    dm_part, drv_part = (torch.randn(batch, heads, n, n, generator=g).to(DEVICE) for _ in range(2))
    L = _Launch(torch.empty(batch, heads, n, 8, device=DEVICE, dtype=dtype), None, "value", 0.0)
    got = _refine.refinement_weight_grads(L, "value", dm_part, drv_part, w_rq, w_rk, w_rv)
    want = _expected("value", dm_part, drv_part, w_rq, w_rk, w_rv)
    for x, ref in zip(got, want):
        assert x.dtype == dtype
        # half weights: the factor is rounded to `dtype` before the product, the result once more
        torch.testing.assert_close(x.double(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())
