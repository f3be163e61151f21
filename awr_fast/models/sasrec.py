"""SASRec (kang205/SASRec, pmixer/SASRec.pytorch) with AWRSR-refined attention (SPEC §2, §3).

Also home of ``SequentialRecommender``, the interface every model of awr_fast.models implements:
forward / loss / score_all / score_items / attention_maps over left-padded LongTensor batches.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..backends import check_backend
from ..nn.dot import RefinedMultiheadAttention
from ..ops import dot_refined as dot_spec
from ..ops import w2_refined as w2_spec
from . import losses
from .negatives import sample_negatives

#: Parameter names of the AWRSR n x n matrices, in every model.
REFINE_PARAMS = tuple(
    dict.fromkeys(name for spec in (dot_spec, w2_spec) for names in spec.WEIGHTS.values() for name in names)
)
SASREC_ATTENTIONS = dot_spec.CAUSAL_MECHANISMS
SASREC_LAYOUTS = ("original", "post_ln")
SASREC_LOSSES = ("bce", "ce", "sampled_ce")
DEFAULT_SAMPLED_CE_NEGATIVES = 100
SASREC_LN_EPS = 1e-8  # kang205 / pmixer


# ----------------------------------------------------------------------------------------------------
# Argument checks shared by the models: each error names the argument.


def check_int(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {list(choices)}, got {value!r}")


def check_dropout(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name}: expected a probability in [0, 1), got {value!r}")


def check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name}: expected True or False, got {value!r}")


def check_common(
    *,
    num_items,
    max_len,
    d_model,
    n_layers,
    n_heads,
    dropout,
    attn_dropout,
    attention,
    attentions,
    per_head_refine,
    refine_input,
    refine_scale,
    backend,
) -> None:
    check_int("num_items", num_items)
    check_int("max_len", max_len)
    check_int("d_model", d_model)
    check_int("n_layers", n_layers)
    check_int("n_heads", n_heads)
    if d_model % n_heads:
        raise ValueError(f"n_heads: expected a divisor of d_model={d_model}, got {n_heads}")
    check_dropout("dropout", dropout)
    check_dropout("attn_dropout", attn_dropout)
    check_choice("attention", attention, attentions)
    check_bool("per_head_refine", per_head_refine)
    check_choice("refine_input", refine_input, dot_spec.REFINE_INPUTS)
    check_choice("refine_scale", refine_scale, dot_spec.REFINE_SCALES)
    check_backend("backend", backend)


# ----------------------------------------------------------------------------------------------------


class SequentialRecommender(nn.Module):
    """Shared plumbing. Inputs are LongTensor (B, n) left-padded with item 0, n <= max_len. A batch
    narrower than max_len is the last n positions of one (absolute positions max_len - n .. max_len - 1,
    which index the position embeddings and the refinement matrices): the model computes exactly what it
    would on the batch padded back to max_len, without the padding. The trainer drops the columns that
    are padding in every row of a batch (TrainConfig.trim_padding), so the work follows the longest
    sequence of the batch.

    Subclasses implement ``forward``, ``loss``, ``score_all``, ``score_items``, ``attention_maps``.
    """

    num_items: int
    max_len: int

    def _check_seq(self, seq: torch.Tensor, name: str = "seq") -> torch.Tensor:
        """seq as int64 (B, n), 1 <= n <= max_len: the last n positions."""
        integer = isinstance(seq, torch.Tensor) and not seq.dtype.is_floating_point and seq.dtype != torch.bool
        if not integer or seq.dim() != 2:
            raise ValueError(
                f"{name}: expected an integer tensor (B, n) left-padded with 0, "
                f"got {getattr(seq, 'dtype', type(seq))} {tuple(getattr(seq, 'shape', ()))}"
            )
        n = seq.shape[1]
        if n > self.max_len:
            raise ValueError(
                f"{name}: expected at most max_len={self.max_len} positions, got {n} "
                f"(keep the most recent max_len items)"
            )
        if n == 0:
            raise ValueError(f"{name}: expected at least one position, got shape {tuple(seq.shape)}")
        return seq.long()

    def _pad_seq(self, seq: torch.Tensor, name: str = "seq") -> torch.Tensor:
        """seq left-padded to (B, max_len), for outputs over absolute positions (attention maps)."""
        seq = self._check_seq(seq, name)
        n = seq.shape[1]
        return F.pad(seq, (self.max_len - n, 0)) if n < self.max_len else seq

    def position_rows(self, n: int) -> slice:
        """The rows of the position tables for a batch of the last n positions."""
        return slice(self.max_len - n, self.max_len)

    def _check_targets(self, seq: torch.Tensor, pos: torch.Tensor) -> None:
        if not isinstance(pos, torch.Tensor) or pos.shape != seq.shape:
            raise ValueError(
                f"pos: expected a tensor of shape {tuple(seq.shape)} (that of seq), "
                f"got {tuple(getattr(pos, 'shape', ()))}"
            )

    def _negatives(self, seq, pos, neg, k, generator):
        if neg is None:
            return sample_negatives(seq, pos, self.num_items, k=k, generator=generator)
        if neg.shape != pos.shape and not (neg.dim() == 3 and neg.shape[:2] == pos.shape):
            raise ValueError(
                f"neg: expected shape {tuple(pos.shape)} or {tuple(pos.shape)} + (k,), got {tuple(neg.shape)}"
            )
        return neg.long()

    @staticmethod
    def _mask_padding_column(scores: torch.Tensor) -> torch.Tensor:
        scores[:, 0] = float("-inf")
        return scores

    @staticmethod
    def _scoring_dtype(*tensors: torch.Tensor) -> torch.dtype:
        """Scores are computed in the widest dtype of the inputs (float32 under autocast, never bf16:
        low-precision scores tie often and ties distort the ranking metrics)."""
        dtype = torch.float32
        for t in tensors:
            dtype = torch.promote_types(dtype, t.dtype)
        return dtype

    def parameter_parts(self) -> dict[str, dict[str, nn.Parameter]]:
        """Parameters by model part: item_embedding, position_embedding, attention (projections,
        output dense), refinement (the AWRSR n x n matrices), ffn, norm (LayerNorms). For optimiser
        groups, e.g. a separate learning rate or no weight decay for the refinement."""
        parts: dict[str, dict[str, nn.Parameter]] = {
            key: {} for key in ("item_embedding", "position_embedding", "attention", "refinement", "ffn", "norm")
        }
        for name, param in self.named_parameters():
            leaf_module = name.split(".")[-2] if "." in name else ""
            if name.split(".")[-1] in REFINE_PARAMS:
                part = "refinement"
            elif name.startswith("item_"):
                part = "item_embedding"
            elif name.startswith("pos_"):
                part = "position_embedding"
            elif "norm" in leaf_module:
                part = "norm"
            elif ".attn." in name or ".attention." in name:
                part = "attention"
            else:
                part = "ffn"
            parts[part][name] = param
        return parts


class PointWiseFeedForward(nn.Module):
    """pmixer's FFN (two kernel-1 Conv1d = two Linear): Drop(W2 Drop(ReLU(W1 x))); residual outside."""

    def __init__(self, d_model: int, dropout: float, inner: int | None = None):
        super().__init__()
        self.linear1 = nn.Linear(d_model, inner or d_model)
        self.linear2 = nn.Linear(inner or d_model, d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout2(self.linear2(self.dropout1(F.relu(self.linear1(x)))))


class SASRecBlock(nn.Module):
    """One SASRec block.
    layout="original" (kang205 / pmixer): Q = LN(x); x = Q + MHA(Q, x, x); x = LN(x); x = x + FFN(x).
    layout="post_ln": x = LN(x + Drop(MHA(x, x, x))); x = LN(x + FFN(x)).
    Padding positions are zeroed after the block, as pmixer does."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        max_len: int,
        *,
        layout: str,
        dropout: float,
        attn_dropout: float,
        attention: str,
        per_head_refine: bool,
        refine_input: str,
        refine_scale: str,
        backend: str,
    ):
        super().__init__()
        self.layout = layout
        self.attn_norm = nn.LayerNorm(d_model, eps=SASREC_LN_EPS)
        self.attn = RefinedMultiheadAttention(
            d_model,
            n_heads,
            max_len,
            attention,
            per_head_refine=per_head_refine,
            dropout=attn_dropout,
            refine_input=refine_input,
            refine_scale=refine_scale,
            out_proj=(layout == "post_ln"),
            backend=backend,
        )
        self.attn_dropout = nn.Dropout(dropout) if layout == "post_ln" else nn.Identity()
        self.ffn_norm = nn.LayerNorm(d_model, eps=SASREC_LN_EPS)
        self.ffn = PointWiseFeedForward(d_model, dropout)

    def attention_inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(queries, keys) that this block's attention sees for block input x."""
        return (self.attn_norm(x), x) if self.layout == "original" else (x, x)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor) -> torch.Tensor:
        keep = (~key_padding_mask)[..., None].to(x.dtype)
        if self.layout == "original":
            q = self.attn_norm(x)
            x = q + self.attn(q, x, key_padding_mask)
            x = self.ffn_norm(x)
            x = x + self.ffn(x)
        else:
            x = self.attn_norm(x + self.attn_dropout(self.attn(x, x, key_padding_mask)))
            x = self.ffn_norm(x + self.ffn(x))
        return x * keep


