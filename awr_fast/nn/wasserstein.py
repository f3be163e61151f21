"""STOSA's Wasserstein self-attention layer (DistSelfAttention) with AWRSR refinement, over the public op."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import validation as V
from ..api import wasserstein_attention
from ..backends import check_backend, preload
from ..ops import w2_refined as spec
from ..ops.dot_refined import refine_scale_value
from .dot import check_window, weights_backend, window_refine_weights

STOSA_INIT_MEAN, STOSA_INIT_STD = 0.01, 0.02


class WassersteinAttention(nn.Module):
    """STOSA DistSelfAttention (SPEC §4): Gaussian W2 attention, heads split along channels.

    forward(mu, sigma, key_padding_mask) takes (B, n, d) with n <= max_len, the last n positions
    (refinement matrices are indexed by absolute, left-padded position; see RefinedMultiheadAttention),
    and returns (mu', sigma'):
        mu'    = LN(Drop(W_mo ctx_mu) + mu),   ctx_mu  = P' (W_mq-projected means, per head)
        sigma' = LN(Drop(W_so ctx_sig) + sigma), ctx_sig = (P' o P') (ELU(W_sv sigma) + 1)
    One LayerNorm is shared by both streams, as in STOSA. refine_scale picks c = 1/sqrt(d_h | d | n).
    Initialisation is STOSA's: weights N(0.01, 0.02) (linears and refinement matrices), biases 0.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        max_len: int,
        mechanism: str = "none",
        *,
        per_head_refine: bool = False,
        attn_dropout: float = 0.0,
        hidden_dropout: float = 0.3,
        refine_input: str = "probs",
        refine_scale: str = "d_h",
        backend: str = "auto",
        layer_norm_eps: float = 1e-12,
    ):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"n_heads: expected a divisor of d_model={d_model}, got {n_heads}")
        V.check_choice("mechanism", mechanism, spec.MECHANISMS)
        check_backend("backend", backend)
        self.d_model, self.n_heads, self.max_len = d_model, n_heads, max_len
        self.mechanism, self.attn_dropout, self.refine_input = mechanism, attn_dropout, refine_input
        self.backend = backend
        preload("w2_refined")  # so that torch.compile traces the dispatch without importing
        self.refine_scale = refine_scale_value(refine_scale, d_model, n_heads, max_len)
        self.mean_query = nn.Linear(d_model, d_model)
        self.mean_key = nn.Linear(d_model, d_model)
        self.mean_value = nn.Linear(d_model, d_model)
        self.cov_query = nn.Linear(d_model, d_model)
        self.cov_key = nn.Linear(d_model, d_model)
        self.cov_value = nn.Linear(d_model, d_model)
        self.mean_dense = nn.Linear(d_model, d_model)
        self.cov_dense = nn.Linear(d_model, d_model)
        self.out_dropout = nn.Dropout(hidden_dropout)
        self.layer_norm = nn.LayerNorm(d_model, eps=layer_norm_eps)
        shape = (n_heads, max_len, max_len) if per_head_refine else (max_len, max_len)
        for name in spec.WEIGHTS[mechanism]:
            self.register_parameter(name, nn.Parameter(torch.empty(shape)))
        self.reset_parameters()

    def linears(self) -> tuple[nn.Linear, ...]:
        return (
            self.mean_query,
            self.mean_key,
            self.mean_value,
            self.cov_query,
            self.cov_key,
            self.cov_value,
            self.mean_dense,
            self.cov_dense,
        )

    def reset_parameters(self) -> None:
        for lin in self.linears():
            nn.init.normal_(lin.weight, mean=STOSA_INIT_MEAN, std=STOSA_INIT_STD)
            nn.init.zeros_(lin.bias)
        self.layer_norm.reset_parameters()
        for name in spec.WEIGHTS[self.mechanism]:
            nn.init.normal_(getattr(self, name), mean=STOSA_INIT_MEAN, std=STOSA_INIT_STD)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, n, _ = x.shape
        return x.view(batch, n, self.n_heads, self.d_model // self.n_heads).transpose(1, 2)

    def merge_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, n, _ = x.shape
        return x.transpose(1, 2).reshape(batch, n, self.d_model)

    def refinement_weights(self, n: int) -> dict[str, torch.Tensor]:
        """The refinement matrices for a batch of the last n positions (n = max_len: all of them)."""
        return window_refine_weights(self, spec.WEIGHTS[self.mechanism], self.max_len, n)

    def forward(
        self,
        mu: torch.Tensor,
        sigma: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        *,
        return_weights: bool = False,
    ):
        """-> (mu', sigma'); with return_weights=True, ((mu', sigma'), weights) with the op's weights {"A",
        "B", "P"} of this call, each (B, H, n, n)."""
        check_window("mu", mu, self.max_len, self.d_model)
        if sigma.shape != mu.shape:
            raise ValueError(f"sigma: expected shape {tuple(mu.shape)} (that of mu), got {tuple(sigma.shape)}")
        mu_q, mu_k, mu_v = (self.split_heads(lin(mu)) for lin in (self.mean_query, self.mean_key, self.mean_value))
        sig_q, sig_k, sig_v = (
            self.split_heads(F.elu(lin(sigma)) + 1.0) for lin in (self.cov_query, self.cov_key, self.cov_value)
        )
        weights = self.refinement_weights(mu.shape[1])
        out = wasserstein_attention(
            mu_q,
            sig_q,
            mu_k,
            sig_k,
            mu_v,
            sig_v,
            mechanism=self.mechanism,
            key_padding_mask=key_padding_mask,
            refine_scale=self.refine_scale,
            refine_input=self.refine_input,
            dropout_p=self.attn_dropout if self.training else 0.0,
            return_weights=return_weights,
            backend=weights_backend("w2_refined", self.backend) if return_weights else self.backend,
            **weights,
        )
        (ctx_mu, ctx_sig), maps = out if return_weights else (out, None)
        mu_out = self.layer_norm(self.out_dropout(self.mean_dense(self.merge_heads(ctx_mu))) + mu)
        sig_out = self.layer_norm(self.out_dropout(self.cov_dense(self.merge_heads(ctx_sig))) + sigma)
        return ((mu_out, sig_out), maps) if return_weights else (mu_out, sig_out)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, n_heads={self.n_heads}, max_len={self.max_len}, "
            f"mechanism={self.mechanism!r}, backend={self.backend!r}"
        )
