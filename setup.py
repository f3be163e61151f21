"""Build and install awr_fast: the Python package, its Triton kernels (top-level ``kernels/``, installed as
``awr_fast.kernels``) and, when it can be built, the CUDA extension ``awr_fast._C`` from ``csrc/``.

Environment switches:
    AWR_FAST_SKIP_CUDA_BUILD=1   never build the CUDA extension (pure Python + Triton install)
    AWR_FAST_FORCE_CUDA_BUILD=1  build it or fail the install loudly (no silent fallback)
    CUDA_HOME / CUDA_PATH        the CUDA toolkit to use; when unset it is found from nvcc, falling back to
                                 /usr/local/cuda when the guess has no toolkit in it (e.g. an nvcc wrapper)
    TORCH_CUDA_ARCH_LIST         target architectures; default "8.0;9.0+PTX" when unset and no GPU is visible
    MAX_JOBS                     parallel compile jobs; default about one per 4 GiB of available memory

The extension is built only when the torch seen at build time has CUDA (torch.version.cuda) and nvcc is
found with the same major CUDA version; otherwise the install goes on without it and says why (a line
here, visible with ``pip install -v``, and ``python -m awr_fast.info`` afterwards).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
STATUS_FILE = ROOT / "awr_fast" / "_build_status.json"  # read by awr_fast/_ext.py; not tracked by git
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"
GIB = 1024**3


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


SKIP_CUDA = _flag("AWR_FAST_SKIP_CUDA_BUILD")
FORCE_CUDA = _flag("AWR_FAST_FORCE_CUDA_BUILD")


def log(msg: str) -> None:
    print(f"awr_fast setup: {msg}", file=sys.stderr, flush=True)


def version() -> str:
    text = (ROOT / "awr_fast" / "__init__.py").read_text()
    match = re.search(r'^__version__\s*=\s*["\']([^"\']+)["\']', text, re.M)
    if match is None:
        raise RuntimeError("awr_fast/__init__.py: no __version__ = '...' line")
    return match.group(1)


def write_status(built: bool | None, reason: str, **extra) -> None:
    """Record what happened to the CUDA extension (built: True/False, None = build pending)."""
    data = {"cuda_extension_built": built, "reason": reason, "python": sys.version.split()[0], **extra}
    try:
        STATUS_FILE.write_text(json.dumps(data, indent=1) + "\n")
    except OSError as exc:  # a read-only source tree must not break the install
        log(f"could not write {STATUS_FILE.name}: {exc}")


def no_cuda(reason: str) -> None:
    if FORCE_CUDA:
        raise SystemExit(
            f"awr_fast setup: AWR_FAST_FORCE_CUDA_BUILD=1 but the CUDA extension cannot be built: {reason}"
        )
    log(f"NOT building the CUDA extension awr_fast._C: {reason}. Installing the pure-Python + Triton package.")
    write_status(False, reason)


# ------------------------------------------------------------------------------------------ CUDA toolkit


def _is_toolkit(path: str | None) -> bool:
    return (
        bool(path)
        and os.path.isfile(os.path.join(path, "bin", "nvcc"))
        and os.path.isfile(os.path.join(path, "include", "cuda_runtime.h"))
    )


def find_cuda_home() -> tuple[str | None, str]:
    """(CUDA toolkit root or None, explanation). An explicit CUDA_HOME / CUDA_PATH is honoured as given.

    torch guesses dirname(dirname(which nvcc)), which is wrong when nvcc on PATH is a wrapper script or a
    symlink outside the toolkit (e.g. /usr/local/bin/nvcc -> /usr/local): such guesses are skipped.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        explicit = os.environ.get(var)
        if explicit:
            if os.path.isfile(os.path.join(explicit, "bin", "nvcc")):
                return explicit, f"{var}={explicit}"
            return None, f"{var}={explicit} has no bin/nvcc"
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates += [os.path.dirname(os.path.dirname(nvcc)), os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))]
    candidates.append("/usr/local/cuda")
    for cand in candidates:
        if _is_toolkit(cand):
            return cand, f"found {cand}"
    return None, "nvcc not found (no CUDA toolkit on PATH or in /usr/local/cuda; set CUDA_HOME)"


