"""Compiled resources of every Triton kernel for a GPU target, on a machine without a GPU.

    python bench/kernel_resources.py                          # the default configurations, sm_90 and sm_80
    python bench/kernel_resources.py --arch 90 --n 50 --dtypes fp32 --mechanisms simp
    python bench/kernel_resources.py --all                    # every window, block size and flag
    python bench/kernel_resources.py --families w2 --n 50,200  # the W2 family: fused and tiled kernels

Triton's whole JIT path (binder, specialization, constexprs, ``triton.compile`` with its bundled ptxas)
runs here once the active driver is replaced by a stand-in that reports the target
(``GPUTarget("cuda", 90, 32)`` or 80) and the device's opt-in shared memory per block (so Triton's own
OutOfResources check runs), and whose launcher does nothing. The project's launchers are then called on
small CPU tensors, forward and backward, so each kernel is compiled exactly as a GPU launch of that
configuration would compile it. Per compiled kernel the bundled ``cuobjdump --dump-resource-usage`` gives
registers, the stack frame per thread (register spills are stored there, so STACK > 0 means the kernel
spills or keeps a local array), local arrays and static shared memory; the kernel's metadata gives
num_warps, num_stages and the shared memory the launch needs. Rows go to
bench/results/kernel_resources.csv/.jsonl and a markdown table to kernel_resources.md.

The numbers are the compiler's, not a GPU's: they say whether a kernel can be fast (no spills, fits in
shared memory), not how fast it is.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

#: Opt-in shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin) and SM count.
ARCHS = {
    90: {"max_shared_mem": 232448, "multiprocessor_count": 132},
    80: {"max_shared_mem": 166912, "multiprocessor_count": 108},
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
COLUMNS = [
    "run_id",
    "date",
    "git_commit",
    "triton",
    "arch",
    "config",
    "kernel",
    "n",
    "dtype",
    "mechanism",
    "masked",
    "dropout",
    "num_warps",
    "num_stages",
    "shared_bytes",
    "max_shared_bytes",
    "registers",
    "local_bytes",
    "stack_bytes",
    "spill_stores",
    "spill_loads",
    "status",
    "reason",
    "compile_s",
]


# ------------------------------------------------------------------------------------------ the gate

#: The resource gate (`--check`; tests/test_kernel_resources.py runs it in CI on sm_90 for the default
#: configurations): a compile error or more shared memory than the device has always fails; a fused
#: kernel may have no stack frame (register spills live there) and any other kernel at most
#: TILED_STACK_BUDGET bytes per thread, except the kernels in KNOWN_SPILLS, each held to its ceiling.
FUSED_KERNELS = ("_fused_fwd", "_fused_bwd", "_w2_fused_fwd", "_w2_fused_bwd", "_calibrated_fwd")
TILED_STACK_BUDGET = 256  # 512 until the tiled kernels' fixes of 2026-12-05 (the calibrated row kernels: 176 B)
#: (arch, dtype, mechanism, kernel) -> stack bytes allowed: what the kernels spill today (2026-12-02, triton
#: 3.8, after the tf32x3 / reordered-backward fixes) with a quarter's margin. A ratchet, not a target: the
#: target is 0 for fused kernels, and a ceiling only ever comes down.
KNOWN_SPILLS = {
    # fused kernels at n = 50 since they stage their (n, n) tiles through scratch where registers spilled
    # (2026-12-05, kernels/_common.py's _stages_forward / _stages_backward; measured bytes in the comments).
    # Before: the fp32 refined backward 376 B-1.3 KB on sm_90 and 2.9-5.5 KB on sm_80, W2's 0.4-1.5 KB and
    # 2.5-5.2 KB, the sm_80 fp32 forwards 1.1-2.6 KB, the half-precision value backward 48-208 B on sm_90.
    # Half inputs: 0 everywhere since their staged products take 32-column K-slices (_staged_k_slice; 16
    # left 8-176 B) and W2 stages its plain backward on sm_80 (64-160 B in registers)
    (90, "fp32", "add", "_w2_fused_bwd"): 16,  # 8
    (90, "fp32", "value", "_w2_fused_bwd"): 24,  # 16
    # sm_80 (2026-12-05), the dot and W2 families' fused kernels at n = 50: sm_80's mma.sync takes both
    # operands from registers; none of these is a target, each ceiling only comes down
    (80, "fp32", "value", "_fused_bwd"): 40,  # 32 (5512 in registers)
    (80, "fp32", "add", "_calibrated_fwd"): 16,  # 8 (2192 in registers, staged since 2026-12-05)
    (80, "fp32", "value", "_calibrated_fwd"): 16,  # 8 (2056)
    (80, "fp32", "none", "_w2_fused_bwd"): 16,  # 8 (2480)
    (80, "fp32", "simp", "_w2_fused_bwd"): 40,  # 32 (3984)
    (80, "fp32", "add", "_w2_fused_bwd"): 40,  # 32 (4040)
    (80, "fp32", "value", "_w2_fused_bwd"): 160,  # 128 (5200)
}


def gate_violations(rows: list[dict]) -> list[str]:
    """What breaks the gate, one line per offending kernel (empty: the rows pass)."""
    out = []
    for r in rows:
        where = f"{r['config']}: {r['kernel']}"
        if r["status"] != "ok":
            out.append(f"{where}: {r['status']} {r.get('reason', '')}".rstrip())
            continue
        stack = int(r["stack_bytes"])
        key = (int(r["arch"]), r["dtype"], r["mechanism"], r["kernel"])
        allowed = KNOWN_SPILLS.get(key, 0 if r["kernel"] in FUSED_KERNELS else TILED_STACK_BUDGET)
        if stack > allowed:
            out.append(f"{where}: {stack} B of stack (spills) per thread, at most {allowed} B allowed")
    return out


# ------------------------------------------------------------------------------------- stand-in driver


class _Launcher:
    """Takes the compiled kernel's place at launch: counts and logs the launch, runs nothing."""

    launches = 0
    log: list = []  # the metadata of every launch since the last clear (the kernel's own object)
    record = False  # when set, `calls` keeps every launch's (metadata, arguments): tests/test_launch.py
    calls: list = []

    def __init__(self, src, metadata):
        self.metadata = metadata

    def __call__(self, *args, **kwargs):
        _Launcher.launches += 1
        _Launcher.log.append(self.metadata)
        if _Launcher.record:
            _Launcher.calls.append((self.metadata, args))


