"""The dot_refined op: causal dot-product attention (SASRec) with AWRSR refinement (SPEC §2, §3, §3b)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import validation as V
from .capability import KERNEL_FLOAT, Capability, InputsRecord

NAME = "dot_refined"
#: Every mechanism of the op; value_literal is the paper's literal M_value, which leaks future rows.
MECHANISMS = ("none", "simp", "add", "value", "value_literal")
#: The causal mechanisms, the ones a model offers.
CAUSAL_MECHANISMS = ("none", "simp", "add", "value")
#: The refinement weights each mechanism takes, by argument name.
WEIGHTS = {
    "none": (),
    "simp": ("w_rq", "w_rk"),
    "add": ("w_rq", "w_rk"),
    "value": ("w_rq", "w_rk", "w_rv"),
    "value_literal": ("w_rq", "w_rk", "w_rv"),
}
#: Weights whose both dimensions are positions; the others are projections, (n, r) for any inner width r.
SQUARE_WEIGHTS = ("w_rv",)
REFINE_INPUTS = ("probs", "scores")
#: refine_scale options of the modules: c = 1/sqrt(d_h) (default), 1/sqrt(d) or 1/sqrt(n).
REFINE_SCALES = ("d_h", "d", "n")

TRITON_MAX_N = 256
TRITON_MAX_D_HEAD = 128
MAX_GRID = 65535  # one program per (batch, head) on the grid's first axis


def default_scale(d_h: int) -> float:
    """The default of both scale (Q K^T) and refine_scale (c of SPEC §3): 1/sqrt(d_h)."""
    return 1.0 / math.sqrt(d_h)


def refine_scale_value(name: str, d_model: int, n_heads: int, max_len: int) -> float:
    """c of SPEC §3 from a module's refine_scale option."""
    V.check_choice("refine_scale", name, REFINE_SCALES)
    return 1.0 / math.sqrt({"d_h": d_model // n_heads, "d": d_model, "n": max_len}[name])


@dataclass(frozen=True, eq=False, slots=True)
class Inputs(InputsRecord):
    """Validated inputs of one call: what every backend receives (weights cast to the activations' dtype;
    `weights` holds exactly WEIGHTS[mechanism])."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    mechanism: str
    weights: dict
    key_padding_mask: torch.Tensor | None
    scale: float | None
    refine_scale: float | None
    refine_input: str
    dropout_p: float
    return_weights: bool = False

    @property
    def lead(self) -> torch.Tensor:
        return self.q

    def leaves(self) -> tuple:
        return (self.q, self.k, self.v, *self.weights.values())

    def call(self, fn):
        """fn(q, k, v, *, mechanism, <weights>, key_padding_mask, ...): the reference's signature, which
        every backend's dot_refined shares."""
        extra = {"return_weights": True} if self.return_weights else {}
        return fn(
            self.q,
            self.k,
            self.v,
            mechanism=self.mechanism,
            **self.weights,
            key_padding_mask=self.key_padding_mask,
            scale=self.scale,
            refine_scale=self.refine_scale,
            refine_input=self.refine_input,
            dropout_p=self.dropout_p,
            **extra,
        )


def check_refinement(mechanism: str, weights: dict, heads: int, n: int, like: torch.Tensor) -> dict:
    """The mechanism's weights, checked (each error names the argument) and cast to like's dtype."""
    used = WEIGHTS[mechanism]
    V.check_unused(mechanism, **{name: w for name, w in weights.items() if name not in used})
    square = mechanism == "value_literal"  # the literal reading multiplies W A, so every W is n x n
    out = {}
    for name in used:
        w = weights[name]
        V.check_refine_weight(name, w, n, heads, like.device, square=square or name in SQUARE_WEIGHTS)
        out[name] = w if w.dtype == like.dtype else w.to(like.dtype)
    if len(used) > 1:
        V.check_same_columns(used[1], out[used[1]], used[0], out[used[0]])
    return out


def check_common(key_padding_mask, lengths, batch: int, n: int, device, scale, refine_scale, refine_input, dropout_p):
    """The options shared with w2_refined; returns the key padding mask (from lengths if given)."""
    key_padding_mask = V.lengths_to_padding_mask(lengths, key_padding_mask, batch, n, device)
    V.check_key_padding_mask(key_padding_mask, batch, n, device)
    V.check_scale("scale", scale)
    V.check_scale("refine_scale", refine_scale)
    V.check_choice("refine_input", refine_input, REFINE_INPUTS)
    V.check_probability("dropout_p", dropout_p)
    return key_padding_mask


def make_inputs(
    q,
    k,
    v,
    *,
    mechanism,
    w_rq=None,
    w_rk=None,
    w_rv=None,
    key_padding_mask=None,
    lengths=None,
    scale=None,
    refine_scale=None,
    refine_input="probs",
    dropout_p=0.0,
    return_weights=False,
) -> Inputs:
    """Validate the public call's arguments once and freeze them into an Inputs record."""
    batch, heads, n, _ = V.check_heads_layout(("q", "k", "v"), (q, k, v))
    V.check_choice("mechanism", mechanism, MECHANISMS)
    weights = check_refinement(mechanism, {"w_rq": w_rq, "w_rk": w_rk, "w_rv": w_rv}, heads, n, q)
    key_padding_mask = check_common(
        key_padding_mask, lengths, batch, n, q.device, scale, refine_scale, refine_input, dropout_p
    )
    return Inputs(
        q,
        k,
        v,
        mechanism,
        weights,
        key_padding_mask,
        scale,
        refine_scale,
        refine_input,
        float(dropout_p),
        bool(return_weights),
    )


LITERAL_WHY = "the literal M_value is not causal, so only the reference runs it"

CUDA_MAX_N = 256  # csrc/common/refine_block.cuh, kMaxN: one block per sequence (shared memory up to 64)
CUDA_NOT_AUTO = (
    "the CUDA kernels are SIMT (no tensor cores yet) and unmeasured on a GPU; auto picks them once a GPU "
    "run shows them at least as fast as Triton"
)

CAPABILITIES = (
    Capability(
        "cuda",
        "awr_fast.cuda.dot_refined",
        dtypes=KERNEL_FLOAT,
        mechanisms=CAUSAL_MECHANISMS,
        max_n=CUDA_MAX_N,
        max_grid=2**31 - 1,
        host_emulation=True,
        not_auto=CUDA_NOT_AUTO,
        why_not={"value_literal": LITERAL_WHY},
    ),
    Capability(
        "triton",
        "awr_fast.kernels.dot_refined",
        dtypes=KERNEL_FLOAT,
        mechanisms=CAUSAL_MECHANISMS,
        max_n=TRITON_MAX_N,
        max_d_h=TRITON_MAX_D_HEAD,
        max_grid=MAX_GRID,
        why_not={"value_literal": LITERAL_WHY},
    ),
    Capability(
        "eager",
        "awr_fast.eager.dot_refined",
        mechanisms=("simp", "add", "value"),
        weights=True,
        why_not={"none": "plain attention has nothing to factor: the reference runs it", "value_literal": LITERAL_WHY},
    ),
    Capability("reference", "awr_fast.reference.dot_refined", weights=True),
)
