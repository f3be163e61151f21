"""AC-TSR's calibrated attention layer (SPEC §5) as an nn.Module over the public op."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .. import validation as V
from ..api import calibrated_attention
from ..ops import calibrated as spec
from ..ops.dot_refined import refine_scale_value
from .dot import window_refine_weights

RECBOLE_INIT_STD = 0.02  # RecBole's initializer_range, used by the released AC-TSR models


class CalibratedLayerOutput(NamedTuple):
    """h_cal feeds the next layer; h_att (perturbed) and perturb (the mask M, (B, H, n, n)) exist only
    with the adversarial calibrator."""

    h_cal: torch.Tensor
    h_att: torch.Tensor | None
    perturb: torch.Tensor | None


class CalibratedAttention(nn.Module):
    """AC-TSR attention (post-LN BERT style), heads split along channels.

    forward(x, key_padding_mask) takes (B, n, d), the last n <= max_len positions (the gate is
    Linear(d -> max_len) over absolute key positions: a narrower batch uses its last n columns), and
    returns (h_cal, h_att, perturb) with h = LN(Drop(W_o (P V)) + x) for P = P_fin and P = P_att; the two
    outputs share V, W_o, the dropout module and the LayerNorm as released. adversarial=False keeps only
    the spatial calibrator (h_att and perturb None).

    Parameters: Q/K/V linears; the spatial calibrator's w_oq, w_ok, w_dq, w_dk (d_h, shared by the heads),
    b_o, b_d and dist_scale (scalars); the adversarial maps a_q, a_k (d x d, no bias, applied as Q a_q
    before the head split); the gate Linear(d -> max_len) on Q; the output dense and LayerNorm. The
    adversarial loss updates only a_q/a_k (``adversarial_parameters``), the calibrated loss everything
    else (``calibrator_parameters``).
    Initialisation as RecBole: weights N(0, 0.02), biases 0, dist_scale N(0, 1) (released torch.randn(1)).
    perturb_dropout (dropout on M) defaults to attn_dropout, as the released layer uses one dropout for both.
    refine ("simp", "add", "value"; SPEC §3): AWRSR refinement of the weights h_cal uses (A = P_fin, or P_sp
    without the adversarial calibrator), with (max_len, max_len) matrices w_rq, w_rk (, w_rv), per head
    with per_head_refine, initialised xavier_normal as SASRec's; c from refine_scale ("d_h", "d", "n").
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        max_len: int,
        *,
        adversarial: bool = True,
        attn_dropout: float = 0.0,
        hidden_dropout: float = 0.5,
        perturb_dropout: float | None = None,
        layer_norm_eps: float = 1e-12,
        refine: str = "none",
        per_head_refine: bool = False,
        refine_scale: str = "d_h",
        backend: str = "auto",
    ):
        super().__init__()
        V.check_choice("refine", refine, spec.REFINE_MECHANISMS)
        if d_model % n_heads:
            raise ValueError(f"n_heads: expected a divisor of d_model={d_model}, got {n_heads}")
        self.d_model, self.n_heads, self.max_len, self.adversarial = d_model, n_heads, max_len, adversarial
        self.attn_dropout, self.backend = attn_dropout, backend
        self.perturb_dropout = attn_dropout if perturb_dropout is None else perturb_dropout
        d_h = d_model // n_heads
        self.query = nn.Linear(d_model, d_model)
        self.key = nn.Linear(d_model, d_model)
        self.value = nn.Linear(d_model, d_model)
        self.w_oq = nn.Parameter(torch.empty(d_h))
        self.w_ok = nn.Parameter(torch.empty(d_h))
        self.b_o = nn.Parameter(torch.empty(()))
        self.w_dq = nn.Parameter(torch.empty(d_h))
        self.w_dk = nn.Parameter(torch.empty(d_h))
        self.b_d = nn.Parameter(torch.empty(()))
        self.dist_scale = nn.Parameter(torch.empty(()))
        if adversarial:
            self.a_q = nn.Parameter(torch.empty(d_model, d_model))
            self.a_k = nn.Parameter(torch.empty(d_model, d_model))
            self.gate = nn.Linear(d_model, max_len)
        self.refine = refine
        self.refine_scale = refine_scale_value(refine_scale, d_model, n_heads, max_len)
        shape = (n_heads, max_len, max_len) if per_head_refine else (max_len, max_len)
        for name in spec.REFINE_WEIGHTS[refine]:
            self.register_parameter(name, nn.Parameter(torch.empty(shape)))
        self.dense = nn.Linear(d_model, d_model)
        self.out_dropout = nn.Dropout(hidden_dropout)
        self.layer_norm = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        linears = [self.query, self.key, self.value, self.dense] + ([self.gate] if self.adversarial else [])
        for lin in linears:
            nn.init.normal_(lin.weight, std=RECBOLE_INIT_STD)
            nn.init.zeros_(lin.bias)
        for w in (self.w_oq, self.w_ok, self.w_dq, self.w_dk) + ((self.a_q, self.a_k) if self.adversarial else ()):
            nn.init.normal_(w, std=RECBOLE_INIT_STD)
        nn.init.zeros_(self.b_o)
        nn.init.zeros_(self.b_d)
        nn.init.normal_(self.dist_scale)
        for name in spec.REFINE_WEIGHTS[self.refine]:
            nn.init.xavier_normal_(getattr(self, name))
        self.layer_norm.reset_parameters()

    def adversarial_parameters(self) -> list[nn.Parameter]:
        """What the adversarial loss L_att updates: A_q, A_k (empty without the adversarial calibrator)."""
        return [self.a_q, self.a_k] if self.adversarial else []

    def calibrator_parameters(self) -> list[nn.Parameter]:
        """What the calibrated loss L_cal updates: every parameter but A_q, A_k."""
        adversarial = {id(p) for p in self.adversarial_parameters()}
        return [p for p in self.parameters() if id(p) not in adversarial]

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, n, _ = x.shape
        return x.view(batch, n, self.n_heads, self.d_model // self.n_heads).transpose(1, 2)

    def merge_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, n, _ = x.shape
        return x.transpose(1, 2).reshape(batch, n, self.d_model)

    def _output(self, ctx: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.layer_norm(self.out_dropout(self.dense(self.merge_heads(ctx))) + x)

    def forward(
        self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None, *, noise: torch.Tensor | None = None
    ) -> CalibratedLayerOutput:
        """noise: optional fixed N(0, 1) draw (B, H, n, n) for the perturbed attention (drawn when None)."""
        q, k, v, adv = self._attention_inputs(x, noise)
        out = calibrated_attention(
            q,
            k,
            v,
            **self._calibrator(x.shape[1]),
            key_padding_mask=key_padding_mask,
            dropout_p=self.attn_dropout if self.training else 0.0,
            perturb_dropout_p=self.perturb_dropout if self.training else 0.0,
            backend=self.backend,
            **adv,
        )
        h_cal = self._output(out.out_cal, x)
        h_att = self._output(out.out_att, x) if out.out_att is not None else None
        return CalibratedLayerOutput(h_cal, h_att, out.perturb)

    def _attention_inputs(self, x: torch.Tensor, noise: torch.Tensor | None):
        """(q, k, v, adversarial inputs) of the op for x (B, n, d), n <= max_len the last n positions: the
        gate's columns are absolute key positions, so a narrower batch takes its last n columns (the same
        function as on the batch padded back to max_len, whose padding keys are masked)."""
        if x.dim() != 3 or not 1 <= x.shape[1] <= self.max_len or x.shape[2] != self.d_model:
            raise ValueError(
                f"x: expected (B, n, d={self.d_model}) with 1 <= n <= max_len={self.max_len}, got {tuple(x.shape)}"
            )
        q_full, k_full = self.query(x), self.key(x)
        q, k, v = self.split_heads(q_full), self.split_heads(k_full), self.split_heads(self.value(x))
        adv = {}
        if self.adversarial:
            adv = dict(
                q_adv=self.split_heads(q_full @ self.a_q),
                k_adv=self.split_heads(k_full @ self.a_k),
                gate_logits=self.gate(q_full)[..., self.max_len - x.shape[1] :],
                noise=noise,
            )
        return q, k, v, adv

    def _calibrator(self, n: int) -> dict:
        """The op's calibrator and refinement arguments for a batch of the last n positions."""
        refinement = {}
        if self.refine != "none":
            weights = window_refine_weights(self, spec.REFINE_WEIGHTS[self.refine], self.max_len, n)
            refinement = dict(refine=self.refine, refine_scale=self.refine_scale, **weights)
        return dict(
            w_oq=self.w_oq,
            w_ok=self.w_ok,
            b_o=self.b_o,
            w_dq=self.w_dq,
            w_dk=self.w_dk,
            b_d=self.b_d,
            dist_scale=self.dist_scale,
            **refinement,
        )

    @torch.no_grad()
    def attention_weights(
        self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None, *, noise: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """The weights before dropout, from the reference: "P_sp" and, with the adversarial calibrator,
        "M", "P_att", "P_cal", "P_fin" (B, H, n, n); with a refinement also "B" and "P" (what h_cal uses).
        Dropout follows the module's mode for M only: call eval() first for clean maps."""
        from ..reference.calibrated import calibrated

        q, k, v, adv = self._attention_inputs(x, noise)
        _, weights = calibrated(
            q,
            k,
            v,
            **self._calibrator(x.shape[1]),
            **adv,
            key_padding_mask=key_padding_mask,
            perturb_dropout_p=self.perturb_dropout if self.training else 0.0,
            return_weights=True,
        )
        return weights

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, n_heads={self.n_heads}, max_len={self.max_len}, "
            f"adversarial={self.adversarial}, refine={self.refine!r}, backend={self.backend!r}"
        )
