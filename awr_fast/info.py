"""``python -m awr_fast.info [--json]``: what is installed, what was built, and which backends can run here."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys


def _version(module_name: str) -> tuple[str | None, str]:
    """(version or None, text): the version, or why the module is missing."""
    try:
        module = __import__(module_name)
    except Exception as exc:
        return None, f"not available ({type(exc).__name__}: {exc})"
    ver = getattr(module, "__version__", "unknown")
    return ver, ver


def _awr_fast_version() -> str:
    try:
        from awr_fast import __version__

        return __version__
    except Exception as exc:
        try:
            from importlib.metadata import version

            return f"{version('awr_fast')} (import awr_fast failed: {type(exc).__name__}: {exc})"
        except Exception:
            return f"unknown (import awr_fast failed: {type(exc).__name__}: {exc})"


def _devices(torch) -> list[str]:
    if torch is None or not torch.cuda.is_available():
        return ["cpu only"]
    out = []
    for i in range(torch.cuda.device_count()):
        major, minor = torch.cuda.get_device_capability(i)
        out.append(f"cuda:{i} {torch.cuda.get_device_name(i)} (capability {major}.{minor})")
    return out


def collect() -> dict:
    """Everything the command prints, as plain data."""
    try:
        import torch
    except Exception as exc:  # awr_fast cannot work without torch, but the report still should
        torch, torch_text = None, f"not available ({type(exc).__name__}: {exc})"
    else:
        torch_text = torch.__version__
    _, triton_text = _version("triton")
    _, numpy_text = _version("numpy")
    info = {
        "awr_fast": _awr_fast_version(),
        "python": f"{platform.python_version()} ({sys.executable})",
        "torch": torch_text,
        "torch_cuda": (torch.version.cuda if torch is not None else None) or "none (CPU-only build)",
        "triton": triton_text,
        "numpy": numpy_text,
        "devices": _devices(torch),
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "unset"),
    }
    try:
        from awr_fast._ext import build_status, load_cuda_extension

        module, reason = load_cuda_extension()
        info["cuda_extension"] = {"loaded": module is not None, "reason": reason, "build": build_status()}
    except Exception as exc:
        info["cuda_extension"] = {
            "loaded": False,
            "reason": f"awr_fast._ext failed ({type(exc).__name__}: {exc})",
            "build": {},
        }
    try:
        from awr_fast.backends import backend_status, capabilities
        from awr_fast.ops import SPECS
    except Exception as exc:  # a broken install: say so instead of guessing
        info["backends"] = {}
        info["backends_error"] = f"awr_fast.backends failed to import ({type(exc).__name__}: {exc})"
        return info
    ops_by_backend = {name: [op for op in SPECS if name in capabilities(op)] for name in backend_status()}
    info["backends"] = {
        name: {"usable": bool(ok), "reason": str(reason), "ops": ops_by_backend[name]}
        for name, (ok, reason) in backend_status().items()
    }
    return info


def render(info: dict) -> str:
    ext = info["cuda_extension"]
    build = ext.get("build") or {}
    lines = [
        f"awr_fast          {info['awr_fast']}",
        f"python            {info['python']}",
        f"torch             {info['torch']} (CUDA {info['torch_cuda']})",
        f"triton            {info['triton']}",
        f"numpy             {info['numpy']}",
        f"devices           {'; '.join(info['devices'])}",
        f"TRITON_INTERPRET  {info['TRITON_INTERPRET']}",
        f"CUDA extension    {'loaded' if ext['loaded'] else 'not available'}: {ext['reason']}",
    ]
    if build.get("cuda_extension_built") and build.get("torch"):
        lines.append(
            f"  built with      torch {build['torch']}, nvcc {build.get('nvcc')}, "
            f"arch {build.get('arch_list')}, {build.get('reason')}"
        )
    lines.append('backends ("auto" tries them in this order; cuda and triton only for CUDA tensors):')
    if "backends_error" in info:
        lines.append(f"  {info['backends_error']}")
    width = max((len(name) for name in info["backends"]), default=0)
    for name, entry in info["backends"].items():
        mark = "usable" if entry["usable"] else "NOT usable"
        lines.append(f"  {name:<{width}}  {mark:<10}  {entry['reason']}")
        lines.append(f"  {'':<{width}}  {'':<10}  ops: {', '.join(entry['ops'])}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m awr_fast.info", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    args = parser.parse_args(argv)
    info = collect()
    print(json.dumps(info, indent=2) if args.json else render(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
