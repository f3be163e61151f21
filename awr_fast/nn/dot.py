"""SASRec multi-head self-attention with AWRSR refinement, as an nn.Module over the public op."""

from __future__ import annotations

import torch
from torch import nn

from .. import validation as V
from ..api import refined_attention
from ..backends import capabilities, check_backend, preload
from ..ops import dot_refined as spec


def weights_backend(op: str, backend: str) -> str:
    """A module's backend for a return_weights call: its own where that stores the weights, else "auto"
    (which picks the first that does)."""
    row = capabilities(op).get(backend)
    return backend if row is not None and row.weights else "auto"


def check_window(name: str, x: torch.Tensor, max_len: int, d_model: int) -> None:
    if x.dim() != 3 or not 1 <= x.shape[1] <= max_len or x.shape[2] != d_model:
        raise ValueError(
            f"{name}: expected (B, n, d={d_model}) with 1 <= n <= max_len={max_len} (the last n "
            f"positions), got {tuple(x.shape)}"
        )


def window_refine_weights(module: nn.Module, names: tuple[str, ...], max_len: int, n: int) -> dict[str, torch.Tensor]:
    """Refinement matrices for the window of the last n of max_len positions: the projections (W_RQ, W_RK,
    W_mu, W_sigma) keep their rows for those positions and all max_len columns, since (A W)_ic sums over
    the rows of W that meet non-zero columns of A; W_RV (whose columns are key positions) keeps the
    square block."""
    off = max_len - n
    weights = {}
    for name in names:
        w = getattr(module, name)
        weights[name] = w if off == 0 else (w[..., off:, off:] if name == "w_rv" else w[..., off:, :])
    return weights


class RefinedMultiheadAttention(nn.Module):
    """Causal multi-head attention (heads split along channels) whose weights AWRSR refines.

    forward(queries, keys, key_padding_mask) takes (B, n, d) with n <= max_len and returns (B, n, d).
    The refinement matrices are indexed by absolute, left-padded position: a batch narrower than
    max_len holds the last n positions (its columns that are padding in every row were dropped), and
    the layer uses the matching rows of the matrices (refinement_weights), the same function as on the
    batch padded back to max_len.
    out_proj=False gives the original SASRec layer (no output projection), True the pmixer/torch one.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        max_len: int,
        mechanism: str = "none",
        *,
        per_head_refine: bool = False,
        dropout: float = 0.0,
        refine_input: str = "probs",
        refine_scale: str = "d_h",
        bias: bool = True,
        out_proj: bool = True,
        backend: str = "auto",
    ):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"n_heads: expected a divisor of d_model={d_model}, got {n_heads}")
        V.check_choice("mechanism", mechanism, spec.MECHANISMS)
        check_backend("backend", backend)
        self.d_model, self.n_heads, self.max_len = d_model, n_heads, max_len
        self.mechanism, self.dropout, self.refine_input, self.backend = mechanism, dropout, refine_input, backend
        preload("dot_refined")  # so that torch.compile traces the dispatch without importing
        self.refine_scale = spec.refine_scale_value(refine_scale, d_model, n_heads, max_len)
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)
        self.k_proj = nn.Linear(d_model, d_model, bias=bias)
        self.v_proj = nn.Linear(d_model, d_model, bias=bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias) if out_proj else nn.Identity()
        shape = (n_heads, max_len, max_len) if per_head_refine else (max_len, max_len)
        for name in spec.WEIGHTS[mechanism]:
            self.register_parameter(name, nn.Parameter(torch.empty(shape)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            if isinstance(lin, nn.Linear):
                nn.init.xavier_normal_(lin.weight)
                if lin.bias is not None:
                    nn.init.zeros_(lin.bias)
        for name in spec.WEIGHTS[self.mechanism]:
            nn.init.xavier_normal_(getattr(self, name))  # SASRec initialises everything xavier_normal

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, n, _ = x.shape
        return x.view(batch, n, self.n_heads, self.d_model // self.n_heads).transpose(1, 2)

    def refinement_weights(self, n: int) -> dict[str, torch.Tensor]:
        """The refinement matrices for a batch of the last n positions (n = max_len: all of them)."""
        return window_refine_weights(self, spec.WEIGHTS[self.mechanism], self.max_len, n)

    def forward(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
        *,
        return_weights: bool = False,
    ):
        """(B, n, d) -> (B, n, d); with return_weights=True, (out, weights) with the op's weights {"A", "B",
        "P"} of this call, each (B, H, n, n) (a backend that stores them runs: eager or reference)."""
        keys = queries if keys is None else keys
        check_window("queries", queries, self.max_len, self.d_model)
        q = self.split_heads(self.q_proj(queries))
        k = self.split_heads(self.k_proj(keys))
        v = self.split_heads(self.v_proj(keys))
        out = refined_attention(
            q,
            k,
            v,
            mechanism=self.mechanism,
            **self.refinement_weights(queries.shape[1]),
            key_padding_mask=key_padding_mask,
            refine_scale=self.refine_scale,
            refine_input=self.refine_input,
            dropout_p=self.dropout if self.training else 0.0,
            return_weights=return_weights,
            backend=weights_backend("dot_refined", self.backend) if return_weights else self.backend,
        )
        out, weights = out if return_weights else (out, None)
        batch, _, n, _ = out.shape
        out = self.out_proj(out.transpose(1, 2).reshape(batch, n, self.d_model))
        return (out, weights) if return_weights else out

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, n_heads={self.n_heads}, max_len={self.max_len}, "
            f"mechanism={self.mechanism!r}, backend={self.backend!r}"
        )
