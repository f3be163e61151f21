"""CUDA backend of dot_refined (SPEC §1-3, §3b): the fused kernels of csrc/dot_refined/ behind autograd.

The C++ ops awr_fast::dot_refined_cuda_fwd and _bwd each take the whole call (M = W_RQ W_RK^T, the
kernel, and in the backward every reduction down to dW_RQ, dW_RK, dW_RV), so one Python call is one C++
call. Registered here: their fake kernels (torch.compile traces them, fullgraph) and the autograd rule
(the forward saves nothing but its inputs; the backward recomputes on chip).
"""

from __future__ import annotations

import torch

from .._ext import load_cuda_extension
from ..ops.dot_refined import default_scale

FWD = "awr_fast::dot_refined_cuda_fwd"
BWD = "awr_fast::dot_refined_cuda_bwd"

_module, _why = load_cuda_extension()
if _module is None:
    raise ImportError(f"the CUDA backend of dot_refined is unavailable: {_why}")
_register_fake = getattr(torch.library, "register_fake", None) or torch.library.impl_abstract


@_register_fake(FWD)
def _fake_forward(q, k, v, w_rq, w_rk, w_rv, key_padding_mask, seed, mechanism, scale, refine_scale, scores, p):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@_register_fake(BWD)
def _fake_backward(grad, q, k, v, w_rq, w_rk, w_rv, key_padding_mask, seed, mechanism, *options):
    def like(w):
        return q.new_empty(0, dtype=torch.float32) if w is None else torch.empty_like(w)

    dense = dict(memory_format=torch.contiguous_format)
    return (torch.empty_like(q, **dense), torch.empty_like(k, **dense), torch.empty_like(v, **dense)) + tuple(
        like(w) for w in (w_rq, w_rk, w_rv)
    )


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:8])
    ctx.options = inputs[8:]


def _backward(ctx, grad):
    q, k, v, w_rq, w_rk, w_rv, kpm, seed = ctx.saved_tensors
    grads = torch.ops.awr_fast.dot_refined_cuda_bwd(grad, q, k, v, w_rq, w_rk, w_rv, kpm, seed, *ctx.options)
    dq, dk, dv, *dw = grads
    dw = [g if w is not None else None for g, w in zip(dw, (w_rq, w_rk, w_rv))]
    return (dq, dk, dv, *dw, None, None, None, None, None, None, None)


torch.library.register_autograd(FWD, _backward, setup_context=_setup_context)


def dropout_seed(dropout_p: float, like: torch.Tensor):
    """The dropout seed of one call: an int64 tensor on the inputs' device (no host sync), or None."""
    if dropout_p <= 0:
        return None
    return torch.randint(0, 2**62, (1,), device=like.device, dtype=torch.int64)


def dot_refined(
    q,
    k,
    v,
    *,
    mechanism="none",
    w_rq=None,
    w_rk=None,
    w_rv=None,
    key_padding_mask=None,
    scale=None,
    refine_scale=None,
    refine_input="probs",
    dropout_p=0.0,
):
    """Same contract as awr_fast.reference.dot_refined.dot_refined (inputs validated by the API; what runs
    here is the cuda row of awr_fast.ops.dot_refined.CAPABILITIES)."""
    d_h = q.shape[-1]
    scale = default_scale(d_h) if scale is None else float(scale)
    refine_scale = default_scale(d_h) if refine_scale is None else float(refine_scale)
    return torch.ops.awr_fast.dot_refined_cuda_fwd(
        q,
        k,
        v,
        w_rq,
        w_rk,
        w_rv,
        key_padding_mask,
        dropout_seed(dropout_p, q),
        mechanism,
        scale,
        refine_scale,
        refine_input == "scores",
        float(dropout_p),
    )
