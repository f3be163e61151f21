"""Atomic checkpoints with everything needed to continue a run exactly.

A checkpoint is one ``torch.save`` dict (see :func:`make_checkpoint`)::

    {"format": 1, "epoch", "step", "model", "optimizer", "scaler" (or None),
     "rng": {"python", "numpy", "torch", "cuda" (list or None), "negatives"},
     "early_stopping": {"best_metric", "best_epoch", "bad_evals"}, "config": {...}}

:func:`save_checkpoint` writes to a temporary file in the destination folder, flushes and fsyncs
it, then ``os.replace``-s it over the destination (atomic on POSIX) and fsyncs the folder; a crash
at any point leaves either the previous checkpoint or the new one, never a torn file.

Exact resume: all randomness inside an epoch is reseeded from ``(seed, epoch)`` at the start of
the epoch (:mod:`awr_fast.training.sampler`), so a run resumed after epoch ``e`` from ``last.pt``
(model, optimizer, GradScaler, early-stopping state) continues bit for bit like the uninterrupted
run on the CPU. The RNG states are stored and restored as well, for code that draws outside the
epoch's generators.
"""

from __future__ import annotations

import os
import random
from typing import Any, Dict, Optional, Union

import numpy as np
import torch

from ..atomic import atomic_write, atomic_write_bytes, atomic_write_text

__all__ = ["CHECKPOINT_FORMAT", "get_rng_state", "load_checkpoint", "save_checkpoint", "set_rng_state",
           "atomic_write_bytes", "atomic_write_text"]

CHECKPOINT_FORMAT = 1
PathLike = Union[str, os.PathLike]


def get_rng_state(negatives: Optional[torch.Generator] = None) -> Dict[str, Any]:
    """Python, numpy, torch CPU and CUDA (all devices, if initialised) RNG states, and the state
    of the negative-sampling generator when given."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
        "negatives": negatives.get_state() if negatives is not None else None,
    }


def set_rng_state(state: Dict[str, Any], negatives: Optional[torch.Generator] = None) -> None:
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


def save_checkpoint(path: PathLike, state: Dict[str, Any]) -> None:
    """``torch.save(state)`` to ``path`` atomically."""
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: PathLike, map_location: Union[str, torch.device, None] = "cpu") -> Dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`.

    RNG states contain numpy arrays and Python tuples, so the file is loaded with
    ``weights_only=False``: only load checkpoints you wrote yourself.
    """
    state = torch.load(path, map_location=map_location, weights_only=False)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not an awr_fast training checkpoint (format {CHECKPOINT_FORMAT})")
    return state
