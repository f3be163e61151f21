"""Atomic training checkpoints (``best.pt``, ``last.pt``) with everything needed to continue a run.

A checkpoint is one ``torch.save`` dict, built by :func:`make_checkpoint`::

    {"format": 1, "epoch", "step", "model", "optimizer", "scaler" (None without fp16),
     "rng": {"python", "numpy", "torch", "cuda" (list, or None before CUDA is initialised),
             "negatives" (the negative generator's state)},
     "early_stopping": {"best_metric", "best_epoch", "bad_evals"}, "config": TrainConfig.to_dict()}

:func:`save_checkpoint` writes it with :func:`awr_fast.atomic.atomic_write`: a temporary file in
the destination folder, flushed and fsynced, ``os.replace``-d over the destination (atomic on
POSIX), then the folder fsynced; a crash at any point leaves the previous checkpoint or the new
one, never a torn file. :func:`load_checkpoint` checks the ``format`` key.

Exact resume does not rely on the stored RNG states: every epoch starts from state that is a
function of ``(seed, epoch)`` alone (the sampler's batch order,
:func:`awr_fast.training.sampler.epoch_generator`; the negative generator, reseeded by
:func:`awr_fast.training.loop.train_epoch`; the global torch RNG for dropout, reseeded by
:func:`awr_fast.training.loop.seed_epoch`), so a run resumed from ``last.pt`` of epoch ``e``
(model, optimizer, GradScaler and early-stopping state restored) continues bit for bit like the
uninterrupted run on the CPU. The trainer still restores the Python, numpy and torch RNG states
(:func:`set_rng_state`), for code that draws outside those generators between epochs.
"""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch

from ..atomic import atomic_write, atomic_write_bytes, atomic_write_text

__all__ = [
    "CHECKPOINT_FORMAT",
    "atomic_write_bytes",
    "atomic_write_text",
    "get_rng_state",
    "load_checkpoint",
    "make_checkpoint",
    "save_checkpoint",
    "set_rng_state",
]

CHECKPOINT_FORMAT = 1
PathLike = str | os.PathLike


def get_rng_state(negatives: torch.Generator | None = None) -> dict[str, Any]:
    """Python, numpy, torch CPU and CUDA (all devices, if initialised) RNG states, and the state
    of the negative-sampling generator when given."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
        "negatives": negatives.get_state() if negatives is not None else None,
    }


def set_rng_state(state: dict[str, Any], negatives: torch.Generator | None = None) -> None:
    """Restore what :func:`get_rng_state` returned (CUDA only if present on both sides)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    if negatives is not None and state.get("negatives") is not None:
        negatives.set_state(state["negatives"].cpu())


def make_checkpoint(
    *,
    epoch: int,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    negatives: torch.Generator | None,
    early_stopping,
    config,
) -> dict[str, Any]:
    """The checkpoint dict after epoch ``epoch`` (``step`` optimiser steps so far); ``early_stopping``
    is an :class:`~awr_fast.training.loop.EarlyStopping`, ``config`` a TrainConfig."""
    return {
        "format": CHECKPOINT_FORMAT,
        "epoch": int(epoch),
        "step": int(step),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": get_rng_state(negatives),
        "early_stopping": early_stopping.state_dict(),
        "config": config.to_dict(),
    }


def save_checkpoint(path: PathLike, state: dict[str, Any]) -> None:
    """``torch.save(state)`` to ``path`` atomically."""
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: PathLike, map_location: str | torch.device | None = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (tensors onto ``map_location``).

    RNG states contain numpy arrays and Python tuples, so the file is loaded with
    ``weights_only=False``: only load checkpoints you wrote yourself.
    """
    state = torch.load(path, map_location=map_location, weights_only=False)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        got = f"format {state.get('format')!r}" if isinstance(state, dict) else f"a {type(state).__name__}"
        raise ValueError(
            f"path: expected an awr_fast training checkpoint (a dict with format {CHECKPOINT_FORMAT}), "
            f"got {got} in {os.fspath(path)}"
        )
    return state
