"""pytest-benchmark cases for the hot ops, to track regressions:

    pytest bench --benchmark-only                      # run and compare by eye
    pytest bench --benchmark-only --benchmark-autosave # store under .benchmarks/ (git-ignored)
    pytest bench --benchmark-only --benchmark-compare  # against the last saved run

Not collected by a plain ``pytest`` (the project's testpaths is ["tests"]). Each case runs the public op
with backend="auto" (the reference on the CPU; Triton/CUDA where a GPU makes them the choice) at a small
shape, forward+backward for the attention ops. On CUDA the op is synchronized inside the timed call.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("pytest_benchmark")
import awr_fast  # noqa: E402
from awr_fast.ops import dot_refined, w2_refined  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
B, H, N, D_H = (64, 2, 50, 32) if DEVICE.type == "cuda" else (8, 2, 50, 32)


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _leaf(*shape, scale=1.0, seed=0, positive=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * scale
    if positive:
        x = torch.nn.functional.elu(x) + 1.0
    return x.to(DEVICE).requires_grad_(True)


def _padding_mask(seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, N + 1, (B,), generator=g)
    lengths[0] = N
    return (torch.arange(N)[None, :] < (N - lengths)[:, None]).to(DEVICE)


def _weights(names, seed):
    scale = math.sqrt(2.0 / (2 * N)) * 4
    return {name: _leaf(N, N, scale=scale, seed=seed + i) for i, name in enumerate(names)}


def _fwd_bwd(fn, leaves):
    def step():
        out = fn()
        outs = [out] if isinstance(out, torch.Tensor) else [t for t in out if t is not None]
        grads = torch.autograd.grad(outs, leaves, [torch.ones_like(o) for o in outs], allow_unused=True)
        _sync()
        return grads

    return step


@pytest.mark.parametrize("mechanism", dot_refined.CAUSAL_MECHANISMS)
def test_refined_attention_fwd_bwd(benchmark, mechanism):
    q, k, v = (_leaf(B, H, N, D_H, seed=i) for i in range(3))
    names = dot_refined.WEIGHTS[mechanism]
    weights = _weights(names, seed=10)
    mask = _padding_mask()
    step = _fwd_bwd(
        lambda: awr_fast.refined_attention(q, k, v, mechanism=mechanism, key_padding_mask=mask, **weights),
        [q, k, v, *weights.values()],
    )
    grads = benchmark(step)
    assert all(g is None or torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("mechanism", ["none", "simp", "stoc"])
def test_wasserstein_attention_fwd_bwd(benchmark, mechanism):
    tensors = [_leaf(B, H, N, D_H, seed=i, positive=(i % 2 == 1)) for i in range(6)]
    names = w2_refined.WEIGHTS[mechanism]
    weights = _weights(names, seed=20)
    mask = _padding_mask()
    step = _fwd_bwd(
        lambda: awr_fast.wasserstein_attention(*tensors, mechanism=mechanism, key_padding_mask=mask, **weights),
        [*tensors, *weights.values()],
    )
    grads = benchmark(step)
    assert all(g is None or torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("items", [2000, 12101])  # a small catalogue and Beauty's
def test_w2_scores(benchmark, items):
    batch, d = 256, 64
    g = torch.Generator().manual_seed(0)
    mu, item_mu = torch.randn(batch, d, generator=g), torch.randn(items, d, generator=g)
    sig = torch.nn.functional.elu(torch.randn(batch, d, generator=g)) + 1.0
    item_sig = torch.nn.functional.elu(torch.randn(items, d, generator=g)) + 1.0
    mu, sig, item_mu, item_sig = (t.to(DEVICE) for t in (mu, sig, item_mu, item_sig))

    def step():
        with torch.no_grad():
            out = awr_fast.w2_scores(mu, sig, item_mu, item_sig)
        _sync()
        return out

    out = benchmark(step)
    assert out.shape == (batch, items) and torch.isfinite(out).all()
