"""The dot precision of the Triton kernels, and the interpreter's emulation of it (tests/conftest.py) that
makes the CPU tests check the arithmetic a GPU runs."""

import os

import numpy as np
import pytest
import torch

from awr_fast.testing import round_to_tf32, tensor_core_matmul


def test_round_to_tf32_keeps_ten_mantissa_bits_ties_away():
    one = np.float32(1.0)
    ulp = np.float32(2.0**-10)  # TF32's spacing at 1
    x = np.array([one + ulp / 4, one + ulp / 2, one + 3 * ulp / 4, -(one + ulp / 2), np.inf, -3.0], np.float32)
    got = round_to_tf32(x)
    np.testing.assert_array_equal(got[[0, 1, 2, 3]], [one, one + ulp, one + ulp, -(one + ulp)])
    assert np.isinf(got[4]) and got[5] == -3.0


@pytest.mark.parametrize("shape", [(16, 16, 16), (64, 37, 64), (50, 256, 16)])
def test_tf32x3_is_as_close_to_float64_as_fp32(shape):
    m, k, n = shape
    rng = np.random.default_rng(0)
    a = rng.standard_normal((m, k)).astype(np.float32)
    b = rng.standard_normal((k, n)).astype(np.float32)
    exact = a.astype(np.float64) @ b.astype(np.float64)
    scale = np.abs(exact).max()
    err = {p: np.abs(tensor_core_matmul(a, b, p) - exact).max() / scale for p in ("ieee", "tf32x3", "tf32")}
    assert err["tf32x3"] <= 4 * err["ieee"] + 1e-7, err
    assert err["tf32"] > 20 * err["tf32x3"], err  # plain TF32 is far coarser: the split is what buys fp32


def test_fp32_inputs_run_tf32x3():
    from awr_fast.kernels import dot_refined

    assert dot_refined._precision(torch.float32) == "tf32x3"
    assert dot_refined._precision(torch.bfloat16) == "tf32"


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="checks the CPU interpreter")
@pytest.mark.parametrize("precision", ["ieee", "tf32x3", "tf32"])
def test_interpreter_dot_follows_input_precision(precision):
    import conftest
    import triton
    import triton.language as tl

    assert conftest.INTERPRETER_EMULATES_TENSOR_CORES, "this Triton's interpreter has no create_dot hook"

    @triton.jit
    def dot_kernel(A, B, C, PRECISION: tl.constexpr):
        i = tl.arange(0, 32)
        a = tl.load(A + i[:, None] * 32 + i[None, :])
        b = tl.load(B + i[:, None] * 32 + i[None, :])
        tl.store(C + i[:, None] * 32 + i[None, :], tl.dot(a, b, input_precision=PRECISION))

    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(32, 32, generator=g), torch.randn(32, 32, generator=g)
    c = torch.empty(32, 32)
    dot_kernel[(1,)](a, b, c, PRECISION=precision)
    expected = tensor_core_matmul(a.numpy(), b.numpy(), precision)
    np.testing.assert_allclose(c.numpy(), expected, rtol=1e-6, atol=1e-6)
    if precision == "tf32":  # the emulation is on: the result is not the exact fp32 product
        assert np.abs(c.numpy() - a.numpy() @ b.numpy()).max() > 1e-4
