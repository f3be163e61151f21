"""Compiled resources of every kernel of the CUDA extension (awr_fast._C, csrc/), per target architecture.

    python bench/cuda_resources.py                  # report: bench/results/cuda_resources.md and .json
    python bench/cuda_resources.py --check          # also fail (exit 1) on a spill or a broken promise
    python bench/cuda_resources.py --lib PATH       # another build of the library

No GPU is needed: ``cuobjdump --dump-resource-usage`` (the toolkit's, else the one Triton bundles) reads
the library's device code for each architecture it was built for (TORCH_CUDA_ARCH_LIST at build time,
default "8.0;9.0+PTX"). Per kernel: registers, stack frame (register spills and local arrays live
there), local memory, static shared memory; beside it the dynamic shared memory the launcher asks for
at the default configurations (dot_refined and w2_refined at n = 50 and 64, every mechanism, forward and
backward; w2_topk at the largest k of each key width; the ops awr_fast::<op>_cuda_smem_bytes are the
launcher's own formula). The check asserts, for every
architecture the build was asked for:
  - no spills: STACK = 0 and LOCAL = 0 for every kernel;
  - the launch bounds hold: registers x 256 threads fit the 64K-register file (every kernel here is
    declared __launch_bounds__(256));
  - static + dynamic shared memory of each default configuration fits the architecture's opt-in limit.
CI runs the check on every build (tests/test_cuda_resources.py).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
#: cudaDevAttrMaxSharedMemoryPerBlockOptin per architecture (the same table as bench/kernel_resources.py).
SMEM_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
REGISTER_FILE = 65536
LAUNCH_THREADS = 256  # kBlockThreads (csrc/common/block.cuh) and w2_scores' kThreads
DEFAULT_N = (50, 64)
MECHANISMS = ("none", "simp", "add", "value")


def cuobjdump() -> str:
    """The toolkit's cuobjdump, else the one Triton ships."""
    for base in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if base and Path(base, "bin", "cuobjdump").is_file():
            return str(Path(base, "bin", "cuobjdump"))
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import triton
    except ImportError as exc:
        raise SystemExit(f"no cuobjdump: none in the CUDA toolkit or on PATH, and triton is not importable ({exc})")
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


def library_path() -> Path:
    import awr_fast

    found = sorted(Path(awr_fast.__file__).parent.glob("_C*.so"))
    if not found:
        raise SystemExit("awr_fast._C is not built (pip install -e . with a CUDA torch and nvcc; see README)")
    return found[0]


def demangle(names: list[str]) -> list[str]:
    tool = shutil.which("c++filt")
    if not tool:
        return names
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return out.splitlines()


def short_name(demangled: str) -> str:
    """awr_fast::dot_refined::(anonymous namespace)::forward_kernel<__half>(...) ->
    dot_refined.forward_kernel<__half>"""
    text = demangled.replace("(anonymous namespace)::", "").removeprefix("void ").split("(", 1)[0]
    return text.replace("awr_fast::", "").replace("::", ".")


