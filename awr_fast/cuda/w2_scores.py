"""CUDA backend of w2_scores (SPEC §4): the tiled W2 scoring kernel of csrc/w2_scores/ with its backward.

The forward awr_fast::w2_scores_cuda is one kernel (float32 scores); the backward
awr_fast::w2_scores_cuda_bwd is one C++ call of four GEMMs and norms (SPEC §4's expansion differentiated),
registered here as the forward's autograd rule. The forward's fake kernel is registered by the loader
(awr_fast._ext), the backward's here.
"""

from __future__ import annotations

import torch

from .._ext import load_cuda_extension

FWD = "awr_fast::w2_scores_cuda"
BWD = "awr_fast::w2_scores_cuda_bwd"

_module, _why = load_cuda_extension()
if _module is None:
    raise ImportError(f"the CUDA backend of w2_scores is unavailable: {_why}")
_register_fake = getattr(torch.library, "register_fake", None) or torch.library.impl_abstract


@_register_fake(BWD)
def _fake_backward(grad, mu, sig, item_mu, item_sig):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (mu, sig, item_mu, item_sig))


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
