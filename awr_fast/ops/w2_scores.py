"""The w2_scores op: squared W2 distance of B query Gaussians to every item (SPEC §4, evaluation and loss)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import validation as V
from .capability import KERNEL_FLOAT, Capability, InputsRecord, dtype_names

NAME = "w2_scores"
MECHANISMS = ()


@dataclass(frozen=True, eq=False, slots=True)
class Inputs(InputsRecord):
    mu: torch.Tensor
    sig: torch.Tensor
    item_mu: torch.Tensor
    item_sig: torch.Tensor

    mechanism = None
    dropout_p = 0.0
    return_weights = False

    @property
    def lead(self) -> torch.Tensor:
        return self.mu

    def leaves(self) -> tuple:
        return self.mu, self.sig, self.item_mu, self.item_sig

    @property
    def n(self) -> int:  # the items play the keys
        return self.item_mu.shape[0]

    @property
    def d_h(self) -> int:
        return self.mu.shape[1]

    @property
    def grid(self) -> int:
        return self.mu.shape[0]

    def call(self, fn):
        return fn(self.mu, self.sig, self.item_mu, self.item_sig)


def make_inputs(mu, sig, item_mu, item_sig) -> Inputs:
    V.check_tensor("mu", mu, dim=2)
    V.check_tensor("sig", sig, dim=2)
    V.check_same("sig", sig, "mu", mu)
    V.check_tensor("item_mu", item_mu, dim=2)
    V.check_tensor("item_sig", item_sig, dim=2)
    V.check_same("item_sig", item_sig, "item_mu", item_mu)
    V.check_same("item_mu", item_mu, "mu", mu, shape=False)
    if item_mu.shape[1] != mu.shape[1]:
        raise ValueError(f"item_mu: expected {mu.shape[1]} columns (the width of mu), got shape {tuple(item_mu.shape)}")
    return Inputs(mu, sig, item_mu, item_sig)


#: The fused top-k's largest k (both backends): the running keys of a block's rows stay on chip.
TOPK_MAX_K = 128


@dataclass(frozen=True, slots=True)
class TopkRequest:
    """A validated w2_topk call: k, and `exclude` as kind "none", "mask" (bool (B, |V|), True = skip) or
    "ids" ((B, L) int32/int64 item ids, -1 = padding), with its tensor (None for "none")."""

    k: int
    kind: str
    exclude: torch.Tensor | None
    exclude_padding: bool


def make_topk_request(mu, sig, item_mu, item_sig, k, exclude, exclude_padding) -> TopkRequest:
    """Validate a w2_topk call (every backend's entry calls this first): the scoring inputs as
    make_inputs, dtype float32/bfloat16/float16, 1 <= k <= min(|V|, TOPK_MAX_K), `exclude` a bool
    (B, |V|) mask or (B, L) ids in -1..|V|-1 on mu's device (the id range costs one host sync: an
    evaluation batch, not a training step)."""
    make_inputs(mu, sig, item_mu, item_sig)
    if mu.dtype not in KERNEL_FLOAT:
        raise TypeError(f"mu: expected dtype {dtype_names(KERNEL_FLOAT)}, got {mu.dtype}")
    if not isinstance(exclude_padding, bool):
        raise TypeError(f"exclude_padding: expected a bool, got {type(exclude_padding).__name__}")
    batch, items = mu.shape[0], item_mu.shape[0]
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k: expected an int, got {type(k).__name__}")
    if not 1 <= k <= min(items, TOPK_MAX_K):
        limit = f"|V| = {items}" if items <= TOPK_MAX_K else f"{TOPK_MAX_K} (the fused top-k's limit)"
        raise ValueError(f"k: expected 1 <= k <= {limit}, got {k}")
    if exclude is None:
        return TopkRequest(k, "none", None, exclude_padding)
    if not isinstance(exclude, torch.Tensor):
        raise TypeError(f"exclude: expected a torch.Tensor or None, got {type(exclude).__name__}")
    if exclude.device != mu.device:
        raise ValueError(f"exclude: expected device {mu.device} (that of mu), got {exclude.device}")
    if exclude.dtype == torch.bool:
        if tuple(exclude.shape) != (batch, items):
            raise ValueError(f"exclude: expected a bool mask of shape {(batch, items)}, got {tuple(exclude.shape)}")
        return TopkRequest(k, "mask", exclude, exclude_padding)
    if exclude.dtype not in (torch.int64, torch.int32) or exclude.dim() != 2 or exclude.shape[0] != batch:
        raise ValueError(
            f"exclude: expected (B={batch}, L) int64 item ids padded with -1, or a bool ({batch}, {items}) mask, "
            f"got {exclude.dtype} of shape {tuple(exclude.shape)}"
        )
    if exclude.numel() == 0:
        return TopkRequest(k, "none", None, exclude_padding)
    low, high = (int(x) for x in torch.aminmax(exclude))
    if low < -1 or high >= items:
        bad = low if low < -1 else high
        raise ValueError(f"exclude: expected item ids in 0..{items - 1} or -1 (padding), got {bad}")
    return TopkRequest(k, "ids", exclude, exclude_padding)


CAPABILITIES = (
    # tiled forward kernel, backward as GEMMs in the same C++ call; float32 scores; also
    # cuda.w2_scores.w2_topk, the fused top-k
    Capability("cuda", "awr_fast.cuda.w2_scores", dtypes=KERNEL_FLOAT),
    # tiled forward and backward (all four inputs), float32 result; also kernels.w2_scores.w2_topk
    Capability("triton", "awr_fast.kernels.w2_scores", dtypes=KERNEL_FLOAT),
    Capability("reference", "awr_fast.reference.w2_scores"),
)