def read_resources(lib: Path) -> list[dict]:
    """One row per (architecture, kernel) of the library's device code."""
    out = subprocess.run(
        [cuobjdump(), "--dump-resource-usage", str(lib)], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    rows, arch, pending = [], None, None
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("arch = sm_"):
            arch = int(line.split("sm_")[1])
        elif line.startswith("Function "):
            pending = line[len("Function ") :].rstrip(":")
        elif pending and line.startswith("REG:"):
            fields = dict(re.findall(r"([A-Z]+(?:\[\d+\])?):(\d+)", line))
            rows.append(
                dict(
                    arch=arch,
                    mangled=pending,
                    registers=int(fields["REG"]),
                    stack=int(fields["STACK"]),
                    local=int(fields["LOCAL"]),
                    static_shared=int(fields["SHARED"]),
                )
            )
            pending = None
    for row, name in zip(rows, demangle([r["mangled"] for r in rows])):
        row["kernel"] = short_name(name)
    return rows


def dynamic_shared(kernel: str) -> dict:
    """Default configuration -> dynamic shared memory bytes the launcher asks for this kernel."""
    import torch

    import awr_fast._ext as ext

    backward = ".backward_kernel" in kernel
    if ext.load_cuda_extension()[0] is None:
        return {"": 0}
    if "dot_refined.Family" in kernel:
        smem = torch.ops.awr_fast.dot_refined_cuda_smem_bytes
        return {f"n={n} {m}": int(smem(n, m, backward)) for n in DEFAULT_N for m in MECHANISMS}
    if "w2_refined.Family" in kernel:  # M_stoc at r = n, its widest default
        smem = torch.ops.awr_fast.w2_refined_cuda_smem_bytes
        return {f"n={n} {m}": int(smem(n, m, backward, n)) for n in DEFAULT_N for m in (*MECHANISMS, "stoc")}
    match = re.match(r"w2_topk_kernel<[^,]+, (\d+)>", kernel)
    if match:  # one instantiation per key width k_pad = 32 E: the largest k it serves
        k = 32 * int(match.group(1))
        return {f"k={k}": int(torch.ops.awr_fast.w2_topk_cuda_smem_bytes(k))}
    return {"": 0}


def expected_archs() -> list[int]:
    """The architectures the build was asked for (awr_fast/_build_status.json), e.g. [80, 90]."""
    from awr_fast._ext import build_status

    listed = build_status().get("arch_list") or os.environ.get("TORCH_CUDA_ARCH_LIST") or ""
    archs = []
    for item in re.split(r"[;\s]+", listed):
        match = re.match(r"(\d+)\.(\d+)", item)
        if match:
            archs.append(int(match.group(1)) * 10 + int(match.group(2)))
    return sorted(set(archs))


def check(rows: list[dict], archs: list[int]) -> list[str]:
    """Every broken promise, in words ([] when the build is clean)."""
    problems = []
    present = {r["arch"] for r in rows}
    for arch in archs:
        if arch not in present:
            problems.append(f"sm_{arch}: asked for by the build but no device code for it in the library")
    for r in rows:
        where = f"sm_{r['arch']} {r['kernel']}"
        if r["stack"] or r["local"]:
            problems.append(f"{where}: spills or local arrays (stack {r['stack']} B, local {r['local']} B)")
        if r["registers"] * LAUNCH_THREADS > REGISTER_FILE:
            problems.append(f"{where}: {r['registers']} registers x {LAUNCH_THREADS} threads exceed {REGISTER_FILE}")
        limit = SMEM_LIMIT.get(r["arch"])
        for config, dynamic in r["dynamic_shared"].items():
            total = r["static_shared"] + dynamic
            if limit is not None and total > limit:
                problems.append(f"{where} {config}: {total} B of shared memory > the sm_{r['arch']} limit {limit} B")
    return problems


def render(rows: list[dict], lib: Path, archs: list[int], problems: list[str]) -> str:
    lines = [
        "# CUDA extension: compiled resources per kernel",
        "",
        f"Library: `{lib.name}`; architectures asked for: {', '.join(f'sm_{a}' for a in archs) or 'unknown'}; "
        f"read with cuobjdump --dump-resource-usage. Regenerate: `python bench/cuda_resources.py`.",
        f"Launch bounds: {LAUNCH_THREADS} threads per block. Dynamic shared memory: the launcher's request at the "
        "default configurations (largest shown; limit = the architecture's opt-in maximum).",
        "",
        "| arch | kernel | registers | stack B | local B | static smem B | largest dynamic smem B | limit B |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in sorted(rows, key=lambda r: (r["arch"], r["kernel"])):
        config, dynamic = max(r["dynamic_shared"].items(), key=lambda kv: kv[1])
        biggest = f"{dynamic} ({config})" if config else "0"
        lines.append(
            f"| sm_{r['arch']} | `{r['kernel']}` | {r['registers']} | {r['stack']} | {r['local']} | "
            f"{r['static_shared']} | {biggest} | {SMEM_LIMIT.get(r['arch'], '?')} |"
        )
    lines += [
        "",
        "Check: " + ("passed (no spills, launch bounds and shared memory hold)." if not problems else "FAILED"),
    ]
    lines += [f"- {p}" for p in problems]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lib", type=Path, help="the library to read (default: the installed awr_fast._C)")
    parser.add_argument("--check", action="store_true", help="exit 1 on a spill, a register or shared-memory excess")
    parser.add_argument("--out", type=Path, default=RESULTS / "cuda_resources", help="report stem (.md, .json)")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    lib = args.lib or library_path()
    rows = read_resources(lib)
    if not rows:
        print(f"no device code found in {lib}", file=sys.stderr)
        return 1
    for r in rows:
        r["dynamic_shared"] = dynamic_shared(r["kernel"])
    archs = expected_archs()
    problems = check(rows, archs)
    text = render(rows, lib, archs, problems)
    print(text)
    if not args.no_write:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".md").write_text(text)
        payload = {"library": lib.name, "archs": archs, "rows": rows, "problems": problems}
        args.out.with_suffix(".json").write_text(json.dumps(payload, indent=1) + "\n")
    return 1 if (args.check and problems) else 0


if __name__ == "__main__":
    sys.exit(main())
