"""AC-SASRec (AC-TSR, CIKM 2023) as released (AIM-SE/AC-TSR, RecBole based; SPEC §5).

Post-LN BERT blocks over calibrated attention (awr_fast.nn.CalibratedAttention): per layer the spatial
calibrator's P_sp, the adversarial calibrator's perturbation mask M, the perturbed output h_att (from
P_att) and the calibrated output h_cal (from P_fin). Both share V, W_o, the output LayerNorm and the FFN;
only h_cal feeds the next layer. No positional embedding (the released Beauty configuration; option
``position_embedding``), tied item embeddings, full-softmax cross-entropy.

Two losses, one optimiser step per batch:
    L_cal = CE(h_cal)                                   updates every parameter but the maps A_q, A_k
    L_att = -CE(h_att) + lambda * mean_l ||1 - M_l||_F  updates only A_q, A_k (the adversary)
``loss`` returns them as a :class:`~awr_fast.models.losses.RoutedLoss`; the trainer backpropagates each
into its own parameters (``backward(inputs=...)``), which gives exactly the gradients of the released
requires_grad toggling.

Readings (closest to the released code):
- The released "trainable mask loss weight" is an nn.Parameter (initialised 0.3) that no loss routes a
  gradient to (L_cal does not depend on it, L_att updates only the maps), so it is the fixed weight 0.3:
  here lambda is the fixed ``mask_loss_weight`` (0.03, the Beauty configuration's; 0.3 for that option).
- ||1 - M||_F is over the whole (B, H, n, n) mask of a layer, as released; padding entries (M = 0 there)
  count 1 each, so a batch narrower than max_len adds them back (the same value as the padded batch).
- The loss is taken at every non-padding target of ``pos``; with ``train_prefixes`` (the trainer's
  RecBole-style augmentation, every prefix a sample with its target at the last position) that is the
  released loss at the last position.
- The released logits include the padding item 0; here (as for SASRec) the softmax runs over items
  1..num_items.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.calibrated import RECBOLE_INIT_STD, CalibratedAttention
from ..ops.calibrated import REFINE_MECHANISMS
from . import losses
from .losses import RoutedLoss
from .sasrec import SequentialRecommender, TiedDotScores, check_bool, check_common, check_int

ACSASREC_ATTENTIONS = REFINE_MECHANISMS  # AWRSR refinement of P_fin
RECBOLE_LN_EPS = 1e-12  # RecBole's layer_norm_eps
DEFAULT_MASK_LOSS_WEIGHT = 0.03  # the released Beauty configuration


class BertFeedForward(nn.Module):
    """RecBole's FeedForward: LN(x + Drop(W2 GELU(W1 x)))."""

    def __init__(self, d_model: int, inner_size: int, dropout: float, eps: float = RECBOLE_LN_EPS):
        super().__init__()
        self.dense_1 = nn.Linear(d_model, inner_size)
        self.dense_2 = nn.Linear(inner_size, d_model)
        self.dropout = nn.Dropout(dropout)
        self.layer_norm = nn.LayerNorm(d_model, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer_norm(x + self.dropout(self.dense_2(F.gelu(self.dense_1(x)))))


class ACBlock(nn.Module):
    """One released AttackR layer: calibrated attention, then the FFN on each of its two outputs."""

    def __init__(
        self, d_model, n_heads, max_len, *, inner_size, dropout, attn_dropout, adversarial, refinement, backend
    ):
        super().__init__()
        self.attention = CalibratedAttention(
            d_model,
            n_heads,
            max_len,
            adversarial=adversarial,
            attn_dropout=attn_dropout,
            hidden_dropout=dropout,
            layer_norm_eps=RECBOLE_LN_EPS,
            **refinement,
            backend=backend,
        )
        self.ffn = BertFeedForward(d_model, inner_size, dropout)

    def forward(self, x, key_padding_mask):
        """(h_cal, h_att or None, M or None) of this layer for input x."""
        out = self.attention(x, key_padding_mask)
        h_att = self.ffn(out.h_att) if out.h_att is not None else None
        return self.ffn(out.h_cal), h_att, out.perturb


class ACSASRec(TiedDotScores, SequentialRecommender):
    """AC-SASRec (see the module docstring). Init as RecBole: Linear/Embedding weights N(0, 0.02), biases 0,
    LayerNorm 1/0 (the calibrator's own parameters as awr_fast.nn.CalibratedAttention), padding row 0.

    ``attention`` ("simp", "add", "value") refines the weights h_cal uses with AWRSR (SPEC §3: A = P_fin,
    or P_sp with ``adversarial=False``; matrices per layer, shared by the heads unless per_head_refine;
    refine_input must be "probs", as A is a probability matrix here).
    ``adversarial=False`` keeps only the spatial calibrator (then ``loss`` is L_cal alone, a plain tensor).
    """

    def __init__(
        self,
        num_items: int,
        max_len: int,
        *,
        d_model: int = 64,
        n_layers: int = 3,
        n_heads: int = 4,
        dropout: float = 0.5,
        attn_dropout: float = 0.5,
        attention: str = "none",
        per_head_refine: bool = False,
        refine_input: str = "probs",
        refine_scale: str = "d_h",
        backend: str = "auto",
        inner_size: int | None = None,
        mask_loss_weight: float = DEFAULT_MASK_LOSS_WEIGHT,
        adversarial: bool = True,
        position_embedding: bool = False,
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
            attentions=ACSASREC_ATTENTIONS,
            per_head_refine=per_head_refine,
            refine_input=refine_input,
            refine_scale=refine_scale,
            backend=backend,
        )
        inner_size = 2 * d_model if inner_size is None else inner_size
        check_int("inner_size", inner_size)
        if refine_input != "probs":
            raise ValueError(
                f"refine_input: expected 'probs' for acsasrec (A is the calibrated P_fin), got {refine_input!r}"
            )
        if isinstance(mask_loss_weight, bool) or not isinstance(mask_loss_weight, (int, float)) or mask_loss_weight < 0:
            raise ValueError(f"mask_loss_weight: expected a weight >= 0, got {mask_loss_weight!r}")
        check_bool("adversarial", adversarial)
        check_bool("position_embedding", position_embedding)
        self.num_items, self.max_len, self.d_model = num_items, max_len, d_model
        self.attention, self.backend, self.adversarial = attention, backend, adversarial
        self.mask_loss_weight = float(mask_loss_weight)
        #: what the trainer asks: ``loss`` returns a RoutedLoss (two losses, two parameter groups)
        self.routes_gradients = adversarial
        self.item_emb = nn.Embedding(num_items + 1, d_model, padding_idx=0)
        self.pos_emb = nn.Embedding(max_len, d_model) if position_embedding else None
        self.emb_norm = nn.LayerNorm(d_model, eps=RECBOLE_LN_EPS)
        self.emb_dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            ACBlock(
                d_model,
                n_heads,
                max_len,
                inner_size=inner_size,
                dropout=dropout,
                attn_dropout=attn_dropout,
                adversarial=adversarial,
                refinement=dict(refine=attention, per_head_refine=per_head_refine, refine_scale=refine_scale),
                backend=backend,
            )
            for _ in range(n_layers)
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=RECBOLE_INIT_STD)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, nn.LayerNorm):
                module.reset_parameters()
            if isinstance(module, CalibratedAttention):
                module.reset_parameters()
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    # -------------------------------------------------------------------------------------- parameters
    def adversarial_parameters(self) -> list[nn.Parameter]:
        """What L_att updates: the maps A_q, A_k of every layer."""
        return [p for block in self.blocks for p in block.attention.adversarial_parameters()]

    def calibrator_parameters(self) -> list[nn.Parameter]:
        """What L_cal updates: every parameter but the maps."""
        adversarial = {id(p) for p in self.adversarial_parameters()}
        return [p for p in self.parameters() if id(p) not in adversarial]

    def item_embeddings(self) -> torch.Tensor:
        """The (num_items + 1, d) item table used for scoring (row 0 = padding)."""
        return self.item_emb.weight

    # -------------------------------------------------------------------------------------- encoder
    def embed(self, seq: torch.Tensor) -> torch.Tensor:
        """seq (B, n) -> Drop(LN(E[s] (+ P))) (B, n, d), as released (no sqrt(d) scale, no zeroing)."""
        x = self.item_emb(seq)
        if self.pos_emb is not None:
            x = x + self.pos_emb.weight[self.position_rows(seq.shape[1])][None]
        return self.emb_dropout(self.emb_norm(x))

    def _encode(self, seq: torch.Tensor, upto: int | None = None):
        """(h_cal, h_att of the last layer run, the masks M of every layer run)."""
        key_padding_mask = seq == 0
        x, h_att, masks = self.embed(seq), None, []
        for block in self.blocks[:upto]:
            x, h_att, perturb = block(x, key_padding_mask)
            masks.append(perturb)
        return x, h_att, masks

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        """seq (B, n) left-padded, the last n <= max_len positions -> calibrated hidden states (B, n, d)."""
        return self._encode(self._check_seq(seq))[0]

    def mask_penalty(self, masks: list[torch.Tensor]) -> torch.Tensor:
        """mean over layers of ||1 - M||_F over the (B, H, max_len, max_len) masks (see the module notes)."""
        norms = []
        for m in masks:
            batch, heads, n, _ = m.shape
            missing = batch * heads * (self.max_len**2 - n**2)  # padding entries of the full-width batch
            norms.append(torch.sqrt(torch.square(1.0 - m.float()).sum() + missing))
        return torch.stack(norms).mean()

    def loss(
        self,
        seq: torch.Tensor,
        pos: torch.Tensor,
        neg: torch.Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
    ):
        """RoutedLoss(L_cal, routes): L_cal into calibrator_parameters(), L_att into
        adversarial_parameters(); L_cal alone (a tensor) without the adversarial calibrator. Full softmax:
        neg and generator are accepted for the common interface and not used."""
        seq = self._check_seq(seq)
        self._check_targets(seq, pos)
        pos = pos.long()
        h_cal, h_att, masks = self._encode(seq)
        table = self.item_embeddings()
        loss_cal = losses.full_ce_loss(h_cal, table, pos)
        if not self.adversarial:
            return loss_cal
        loss_att = -losses.full_ce_loss(h_att, table, pos) + self.mask_loss_weight * self.mask_penalty(masks)
        return RoutedLoss(
            loss_cal,
            ((loss_cal, tuple(self.calibrator_parameters())), (loss_att, tuple(self.adversarial_parameters()))),
        )

    @torch.no_grad()
    def attention_maps(self, seq: torch.Tensor) -> dict[str, torch.Tensor]:
        """The last layer's weights (B, H, max_len, max_len) from the reference: "P" the weights h_cal uses,
        "A" the ones before them (P_sp without refinement; with it the refinement input P_fin, and "B" the
        refined scores), "P_sp" and with the adversarial calibrator "M", "P_att", "P_cal"; plus
        "key_padding_mask". Call model.eval() first."""
        seq = self._pad_seq(seq)
        key_padding_mask = seq == 0
        x = self._encode(seq, upto=len(self.blocks) - 1)[0]
        weights = self.blocks[-1].attention.attention_weights(x, key_padding_mask)
        first = weights.get("P_fin", weights["P_sp"])
        if "B" in weights:
            maps = {"A": first, "B": weights["B"], "P": weights["P"]}
        else:
            maps = {"A": weights["P_sp"], "P": first}
        maps.update({k: weights[k] for k in ("P_sp", "M", "P_att", "P_cal") if k in weights})
        return {**maps, "key_padding_mask": key_padding_mask}

    def extra_repr(self) -> str:
        return (
            f"num_items={self.num_items}, max_len={self.max_len}, adversarial={self.adversarial}, "
            f"mask_loss_weight={self.mask_loss_weight}, position_embedding={self.pos_emb is not None}"
        )
