"""The calibrated op: AC-TSR spatial (+ adversarial) calibrated attention (SPEC §5)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import validation as V
from .capability import KERNEL_FLOAT, Capability, InputsRecord
from .dot_refined import CAUSAL_MECHANISMS, MAX_GRID, TRITON_MAX_D_HEAD, TRITON_MAX_N, WEIGHTS, check_refinement

NAME = "calibrated"
#: "spatial" alone, or with the adversarial calibrator (q_adv, k_adv, gate_logits given).
MECHANISMS = ("spatial", "adversarial")
#: The spatial calibrator's (d_h,) vectors shared by the heads, and its scalars.
VECTORS = ("w_oq", "w_ok", "w_dq", "w_dk")
SCALARS = ("b_o", "b_d", "dist_scale")
ADVERSARIAL = ("q_adv", "k_adv", "gate_logits")
#: AWRSR refinement of the final weights (P_fin, or P_sp without the adversarial calibrator), SPEC §3:
#: the dot family's causal mechanisms and weights.
REFINE_MECHANISMS = CAUSAL_MECHANISMS
REFINE_WEIGHTS = WEIGHTS
#: Parameters cast to the activations' dtype (they may stay float32 under mixed precision).
CAST = (*VECTORS, *SCALARS, "gate_logits", "noise")


@dataclass(frozen=True, eq=False, slots=True)
class Inputs(InputsRecord):
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    params: dict  # VECTORS and SCALARS by name
    q_adv: torch.Tensor | None
    k_adv: torch.Tensor | None
    gate_logits: torch.Tensor | None
    noise: torch.Tensor | None
    key_padding_mask: torch.Tensor | None
    scale: float | None
    dropout_p: float
    perturb_dropout_p: float
    refine: str = "none"
    refine_weights: dict | None = None  # REFINE_WEIGHTS[refine] by name
    refine_scale: float | None = None

    return_weights = False

    @property
    def mechanism(self) -> str:
        return "spatial" if self.q_adv is None else "adversarial"

    @property
    def lead(self) -> torch.Tensor:
        return self.q

    def leaves(self) -> tuple:
        extra = tuple((self.refine_weights or {}).values())
        return (self.q, self.k, self.v, self.q_adv, self.k_adv, self.gate_logits, *self.params.values(), *extra)

    def call(self, fn):
        return fn(
            self.q,
            self.k,
            self.v,
            **self.params,
            q_adv=self.q_adv,
            k_adv=self.k_adv,
            gate_logits=self.gate_logits,
            noise=self.noise,
            key_padding_mask=self.key_padding_mask,
            scale=self.scale,
            dropout_p=self.dropout_p,
            perturb_dropout_p=self.perturb_dropout_p,
            **(
                {"refine": self.refine, **self.refine_weights, "refine_scale": self.refine_scale}
                if self.refine != "none"
                else {}
            ),
        )


def _cast(t, dtype):
    return t if t is None or t.dtype == dtype else t.to(dtype)


def make_inputs(
    q,
    k,
    v,
    *,
    w_oq,
    w_ok,
    b_o,
    w_dq,
    w_dk,
    b_d,
    dist_scale,
    q_adv=None,
    k_adv=None,
    gate_logits=None,
    noise=None,
    key_padding_mask=None,
    scale=None,
    dropout_p=0.0,
    perturb_dropout_p=0.0,
    refine="none",
    w_rq=None,
    w_rk=None,
    w_rv=None,
    refine_scale=None,
) -> Inputs:
    batch, heads, n, d_h = V.check_heads_layout(("q", "k", "v"), (q, k, v))
    params = {"w_oq": w_oq, "w_ok": w_ok, "w_dq": w_dq, "w_dk": w_dk, "b_o": b_o, "b_d": b_d, "dist_scale": dist_scale}
    for name in VECTORS:
        V.check_tensor(name, params[name], dim=1)
        if params[name].shape[0] != d_h:
            raise ValueError(f"{name}: expected shape ({d_h},) (d_h of q), got {tuple(params[name].shape)}")
    for name in SCALARS:
        V.check_tensor(name, params[name], dim=(0, 1))
        if params[name].numel() != 1:
            raise ValueError(f"{name}: expected a scalar tensor, got shape {tuple(params[name].shape)}")
    adversarial = (q_adv, k_adv, gate_logits)
    if any(t is not None for t in adversarial) and any(t is None for t in adversarial):
        raise ValueError(
            "q_adv, k_adv, gate_logits: expected all three (adversarial calibrator) or none, got "
            + ", ".join(name for name, t in zip(ADVERSARIAL, adversarial) if t is not None)
        )
    if q_adv is not None:
        V.check_heads_layout(("q", "q_adv", "k_adv"), (q, q_adv, k_adv))
        V.check_tensor("gate_logits", gate_logits, dim=3)
        if tuple(gate_logits.shape) != (batch, n, n):
            raise ValueError(
                f"gate_logits: expected shape (B, n, n) = ({batch}, {n}, {n}), got {tuple(gate_logits.shape)}"
            )
        if noise is not None:
            V.check_tensor("noise", noise, dim=4)
            if tuple(noise.shape) != (batch, heads, n, n):
                raise ValueError(f"noise: expected shape ({batch}, {heads}, {n}, {n}), got {tuple(noise.shape)}")
    elif noise is not None:
        raise ValueError(
            "noise: expected None without the adversarial calibrator (q_adv/k_adv/gate_logits), "
            f"got a tensor of shape {tuple(noise.shape)}"
        )
    V.check_key_padding_mask(key_padding_mask, batch, n, q.device)
    V.check_scale("scale", scale)
    V.check_probability("dropout_p", dropout_p)
    V.check_probability("perturb_dropout_p", perturb_dropout_p)
    V.check_choice("refine", refine, REFINE_MECHANISMS)
    refine_weights = check_refinement(refine, {"w_rq": w_rq, "w_rk": w_rk, "w_rv": w_rv}, heads, n, q)
    V.check_scale("refine_scale", refine_scale)
    dtype = q.dtype
    return Inputs(
        q,
        k,
        v,
        {name: _cast(t, dtype) for name, t in params.items()},
        q_adv,
        k_adv,
        _cast(gate_logits, dtype),
        _cast(noise, dtype),
        key_padding_mask,
        scale,
        float(dropout_p),
        float(perturb_dropout_p),
        refine,
        refine_weights,
        refine_scale,
    )


CAPABILITIES = (
    # forward (fused windows for n <= 64 in evaluation, row blocks otherwise) and backward (row and column
    # blocks, a refinement of P_fin through the dot family's tiled core) with Philox dropout
    Capability(
        "triton",
        "awr_fast.kernels.calibrated",
        dtypes=KERNEL_FLOAT,
        max_n=TRITON_MAX_N,
        max_d_h=TRITON_MAX_D_HEAD,
        max_grid=MAX_GRID,
    ),
    Capability("reference", "awr_fast.reference.calibrated"),
)
