"""Test configuration. Without a GPU, Triton kernels run on the CPU interpreter: TRITON_INTERPRET must be
set before any @triton.jit kernel is defined, i.e. before awr_fast.kernels is imported. Likewise the CUDA
backend's ops run their block code on CPU tensors (AWR_FAST_CUDA_EMULATE=1)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("AWR_FAST_CUDA_EMULATE", "1")

if os.environ.get("TRITON_INTERPRET") == "1":
    # the interpreter multiplies exactly in fp32 unless told to run tl.dot's input_precision (tf32x3 for
    # fp32 inputs, tf32 for upcast half ones) as a GPU does: the kernel tests then check that arithmetic
    from awr_fast.testing import emulate_tensor_core_dots

    INTERPRETER_EMULATES_TENSOR_CORES = emulate_tensor_core_dots()


try:  # hypothesis profiles: CI keeps the sweeps short and deterministic
    from hypothesis import HealthCheck, settings

    settings.register_profile(
        "ci", max_examples=12, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
    )
    settings.register_profile("dev", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
except ImportError:  # pragma: no cover
    pass


import pytest  # noqa: E402


@pytest.fixture
def backend_log():
    """awr_fast.backends' count of dispatched calls, emptied for the test: what ran, by op."""
    from awr_fast import backends

    backends.USED.clear()
    yield backends.used_backends
    backends.USED.clear()
