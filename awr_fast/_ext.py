"""The CUDA backend: the compiled extension ``awr_fast._C`` (csrc/), loaded lazily.

A missing or ABI-mismatched library is never an error at ``import awr_fast``: ``load_cuda_extension()``
returns ``(None, reason)`` without a warning, and ``cuda_status()`` says whether the backend is usable and
why not. Importing ``awr_fast._C`` registers the op ``torch.ops.awr_fast.w2_scores_cuda`` (SPEC §4); its
fake (meta) kernel is registered here so that it traces under torch.compile.
"""

from __future__ import annotations

import importlib
import json
from functools import lru_cache
from pathlib import Path

import torch

_OP = "awr_fast::w2_scores_cuda"
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def build_status() -> dict:
    """What setup.py recorded about the CUDA build ({} when nothing was recorded)."""
    try:
        return json.loads((Path(__file__).with_name("_build_status.json")).read_text())
    except (OSError, ValueError):
        return {}


def _not_built_reason() -> str:
    status = build_status()
    if status.get("cuda_extension_built") is False and status.get("reason"):
        return f"the CUDA extension awr_fast._C was not built: {status['reason']}"
    return (
        "the CUDA extension awr_fast._C is not installed (reinstall with a CUDA build of torch and nvcc "
        "present, e.g. AWR_FAST_FORCE_CUDA_BUILD=1 pip install -e . -v, to see why)"
    )


def _register_fake() -> None:
    def fake(mu, sig, item_mu, item_sig):
        return mu.new_empty((mu.shape[0], item_mu.shape[0]), dtype=torch.float32)

    register = getattr(torch.library, "register_fake", None) or torch.library.impl_abstract
    try:
        register(_OP)(fake)
    except RuntimeError as exc:  # registered already (e.g. the module was reloaded)
        if "already" not in str(exc).lower():
            raise


@lru_cache(maxsize=None)
def load_cuda_extension():
    """Import the compiled extension once: (module, "loaded ...") or (None, why it is unavailable)."""
    try:
        module = importlib.import_module("awr_fast._C")
    except ModuleNotFoundError as exc:
        if exc.name not in ("awr_fast._C", "awr_fast"):
            return None, f"importing awr_fast._C failed ({type(exc).__name__}: {exc})"
        return None, _not_built_reason()
    except Exception as exc:  # ImportError/OSError: undefined symbols, a library built for another torch
        status = build_status()
        if status.get("cuda_extension_built") is False:  # a library left in the tree by an earlier build
            return None, (
                f"awr_fast._C failed to load ({type(exc).__name__}: {exc}); it is left over from an "
                f"earlier build: the last install did not build it ({status.get('reason')})"
            )
        built = status.get("torch")
        against = (
            f" It was built against torch {built}, this is torch {torch.__version__}."
            if built and built != torch.__version__
            else ""
        )
        return None, (
            f"awr_fast._C failed to load ({type(exc).__name__}: {exc}).{against} Rebuild it with "
            "pip install -e . (the same torch at build and run time)"
        )
    if not hasattr(torch.ops.awr_fast, "w2_scores_cuda"):
        return None, f"awr_fast._C loaded from {module.__file__} but registered no op {_OP}"
    try:
        _register_fake()
    except Exception as exc:
        return None, f"awr_fast._C loaded but its fake kernel could not be registered ({type(exc).__name__}: {exc})"
    return module, f"loaded from {module.__file__}"


def cuda_status() -> tuple[bool, str]:
    """(usable, reason): the extension loaded AND a CUDA device is available."""
    module, reason = load_cuda_extension()
    if module is None:
        return False, reason
    if not torch.cuda.is_available():
        from .cuda import emulate

        if emulate():
            return True, (
                f"CUDA extension {reason}, no CUDA device: AWR_FAST_CUDA_EMULATE=1 runs the kernels' block code "
                "on CPU tensors (correct but slow)"
            )
        return False, "the CUDA extension is built, but torch sees no CUDA device (AWR_FAST_CUDA_EMULATE=1 emulates it)"
    return True, f"CUDA extension {reason}, device {torch.cuda.get_device_name()}"


def w2_scores_cuda(mu: torch.Tensor, sig: torch.Tensor, item_mu: torch.Tensor, item_sig: torch.Tensor) -> torch.Tensor:
    """Squared W2 distance of B query Gaussians to V item Gaussians (SPEC §4), float32 (B, V).

    mu, sig (B, d), item_mu, item_sig (V, d); one dtype among float32/float16/bfloat16, on one CUDA device;
    sig are variances. Accumulates in float32. Raises RuntimeError when the extension is unavailable.
    """
    module, reason = load_cuda_extension()
    if module is None:
        raise RuntimeError(f"w2_scores_cuda: {reason}")
    return torch.ops.awr_fast.w2_scores_cuda(
        mu.contiguous(), sig.contiguous(), item_mu.contiguous(), item_sig.contiguous()
    )
