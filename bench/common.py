"""Shared helpers of the benchmarks: timing, memory, FLOP/byte counts, ceilings, results files.

Used by bench/attention.py, bench/train.py and bench/test_bench_ops.py (imported as ``common`` with
bench/ on sys.path). Nothing here imports awr_fast, so the helpers stay usable when the package is broken.

Timing: on CUDA ``triton.testing.do_bench`` (CUDA events, L2 flushed between calls, median and the
20/80 quantiles); on the CPU ``torch.utils.benchmark.Timer.blocked_autorange`` with as many threads as
torch uses, the quantiles taken over its per-block averages. Callables are always warmed up first, so
compilation (torch.compile, Triton JIT) stays out of the numbers.
"""

from __future__ import annotations

import csv
import datetime as _dt
import hashlib
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
DEFAULT_RESULTS_DIR = BENCH_DIR / "results"

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
NAN = float("nan")
MIB = 2.0**20


# ------------------------------------------------------------------------------------------ environment


def git_commit(root: Path = REPO_ROOT) -> str:
    """HEAD's commit (with "+dirty" when the tree has changes), or "unknown" (no git, no commit yet)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if out.returncode != 0:
            return "unknown"
        commit = out.stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return commit + ("+dirty" if status.returncode == 0 and status.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({torch.get_num_threads()} threads)"


def triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except Exception:
        return "n/a"


def env_info(device: torch.device) -> dict:
    """The columns every results row starts with."""
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": triton_version(),
        "cuda": torch.version.cuda or "none",
        "python": platform.python_version(),
        "git_commit": git_commit(),
        "threads": torch.get_num_threads(),
        "loadavg": _loadavg(),
    }


def _loadavg() -> float:
    """1-minute load average when the run starts (this process's own earlier work included; the
    per-row other_cpu column is the reliable measure of competition)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return float("nan")


