"""Sequential recommenders over the awr_fast attention modules: SASRec (SPEC §2) and STOSA (SPEC §4), each
with AWRSR refinement (SPEC §3), and AC-SASRec (SPEC §5: calibrated attention, adversarial training).

Every model takes LongTensor batches (B, n), left-padded with item 0, n <= max_len, and offers
    forward(seq)                   SASRec: hidden states (B, n, d); STOSA: (mu, sigma), each (B, n, d)
    loss(seq, pos, neg=None)       scalar training loss (AC-SASRec: a losses.RoutedLoss); pos (B, n)
                                   next-item targets (0 = ignored), neg (B, n) or (B, n, k), sampled with
                                   negatives.sample_negatives if None
    score_all(seq)                 (B, num_items + 1) scores of the last position, higher = better, col 0 = -inf
    score_items(seq, items)        (B, k) scores of the given items (sampled protocol)
    attention_maps(seq)            last layer's "A", "B", "P" (B, H, max_len, max_len) from the reference
    parameter_parts()              parameters grouped by part (embeddings, attention, refinement, ffn, norm)
and the attributes num_items, max_len.
"""

from __future__ import annotations

import inspect

from torch import nn

from .acsasrec import ACSASRec
from .losses import RoutedLoss, bce_loss, full_ce_loss, sampled_ce_loss, w2_bpr_loss, w2_pair_distance
from .negatives import sample_negatives
from .sasrec import SASRec, SequentialRecommender
from .stosa import STOSA

MODELS = {"sasrec": SASRec, "stosa": STOSA, "acsasrec": ACSASRec}


def model_options(name: str) -> dict:
    """The keyword options of a model and their defaults (everything but num_items and max_len)."""
    if name not in MODELS:
        raise ValueError(f"name: expected one of {list(MODELS)}, got {name!r}")
    params = inspect.signature(MODELS[name].__init__).parameters
    return {key: p.default for key, p in params.items() if key not in ("self", "num_items", "max_len")}


def build_model(name: str, *, num_items: int, max_len: int, **kwargs) -> nn.Module:
    """Build "sasrec", "stosa" or "acsasrec". kwargs are the model's options (see model_options(name)); an option of
    another model, or a bad value, raises ValueError naming the argument."""
    options = model_options(name)
    for key in kwargs:
        if key not in options:
            raise ValueError(
                f"{key}: expected an option of model {name!r} (one of {sorted(options)}), got {key}={kwargs[key]!r}"
            )
    return MODELS[name](num_items=num_items, max_len=max_len, **kwargs)


__all__ = [
    "MODELS",
    "ACSASRec",
    "RoutedLoss",
    "SASRec",
    "STOSA",
    "SequentialRecommender",
    "bce_loss",
    "build_model",
    "full_ce_loss",
    "model_options",
    "sample_negatives",
    "sampled_ce_loss",
    "w2_bpr_loss",
    "w2_pair_distance",
]