class _Utils:
    def __init__(self, arch: int):
        self.props = {
            **ARCHS[arch],
            "max_num_regs": 65536,
            "warpSize": 32,
            "sm_clock_rate": 1,
            "mem_clock_rate": 1,
            "mem_bus_width": 1,
        }

    def get_device_properties(self, device):
        return self.props

    def load_binary(self, name, kernel, shared, device):
        return 0, 0, 0, 0, 1024  # module, function, n_regs, n_spills (unknown here: see cuobjdump), max threads

    def unload_module(self, module):
        pass


def install_stand_in(arch: int):
    """Make `arch` the active Triton target; returns the driver object. Call it before awr_fast.kernels is
    imported: the kernels must be decorated for compilation, not for the interpreter."""
    os.environ.pop("TRITON_INTERPRET", None)
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase
    from triton.runtime import driver

    class StandIn(DriverBase):
        def __init__(self):
            self.utils = _Utils(arch)
            self.launcher_cls = _Launcher

        @staticmethod
        def is_active():
            return False

        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

        def get_current_device(self):
            return 0

        def set_current_device(self, device):
            pass

        def get_current_stream(self, device=None):
            return 0

        def get_device_capability(self, device=None):
            return divmod(arch, 10)

        def get_active_torch_device(self):
            return torch.device("cpu")

        def get_device_interface(self):
            return torch.cuda

        def map_python_to_cpp_type(self, ty):
            return ty

        def get_benchmarker(self):
            raise RuntimeError("no benchmarking on the stand-in driver")

        def get_empty_cache_for_benchmark(self):
            raise RuntimeError("no benchmarking on the stand-in driver")

        def clear_cache(self, cache):
            pass

    stand_in = StandIn()
    driver.set_active(stand_in)
    from triton.compiler import compiler

    if hasattr(compiler.max_shared_mem, "cache_clear"):  # cached per device: a second target must not see the first's
        compiler.max_shared_mem.cache_clear()
    from awr_fast.kernels import _launch

    _launch._MEMOS.clear()  # the direct-launch memo is per device too: a second target must compile its own
    return stand_in


# ------------------------------------------------------------------------------------------ resources


def _cuobjdump() -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