class TiedDotScores:
    """Scoring of the models with tied item embeddings (SASRec, AC-SASRec): <h_last, E[i]> from
    ``forward(seq)[:, -1]`` and ``item_emb``."""

    def score_all(self, seq: torch.Tensor) -> torch.Tensor:
        """(B, num_items + 1) scores <h_last, E[i]> of the last position, higher = better, column 0 = -inf.
        Computed in float32 or wider even under autocast."""
        h, table = self.forward(seq)[:, -1], self.item_embeddings()
        dtype = self._scoring_dtype(h, table)
        with torch.autocast(device_type=h.device.type, enabled=False):
            scores = h.to(dtype) @ table.to(dtype).transpose(0, 1)
        return self._mask_padding_column(scores)

    def score_items(self, seq: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """(B, k) scores of the given items (B, k) at the last position; item 0 scores -inf."""
        h = self.forward(seq)[:, -1]
        emb = self.item_emb(items.long())
        dtype = self._scoring_dtype(h, emb)
        with torch.autocast(device_type=h.device.type, enabled=False):
            scores = (emb.to(dtype) @ h.to(dtype)[:, :, None]).squeeze(-1)
        return scores.masked_fill(items == 0, float("-inf"))


class SASRec(TiedDotScores, SequentialRecommender):
    """SASRec with AWRSR refinement of its attention weights (SPEC §2, §3).

    Embedding: E[s] * sqrt(d) + P (learned absolute positions), dropout, times the non-padding mask.
    Scores are <h, E[i]> with the item table tied to the input embedding (``item_emb``).
    Init as pmixer: xavier_normal_ on every parameter with >= 2 dims (1-d ones keep their defaults:
    LayerNorm 1/0, attention biases 0, FFN biases PyTorch's uniform), then the padding row E[0] = 0.
    """

    def __init__(
        self,
        num_items: int,
        max_len: int,
        *,
        d_model: int = 64,
        n_layers: int = 1,
        n_heads: int = 1,
        dropout: float = 0.2,
        attn_dropout: float = 0.0,
        attention: str = "none",
        per_head_refine: bool = False,
        refine_input: str = "probs",
        refine_scale: str = "d_h",
        backend: str = "auto",
        layout: str = "original",
        loss: str = "bce",
        num_negatives: int | None = None,
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
            attentions=SASREC_ATTENTIONS,
            per_head_refine=per_head_refine,
            refine_input=refine_input,
            refine_scale=refine_scale,
            backend=backend,
        )
        check_choice("layout", layout, SASREC_LAYOUTS)
        check_choice("loss", loss, SASREC_LOSSES)
        if num_negatives is None:
            num_negatives = DEFAULT_SAMPLED_CE_NEGATIVES if loss == "sampled_ce" else 1
        check_int("num_negatives", num_negatives)
        self.num_items, self.max_len, self.d_model = num_items, max_len, d_model
        self.attention, self.layout, self.loss_type, self.num_negatives = attention, layout, loss, num_negatives
        self.backend = backend
        self.item_emb = nn.Embedding(num_items + 1, d_model, padding_idx=0)
        self.pos_emb = nn.Embedding(max_len, d_model)
        self.emb_dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            SASRecBlock(
                d_model,
                n_heads,
                max_len,
                layout=layout,
                dropout=dropout,
                attn_dropout=attn_dropout,
                attention=attention,
                per_head_refine=per_head_refine,
                refine_input=refine_input,
                refine_scale=refine_scale,
                backend=backend,
            )
            for _ in range(n_layers)
        )
        self.final_norm = nn.LayerNorm(d_model, eps=SASREC_LN_EPS) if layout == "original" else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for param in self.parameters():
            if param.dim() >= 2:
                nn.init.xavier_normal_(param)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    def item_embeddings(self) -> torch.Tensor:
        """The (num_items + 1, d) item table used for scoring (row 0 = padding)."""
        return self.item_emb.weight

    def embed(self, seq: torch.Tensor) -> torch.Tensor:
        """seq (B, n), the last n positions -> (B, n, d): E[s] sqrt(d) + P, dropout, times the non-padding mask."""
        x = self.item_emb(seq) * math.sqrt(self.d_model) + self.pos_emb.weight[self.position_rows(seq.shape[1])][None]
        return self.emb_dropout(x) * (seq != 0)[..., None].to(x.dtype)

    def _encode(self, seq: torch.Tensor, upto: int | None = None) -> torch.Tensor:
        key_padding_mask = seq == 0
        x = self.embed(seq)
        for block in self.blocks[:upto]:
            x = block(x, key_padding_mask)
        return x

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        """seq (B, n) left-padded, the last n <= max_len positions -> final hidden states (B, n, d)."""
        return self.final_norm(self._encode(self._check_seq(seq)))

    def loss(
        self,
        seq: torch.Tensor,
        pos: torch.Tensor,
        neg: torch.Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Training loss at every non-padding target of pos (B, n). neg (B, n) or (B, n, k) is drawn with
        awr_fast.models.negatives when None (num_negatives per position); "ce" uses no negatives."""
        self._check_targets(seq, pos)
        pos = pos.long()
        h = self.forward(seq)
        table = self.item_embeddings()
        if self.loss_type == "ce":
            return losses.full_ce_loss(h, table, pos)
        neg = self._negatives(seq, pos, neg, self.num_negatives, generator)
        if self.loss_type == "bce":
            return losses.bce_loss(h, table, pos, neg)
        return losses.sampled_ce_loss(h, table, pos, neg)

    @torch.no_grad()
    def attention_maps(self, seq: torch.Tensor) -> dict[str, torch.Tensor]:
        """The last layer's attention weights (its module's return_weights): "A" (first-order P, or the
        masked logits for refine_input="scores"), "B" (second-order scores, only when attention != "none"),
        "P" (final weights, before dropout), each (B, H, max_len, max_len) over absolute positions, plus
        "key_padding_mask" (B, max_len). Follows the module's train/eval mode for the embedding/FFN dropout:
        call model.eval() first for clean maps."""
        seq = self._pad_seq(seq)
        key_padding_mask = seq == 0
        block = self.blocks[-1]
        queries, keys = block.attention_inputs(self._encode(seq, upto=len(self.blocks) - 1))
        _, maps = block.attn(queries, keys, key_padding_mask, return_weights=True)
        return {**maps, "key_padding_mask": key_padding_mask}

    def extra_repr(self) -> str:
        return (
            f"num_items={self.num_items}, max_len={self.max_len}, attention={self.attention!r}, "
            f"layout={self.layout!r}, loss={self.loss_type!r}, num_negatives={self.num_negatives}"
        )
