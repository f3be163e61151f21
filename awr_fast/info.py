"""``python -m awr_fast.info [--json]``: what is installed, what was built, and which backends can run here."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

BACKEND_NAMES = ("reference", "triton", "cuda")


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


def _triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _devices(torch) -> list[str]:
    if torch is None or not torch.cuda.is_available():
        return ["cpu only"]
    out = []
    for i in range(torch.cuda.device_count()):
        major, minor = torch.cuda.get_device_capability(i)
        out.append(f"cuda:{i} {torch.cuda.get_device_name(i)} (capability {major}.{minor})")
    return out


def _fallback_backend_status(triton_ok: bool, triton_text: str, torch) -> dict[str, tuple[bool, str]]:
    """Used only when awr_fast.backends cannot be imported."""
    status = {"reference": (True, "PyTorch eager, runs anywhere")}
    cuda_available = torch is not None and torch.cuda.is_available()
    if not triton_ok:
        status["triton"] = (False, f"triton {triton_text}")
    elif cuda_available or _triton_interpret():
        status["triton"] = (True, f"triton {triton_text}" + ("" if cuda_available else ", TRITON_INTERPRET=1"))
    else:
        status["triton"] = (False, "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU)")
    try:
        from awr_fast._ext import cuda_status
        status["cuda"] = cuda_status()
    except Exception as exc:
        status["cuda"] = (False, f"awr_fast._ext failed to import ({type(exc).__name__}: {exc})")
    return status


def collect() -> dict:
    """Everything the command prints, as plain data."""
    try:
        import torch
    except Exception as exc:  # awr_fast cannot work without torch, but the report still should
        torch, torch_text = None, f"not available ({type(exc).__name__}: {exc})"
    else:
        torch_text = torch.__version__
    triton_ver, triton_text = _version("triton")
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
        info["cuda_extension"] = {"loaded": False, "reason": f"awr_fast._ext failed ({type(exc).__name__}: {exc})",
                                  "build": {}}
    try:
        from awr_fast.backends import backend_status
        status = backend_status()
        source = "awr_fast.backends.backend_status()"
    except Exception as exc:
        status = _fallback_backend_status(triton_ver is not None, triton_text, torch)
        source = f"computed by awr_fast.info (awr_fast.backends failed: {type(exc).__name__}: {exc})"
    names = list(BACKEND_NAMES) + [name for name in status if name not in BACKEND_NAMES]
    info["backends"] = {name: {"usable": bool(status[name][0]), "reason": str(status[name][1])}
                        if name in status else {"usable": False, "reason": "not reported"} for name in names}
    info["backends_source"] = source
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
        lines.append(f"  built with      torch {build['torch']}, nvcc {build.get('nvcc')}, "
                     f"arch {build.get('arch_list')}, {build.get('reason')}")
    lines.append("backends:")
    width = max(len(name) for name in info["backends"])
    for name, entry in info["backends"].items():
        mark = "usable" if entry["usable"] else "NOT usable"
        lines.append(f"  {name:<{width}}  {mark:<10}  {entry['reason']}")
    if not info["backends_source"].startswith("awr_fast.backends"):
        lines.append(f"  (backend status {info['backends_source']})")
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
