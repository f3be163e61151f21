"""The w2_refined op: STOSA Wasserstein attention with AWRSR refinement (SPEC §3, §4)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import validation as V
from .capability import KERNEL_FLOAT, Capability, InputsRecord
from .dot_refined import CUDA_NOT_AUTO, MAX_GRID, TRITON_MAX_D_HEAD, TRITON_MAX_N, check_common, check_refinement
from .dot_refined import default_scale as default_scale  # one default for both families

NAME = "w2_refined"
MECHANISMS = ("none", "simp", "add", "value", "stoc")
WEIGHTS = {
    "none": (),
    "simp": ("w_rq", "w_rk"),
    "add": ("w_rq", "w_rk"),
    "value": ("w_rq", "w_rk", "w_rv"),
    "stoc": ("w_mu", "w_sigma"),
}
TENSORS = ("mu_q", "sig_q", "mu_k", "sig_k", "mu_v", "sig_v")
SQRT_CLAMP = 1e-24  # STOSA clamps covariances here before the square root


@dataclass(frozen=True, eq=False, slots=True)
class Inputs(InputsRecord):
    """Validated inputs of one call (see ops.dot_refined.Inputs)."""

    mu_q: torch.Tensor
    sig_q: torch.Tensor
    mu_k: torch.Tensor
    sig_k: torch.Tensor
    mu_v: torch.Tensor
    sig_v: torch.Tensor
    mechanism: str
    weights: dict
    key_padding_mask: torch.Tensor | None
    scale: float | None
    refine_scale: float | None
    refine_input: str
    dropout_p: float
    return_weights: bool = False

    @property
    def tensors(self) -> tuple:
        return self.mu_q, self.sig_q, self.mu_k, self.sig_k, self.mu_v, self.sig_v

    @property
    def lead(self) -> torch.Tensor:
        return self.mu_q

    def leaves(self) -> tuple:
        return (*self.tensors, *self.weights.values())

    def call(self, fn):
        extra = {"return_weights": True} if self.return_weights else {}
        return fn(
            *self.tensors,
            mechanism=self.mechanism,
            **self.weights,
            key_padding_mask=self.key_padding_mask,
            scale=self.scale,
            refine_scale=self.refine_scale,
            refine_input=self.refine_input,
            dropout_p=self.dropout_p,
            **extra,
        )


def make_inputs(
    mu_q,
    sig_q,
    mu_k,
    sig_k,
    mu_v,
    sig_v,
    *,
    mechanism,
    w_rq=None,
    w_rk=None,
    w_rv=None,
    w_mu=None,
    w_sigma=None,
    key_padding_mask=None,
    lengths=None,
    scale=None,
    refine_scale=None,
    refine_input="probs",
    dropout_p=0.0,
    return_weights=False,
) -> Inputs:
    tensors = (mu_q, sig_q, mu_k, sig_k, mu_v, sig_v)
    batch, heads, n, _ = V.check_heads_layout(TENSORS, tensors)
    V.check_choice("mechanism", mechanism, MECHANISMS)
    given = {"w_rq": w_rq, "w_rk": w_rk, "w_rv": w_rv, "w_mu": w_mu, "w_sigma": w_sigma}
    weights = check_refinement_w2(mechanism, given, heads, n, mu_q)
    key_padding_mask = check_common(
        key_padding_mask, lengths, batch, n, mu_q.device, scale, refine_scale, refine_input, dropout_p
    )
    return Inputs(
        *tensors,
        mechanism,
        weights,
        key_padding_mask,
        scale,
        refine_scale,
        refine_input,
        float(dropout_p),
        bool(return_weights),
    )


def check_refinement_w2(mechanism: str, given: dict, heads: int, n: int, like: torch.Tensor) -> dict:
    if mechanism != "stoc":
        V.check_unused(mechanism, w_mu=given.pop("w_mu"), w_sigma=given.pop("w_sigma"))
        return check_refinement(mechanism, given, heads, n, like)
    V.check_unused(mechanism, w_rq=given["w_rq"], w_rk=given["w_rk"], w_rv=given["w_rv"])
    out = {}
    for name in WEIGHTS["stoc"]:  # projections of the rows of A: (n, r)
        w = given[name]
        V.check_refine_weight(name, w, n, heads, like.device, square=False)
        out[name] = w if w.dtype == like.dtype else w.to(like.dtype)
    V.check_same_columns("w_sigma", out["w_sigma"], "w_mu", out["w_mu"])
    return out


CUDA_MAX_N = 256  # csrc/common/refine_block.cuh, kMaxN: one block per sequence (shared memory up to 64)


CAPABILITIES = (
    Capability(
        "cuda",
        "awr_fast.cuda.w2_refined",
        dtypes=KERNEL_FLOAT,
        max_n=CUDA_MAX_N,
        max_grid=2**31 - 1,
        reasons="cuda_reasons",
        host_emulation=True,
        not_auto=CUDA_NOT_AUTO,
    ),
    Capability(
        "triton",
        "awr_fast.kernels.w2_refined",
        dtypes=KERNEL_FLOAT,
        mechanisms=MECHANISMS,
        max_n=TRITON_MAX_N,
        max_d_h=TRITON_MAX_D_HEAD,
        max_grid=MAX_GRID,
        reasons="triton_reasons",
    ),
    Capability(
        "eager",
        "awr_fast.eager.w2_refined",
        mechanisms=("simp", "add", "value", "stoc"),
        weights=True,
        why_not={"none": "plain W2 attention has nothing to factor: the reference runs it"},
    ),
    Capability("reference", "awr_fast.reference.w2_refined", weights=True),
)