def _cpu_jiffies() -> tuple[int, int]:
    """(busy jiffies of the whole machine, jiffies of this process), from /proc."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    busy = sum(fields[:3]) + sum(fields[5:8])  # user nice system + irq softirq steal
    with open("/proc/self/stat") as f:
        own = f.read().rsplit(")", 1)[1].split()
    return busy, int(own[11]) + int(own[12])  # utime + stime, all threads


class OtherCpu:
    """Context manager: how many cores other processes kept busy on average while it was active
    (machine busy time minus this process's time, over the wall time). NaN where /proc is missing.
    A CPU timing taken while this is well above 0 competed with other work."""

    def __init__(self):
        self.cores = NAN

    def __enter__(self):
        try:
            self._t0, self._j0 = time.perf_counter(), _cpu_jiffies()
        except (OSError, ValueError, IndexError):
            self._j0 = None
        return self

    def __exit__(self, *exc):
        if self._j0 is not None:
            try:
                busy, own = _cpu_jiffies()
                wall = time.perf_counter() - self._t0
                hz = os.sysconf("SC_CLK_TCK")
                self.cores = max(0.0, ((busy - self._j0[0]) - (own - self._j0[1])) / hz / wall) if wall > 0 else NAN
            except (OSError, ValueError, IndexError):
                pass
        return False


def contention_warning(rows: list[dict], key: str = "other_cpu") -> str | None:
    """A warning when other processes used a noticeable share of the CPU during some timed rows."""
    cores = os.cpu_count() or 1
    hit = [
        r
        for r in rows
        if r.get("device_type") == "cpu"
        and isinstance(r.get(key), float)
        and not math.isnan(r[key])
        and r[key] > 0.25 * cores
    ]
    if not hit:
        return None
    worst = max(r[key] for r in hit)
    return (
        f"warning: other processes kept up to {worst:.1f} of {cores} cores busy during {len(hit)} of "
        f"{len(rows)} rows (column {key}; marked '!' in the table): those timings are unreliable"
    )


def run_id(env: dict) -> str:
    return hashlib.sha1(f"{env['date']}-{os.getpid()}-{time.time_ns()}".encode()).hexdigest()[:10]


def describe(exc: BaseException, limit: int = 500) -> str:
    """One line for a results row: the exception's type and the first line of its message."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"[:limit]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Interrupted(BaseException):
    """SIGTERM arrived (e.g. from `timeout`): stop measuring, but still print and save what was measured.
    A BaseException, so that the per-case `except Exception` handlers do not swallow it."""


def stop_on_sigterm() -> None:
    def handler(signum, frame):
        raise Interrupted(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)


# ------------------------------------------------------------------------------------------------ timing


@dataclass
class Timing:
    """Milliseconds: median and the 20/80 quantiles; samples = timed calls (GPU) or blocks (CPU)."""

    median: float = NAN
    p20: float = NAN
    p80: float = NAN
    samples: int = 0
    timer: str = ""

    def as_dict(self, prefix: str) -> dict:
        return {f"{prefix}_ms": self.median, f"{prefix}_p20_ms": self.p20, f"{prefix}_p80_ms": self.p80}


def time_fn(
    fn: Callable[[], object], device: torch.device, *, min_time: float = 1.0, warmup: int = 2, min_samples: int = 5
) -> Timing:
    """Time fn() (warmed up first). min_time: seconds of measurement on the CPU (blocked_autorange's
    min_run_time, then more blocks until there are min_samples of them); on CUDA the do_bench repetition
    time, with a quarter of it as warm-up."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    if device.type == "cuda":
        import triton.testing

        rep_ms = max(20.0, 1000.0 * min_time)
        med, p20, p80 = triton.testing.do_bench(fn, warmup=max(5.0, rep_ms / 4), rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
        # do_bench's repeat count follows from its estimate of one call
        return Timing(float(med), float(p20), float(p80), 0, "triton.testing.do_bench")
    from torch.utils.benchmark import Timer

    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    m = timer.blocked_autorange(min_run_time=min_time)
    times = list(m.times)  # seconds per call, one entry per block of m.number_per_run calls
    while len(times) < min_samples:  # slow calls: blocked_autorange stops after min_run_time
        times.extend(timer.timeit(m.number_per_run).times)
    times = np.asarray(times, dtype=np.float64) * 1e3
    p20, med, p80 = np.quantile(times, [0.2, 0.5, 0.8])
    return Timing(float(med), float(p20), float(p80), len(times), "torch.utils.benchmark.blocked_autorange")


# ------------------------------------------------------------------------------------------------ memory


def saved_tensor_bytes(fn: Callable[[], object], exclude: Iterable[torch.Tensor] = ()) -> tuple[float, object]:
    """Bytes of the distinct storages that autograd saves for backward while fn() runs (the activation
    memory of a training forward), not counting the storages of `exclude` (inputs and weights, which
    are resident anyway). Returns (bytes, fn's result). Works on any device; this is the CPU's memory
    column, since tracemalloc does not see tensor allocations."""
    excluded = {t.untyped_storage().data_ptr() for t in exclude if isinstance(t, torch.Tensor)}
    seen: dict[tuple, int] = {}

    def pack(t):
        if isinstance(t, torch.Tensor):
            try:
                storage = t.untyped_storage()
                key = (t.device.type, storage.data_ptr())
                if storage.data_ptr() not in excluded and key not in seen:
                    seen[key] = storage.nbytes()
            except (RuntimeError, NotImplementedError):  # tensor subclasses without storage
                seen[("id", id(t))] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return float(sum(seen.values())), result


def cuda_peak_bytes(fn: Callable[[], object], device: torch.device) -> float:
    """Peak of torch.cuda.max_memory_allocated while fn() runs, above what was allocated before it."""
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    result = fn()
    synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del result
    return float(peak)


# -------------------------------------------------------------------------------------------- ceilings


@dataclass
class Ceilings:
    """Measured in the same run: the FLOP/s of one large matmul in the benchmark dtype and the GB/s of
    one large tensor copy (bytes read + bytes written)."""

    tflops: float
    gbps: float
    matmul_size: int
    copy_mib: float


def measure_ceilings(device: torch.device, dtype: torch.dtype, *, quick: bool = False) -> Ceilings:
    if device.type == "cuda":
        size = 8192 if dtype != torch.float64 else 4096
        copy_numel = (1 << 30) // 4  # 1 GiB of fp32
        min_time = 0.3
    else:
        size = 1024 if quick else 2048
        copy_numel = (64 if quick else 256) * (1 << 20) // 4
        min_time = 0.3 if quick else 1.0
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=g)  # never zeros (see METHOD.md)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=g)
    t_mm = time_fn(lambda: a @ b, device, min_time=min_time).median
    a = b = None  # release the matrices before the copy test
    src = torch.randn(copy_numel, device=device, dtype=torch.float32, generator=g)
    dst = torch.empty_like(src)
    t_cp = time_fn(lambda: dst.copy_(src), device, min_time=min_time).median
    nbytes = 2 * src.numel() * src.element_size()
    src = dst = None
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return Ceilings(
        tflops=2.0 * size**3 / (t_mm * 1e-3) / 1e12,
        gbps=nbytes / (t_cp * 1e-3) / 1e9,
        matmul_size=size,
        copy_mib=copy_numel * 4 / MIB,
    )


# ------------------------------------------------------------------------------------- FLOP counts
#
# Per head and per sequence of real length L (L = n without padding), d = d_h. Two counts:
#   nominal: the dense formulas of SPEC §3b, the same for every backend (the TFLOP/s columns use it):
#            base attention 4 L^2 d (Q K^T and P V), each projection A W 2 L^3, B = (A W)(A W)^T 2 L^3.
#   minimal: the least a backend has to do (the roofline floor uses it): causal triangles only, the
#            factored form B = c A M A^T with A lower triangular (T = A M: L^2 (L+1); the lower
#            triangle of T A^T: L (L+1)(L+2)/3), M = W_RQ W_RK^T once per call (2 n^3).
# Backward is counted as 2x forward. Elementwise work (softmax, exp, ELU) is not counted.


def _tri(L):
    return L * (L + 1) / 2.0


def _refine_min(mechanism: str, L, n: int):
    simp = L * L * (L + 1) + L * (L + 1) * (L + 2) / 3.0  # T = A M, then the lower triangle of T A^T
    if mechanism in ("simp", "add"):
        return simp
    if mechanism == "value":
        # inner scores as simp; U = A W_RV on the L live columns; lower triangle of R U
        return simp + L * L * (L + 1) + 2.0 * L * (L + 1) * (2 * L + 1) / 6.0
    if mechanism == "stoc":
        # mean Gram as simp; sigma = ELU(A W_sigma) + 1 on all n columns; sqrt(sig) sqrt(sig)^T lower
        return simp + 2.0 * n * _tri(L) + 2.0 * n * _tri(L)
    return 0.0 * L


def _refine_nominal(mechanism: str, L):
    if mechanism in ("simp", "add"):
        return 6.0 * L**3
    if mechanism == "value":
        return 10.0 * L**3
    if mechanism == "stoc":
        return 8.0 * L**3  # A W_mu, A W_sigma, and the two n-wide dot products of W2
    return 0.0 * L


def _base_per_head(family: str, mechanism: str, L, d: int):
    """(nominal, minimal) FLOPs of the first-order attention and the output products."""
    if family == "dot":
        return 4.0 * L * L * d, 4.0 * d * _tri(L)
    if family == "w2":  # two dot products for W2, P mu_v and (P o P) sig_v
        return 8.0 * L * L * d, 8.0 * d * _tri(L)
    if family == "calibrated":
        products = 2 if mechanism == "spatial" else 4  # Q K^T, P V (+ Q_adv K_adv^T, P_att V)
        return 2.0 * products * L * L * d, 2.0 * products * d * _tri(L)
    if family == "sdpa":
        return 4.0 * L * L * d, 4.0 * d * _tri(L)
    raise ValueError(f"unknown family {family!r}")


def attention_flops(
    family: str, mechanism: str, lengths: Sequence[int] | np.ndarray, heads: int, n: int, d_h: int
) -> dict:
    """Forward FLOPs of one call, nominal and minimal, summed over the batch (lengths: one per sequence)."""
    L = np.asarray(lengths, dtype=np.float64)
    base_nom, base_min = _base_per_head(family, mechanism, L, d_h)
    refined = family in ("dot", "w2") and mechanism != "none"
    nominal = heads * float(np.sum(base_nom + (_refine_nominal(mechanism, L) if refined else 0.0)))
    minimal = heads * float(np.sum(base_min + (_refine_min(mechanism, L, n) if refined else 0.0)))
    if refined:
        minimal += 2.0 * n**3  # M = W_RQ W_RK^T (or W_mu W_mu^T), once per call
    return {"nominal": nominal, "minimal": minimal}


def mode_flops(fwd: float, mode: str) -> float:
    return {"fwd": 1.0, "bwd": 2.0, "fwdbwd": 3.0}[mode] * fwd


def tensor_bytes(tensors: Iterable) -> float:
    return float(sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor)))


def roofline(flops: float, nbytes: float, ceilings: Ceilings) -> float:
    """The floor in ms: max(flops / peak FLOP/s, bytes / peak bandwidth)."""
    return 1e3 * max(flops / (ceilings.tflops * 1e12), nbytes / (ceilings.gbps * 1e9))


# ------------------------------------------------------------------------------------------- results


def _same_header(path: Path, columns: Sequence[str]) -> bool:
    with open(path, newline="") as f:
        header = next(csv.reader(f), None)
    return header == list(columns)


def csv_value(v):
    if isinstance(v, float):
        if math.isnan(v):
            return ""
        return f"{v:.6g}"
    return v


def append_results(results_dir: Path, name: str, rows: list[dict], columns: Sequence[str]) -> tuple[Path, Path]:
    """Append rows to <results_dir>/<name>.csv (header written once) and <name>.jsonl (one object per
    row, every field). If the CSV exists with other columns, the rows go to <name>.<hash>.csv instead,
    so an old file is never made inconsistent."""
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    csv_path = results_dir / f"{name}.csv"
    if csv_path.exists() and csv_path.stat().st_size > 0 and not _same_header(csv_path, columns):
        digest = hashlib.sha1(",".join(columns).encode()).hexdigest()[:8]
        csv_path = results_dir / f"{name}.{digest}.csv"
        print(f"note: {results_dir / (name + '.csv')} has other columns; writing to {csv_path.name}", file=sys.stderr)
    new = not csv_path.exists() or csv_path.stat().st_size == 0
    with open(csv_path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({c: csv_value(row.get(c, "")) for c in columns})
    jsonl_path = results_dir / f"{name}.jsonl"
    with open(jsonl_path, "a") as f:
        for row in rows:
            f.write(
                json.dumps({k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}) + "\n"
            )
    return csv_path, jsonl_path


# ---------------------------------------------------------------------------------------------- text


def fmt_ms(x: float) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    if x >= 1:
        return f"{x:.2f}"
    return f"{x:.3f}"


def fmt_num(x: float, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if abs(x) >= 1000:
        return f"{x:.0f}"
    return f"{x:.{digits}f}"


def fmt_table(header: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool] | None = None) -> str:
    """A fixed-width table; `right` says which columns are right aligned (numbers)."""
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(str(h)) for i, h in enumerate(header)]
    right = right or [False] * len(header)

    def line(cells):
        return "  ".join(str(c).rjust(w) if r else str(c).ljust(w) for c, w, r in zip(cells, widths, right)).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), sep, *(line(r) for r in rows)])
