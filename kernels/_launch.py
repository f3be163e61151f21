"""Launch a cached Triton kernel without Triton's per-call Python path.

``fn[grid](*args, **meta)`` runs Triton's binder over every argument, builds the cache key, looks the
kernel up and only then calls the compiled launcher: about 35 µs of host time per launch on this
library's argument lists, a large share of an op that is host-bound at recommender sizes
(bench/host_overhead.py, its triton and triton-jit-run rows). ``launch(fn, grid, *args, **meta)`` does
the same launch: the first call of a specialization goes through ``fn[grid]`` (compile, Triton's cache,
launch) and remembers the compiled kernel under a key that determines Triton's specialization completely
(per tensor its dtype and whether its address is 16-byte aligned, every other argument by value, the
meta-parameters, the device); later calls with the same key call the compiled launcher directly with
exactly the arguments ``JITFunction.run`` passes it (triton 3.6 to 3.9: grid, stream, function, packed
metadata, launch metadata, the enter/exit hooks, then every kernel parameter in order, constexprs
included). tests/test_launch.py checks on the sm_90 stand-in driver that both paths hand the launcher
the same arguments.

Triton's own path is kept where the shortcut could differ from it: under the interpreter, when a hook
is installed (a profiler such as proton wants its launch metadata), for a callable grid, and with
AWR_FAST_DIRECT_LAUNCH=0.
"""

from __future__ import annotations

import inspect
import os

import torch
import triton

_MAX_ENTRIES = 4096  # distinct specializations remembered per kernel before the memo starts over


def direct_launch_enabled() -> bool:
    text = os.environ.get("AWR_FAST_DIRECT_LAUNCH", "1")
    if text not in ("0", "1"):
        raise ValueError(f"AWR_FAST_DIRECT_LAUNCH: expected 0 or 1, got {text!r}")
    return text == "1" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")


_ENABLED = direct_launch_enabled()


def _hooked(fn) -> bool:
    """Whether a hook would see this launch: ``fn``'s pre-run hooks, a stages-inspection hook, or a
    launch enter/exit hook. Triton 3.6-3.9 keep the launch hooks as ``HookChain`` objects that are never
    None; an empty chain calls nothing, so the launcher is handed None in its place (and no launch
    metadata, which only a hook reads)."""
    if getattr(fn, "pre_run_hooks", None):
        return True
    runtime = getattr(getattr(triton, "knobs", None), "runtime", None)
    if runtime is None:
        return False
    if getattr(runtime, "add_stages_inspection_hook", None) is not None:
        return True
    for hook in (runtime.launch_enter_hook, runtime.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):  # a plain callable, or a chain with calls
            return True
    return False


_TENSOR = torch.Tensor


def _args_key(args) -> tuple:
    """What of each argument decides Triton's specialization: a tensor's dtype and 16-byte alignment, a
    float nothing (always an fp32 scalar), anything else (ints, bools, None) its value. One comprehension
    with the checks inlined: this runs on every launch."""
    return tuple(
        [
            (a.dtype, not a.data_ptr() & 15)
            if isinstance(a, _TENSOR)
            else (float if a.__class__ is float else (a.__class__, a))
            for a in args
        ]
    )


class _Memo:
    """The compiled kernels one JITFunction launched, by argument key."""

    def __init__(self, fn):
        self.fn = fn
        self.kernels: dict = {}
        self.arg_names = list(fn.arg_names)
        self.defaults = {p.name: p.default for p in fn.params}

        self.constexpr = {p.name for p in fn.params if p.is_constexpr}

    def remember(self, key, kernel, n_positional: int, meta: dict) -> None:
        tail = self.arg_names[n_positional:]
        loose = [name for name in tail if name not in self.constexpr]
        if loose:  # a keyword tensor would enter the key by identity and never hit again
            raise TypeError(f"launch({self.fn.__name__}): pass {loose} positionally (only constexprs by name)")
        missing = [name for name in tail if name not in meta and self.defaults[name] is inspect.Parameter.empty]
        if missing:
            raise TypeError(f"launch({self.fn.__name__}): no value for the parameters {missing}")
        values = tuple(meta[name] if name in meta else self.defaults[name] for name in tail)
        if len(self.kernels) >= _MAX_ENTRIES:
            self.kernels.clear()
        self.kernels[key] = (kernel.run, kernel.function, kernel.packed_metadata, values)


_MEMOS: dict = {}


def launch(fn, grid, *args, **meta) -> None:
    """``fn[grid](*args, **meta)``, with Triton's per-call Python work skipped once the kernel is cached.
    ``meta``: the constexpr parameters by name plus launch options (num_warps, num_stages, maxnreg)."""
    if not _ENABLED or not hasattr(fn, "device_caches") or callable(grid) or _hooked(fn):
        fn[grid](*args, **meta)
        return
    memo = _MEMOS.get(fn)
    if memo is None:
        memo = _MEMOS[fn] = _Memo(fn)
    device = triton.runtime.driver.active.get_current_device()
    key = (device, tuple(meta.items()), _args_key(args))
    hit = memo.kernels.get(key)
    if hit is None:
        kernel = fn[grid](*args, **meta)  # compiles on first use, launches, returns the CompiledKernel
        if kernel is None or hasattr(kernel, "result"):  # async compile: leave this one to Triton
            return
        memo.remember(key, kernel, len(args), meta)
        return
    run, function, packed_metadata, tail_values = hit
    stream = triton.runtime.driver.active.get_current_stream(device)
    g0 = grid[0]
    g1 = grid[1] if len(grid) > 1 else 1
    g2 = grid[2] if len(grid) > 2 else 1
    run(g0, g1, g2, stream, function, packed_metadata, None, None, None, *args, *tail_values)