def nvcc_version(cuda_home: str) -> tuple[int, int] | None:
    try:
        out = subprocess.run(
            [os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True, text=True, timeout=60
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+)\.(\d+)", out)
    return (int(match.group(1)), int(match.group(2))) if match else None


def nvidia_wheel_include_dirs() -> list[str]:
    """Headers shipped by the nvidia-* wheels torch depends on (cuBLAS/cuSPARSE for ATen/cuda/CUDAContext.h)."""
    try:
        import nvidia  # namespace package of the nvidia-* wheels
    except ImportError:
        return []
    dirs = []
    for base in getattr(nvidia, "__path__", []):
        for sub in ("cu13", "cu12"):
            inc = os.path.join(base, sub, "include")
            if os.path.isdir(inc) and inc not in dirs:
                dirs.append(inc)
    return dirs


def default_max_jobs() -> int:
    """About one compile job per 4 GiB of available memory, at least 1, at most the CPU count."""
    avail = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    cpus = os.cpu_count() or 1
    if avail is None:
        return max(1, min(cpus, 2))
    return max(1, min(cpus, avail // (4 * GIB)))


def cuda_sources() -> list[str]:
    """csrc/registration.cpp (schemas, module init) and every op's csrc/<op>/*.cpp and *.cu, relative to
    setup.py as setuptools wants."""
    ops = sorted(str(p.relative_to(ROOT)) for ext in ("cpp", "cu") for p in (ROOT / "csrc").glob(f"*/*.{ext}"))
    return ["csrc/registration.cpp", *ops]


def cuda_extension():
    """(ext_modules, cmdclass) for awr_fast._C, or ([], {}) after saying why it is not built."""
    if SKIP_CUDA:
        no_cuda("AWR_FAST_SKIP_CUDA_BUILD=1")
        return [], {}
    try:
        import torch
    except ImportError as exc:
        no_cuda(f"torch is not importable at build time ({exc}); with --no-build-isolation install torch first")
        return [], {}
    if not torch.version.cuda:
        no_cuda(f"torch {torch.__version__} is a CPU-only build (torch.version.cuda is None)")
        return [], {}
    cuda_home, why = find_cuda_home()
    if cuda_home is None:
        no_cuda(why)
        return [], {}
    found = nvcc_version(cuda_home)
    torch_major = int(torch.version.cuda.split(".")[0])
    if found is None:
        no_cuda(f"could not read the version of {cuda_home}/bin/nvcc")
        return [], {}
    if found[0] != torch_major:
        no_cuda(
            f"nvcc in {cuda_home} is CUDA {found[0]}.{found[1]} but torch {torch.__version__} was built "
            f"with CUDA {torch.version.cuda} (the major versions must match; set CUDA_HOME)"
        )
        return [], {}

    os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension at import
    from torch.utils import cpp_extension

    cpp_extension.CUDA_HOME = cuda_home  # in case it was imported (and guessed) before

    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
    if not os.environ.get("MAX_JOBS"):
        os.environ["MAX_JOBS"] = str(default_max_jobs())
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST") or "the visible GPU's"
    build_info = dict(
        torch=torch.__version__,
        torch_cuda=torch.version.cuda,
        nvcc=f"{found[0]}.{found[1]}",
        cuda_home=cuda_home,
        arch_list=arch,
    )
    log(
        f"building the CUDA extension awr_fast._C: CUDA_HOME={cuda_home} ({why}), nvcc {found[0]}.{found[1]}, "
        f"torch {torch.__version__} (CUDA {torch.version.cuda}), TORCH_CUDA_ARCH_LIST={arch}, "
        f"MAX_JOBS={os.environ['MAX_JOBS']}"
    )
    write_status(None, "the build of the CUDA extension did not finish", **build_info)

    # Lowest-priority include dirs: only fill in headers the toolkit lacks (cuBLAS/cuSPARSE of the wheels).
    after = []
    for inc in nvidia_wheel_include_dirs():
        after += ["-idirafter", inc]
    nvcc_after = [f"-Xcompiler=-idirafter,{inc}" for inc in nvidia_wheel_include_dirs()]
    ext = cpp_extension.CUDAExtension(
        name="awr_fast._C",
        sources=cuda_sources(),
        include_dirs=[str(ROOT / "csrc")],
        extra_compile_args={"cxx": ["-O3", *after], "nvcc": ["-O3", *nvcc_after]},  # never --use_fast_math
        py_limited_api=True,
    )

    class BuildExt(cpp_extension.BuildExtension):
        """torch's BuildExtension (ninja), but a failed compile falls back to no extension unless forced."""

        def build_extension(self, extension):
            start = time.time()
            try:
                super().build_extension(extension)
            except BaseException as exc:
                if FORCE_CUDA or isinstance(exc, KeyboardInterrupt):
                    raise
                reason = (
                    f"compiling it failed ({type(exc).__name__}: {str(exc).strip()[:300]}); the compiler output is "
                    "shown by pip install -v"
                )
                log(
                    f"NOT building the CUDA extension awr_fast._C: {reason}. "
                    "Installing the pure-Python + Triton package; AWR_FAST_FORCE_CUDA_BUILD=1 makes this an error."
                )
                write_status(False, reason, **build_info)
                self._failed = getattr(self, "_failed", set()) | {extension.name}
                extension.optional = True  # setuptools then skips copying it into the source tree (editable)
                return
            seconds = time.time() - start
            log(f"built the CUDA extension awr_fast._C in {seconds:.0f} s")
            write_status(True, f"built in {seconds:.0f} s", build_seconds=round(seconds, 1), **build_info)

        def copy_file(self, infile, outfile, *args, **kwargs):
            """Editable installs copy the library into the source tree: replace it by a rename, never write
            into the old file, which a running process (another engineer's pytest) may have mapped."""
            if not str(outfile).endswith(".so"):
                return super().copy_file(infile, outfile, *args, **kwargs)
            if os.path.isdir(outfile):
                outfile = os.path.join(outfile, os.path.basename(infile))
            tmp = f"{outfile}.tmp{os.getpid()}"
            shutil.copyfile(infile, tmp)
            shutil.copymode(infile, tmp)
            os.replace(tmp, outfile)
            return outfile, True

        def get_outputs(self):
            failed = getattr(self, "_failed", set())
            return [out for ext, out in zip(self.extensions, super().get_outputs()) if ext.name not in failed]

    return [ext], {"build_ext": BuildExt.with_options(use_ninja=True)}


ext_modules, cmdclass = cuda_extension()

TEST = ["pytest", "hypothesis", "pytest-benchmark", "matplotlib", "ruff==0.17.6"]
PLOTS = ["matplotlib"]

setup(
    name="awr_fast",
    version=version(),
    description="Fused attention kernels (Triton/CUDA) for AWRSR, STOSA and AC-TSR sequential recommenders",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # The Triton kernels live in the top-level kernels/ folder but install as awr_fast.kernels: no
    # top-level module named `kernels` ever lands in site-packages.
    packages=find_packages(include=["awr_fast", "awr_fast.*"]) + ["awr_fast.kernels"],
    package_dir={"awr_fast.kernels": "kernels"},
    package_data={
        "awr_fast": ["_build_status.json"],
        "awr_fast.data": ["*.txt", "*.csv", "*.tsv", "*.json", "*.gz", "*.zip", "*.dat", "*.inter", "*.npz"],
    },
    install_requires=[
        "torch>=2.4",
        "numpy",
        "tqdm",
        'triton>=3.6,<3.10; platform_system == "Linux" and platform_machine == "x86_64"',
    ],
    extras_require={
        "test": TEST,
        "plots": PLOTS,
        "dev": sorted(set(TEST + PLOTS + ["ninja", "pybind11", "setuptools>=64", "wheel"])),
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
