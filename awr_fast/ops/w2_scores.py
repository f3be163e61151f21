"""The w2_scores op: squared W2 distance of B query Gaussians to every item (SPEC §4, evaluation and loss)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import validation as V
from .capability import KERNEL_FLOAT, Capability, InputsRecord

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


CAPABILITIES = (
    # tiled forward kernel, backward as GEMMs in the same C++ call; float32 scores
    Capability("cuda", "awr_fast.cuda.w2_scores", dtypes=KERNEL_FLOAT),
    # tiled forward and backward (all four inputs), float32 result; also kernels.w2_scores.w2_topk
    Capability("triton", "awr_fast.kernels.w2_scores", dtypes=KERNEL_FLOAT),
    Capability("reference", "awr_fast.reference.w2_scores"),
)
