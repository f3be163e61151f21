"""CUDA backend of w2_scores (SPEC §4): the tiled W2 scoring kernel of csrc/w2_scores/ with its backward,
and the fused top-k for evaluation.

The forward awr_fast::w2_scores_cuda is one kernel (float32 scores); the backward
awr_fast::w2_scores_cuda_bwd is one C++ call of four GEMMs and norms (SPEC §4's expansion differentiated),
registered here as the forward's autograd rule. awr_fast::w2_topk_cuda returns the k nearest items per
query without writing the (B, |V|) scores (csrc/w2_scores/w2_topk_kernels.cu). The forward's fake kernel
is registered by the loader (awr_fast._ext), the backward's and the top-k's here.
"""

from __future__ import annotations

import torch

from .._ext import load_cuda_extension
from ..ops.w2_scores import make_topk_request
from . import emulate

FWD = "awr_fast::w2_scores_cuda"
BWD = "awr_fast::w2_scores_cuda_bwd"

_module, _why = load_cuda_extension()
if _module is None:
    raise ImportError(f"the CUDA backend of w2_scores is unavailable: {_why}")
_register_fake = getattr(torch.library, "register_fake", None) or torch.library.impl_abstract


@_register_fake(BWD)
def _fake_backward(grad, mu, sig, item_mu, item_sig):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (mu, sig, item_mu, item_sig))


@_register_fake("awr_fast::w2_topk_cuda")
def _fake_topk(mu, sig, item_mu, item_sig, k, exclude, exclude_padding):
    return mu.new_empty(mu.shape[0], k, dtype=torch.float32), mu.new_empty(mu.shape[0], k, dtype=torch.int64)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad):
    return torch.ops.awr_fast.w2_scores_cuda_bwd(grad, *ctx.saved_tensors)


torch.library.register_autograd(FWD, _backward, setup_context=_setup_context)


def w2_scores(mu: torch.Tensor, sig: torch.Tensor, item_mu: torch.Tensor, item_sig: torch.Tensor) -> torch.Tensor:
    """Same contract as awr_fast.reference.w2_scores.w2_scores: float32 (B, V) squared W2 distances, with
    gradients to all four inputs."""
    return torch.ops.awr_fast.w2_scores_cuda(
        mu.contiguous(), sig.contiguous(), item_mu.contiguous(), item_sig.contiguous()
    )


@torch.no_grad()
def w2_topk(mu, sig, item_mu, item_sig, k, exclude=None, *, exclude_padding=False):
    """Same contract as awr_fast.kernels.w2_scores.w2_topk: (float32 values, int64 indices) (B, k) of the
    k items nearest each query by ascending squared W2, ties to the lower index, NaN last, (+inf, -1)
    where a row has fewer than k items left; exclude None, a bool (B, |V|) mask or (B, L) ids padded with
    -1; exclude_padding also skips item 0. One C++ call: the exclusion bits, the fused kernel, the merge
    of its item splits and the decoding of the keys. CPU tensors only under AWR_FAST_CUDA_EMULATE=1."""
    request = make_topk_request(mu, sig, item_mu, item_sig, k, exclude, exclude_padding)
    if mu.device.type != "cuda" and not emulate():
        raise ValueError(
            f"mu: the CUDA backend's w2_topk needs CUDA tensors, got device {mu.device} "
            "(AWR_FAST_CUDA_EMULATE=1 runs its kernel's host emulation on CPU tensors, for testing)"
        )
    return torch.ops.awr_fast.w2_topk_cuda(
        mu.contiguous(),
        sig.contiguous(),
        item_mu.contiguous(),
        item_sig.contiguous(),
        request.k,
        request.exclude,
        request.exclude_padding,
    )