def cubin_resources(cubin: bytes) -> dict:
    """From the cubin: REG, STACK (bytes per thread: register spills live in the stack frame) and LOCAL
    (cuobjdump --dump-resource-usage), and the SASS's local-memory stores and loads (STL/LDL: spill
    traffic, as Triton kernels declare no local arrays)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run(
            [_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True, timeout=60, check=True
        ).stdout
        sass = subprocess.run(
            [_cuobjdump(), "-sass", f.name], capture_output=True, text=True, timeout=120, check=True
        ).stdout
    found = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    return {
        "registers": int(found.get("REG", -1)),
        "local_bytes": int(found.get("LOCAL", -1)),
        "stack_bytes": int(found.get("STACK", -1)),
        "spill_stores": len(re.findall(r"\bSTL(?:\.\S+)?\s", sass)),
        "spill_loads": len(re.findall(r"\bLDL(?:\.\S+)?\s", sass)),
    }


def jit_functions(module) -> dict:
    """name -> JITFunction of a family's module and of the shared core it launches (kernels/_refine.py)."""
    import triton

    from awr_fast.kernels import _refine

    return {
        name: fn
        for m in (_refine, module)
        for name, fn in vars(m).items()
        if isinstance(fn, triton.runtime.JITFunction)
    }


def compiled(fn) -> dict:
    """key -> CompiledKernel of a JITFunction's cache on device 0."""
    caches = fn.device_caches.get(0) if hasattr(fn, "device_caches") else None
    return dict(caches[0]) if caches else {}


def scan_cache(cache_dir: Path, base: dict) -> list[dict]:
    """One row per kernel compiled into a Triton cache directory (<name>.json beside <name>.cubin): what
    a real run built, e.g. bench/gpu_check.sh's, with the same cuobjdump numbers. The shape of the call
    that built it is not recorded there, so n, dtype and mechanism stay empty."""
    import json

    rows = []
    for meta_path in sorted(Path(cache_dir).glob("*/*.json")):
        cubin = meta_path.with_suffix(".cubin")
        if not cubin.exists():
            continue  # group files (__grp__*.json) and non-CUDA entries
        meta = json.loads(meta_path.read_text())
        arch = (meta.get("target") or {}).get("arch")
        limit = ARCHS.get(arch, {}).get("max_shared_mem")
        too_big = limit is not None and meta.get("shared", 0) > limit
        rows.append(
            {
                **base,
                "arch": arch,
                "config": f"cache {meta_path.parent.name[:12]}",
                "kernel": meta.get("name", meta_path.stem),
                "n": "",
                "dtype": "",
                "mechanism": "",
                "masked": "",
                "dropout": "",
                "max_shared_bytes": limit,
                "num_warps": meta.get("num_warps"),
                "num_stages": meta.get("num_stages"),
                "shared_bytes": meta.get("shared"),
                **cubin_resources(cubin.read_bytes()),
                "status": "out_of_shared_memory" if too_big else "ok",
                "reason": "",
                "compile_s": 0.0,
            }
        )
    return rows


# ------------------------------------------------------------------------------------------- configs


def configs(args):
    """(label, n, dtype name, mechanism, masked, dropout) of the launches to compile."""
    out = []
    for n in args.n:
        for dtype in args.dtypes:
            for mechanism in args.mechanisms:
                flags = [(True, False)] if not args.all else [(True, False), (False, False), (True, True)]
                for masked, dropout in flags:
                    out.append((n, dtype, mechanism, masked, dropout))
    return out


