"""One spec per op family: its name, mechanisms, weight names, default scales, the frozen inputs record the
public API builds once (validated) and hands to a backend, and the capability rows of the backends that
implement it. Everything else (api, nn, models, the training config, bench, tests) imports from here.

    dot_refined   causal dot-product attention + AWRSR refinement (SASRec)
    w2_refined    STOSA Wasserstein attention + AWRSR refinement
    w2_scores     W2 distance of query Gaussians to every item
    calibrated    AC-TSR spatial + adversarial calibrated attention
"""

from __future__ import annotations

from . import calibrated, dot_refined, w2_refined, w2_scores
from .capability import BACKENDS, Capability

SPECS = {spec.NAME: spec for spec in (dot_refined, w2_refined, w2_scores, calibrated)}

__all__ = ["BACKENDS", "SPECS", "Capability", "calibrated", "dot_refined", "w2_refined", "w2_scores"]
