"""The epoch loop: optimiser, AMP, one training epoch, early stopping.

One epoch (:func:`train_epoch`) walks the batches of the epoch's sampler (a function of
``(seed, epoch)``) and runs ``model.loss(seq, pos, generator=<the epoch's negative generator>)``
under ``torch.autocast`` when AMP is on (fp16 adds a GradScaler).
The global gradient norm (after unscaling, before optional clipping) is averaged over the epoch's
steps and logged. A model whose ``loss`` returns a RoutedLoss (AC-SASRec) gets each part's gradient in
its own parameters (:func:`backward`). :func:`seed_epoch` reseeds the global torch RNG (dropout, anything a model
draws itself) from ``(seed, epoch, rank)`` at the start of every epoch, so that an epoch is
reproducible on its own: this is what makes ``--resume`` exact without replaying.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..models.losses import RoutedLoss
from .distributed import DistInfo, all_reduce_grads, all_reduce_mean
from .sampler import epoch_generator, epoch_seed, shard_batch

__all__ = [
    "EarlyStopping",
    "LossModule",
    "autocast",
    "backward",
    "make_optimizer",
    "make_scaler",
    "resolve_device",
    "seed_epoch",
    "train_epoch",
]


def resolve_device(device: str = "auto", dist: DistInfo | None = None) -> torch.device:
    """``"auto"``: ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU."""
    local = dist.local_rank if dist is not None else 0
    if device in ("auto", None, ""):
        return torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device(f"cuda:{local}")
    return dev


def seed_epoch(seed: int, epoch: int, rank: int = 0) -> None:
    """Seed the global torch (CPU and CUDA) RNG for ``epoch``; ranks get different dropout masks."""
    torch.manual_seed(epoch_seed(seed, epoch) * 131 + int(rank))


def autocast(device: torch.device, amp: str):
    """``torch.autocast`` for ``amp`` in {"bf16", "fp16"}; a null context for "none"."""
    if amp == "none":
        return contextlib.nullcontext()
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    if amp not in dtypes:
        raise ValueError(f"amp: expected one of {['none', *dtypes]}, got {amp!r}")
    dtype = dtypes[amp]
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_scaler(device: torch.device, amp: str) -> torch.amp.GradScaler | None:
    """A GradScaler for fp16 (bf16 and fp32 need none)."""
    return torch.amp.GradScaler(device.type) if amp == "fp16" else None


def make_optimizer(model: nn.Module, name: str, lr: float, l2: float, betas=(0.9, 0.98)) -> torch.optim.Optimizer:
    """Adam (``l2`` as coupled L2 via weight_decay) or AdamW (``l2`` as decoupled decay)."""
    classes = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
    if name not in classes:
        raise ValueError(f"optimizer: expected one of {list(classes)}, got {name!r}")
    params = [p for p in model.parameters() if p.requires_grad]
    cls = classes[name]
    return cls(params, lr=lr, betas=tuple(betas), weight_decay=l2)


class LossModule(nn.Module):
    """``forward(seq, pos, generator) = model.loss(seq, pos, None, generator=generator)``: what
    DistributedDataParallel wraps, since DDP only synchronises through ``forward``.

    The model draws its own negatives (``neg=None``) from ``generator``, the epoch's negative
    generator (every awr_fast model's ``loss`` takes it), so the negatives depend only on
    ``(seed, epoch)`` and the batches.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, seq, pos, generator: torch.Generator | None = None):
        return self.model.loss(seq, pos, None, generator=generator)


@dataclass
class EarlyStopping:
    """Stop after ``patience`` evaluations in a row without a strictly better metric (0: never)."""

    patience: int = 20
    best_metric: float = -math.inf
    best_epoch: int = 0
    bad_evals: int = 0

    def update(self, value: float, epoch: int) -> bool:
        """Record an evaluation; True when it is the new best (NaN never is)."""
        if not math.isnan(value) and value > self.best_metric:
            self.best_metric, self.best_epoch, self.bad_evals = float(value), int(epoch), 0
            return True
        self.bad_evals += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad_evals >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"best_metric": self.best_metric, "best_epoch": self.best_epoch, "bad_evals": self.bad_evals}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_metric = float(state["best_metric"])
        self.best_epoch = int(state["best_epoch"])
        self.bad_evals = int(state["bad_evals"])


def _progress(iterable, total: int, desc: str, enabled: bool):
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return iterable
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)


def progress_enabled(quiet: bool, dist: DistInfo | None = None) -> bool:
    """Progress bars only on an interactive terminal, on rank 0, and without --quiet."""
    return not quiet and (dist is None or dist.is_main) and sys.stderr.isatty()


def trailing_widths(*arrays: np.ndarray) -> np.ndarray:
    """Per row of left-padded (R, n) arrays: how many trailing columns hold a non-padding entry in any of
    them (n minus the first non-zero column; 0 for an all-padding row)."""
    nonzero = np.zeros(arrays[0].shape, dtype=bool)
    for a in arrays:
        nonzero |= np.asarray(a) != 0
    n = nonzero.shape[1]
    return np.where(nonzero.any(axis=1), n - nonzero.argmax(axis=1), 0).astype(np.int64)