def run_config(triton_dot, n, dtype, mechanism, masked, dropout, batch=2, heads=1, d_h=64, device="cpu"):
    """One forward and one backward through the Triton backend's entry (every kernel the launcher picks)."""
    from awr_fast.ops.dot_refined import WEIGHTS

    g = torch.Generator().manual_seed(0)
    dt = DTYPES[dtype]

    def leaf(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dt).requires_grad_(True)

    q, k, v = (leaf(batch, heads, n, d_h) for _ in range(3))
    weights = {name: leaf(n, n) for name in WEIGHTS[mechanism]}
    mask = None
    if masked:
        mask = torch.zeros(batch, n, dtype=torch.bool)
        mask[0, : n // 3] = True
        mask = mask.to(device)
    out = triton_dot.dot_refined(
        q, k, v, mechanism=mechanism, key_padding_mask=mask, dropout_p=0.1 if dropout else 0.0, **weights
    )
    out.backward(torch.ones_like(out))


def run_config_w2(triton_w2, n, dtype, mechanism, masked, dropout, batch=2, heads=1, d_h=64, device="cpu"):
    """The same for the W2 family: six Gaussian inputs (covariances positive), both outputs' gradients."""
    from awr_fast.ops.w2_refined import WEIGHTS

    g = torch.Generator().manual_seed(0)
    dt = DTYPES[dtype]

    def leaf(x):
        return x.to(device=device, dtype=dt).requires_grad_(True)

    shape = (batch, heads, n, d_h)
    inputs = [
        leaf(torch.randn(*shape, generator=g) if i % 2 == 0 else torch.rand(*shape, generator=g) + 0.5)
        for i in range(6)
    ]
    weights = {name: leaf(torch.randn(n, n, generator=g)) for name in WEIGHTS[mechanism]}
    mask = None
    if masked:
        mask = torch.zeros(batch, n, dtype=torch.bool)
        mask[0, : n // 3] = True
        mask = mask.to(device)
    mu, sig = triton_w2.w2_refined(
        *inputs, mechanism=mechanism, key_padding_mask=mask, dropout_p=0.1 if dropout else 0.0, **weights
    )
    (mu.sum() + sig.sum()).backward()


def run_config_calibrated(triton_cal, n, dtype, mechanism, masked, dropout, batch=2, heads=1, d_h=64, device="cpu"):
    """The calibrated family with both calibrators, forward and backward (the row- and column-block kernels),
    with dropout on every stream when `dropout`; `mechanism` is the AWRSR refinement of P_fin (the dot
    family's tiled core, recomputed in the backward)."""
    from awr_fast.ops.calibrated import REFINE_WEIGHTS

    g = torch.Generator().manual_seed(0)
    dt = DTYPES[dtype]

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dt).requires_grad_(True)

    shape = (batch, heads, n, d_h)
    mask = None
    if masked:
        mask = torch.zeros(batch, n, dtype=torch.bool)
        mask[0, : n // 3] = True
        mask = mask.to(device)
    calibrator = {name: randn(d_h) for name in ("w_oq", "w_ok", "w_dq", "w_dk")}
    calibrator.update({name: randn(()) for name in ("b_o", "b_d", "dist_scale")})
    refinement = {name: randn(n, n) for name in REFINE_WEIGHTS[mechanism]}
    p = 0.1 if dropout else 0.0
    out_cal, out_att, perturb = triton_cal.calibrated(
        *(randn(*shape) for _ in range(3)),
        **calibrator,
        q_adv=randn(*shape),
        k_adv=randn(*shape),
        gate_logits=randn(batch, n, n),
        noise=randn(batch, heads, n, n).detach(),
        key_padding_mask=mask,
        dropout_p=p,
        perturb_dropout_p=p,
        refine=mechanism,
        **refinement,
    )
    (out_cal.sum() + out_att.sum() + perturb.sum()).backward()


#: family -> (kernel module, entry runner, mechanisms, longest n): what `--families` compiles
FAMILIES = {
    "dot": ("dot_refined", run_config, ("none", "simp", "add", "value"), 256),
    "w2": ("w2_refined", run_config_w2, ("none", "simp", "add", "value", "stoc"), 256),
    "calibrated": ("calibrated", run_config_calibrated, ("none", "simp", "add", "value"), 256),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="90,80", help="comma list of 90 (H100/H200), 80 (A100)")
    p.add_argument("--n", default="50,200", help="sequence lengths (<= 64: fused kernels; else tiled)")
    p.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32, bf16, fp16")
    p.add_argument("--mechanisms", default="none,simp,add,value,stoc", help="those a family lacks are skipped")
    p.add_argument(
        "--families",
        default="dot",
        help="comma list of dot, w2, calibrated (fused n <= 64, tiled/row-block to 256)",
    )
    p.add_argument("--all", action="store_true", help="also without a mask and with dropout; n 50,100,200,256")
    p.add_argument(
        "--fp32-precision",
        default=None,
        choices=("ieee", "tf32x3", "tf32"),
        help="what-if: compile the fp32 dots with this input_precision instead of the launcher's",
    )
    p.add_argument(
        "--device",
        default="stand-in",
        choices=("stand-in", "cuda"),
        help="stand-in: compile for --arch without a GPU (default); cuda: compile and run on this machine's GPU "
        "(the kernels a real run builds, for its own architecture; --arch is ignored)",
    )
    p.add_argument(
        "--scan-cache",
        type=Path,
        default=None,
        metavar="DIR",
        help="compile nothing: report every kernel already compiled into this Triton cache directory",
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="exit 1 if a kernel breaks the resource gate (compile error, shared memory, spills: see KNOWN_SPILLS)",
    )
    p.add_argument("--results-dir", type=Path, default=common.DEFAULT_RESULTS_DIR)
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)
    if args.device == "cuda":
        if not torch.cuda.is_available():
            p.error("--device cuda: no CUDA device is visible")
        from triton.runtime import driver

        major, minor = torch.cuda.get_device_capability()
        props = driver.active.utils.get_device_properties(torch.cuda.current_device())
        ARCHS[major * 10 + minor] = {k: props[k] for k in ("max_shared_mem", "multiprocessor_count")}
        args.arch = str(major * 10 + minor)
    args.arch = [int(a) for a in args.arch.split(",")]
    args.n = [int(x) for x in (("50,100,200,256" if args.all else args.n).split(","))]
    args.dtypes = args.dtypes.split(",")
    args.mechanisms = args.mechanisms.split(",")
    args.families = args.families.split(",")
    for family in args.families:
        if family not in FAMILIES:
            p.error(f"--families: expected some of {sorted(FAMILIES)}, got {family!r}")
    for a in args.arch:
        if a not in ARCHS:
            p.error(f"--arch: expected some of {sorted(ARCHS)}, got {a}")
    import triton

    rows = []
    env = common.env_info(torch.device("cpu"))
    rid = common.run_id(env)
    if args.scan_cache is not None:
        if not args.scan_cache.is_dir():
            p.error(f"--scan-cache: {args.scan_cache} is not a directory")
        base = {"run_id": rid, "date": env["date"], "git_commit": env["git_commit"], "triton": triton.__version__}
        rows = scan_cache(args.scan_cache, base)
        print(f"{len(rows)} compiled kernel(s) in {args.scan_cache}")
        return _report(args, rows)
    # cubin bytes -> its cuobjdump numbers (keyed by content: an id() would be reused once a cleared cache's
    # kernels are freed, and a second target's rows would read the first target's numbers)
    resources: dict = {}
    device = "cuda" if args.device == "cuda" else "cpu"
    for arch in args.arch:
        if args.device == "stand-in":
            install_stand_in(arch)
        else:
            os.environ.pop("TRITON_INTERPRET", None)
        if args.fp32_precision:  # every launcher takes its precision from _common's _Launch
            from awr_fast.kernels import _common

            chosen = _common._precision
            _common._precision = lambda dtype: args.fp32_precision if dtype == torch.float32 else chosen(dtype)
        import importlib

        todo = []
        for family in args.families:
            module_name, runner, mechanisms, longest = FAMILIES[family]
            module = importlib.import_module(f"awr_fast.kernels.{module_name}")
            # launch options cached per target: this arch afresh
            importlib.import_module("awr_fast.kernels._common")._TARGET_ARCH.clear()
            todo += [(family, module, runner, c) for c in configs(args) if c[0] <= longest and c[2] in mechanisms]
        for fn in {id(f): f for _, m, _, _ in todo for f in jit_functions(m).values()}.values():
            if hasattr(fn, "device_caches"):  # one cache per target: start this arch afresh
                fn.device_caches.clear()
        for family, module, runner, (n, dtype, mechanism, masked, dropout) in todo:
            fns = jit_functions(module)
            prefix = "" if family == "dot" else f"{family} "
            label = (
                f"sm_{arch} {prefix}n={n} {dtype} {mechanism}{' mask' if masked else ''}{' dropout' if dropout else ''}"
            )
            before = {name: set(compiled(fn)) for name, fn in fns.items()}
            _Launcher.log.clear()
            start = time.perf_counter()
            base = {
                "run_id": rid,
                "date": env["date"],
                "git_commit": env["git_commit"],
                "triton": triton.__version__,
                "arch": arch,
                "config": label,
                "n": n,
                "dtype": dtype,
                "mechanism": mechanism,
                "masked": masked,
                "dropout": dropout,
                "max_shared_bytes": ARCHS[arch]["max_shared_mem"],
            }
            try:
                runner(module, n, dtype, mechanism, masked, dropout, device=device)
                status, reason = "ok", ""
            except Exception as exc:  # OutOfResources, a compile error: recorded, the sweep goes on
                status, reason = "error", common.describe(exc)
            seconds = time.perf_counter() - start
            launched = {id(md) for md in _Launcher.log}
            used = [
                (name, kernel, key not in before[name])
                for name, fn in fns.items()
                for key, kernel in compiled(fn).items()
                if key not in before[name] or id(kernel.metadata) in launched
            ]
            fresh = sum(is_new for _, _, is_new in used)
            limit = ARCHS[arch]["max_shared_mem"]
            explained = any(kernel.metadata.shared > limit for _, kernel, _ in used)  # the error is that kernel's
            if status != "ok" and not used:
                rows.append({**base, "kernel": "?", "status": status, "reason": reason, "compile_s": seconds})
            for name, kernel, is_new in used:
                cubin = kernel.asm["cubin"]
                if cubin not in resources:
                    resources[cubin] = cubin_resources(cubin)
                md = kernel.metadata
                too_big = md.shared > ARCHS[arch]["max_shared_mem"]
                rows.append(
                    {
                        **base,
                        "kernel": name,
                        "num_warps": md.num_warps,
                        "num_stages": md.num_stages,
                        "shared_bytes": md.shared,
                        **resources[cubin],
                        "status": "out_of_shared_memory" if too_big else ("ok" if explained else status),
                        "reason": reason if too_big or not explained else "",
                        "compile_s": seconds / fresh if is_new else 0.0,
                    }
                )
            done = [r for r in rows if r["config"] == label]
            worst = max((r.get("stack_bytes", 0) or 0 for r in done), default=0)
            print(
                f"{label}: {len(used)} kernel(s) ({fresh} compiled) in {seconds:.1f} s, {status}; max stack {worst} B",
                flush=True,
            )
    return _report(args, rows)


def _report(args, rows) -> int:
    if rows:
        print_table(rows)
    if not args.no_save:
        common.append_results(args.results_dir, "kernel_resources", rows, COLUMNS)
        (args.results_dir / "kernel_resources.md").write_text(markdown(rows))
    if args.check:
        broken = gate_violations(rows)
        for line in broken:
            print(f"GATE: {line}")
        print(
            f"resource gate: {'FAILED, ' + str(len(broken)) + ' kernel(s)' if broken else 'passed'} ({len(rows)} rows)"
        )
        return 1 if broken else 0
    return 0


def print_table(rows):
    header = [
        "arch",
        "n",
        "dtype",
        "mechanism",
        "flags",
        "kernel",
        "warps",
        "stages",
        "shared KB",
        "regs",
        "stack B",
        "STL",
        "status",
    ]
    table = [
        [
            str(r["arch"]),
            str(r["n"]),
            r["dtype"],
            r["mechanism"],
            ("mask " if r["masked"] else "") + ("dropout" if r["dropout"] else ""),
            r["kernel"],
            str(r.get("num_warps", "")),
            str(r.get("num_stages", "")),
            f"{r['shared_bytes'] / 1024:.1f}" if r.get("shared_bytes") is not None else "",
            str(r.get("registers", "")),
            str(r.get("stack_bytes", "")),
            str(r.get("spill_stores", "")),
            r["status"],
        ]
        for r in rows
    ]
    print(common.fmt_table(header, table, [False] * 6 + [True] * 6 + [False]))


def markdown(rows) -> str:
    lines = [
        "# Compiled resources of the Triton kernels (bench/kernel_resources.py)",
        "",
        "Stack bytes are per thread: register spills are stored in the stack frame, so > 0 means the kernel",
        "spills (or keeps a local array: see local_bytes in the CSV); STL counts the SASS's local-memory stores",
        "(spill stores). Shared memory is what a launch needs; sm_90 has 227 KB per block, sm_80 163 KB.",
        "",
        "| arch | n | dtype | mechanism | flags | kernel | warps | stages | shared KB | regs | stack B | STL "
        "| status |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        shared = f"{r['shared_bytes'] / 1024:.1f}" if r.get("shared_bytes") is not None else ""
        flags = ("mask " if r["masked"] else "") + ("dropout" if r["dropout"] else "")
        lines.append(
            f"| sm_{r['arch']} | {r['n']} | {r['dtype']} | {r['mechanism']} | {flags.strip()} | "
            f"{r['kernel']} | {r.get('num_warps', '')} | {r.get('num_stages', '')} | {shared} | "
            f"{r.get('registers', '')} | {r.get('stack_bytes', '')} | {r.get('spill_stores', '')} | {r['status']} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
