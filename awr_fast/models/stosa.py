"""STOSA (zfan20/STOSA, DistSAModel): Gaussian embeddings and Wasserstein self-attention (SPEC §4), with
AWRSR refinement of the W2 attention weights (SPEC §3, incl. M_stoc).

Every item and position has a mean and a covariance embedding; the sequence state is a pair (mu, sigma)
of (B, n, d) tensors, sigma a positive diagonal covariance. Items are ranked by ascending squared W2
distance between the last position's Gaussian and the item's (E_mu[i], ELU(E_sig[i]) + 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..api import w2_scores
from ..backends import capabilities, preload
from ..nn.wasserstein import STOSA_INIT_MEAN, STOSA_INIT_STD, WassersteinAttention
from ..ops import w2_refined as w2_spec
from . import losses
from .sasrec import SequentialRecommender, check_bool, check_common

STOSA_ATTENTIONS = w2_spec.MECHANISMS
STOSA_LN_EPS = 1e-12


class GaussianFeedForward(nn.Module):
    """STOSA's DistIntermediate: LN(x + Drop(W2 ELU(W1 x))), inner width 4d, its own LayerNorm."""

    def __init__(self, d_model: int, dropout: float):
        super().__init__()
        self.dense_1 = nn.Linear(d_model, 4 * d_model)
        self.dense_2 = nn.Linear(4 * d_model, d_model)
        self.dropout = nn.Dropout(dropout)
        self.layer_norm = nn.LayerNorm(d_model, eps=STOSA_LN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer_norm(x + self.dropout(self.dense_2(F.elu(self.dense_1(x)))))


class STOSALayer(nn.Module):
    """STOSA's DistLayer: W2 attention (output dense, residual, shared LN inside), then a mean FFN and a
    covariance FFN followed by ELU(.) + 1."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        max_len: int,
        *,
        attention: str,
        per_head_refine: bool,
        attn_dropout: float,
        dropout: float,
        refine_input: str,
        refine_scale: str,
        backend: str,
    ):
        super().__init__()
        self.attention = WassersteinAttention(
            d_model,
            n_heads,
            max_len,
            attention,
            per_head_refine=per_head_refine,
            attn_dropout=attn_dropout,
            hidden_dropout=dropout,
            refine_input=refine_input,
            refine_scale=refine_scale,
            backend=backend,
            layer_norm_eps=STOSA_LN_EPS,
        )
        self.mean_ffn = GaussianFeedForward(d_model, dropout)
        self.cov_ffn = GaussianFeedForward(d_model, dropout)

    def forward(
        self, mu: torch.Tensor, sigma: torch.Tensor, key_padding_mask: torch.Tensor, mean_stream: bool = True
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """mean_stream=False skips the mean FFN (its output would be discarded; returns None for mu)."""
        mu, sigma = self.attention(mu, sigma, key_padding_mask)
        sigma = F.elu(self.cov_ffn(sigma)) + 1.0
        return (self.mean_ffn(mu) if mean_stream else None), sigma


class STOSA(SequentialRecommender):
    """STOSA with optional AWRSR refinement (attention in none/simp/add/value/stoc).

    Input: mu0 = ELU(Drop(LN(E_mu[s] + P_mu))), sigma0 = ELU(Drop(LN(E_sig[s] + P_sig))) + 1, one LayerNorm
    (eps 1e-12) shared by the two streams. Each layer: (mu, sigma) -> STOSALayer. The attention scale is
    SPEC §4's: scores -W2sq / sqrt(d_h) (WassersteinAttention's default), refine_scale picks c of §3.

    stosa_compat=True reproduces the released encoder, which never updates the mean stream (it assigns
    the layer output to a misspelled variable): every layer reads mu0 and the model returns mu0, while the
    covariance stream is updated as usual. Only the mean stream differs between the two settings (with one
    layer the sigma outputs are identical); the mean value/dense/FFN weights then receive no gradient.

    Init as STOSA: every Linear and Embedding weight (incl. the padding row, which is never read through
    the masks) N(0.01, 0.02), biases 0, LayerNorms 1/0; refinement matrices N(0.01, 0.02).
    """

    def __init__(
        self,
        num_items: int,
        max_len: int,
        *,
        d_model: int = 64,
        n_layers: int = 1,
        n_heads: int = 4,
        dropout: float = 0.3,
        attn_dropout: float = 0.0,
        attention: str = "none",
        per_head_refine: bool = False,
        refine_input: str = "probs",
        refine_scale: str = "d_h",
        backend: str = "auto",
        pvn: float = 0.005,
        stosa_compat: bool = False,
    ):
        super().__init__()
        check_common(
            num_items=num_items,
            max_len=max_len,
            d_model=d_model,
            n_layers=n_layers,
            n_heads=n_heads,
            dropout=dropout,
            attn_dropout=attn_dropout,
            attention=attention,
            attentions=STOSA_ATTENTIONS,
            per_head_refine=per_head_refine,
            refine_input=refine_input,
            refine_scale=refine_scale,
            backend=backend,
        )
        if isinstance(pvn, bool) or not isinstance(pvn, (int, float)) or not pvn >= 0.0:
            raise ValueError(f"pvn: expected a weight >= 0, got {pvn!r}")
        check_bool("stosa_compat", stosa_compat)
        self.num_items, self.max_len, self.d_model = num_items, max_len, d_model
        self.attention, self.pvn, self.stosa_compat, self.backend = attention, float(pvn), stosa_compat, backend
        self.scores_backend = backend if backend in capabilities("w2_scores") else "auto"
        preload("w2_scores")  # import the backends now, so that torch.compile traces the dispatch
        self.item_mean_emb = nn.Embedding(num_items + 1, d_model, padding_idx=0)
        self.item_cov_emb = nn.Embedding(num_items + 1, d_model, padding_idx=0)
        self.pos_mean_emb = nn.Embedding(max_len, d_model)
        self.pos_cov_emb = nn.Embedding(max_len, d_model)
        self.emb_norm = nn.LayerNorm(d_model, eps=STOSA_LN_EPS)
        self.emb_dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            STOSALayer(
                d_model,
                n_heads,
                max_len,
                attention=attention,
                per_head_refine=per_head_refine,
                attn_dropout=attn_dropout,
                dropout=dropout,
                refine_input=refine_input,
                refine_scale=refine_scale,
                backend=backend,
            )
            for _ in range(n_layers)
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=STOSA_INIT_MEAN, std=STOSA_INIT_STD)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                module.reset_parameters()
            elif isinstance(module, WassersteinAttention):
                for name in w2_spec.WEIGHTS[module.mechanism]:
                    nn.init.normal_(getattr(module, name), mean=STOSA_INIT_MEAN, std=STOSA_INIT_STD)

    def item_gaussians(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, sigma) of every item, each (num_items + 1, d): E_mu and ELU(E_sig) + 1 (row 0 = padding)."""
        return self.item_mean_emb.weight, F.elu(self.item_cov_emb.weight) + 1.0

    def embed(self, seq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """seq (B, n), the last n positions -> (mu0, sigma0), each (B, n, d)."""
        rows = self.position_rows(seq.shape[1])
        mu = self.emb_norm(self.item_mean_emb(seq) + self.pos_mean_emb.weight[rows][None])
        sigma = self.emb_norm(self.item_cov_emb(seq) + self.pos_cov_emb.weight[rows][None])
        return F.elu(self.emb_dropout(mu)), F.elu(self.emb_dropout(sigma)) + 1.0

    def _encode(self, seq: torch.Tensor, upto: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        key_padding_mask = seq == 0
        mu, sigma = self.embed(seq)
        for layer in self.layers[:upto]:
            new_mu, sigma = layer(mu, sigma, key_padding_mask, mean_stream=not self.stosa_compat)
            if not self.stosa_compat:
                mu = new_mu
        return mu, sigma

    def forward(self, seq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """seq (B, n) left-padded, the last n <= max_len positions -> (mu, sigma), each (B, n, d)."""
        return self._encode(self._check_seq(seq))

    def loss(
        self,
        seq: torch.Tensor,
        pos: torch.Tensor,
        neg: torch.Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """STOSA's W2 BPR loss + pvn term (losses.w2_bpr_loss) at every non-padding target of pos (B, n);
        one uniform negative per position is drawn when neg is None."""
        self._check_targets(seq, pos)
        pos = pos.long()
        neg = self._negatives(seq, pos, neg, 1, generator)
        mu, sigma = self.forward(seq)
        item_mu, item_sig = self.item_gaussians()
        return losses.w2_bpr_loss(mu, sigma, item_mu, item_sig, pos, neg, self.pvn)

    def score_all(self, seq: torch.Tensor) -> torch.Tensor:
        """(B, num_items + 1) = -W2sq(last position, item) via awr_fast.w2_scores, column 0 = -inf; float32
        or wider even under autocast. The scoring op runs on the model's backend where that backend
        implements w2_scores, else on "auto" (scores_backend)."""
        mu, sigma = self.forward(seq)
        item_mu, item_sig = self.item_gaussians()
        dtype = self._scoring_dtype(mu, item_mu, item_sig)
        with torch.autocast(device_type=mu.device.type, enabled=False):
            dist = w2_scores(
                mu[:, -1].to(dtype).contiguous(),
                sigma[:, -1].to(dtype).contiguous(),
                item_mu.to(dtype),
                item_sig.to(dtype),
                backend=self.scores_backend,
            )
        return self._mask_padding_column(-dist)

    def score_items(self, seq: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """(B, k) = -W2sq(last position, item) for the given items (B, k); item 0 scores -inf."""
        mu, sigma = self.forward(seq)
        items = items.long()
        item_mu = self.item_mean_emb(items)
        item_sig = F.elu(self.item_cov_emb(items)) + 1.0
        dtype = self._scoring_dtype(mu, item_mu, item_sig)
        with torch.autocast(device_type=mu.device.type, enabled=False):
            dist = losses.w2_pair_distance(
                mu[:, -1:].to(dtype), sigma[:, -1:].to(dtype), item_mu.to(dtype), item_sig.to(dtype)
            )
        return (-dist).masked_fill(items == 0, float("-inf"))

    @torch.no_grad()
    def attention_maps(self, seq: torch.Tensor) -> dict[str, torch.Tensor]:
        """The last layer's W2 attention weights (its module's return_weights): "A", "B" (only when
        attention != "none"), "P", each (B, H, max_len, max_len) over absolute positions, plus
        "key_padding_mask" (B, max_len). Call model.eval() first for clean maps."""
        seq = self._pad_seq(seq)
        key_padding_mask = seq == 0
        mu, sigma = self._encode(seq, upto=len(self.layers) - 1)
        _, maps = self.layers[-1].attention(mu, sigma, key_padding_mask, return_weights=True)
        return {**maps, "key_padding_mask": key_padding_mask}

    def extra_repr(self) -> str:
        return (
            f"num_items={self.num_items}, max_len={self.max_len}, attention={self.attention!r}, "
            f"pvn={self.pvn}, stosa_compat={self.stosa_compat}"
        )