def batch_width(widths: np.ndarray | None, rows: np.ndarray, n: int) -> int:
    """The columns a batch needs: its longest row (at least 1), or all n without widths."""
    if widths is None or len(rows) == 0:
        return n
    return max(int(widths[rows].max()), 1)


def backward(loss, scaler: torch.amp.GradScaler | None) -> torch.Tensor:
    """Backpropagate a step's loss (scaled by ``scaler`` when given) and return the tensor to log. A
    :class:`~awr_fast.models.losses.RoutedLoss` (AC-SASRec) backpropagates each of its losses into its own
    parameters only (``backward(inputs=...)``, the graph kept until the last): exactly the gradients of
    separate requires_grad-toggled passes, for one optimiser step."""
    if not isinstance(loss, RoutedLoss):
        (scaler.scale(loss) if scaler is not None else loss).backward()
        return loss
    last = len(loss.routes) - 1
    for i, (part, params) in enumerate(loss.routes):
        (scaler.scale(part) if scaler is not None else part).backward(inputs=list(params), retain_graph=i < last)
    return loss.value


def train_epoch(
    step_module: nn.Module,
    model: nn.Module,
    *,
    train_input: torch.Tensor,
    train_pos: torch.Tensor,
    batches: Sequence[np.ndarray],
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    neg_generator: torch.Generator | None = None,
    seed: int,
    epoch: int,
    device: torch.device,
    amp: str = "none",
    clip_grad: float = 0.0,
    dist: DistInfo | None = None,
    show_progress: bool = False,
    row_widths: np.ndarray | None = None,
    sync_grads: bool = False,
) -> dict[str, Any]:
    """One pass over ``batches`` (global batches of training-row indices).

    Args:
        step_module: what is called for the loss: :class:`LossModule` (possibly DDP-wrapped).
        model: the bare model (its parameters are what the gradient norm is taken over).
        train_input, train_pos: ``(R, n)`` int64 tensors (CPU or ``device``).
        neg_generator: the generator the model draws negatives from (see :class:`LossModule`),
            best on ``device``; it is reseeded with the epoch's seed first (that of
            ``epoch_generator(seed, epoch, 1)``), so its state is a function of ``(seed, epoch)``
            and this epoch's draws. None: a fresh one on ``device``.
        row_widths: per training row, its trailing non-padding width (:func:`trailing_widths`); when
            given, each batch keeps only the last ``max(width)`` columns (the model computes the same
            function on the narrower batch), so the work follows the batch's longest sequence.
        sync_grads: average the gradients over the ranks after the backward (models whose loss routes
            gradients train without DistributedDataParallel, see awr_fast.train).

    Returns:
        ``{"loss": mean loss, "grad_norm": mean global gradient norm, "steps": steps taken,
        "skipped_steps": fp16 overflow steps, "seconds": wall time}``.
    """
    dist = dist or DistInfo()
    t0 = time.perf_counter()
    step_module.train()
    # negatives are drawn on the training device (no host round trip), reseeded for this epoch
    neg_gen = neg_generator if neg_generator is not None else torch.Generator(device=device)
    neg_gen.manual_seed(epoch_generator(seed, epoch, stream=1).initial_seed())
    params: list[torch.nn.Parameter] = [p for p in model.parameters() if p.requires_grad]
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    norm_sum = torch.zeros((), dtype=torch.float64, device=device)
    finite_steps = torch.zeros((), dtype=torch.float64, device=device)
    steps = 0
    bar = _progress(batches, len(batches), f"epoch {epoch}", show_progress)
    for batch in bar:
        rows = shard_batch(batch, dist.rank, dist.world_size)
        idx = torch.from_numpy(np.ascontiguousarray(rows))
        if train_input.device != idx.device:
            idx = idx.to(train_input.device)
        width = batch_width(row_widths, rows, train_input.shape[1])
        seq = train_input[:, -width:].index_select(0, idx).to(device, non_blocking=True)
        pos = train_pos[:, -width:].index_select(0, idx).to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, amp):
            loss = step_module(seq, pos, neg_gen)
        loss = backward(loss, scaler)
        if sync_grads:
            all_reduce_grads(params, dist)
        if scaler is not None:
            scaler.unscale_(optimizer)
        grads = [p.grad for p in params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=device)
        if clip_grad and clip_grad > 0:
            torch.nn.utils.clip_grads_with_norm_(params, clip_grad, norm)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        finite = torch.isfinite(norm)
        norm_sum += torch.where(finite, norm.double(), torch.zeros((), dtype=torch.float64, device=norm.device))
        finite_steps += finite.double()
        loss_sum += loss.detach().double()
        steps += 1
        if show_progress and hasattr(bar, "set_postfix") and steps % 10 == 0:
            bar.set_postfix(loss=f"{float(loss_sum) / steps:.4f}")
    if hasattr(bar, "close"):
        bar.close()
    stats = torch.stack([loss_sum, norm_sum, finite_steps])
    stats = all_reduce_mean(stats, dist)
    loss_mean = float(stats[0]) / max(steps, 1)
    finite_mean = float(stats[2])
    return {
        "loss": loss_mean,
        "grad_norm": float(stats[1]) / finite_mean if finite_mean > 0 else math.nan,
        "steps": steps,
        "skipped_steps": round(steps - finite_mean),
        "seconds": time.perf_counter() - t0,
    }
