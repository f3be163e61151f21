"""CUDA backend of w2_refined (SPEC §3, §4): STOSA's Wasserstein attention with every AWRSR mechanism,
M_stoc included, as the fused kernels of csrc/w2_refined/ behind autograd.

As for dot_refined, awr_fast::w2_refined_cuda_fwd and _bwd each take the whole call (M = W_RQ W_RK^T,
the kernel, the reductions down to the weight gradients); registered here are their fake kernels
(torch.compile, fullgraph) and the autograd rule (the forward saves nothing but its inputs).
"""

from __future__ import annotations

import torch

from .._ext import load_cuda_extension
from ..ops.w2_refined import CUDA_MAX_N, default_scale
from .dot_refined import dropout_seed

FWD = "awr_fast::w2_refined_cuda_fwd"
BWD = "awr_fast::w2_refined_cuda_bwd"
N_TENSORS = 13  # six inputs, five weights, key_padding_mask, seed

_module, _why = load_cuda_extension()
if _module is None:
    raise ImportError(f"the CUDA backend of w2_refined is unavailable: {_why}")
_register_fake = getattr(torch.library, "register_fake", None) or torch.library.impl_abstract


@_register_fake(FWD)
def _fake_forward(mu_q, *args):
    dense = dict(memory_format=torch.contiguous_format)
    return torch.empty_like(mu_q, **dense), torch.empty_like(mu_q, **dense)


@_register_fake(BWD)
def _fake_backward(grad_mu, grad_sig, *args):
    inputs, weights = args[:6], args[6:11]
    dense = dict(memory_format=torch.contiguous_format)
    return tuple(torch.empty_like(x, **dense) for x in inputs) + tuple(
        grad_mu.new_empty(0, dtype=torch.float32) if w is None else torch.empty_like(w) for w in weights
    )


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:N_TENSORS])
    ctx.options = inputs[N_TENSORS:]


def _backward(ctx, grad_mu, grad_sig):
    saved = ctx.saved_tensors
    grads = torch.ops.awr_fast.w2_refined_cuda_bwd(grad_mu, grad_sig, *saved, *ctx.options)
    weights = saved[6:11]
    dw = [g if w is not None else None for g, w in zip(grads[6:], weights)]
    return (*grads[:6], *dw, None, None) + (None,) * len(ctx.options)


torch.library.register_autograd(FWD, _backward, setup_context=_setup_context)


def cuda_reasons(inputs) -> list[str]:
    """What the cuda row's table cannot say: M_stoc's weights may have at most CUDA_MAX_N columns."""
    w = inputs.weights.get("w_mu")
    if w is not None and w.shape[-1] > CUDA_MAX_N:
        return [f"w_mu has {w.shape[-1]} columns; the CUDA kernels take at most {CUDA_MAX_N}"]
    return []


def w2_refined(
    mu_q,
    sig_q,
    mu_k,
    sig_k,
    mu_v,
    sig_v,
    *,
    mechanism="none",
    w_rq=None,
    w_rk=None,
    w_rv=None,
    w_mu=None,
    w_sigma=None,
    key_padding_mask=None,
    scale=None,
    refine_scale=None,
    refine_input="probs",
    dropout_p=0.0,
):
    """Same contract as awr_fast.reference.w2_refined.w2_refined: (mu_out, sig_out) (inputs validated by the
    API; what runs here is the cuda row of awr_fast.ops.w2_refined.CAPABILITIES)."""
    d_h = mu_q.shape[-1]
    scale = default_scale(d_h) if scale is None else float(scale)
    refine_scale = default_scale(d_h) if refine_scale is None else float(refine_scale)
    return torch.ops.awr_fast.w2_refined_cuda_fwd(
        mu_q,
        sig_q,
        mu_k,
        sig_k,
        mu_v,
        sig_v,
        w_rq,
        w_rk,
        w_rv,
        w_mu,
        w_sigma,
        key_padding_mask,
        dropout_seed(dropout_p, mu_q),
        mechanism,
        scale,
        refine_scale,
        refine_input == "scores",
        float(dropout_p),
    )
