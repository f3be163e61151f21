"""awr_fast: fused attention kernels for AWRSR / STOSA / AC-TSR sequential recommenders.

Public functions (layout (B, H, n, d_h); key_padding_mask bool (B, n), True = padding):
    refined_attention      causal dot-product attention + AWRSR refinement (SASRec backbone)
    wasserstein_attention  STOSA Gaussian W2 attention + AWRSR refinement
    w2_scores              W2 distance of query Gaussians to every item (STOSA ranking)
    calibrated_attention   AC-TSR spatial + adversarial calibrators
"""

__version__ = "0.1.0"

from .api import (  # noqa: E402
    CalibratedOutput,
    calibrated_attention,
    refined_attention,
    w2_scores,
    wasserstein_attention,
)
from .backends import UnsupportedInputError, backend_status, used_backends  # noqa: E402
from .ops.dot_refined import MECHANISMS as DOT_MECHANISMS  # noqa: E402
from .ops.w2_refined import MECHANISMS as W2_MECHANISMS  # noqa: E402

__all__ = [
    "DOT_MECHANISMS",
    "W2_MECHANISMS",
    "CalibratedOutput",
    "UnsupportedInputError",
    "backend_status",
    "calibrated_attention",
    "refined_attention",
    "used_backends",
    "w2_scores",
    "wasserstein_attention",
    "__version__",
]
