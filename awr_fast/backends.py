"""Backend dispatch (xformers style): each backend says in words why it cannot take an input.

Every op has the same name in each layer: ``awr_fast.reference.<op>.<op>``, ``awr_fast.kernels.<op>.<op>``
(Triton) and ``awr_fast._ext.<op>`` (CUDA). A backend module also exposes
``<op>_not_supported_reasons(inputs) -> list[str]``. Backends are imported lazily, so a missing triton
or CUDA build never breaks ``import awr_fast``.
"""

from __future__ import annotations

import importlib
import os

BACKENDS = ("reference", "triton", "cuda")
AUTO_ORDER = ("cuda", "triton", "reference")

# op -> backend -> module that implements it. The reference implements every op.
IMPLEMENTATIONS = {
    "dot_refined": {"reference": "awr_fast.reference.dot_refined", "triton": "awr_fast.kernels.dot_refined"},
    "w2_refined": {"reference": "awr_fast.reference.w2_refined"},
    "w2_scores": {"reference": "awr_fast.reference.w2_scores", "cuda": "awr_fast._ext"},
    "calibrated": {"reference": "awr_fast.reference.calibrated"},
}


class UnsupportedInputError(ValueError):
    """An explicitly requested backend cannot run these inputs; the message lists why."""


def _compiling() -> bool:
    import torch
    return torch.compiler.is_compiling()


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Filled on first use (or by preload()) so that a call traced by torch.compile only reads dicts: Dynamo
# cannot trace importlib, and a dispatch that it cannot trace would break the graph.
_MODULES: dict = {}
_STATUS: dict = {}
_PRELOADED: set = set()


def _module(name: str):
    module = _MODULES.get(name)
    if module is None:
        module = _MODULES[name] = importlib.import_module(name)
    return module


def _triton_import_status() -> tuple[bool, str]:
    status = _STATUS.get("triton")
    if status is None:
        try:
            import triton
            status = (True, f"triton {triton.__version__}")
        except Exception as exc:  # ImportError, or a broken install
            status = (False, f"triton is not importable ({type(exc).__name__}: {exc})")
        _STATUS["triton"] = status
    return status


def _cuda_extension_status() -> tuple[bool, str]:
    status = _STATUS.get("cuda")
    if status is None:
        try:
            status = _module("awr_fast._ext").cuda_status()
        except Exception as exc:
            status = (False, f"CUDA extension helper failed to load ({type(exc).__name__}: {exc})")
        _STATUS["cuda"] = status
    return status


def preload(op: str) -> None:
    """Import every backend of `op` that can load here, so later (compiled) calls only read caches.
    Modules call this at construction; select() calls it on eager calls. Runs once per op."""
    if op in _PRELOADED:
        return
    _PRELOADED.add(op)
    _triton_import_status()
    _cuda_extension_status()
    for backend, module_name in IMPLEMENTATIONS[op].items():
        if backend == "triton" and not _triton_import_status()[0]:
            continue
        if backend == "cuda" and not _cuda_extension_status()[0]:
            continue
        try:
            _module(module_name)
        except Exception:  # reported in words by not_supported_reasons when asked for
            pass


def backend_status() -> dict[str, tuple[bool, str]]:
    """backend name -> (usable on this machine, reason)."""
    import torch

    status = {"reference": (True, "PyTorch eager, runs anywhere")}
    ok, why = _triton_import_status()
    if not ok:
        status["triton"] = (False, why)
    elif torch.cuda.is_available():
        status["triton"] = (True, f"{why} on {torch.cuda.get_device_name()}")
    elif triton_interpret():
        status["triton"] = (True, f"{why}, TRITON_INTERPRET=1 (CPU interpreter: correct but slow)")
    else:
        status["triton"] = (False, f"{why} but no CUDA device (set TRITON_INTERPRET=1 to run kernels on CPU)")
    status["cuda"] = _cuda_extension_status()
    return status


def device_reasons(backend: str, device) -> list[str]:
    """Reasons common to every op of a backend: is it usable at all for tensors on `device`."""
    if backend == "triton":
        ok, why = _triton_import_status()
        if not ok:
            return [why]
        if device.type == "cuda":
            return []
        if device.type == "cpu" and triton_interpret():
            return []
        return [f"inputs are on {device}; Triton kernels need CUDA tensors (or CPU tensors with TRITON_INTERPRET=1)"]
    if backend == "cuda":
        ok, why = _cuda_extension_status()
        if not ok:
            return [why]
        if device.type != "cuda":
            return [f"inputs are on {device}; the CUDA extension needs CUDA tensors"]
    return []


def not_supported_reasons(op: str, backend: str, inputs: dict) -> list[str]:
    module_name = IMPLEMENTATIONS[op].get(backend)
    if module_name is None:
        return [f"backend {backend!r} has no implementation of {op} yet"]
    if backend == "reference":
        return []
    device = next(v.device for v in inputs.values() if hasattr(v, "device"))
    reasons = device_reasons(backend, device)
    if reasons:
        return reasons
    try:
        module = _module(module_name)
    except Exception as exc:
        return [f"{module_name} failed to import ({type(exc).__name__}: {exc})"]
    return list(getattr(module, f"{op}_not_supported_reasons")(inputs))


def implementation(op: str, backend: str):
    return getattr(_module(IMPLEMENTATIONS[op][backend]), op)


def select(op: str, backend: str, inputs: dict):
    """The callable that will run `op` on `inputs`: the named backend, or the first usable for "auto"."""
    if backend not in BACKENDS + ("auto",):
        raise ValueError(f"backend: expected one of {['auto', *BACKENDS]}, got {backend!r}")
    if not _compiling():
        preload(op)
    if backend != "auto":
        reasons = not_supported_reasons(op, backend, inputs)
        if reasons:
            raise UnsupportedInputError(f"backend={backend!r} cannot run {op}: " + "; ".join(reasons))
        return implementation(op, backend)
    device = next(v.device for v in inputs.values() if hasattr(v, "device"))
    for candidate in AUTO_ORDER:
        # "auto" never picks the Triton interpreter: on CPU the reference is the fast path.
        if candidate != "reference" and device.type != "cuda":
            continue
        if not not_supported_reasons(op, candidate, inputs):
            return implementation(op, candidate)
    raise AssertionError("unreachable: the reference backend supports every input")
