"""Backend dispatch (xformers style): each backend says in words why it cannot take an input.

Every op has the same name in each layer: ``awr_fast.reference.<op>`` (the readable float64 oracle),
``awr_fast.eager.<op>`` (the fast eager PyTorch form), ``awr_fast.kernels.<op>`` (Triton) and
``awr_fast._ext`` (CUDA), each exposing ``<op>`` with the reference's signature. What each backend
supports is data: the ``CAPABILITIES`` rows of ``awr_fast.ops.<op>``, turned into refusal reasons by one
generic function. Backends are imported lazily, so a missing triton or CUDA build never breaks
``import awr_fast``.
"""

from __future__ import annotations

import importlib
import os
from collections import Counter

from .cuda import emulate as cuda_emulate
from .ops import BACKENDS, SPECS
from .ops.capability import DEVICE_BACKENDS

#: "auto" tries the backends in this order and runs the first that takes the inputs.
AUTO_ORDER = BACKENDS
CHOICES = ("auto", *BACKENDS)


class UnsupportedInputError(ValueError):
    """An explicitly requested backend cannot run these inputs; the message lists why."""


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_backend(name: str, value: str) -> None:
    """For modules and configs that take a backend option."""
    if value not in CHOICES:
        raise ValueError(f"{name}: expected one of {list(CHOICES)}, got {value!r}")


# Filled on first use (or by preload()) so that a call traced by torch.compile only reads dicts: Dynamo
# cannot trace importlib, and a dispatch that it cannot trace would break the graph.
_MODULES: dict = {}
_STATUS: dict = {}
_ROWS: dict = {op: {row.backend: row for row in spec.CAPABILITIES} for op, spec in SPECS.items()}
_PRELOADED: set = set()
#: (op, backend) -> number of calls dispatched there in this process (what the trainer reports).
USED: Counter = Counter()


def capabilities(op: str) -> dict:
    """backend name -> Capability row of `op`."""
    return _ROWS[op]


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
    Modules call this at construction; dispatch() calls it on eager calls. Runs once per op."""
    if op in _PRELOADED:
        return
    _PRELOADED.add(op)
    for backend, row in _ROWS[op].items():
        if backend == "triton" and not _triton_import_status()[0]:
            continue
        if backend == "cuda" and not _cuda_extension_status()[0]:
            continue
        try:
            _module(row.module)
        except Exception:  # reported in words by not_supported_reasons when asked for
            pass


def backend_status() -> dict[str, tuple[bool, str]]:
    """backend name -> (usable on this machine, reason)."""
    import torch

    status = {
        "eager": (True, "PyTorch eager, factored fast form (SPEC §3b); runs anywhere"),
        "reference": (True, "PyTorch eager, the readable float64 oracle; runs anywhere"),
    }
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
    return {name: status[name] for name in BACKENDS}


def device_reasons(backend: str, device, row=None) -> list[str]:
    """Reasons common to every op of a backend: is it usable at all for tensors on `device` (row: the op's
    capability row, which says whether its CUDA op emulates on CPU tensors)."""
    if backend == "triton":
        ok, why = _triton_import_status()
        if not ok:
            return [why]
        if device.type == "cuda" or (device.type == "cpu" and triton_interpret()):
            return []
        return [f"inputs are on {device}; Triton kernels need CUDA tensors (or CPU tensors with TRITON_INTERPRET=1)"]
    if backend == "cuda":
        ok, why = _cuda_extension_status()
        if not ok:
            return [why]
        if device.type == "cpu" and row is not None and row.host_emulation and cuda_emulate():
            return []
        if device.type != "cuda":
            return [f"inputs are on {device}; the CUDA extension needs CUDA tensors"]
    return []


def not_supported_reasons(op: str, backend: str, inputs) -> list[str]:
    """Why `backend` cannot run `op` on `inputs` (an ops.<op>.Inputs record); [] if it can."""
    row = _ROWS[op].get(backend)
    if row is None:
        return [f"backend {backend!r} has no implementation of {op} yet"]
    reasons = device_reasons(backend, inputs.device, row) + row.table_reasons(inputs)
    if reasons or row.reasons is None:
        return reasons
    try:
        module = _module(row.module)
    except Exception as exc:
        return [f"{row.module} failed to import ({type(exc).__name__}: {exc})"]
    return list(getattr(module, row.reasons)(inputs))


def implementation(op: str, backend: str):
    return getattr(_module(_ROWS[op][backend].module), op)


def select(op: str, backend: str, inputs) -> str:
    """The backend that will run `op` on `inputs`: the named one, or for "auto" the first in AUTO_ORDER that
    takes them (kernel backends only for CUDA tensors)."""
    if backend != "auto":
        if backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {list(CHOICES)}, got {backend!r}")
        reasons = not_supported_reasons(op, backend, inputs)
        if reasons:
            raise UnsupportedInputError(f"backend={backend!r} cannot run {op}: " + "; ".join(reasons))
        return backend
    on_gpu = inputs.device.type == "cuda"
    for candidate in AUTO_ORDER:
        row = _ROWS[op].get(candidate)
        if row is not None and row.not_auto is None and (on_gpu or candidate not in DEVICE_BACKENDS):
            if not not_supported_reasons(op, candidate, inputs):
                return candidate
    raise AssertionError(f"unreachable: the reference backend takes every valid input of {op}")


def dispatch(op: str, backend: str, inputs):
    """Run `op` on the validated `inputs` with the backend that select() picks."""
    import torch

    if not torch.compiler.is_compiling():
        preload(op)
        chosen = select(op, backend, inputs)
        USED[op, chosen] += 1
    else:
        chosen = select(op, backend, inputs)
    return inputs.call(implementation(op, chosen))


def used_backends() -> dict[str, str]:
    """op -> the backend(s) that ran it in this process, e.g. {"dot_refined": "eager"}."""
    out: dict = {}
    for (op, backend), _ in sorted(USED.items()):
        out[op] = backend if op not in out else f"{out[op]}+{backend}"
    return out
