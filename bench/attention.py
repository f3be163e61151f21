"""Attention benchmark: every mechanism x backend against plain causal SDPA on the same (B, H, n, d_h).

    python bench/attention.py                      # default shapes (GPU: fp32 and bf16)
    python bench/attention.py --quick              # a CPU run in a few minutes
    python bench/attention.py --family dot --backends reference,eager,sdpa --batch 128 --heads 2 --d 64 --n 200
    python bench/attention.py --lengths-from Beauty.txt --n 50   # padded vs length-aware, real lengths

For each case it times forward, backward and forward+backward (median, 20/80 quantiles), measures memory
(CUDA: peak allocated above the inputs; CPU: bytes of the tensors saved for backward), counts FLOPs and
bytes, and compares with a roofline floor built from a matmul and a copy measured in the same run. It
prints one table and appends rows to bench/results/attention.csv and .jsonl. Backends that cannot run
are listed as skipped with the reason the dispatcher gives. See bench/README.md for the columns.

Backends (rows): reference = the readable float64 oracle (the naive form) through the public API; eager =
the eager backend (the factored A·M·Aᵀ form of SPEC §3b, what "auto" runs on the CPU); compile =
torch.compile of the reference (compiled once per mechanism and shape, compile time excluded); triton,
cuda = the public API with that backend; sdpa = F.scaled_dot_product_attention(is_causal=True), the
baseline. Every row but compile and sdpa goes through the public API with that backend, so a backend that
cannot run a case is skipped with the dispatcher's reason.
"""

from __future__ import annotations

import argparse
import functools
import gc
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

try:
    import awr_fast  # noqa: F401
except ImportError:  # not installed: use the checkout's package (its Triton kernels then report as unavailable)
    sys.path.insert(1, str(common.REPO_ROOT))

from awr_fast.ops import calibrated, dot_refined, w2_refined  # noqa: E402

FAMILIES = {
    "dot": dot_refined.CAUSAL_MECHANISMS,
    "w2": w2_refined.MECHANISMS,
    "calibrated": ("spatial", "adversarial"),
}
BACKENDS = ("reference", "eager", "compile", "triton", "cuda", "sdpa")
MODES = ("fwd", "bwd", "fwdbwd")
EAGER_TARGET = 1.8  # the eager backend (A·M·Aᵀ) at least 1.8x faster than the naive reference at n=200 on CPU

COLUMNS = [
    "run_id",
    "date",
    "device",
    "device_type",
    "torch",
    "triton",
    "cuda",
    "python",
    "git_commit",
    "threads",
    "loadavg",
    "family",
    "mechanism",
    "backend",
    "batch",
    "heads",
    "n",
    "d_model",
    "d_h",
    "dtype",
    "lengths",
    "lengths_source",
    "mean_len",
    "status",
    "reason",
    "timer",
    "min_time_s",
    "fwd_ms",
    "fwd_p20_ms",
    "fwd_p80_ms",
    "bwd_ms",
    "bwd_p20_ms",
    "bwd_p80_ms",
    "fwdbwd_ms",
    "fwdbwd_p20_ms",
    "fwdbwd_p80_ms",
    "mem_kind",
    "saved_mib",
    "peak_fwd_mib",
    "peak_bwd_mib",
    "peak_fwdbwd_mib",
    "gflop_fwd_nominal",
    "gflop_fwd_minimal",
    "mb_fwd",
    "mb_bwd",
    "mb_fwdbwd",
    "tflops_fwd",
    "tflops_bwd",
    "tflops_fwdbwd",
    "gbps_fwd",
    "gbps_bwd",
    "gbps_fwdbwd",
    "floor_fwd_ms",
    "floor_bwd_ms",
    "floor_fwdbwd_ms",
    "pct_floor_fwd",
    "pct_floor_bwd",
    "pct_floor_fwdbwd",
    "peak_tflops",
    "peak_gbps",
    "ceiling_matmul",
    "ceiling_copy_mib",
    "x_reference_fwd",
    "x_reference_bwd",
    "x_reference_fwdbwd",
    "x_compile_fwd",
    "x_compile_bwd",
    "x_compile_fwdbwd",
    "x_sdpa_fwd",
    "x_sdpa_bwd",
    "x_sdpa_fwdbwd",
    "x_padded_fwd",
    "x_padded_bwd",
    "x_padded_fwdbwd",
    "finite",
    "other_cpu",
]


# ------------------------------------------------------------------------------------------------ inputs


@dataclass(frozen=True)
class Shape:
    batch: int
    heads: int
    n: int
    d_model: int
    dtype: str

    @property
    def d_h(self) -> int:
        return self.d_model // self.heads


@dataclass
class Inputs:
    """leaves: tensors that get gradients (activations and weights); consts: the rest (mask, noise)."""

    leaves: dict
    consts: dict = field(default_factory=dict)


def _randn(shape, g, device, dtype, scale=1.0):
    return (torch.randn(shape, generator=g, device=device, dtype=torch.float32) * scale).to(dtype)


def make_inputs(family: str, mechanism: str, shape: Shape, device, mask, seed: int) -> Inputs:
    """Random inputs (never zeros) for one case; weights at a scale that keeps the scores O(1)."""
    g = torch.Generator(device=device).manual_seed(seed)
    dtype = common.DTYPES[shape.dtype]
    B, H, n, d = shape.batch, shape.heads, shape.n, shape.d_h
    act = (B, H, n, d)
    w_scale = math.sqrt(2.0 / (2 * n)) * 4  # as tests/test_triton_dot.py
    leaves, consts = {}, {"key_padding_mask": mask}
    if family == "dot":
        leaves.update(q=_randn(act, g, device, dtype), k=_randn(act, g, device, dtype), v=_randn(act, g, device, dtype))
        leaves.update({name: _randn((n, n), g, device, dtype, w_scale) for name in dot_refined.WEIGHTS[mechanism]})
    elif family == "w2":
        for name in ("mu_q", "sig_q", "mu_k", "sig_k", "mu_v", "sig_v"):
            x = _randn(act, g, device, torch.float32)
            leaves[name] = (F.elu(x) + 1.0 if name.startswith("sig") else x).to(dtype)
        leaves.update({name: _randn((n, n), g, device, dtype, w_scale) for name in w2_refined.WEIGHTS[mechanism]})
    elif family == "calibrated":
        leaves.update(q=_randn(act, g, device, dtype), k=_randn(act, g, device, dtype), v=_randn(act, g, device, dtype))
        for name in calibrated.VECTORS:
            leaves[name] = _randn((d,), g, device, dtype, 0.1)
        for name in ("b_o", "b_d", "dist_scale"):
            leaves[name] = _randn((), g, device, dtype, 0.5)
        if mechanism == "adversarial":
            leaves.update(
                q_adv=_randn(act, g, device, dtype),
                k_adv=_randn(act, g, device, dtype),
                gate_logits=_randn((B, n, n), g, device, dtype),
            )
            consts["noise"] = _randn((B, H, n, n), g, device, dtype)
    elif family == "sdpa":
        leaves.update(q=_randn(act, g, device, dtype), k=_randn(act, g, device, dtype), v=_randn(act, g, device, dtype))
    else:
        raise ValueError(family)
    for t in leaves.values():
        t.requires_grad_(True)
    return Inputs(leaves, consts)


def padding_mask(lengths: np.ndarray, n: int, device) -> torch.Tensor:
    """Left padding: True at the first n - L positions of each row."""
    lens = torch.as_tensor(lengths, device=device)
    return torch.arange(n, device=device)[None, :] < (n - lens)[:, None]


# --------------------------------------------------------------------------------------- real lengths


def sequence_lengths(source: str) -> tuple[np.ndarray, str]:
    """Per-user sequence lengths (all interactions, before any split) of a data file or a named data set.

    A path is read with awr_fast.data.read_interactions (format detected); a name ("beauty", "ml-1m",
    "ml-100k") is resolved by awr_fast.data.resolve_source without downloading ($AWR_FAST_DATA, or the
    cache); "synthetic" uses the embedded generator."""
    from awr_fast import data

    path = Path(source).expanduser()
    if not path.is_file():
        if source.lower() == "synthetic":
            inter = data.make_synthetic(**data.synthetic_config())
            return np.array([len(v) for v in inter.values()], dtype=np.int64), "synthetic"
        try:
            path = data.resolve_source(source, download=False)
        except KeyError:
            raise SystemExit(
                f"--lengths-from: {source!r} is neither a file nor a known data set "
                f"(synthetic, {', '.join(data.KNOWN_DATASETS)})"
            )
        except data.DatasetUnavailableError as exc:
            raise SystemExit(f"--lengths-from: {exc}")
    inter = data.read_interactions(path)
    lengths = np.array([len(v) for v in inter.values()], dtype=np.int64)
    if lengths.size == 0:
        raise SystemExit(f"--lengths-from: {path} holds no interactions")
    return lengths, path.name


def draw_lengths(pool: np.ndarray, batch: int, n: int, seed: int) -> np.ndarray:
    """batch lengths drawn with replacement from the data set's distribution, truncated to n."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.choice(pool, size=batch, replace=True), 1, n)


# ------------------------------------------------------------------------------------------- callables


@functools.lru_cache(maxsize=None)
def _modules():
    import awr_fast
    from awr_fast.reference import calibrated as ref_cal
    from awr_fast.reference import dot_refined as ref_dot
    from awr_fast.reference import w2_refined as ref_w2

    return awr_fast, {"dot": ref_dot.dot_refined, "w2": ref_w2.w2_refined, "calibrated": ref_cal.calibrated}


_COMPILED: dict = {}


def _configure_dynamo():
    import torch._dynamo.config as cfg
    import torch._functorch.config as fcfg

    # the backward is replayed with retain_graph=True, which donated buffers forbid
    if hasattr(fcfg, "donated_buffer"):
        fcfg.donated_buffer = False
    # one compiled wrapper per (mechanism, shape) shares the reference's code object: keep every entry
    for name, value in (
        ("recompile_limit", 4096),
        ("cache_size_limit", 4096),
        ("accumulated_recompile_limit", 65536),
        ("accumulated_cache_size_limit", 65536),
    ):
        if hasattr(cfg, name):
            setattr(cfg, name, value)


def make_callable(family: str, mechanism: str, backend: str, shape: Shape, masked: bool):
    """fn(**leaves, **consts) -> output(s) for one backend, or raise Skip with the reason."""
    awr_fast, refs = _modules()
    kw = {} if family in ("calibrated", "sdpa") else {"mechanism": mechanism}
    if family == "sdpa":
        if backend != "sdpa":
            raise Skip("the SDPA baseline has one backend")
        return lambda q, k, v, key_padding_mask=None: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if backend == "sdpa":
        raise Skip("sdpa is the baseline row")
    if backend in ("reference", "eager", "triton", "cuda"):
        api = {
            "dot": awr_fast.refined_attention,
            "w2": awr_fast.wasserstein_attention,
            "calibrated": awr_fast.calibrated_attention,
        }[family]
        return functools.partial(api, backend=backend, **kw)
    if backend == "compile":
        key = (family, mechanism, shape, masked)
        if key not in _COMPILED:
            _configure_dynamo()
            _COMPILED[key] = torch.compile(functools.partial(refs[family], **kw), dynamic=False)
        return _COMPILED[key]
    raise ValueError(f"unknown backend {backend!r}")


class Skip(Exception):
    """This backend cannot run this case; the message says why."""


def outputs_of(result) -> list:
    if isinstance(result, torch.Tensor):
        return [result]
    return [t for t in result if isinstance(t, torch.Tensor) and t.requires_grad]


# ------------------------------------------------------------------------------------------------ cases


@dataclass
class Case:
    family: str
    mechanism: str
    backend: str
    shape: Shape
    lengths_mode: str  # "full" (no padding) or "real" (key_padding_mask from --lengths-from)
    lengths: np.ndarray


def run_case(case: Case, args, env: dict, ceilings: common.Ceilings, device, seed: int) -> dict:
    shape = case.shape
    row = {
        **env,
        "family": case.family,
        "mechanism": case.mechanism,
        "backend": case.backend,
        "batch": shape.batch,
        "heads": shape.heads,
        "n": shape.n,
        "d_model": shape.d_model,
        "d_h": shape.d_h,
        "dtype": shape.dtype,
        "lengths": case.lengths_mode,
        "lengths_source": args.lengths_source if case.lengths_mode == "real" else "",
        "mean_len": float(np.mean(case.lengths)),
        "min_time_s": args.min_time,
        "peak_tflops": ceilings.tflops,
        "peak_gbps": ceilings.gbps,
        "ceiling_matmul": f"{ceilings.matmul_size}^3 {shape.dtype}",
        "ceiling_copy_mib": ceilings.copy_mib,
        "mem_kind": "cuda_peak_above_inputs" if device.type == "cuda" else "saved_tensors_fwd",
    }
    masked = case.lengths_mode == "real"
    try:
        fn = make_callable(case.family, case.mechanism, case.backend, shape, masked)
    except Skip as exc:
        return {**row, "status": "skipped", "reason": str(exc)}
    if case.backend == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return {
            **row,
            "status": "skipped",
            "reason": "TRITON_INTERPRET=1: the CPU interpreter is far too slow to benchmark",
        }
    if (
        case.backend == "cuda"
        and device.type == "cpu"
        and os.environ.get("AWR_FAST_CUDA_EMULATE", "0") not in ("", "0")
    ):
        return {
            **row,
            "status": "skipped",
            "reason": "AWR_FAST_CUDA_EMULATE=1: the host emulation of the CUDA kernels is far too slow to benchmark",
        }
    mask = padding_mask(case.lengths, shape.n, device) if masked else None
    inputs = make_inputs(case.family, case.mechanism, shape, device, mask, seed)
    leaves = list(inputs.leaves.values())
    kwargs = {**inputs.leaves, **inputs.consts}

    def fwd():
        return fn(**kwargs)

    from awr_fast import UnsupportedInputError

    try:
        try:
            outs = outputs_of(fwd())  # the first call: dispatch check, compilation, JIT
        except UnsupportedInputError as exc:
            return {**row, "status": "skipped", "reason": str(exc)}
        g = torch.Generator(device=device).manual_seed(seed + 1)
        grads = [torch.randn(o.shape, generator=g, device=device, dtype=torch.float32).to(o.dtype) for o in outs]
        finite = all(bool(torch.isfinite(o).all()) for o in outs)

        def fwdbwd():
            return torch.autograd.grad(outputs_of(fwd()), leaves, grads, allow_unused=True)

        fwdbwd()  # compiles the backward graph
        held = outputs_of(fwd())

        def bwd():
            return torch.autograd.grad(held, leaves, grads, retain_graph=True, allow_unused=True)

        with common.OtherCpu() as other:
            timings = {
                "fwd": common.time_fn(fwd, device, min_time=args.min_time),
                "bwd": common.time_fn(bwd, device, min_time=args.min_time),
                "fwdbwd": common.time_fn(fwdbwd, device, min_time=args.min_time),
            }
        row["other_cpu"] = other.cores
        saved, _ = common.saved_tensor_bytes(fwd, exclude=leaves + [t for t in inputs.consts.values() if t is not None])
        row["saved_mib"] = saved / common.MIB
        if device.type == "cuda":
            row["peak_fwd_mib"] = common.cuda_peak_bytes(fwd, device) / common.MIB
            row["peak_bwd_mib"] = common.cuda_peak_bytes(bwd, device) / common.MIB
            row["peak_fwdbwd_mib"] = common.cuda_peak_bytes(fwdbwd, device) / common.MIB
    except Exception as exc:  # record and go on: one broken backend must not stop the sweep
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return {**row, "status": "error", "reason": common.describe(exc)}

    flops = common.attention_flops(case.family, case.mechanism, case.lengths, shape.heads, shape.n, shape.d_h)
    consts = [t for t in inputs.consts.values() if t is not None]
    b_in, b_out = common.tensor_bytes(leaves + consts), common.tensor_bytes(outs)
    b_grads_in, b_grads_out = common.tensor_bytes(grads), common.tensor_bytes(leaves)
    nbytes = {
        "fwd": b_in + b_out,
        "bwd": b_in + b_grads_in + b_grads_out,
        "fwdbwd": b_in + b_out + b_grads_in + b_grads_out,
    }
    row.update(
        status="ok",
        reason="",
        timer=timings["fwd"].timer,
        finite=finite,
        gflop_fwd_nominal=flops["nominal"] / 1e9,
        gflop_fwd_minimal=flops["minimal"] / 1e9,
    )
    for mode in MODES:
        t = timings[mode]
        row.update(t.as_dict(mode))
        row[f"mb_{mode}"] = nbytes[mode] / 1e6
        row[f"tflops_{mode}"] = common.mode_flops(flops["nominal"], mode) / (t.median * 1e-3) / 1e12
        row[f"gbps_{mode}"] = nbytes[mode] / (t.median * 1e-3) / 1e9
        floor = common.roofline(common.mode_flops(flops["minimal"], mode), nbytes[mode], ceilings)
        row[f"floor_{mode}_ms"] = floor
        row[f"pct_floor_{mode}"] = 100.0 * floor / t.median
    held = outs = inputs = kwargs = None  # free the graph and the inputs before the next case
    return row


def add_ratios(rows: list[dict]) -> None:
    """x_reference = reference time / this time (same family, mechanism, shape, lengths); x_compile likewise;
    x_sdpa = SDPA time (same shape, no padding) / this time; x_padded = the same backend's time on the
    padded batch / this time (length-aware rows only). > 1 means this row is faster."""

    def key(r, **over):
        r = {**r, **over}
        return (
            r["family"],
            r["mechanism"],
            r["backend"],
            r["batch"],
            r["heads"],
            r["n"],
            r["d_model"],
            r["dtype"],
            r["lengths"],
        )

    ok = {key(r): r for r in rows if r.get("status") == "ok"}
    for r in rows:
        if r.get("status") != "ok":
            continue
        refs = {
            "reference": ok.get(key(r, backend="reference")),
            "compile": ok.get(key(r, backend="compile")),
            "sdpa": ok.get(key(r, family="sdpa", mechanism="causal", backend="sdpa", lengths="full")),
            "padded": ok.get(key(r, lengths="full")) if r["lengths"] == "real" else None,
        }
        for name, ref in refs.items():
            for mode in MODES:
                r[f"x_{name}_{mode}"] = (ref[f"{mode}_ms"] / r[f"{mode}_ms"]) if ref is not None else float("nan")


# ------------------------------------------------------------------------------------------------ output


def print_table(rows: list[dict], device) -> None:
    mem_head = "peak MiB" if device.type == "cuda" else "saved MiB"
    header = [
        "family",
        "mechanism",
        "backend",
        "lens",
        "fwd ms",
        "fwd p20-p80",
        "bwd ms",
        "f+b ms",
        "f+b p20-p80",
        mem_head,
        "TFLOP/s",
        "GB/s",
        "floor ms",
        "%floor",
        "x_reference",
        "x_compile",
        "x_sdpa",
        "x_padded",
    ]
    right = [False] * 4 + [True] * (len(header) - 4)
    groups: dict = {}
    for r in rows:
        if r.get("status") == "ok":
            groups.setdefault((r["batch"], r["heads"], r["n"], r["d_model"], r["dtype"]), []).append(r)
    for (B, H, n, d, dtype), grp in groups.items():
        lens = {r["lengths"]: r for r in grp}
        real = lens.get("real")
        extra = f", real lengths from {real['lengths_source']} (mean L {real['mean_len']:.1f})" if real else ""
        ceil = grp[0]
        print(
            f"\n== B={B} H={H} n={n} d_model={d} (d_h={d // H}) {dtype}{extra}; ceilings: "
            f"{ceil['peak_tflops']:.3g} TFLOP/s (matmul {ceil['ceiling_matmul']}), "
            f"{ceil['peak_gbps']:.3g} GB/s (copy)"
        )
        table = []
        for r in grp:
            mem = r["peak_fwdbwd_mib"] if device.type == "cuda" else r.get("saved_mib", float("nan"))
            busy = device.type == "cpu" and r.get("other_cpu", 0.0) > 0.25 * (os.cpu_count() or 1)
            table.append(
                [
                    r["family"],
                    r["mechanism"],
                    r["backend"] + ("!" if busy else ""),
                    r["lengths"],
                    common.fmt_ms(r["fwd_ms"]),
                    f"{common.fmt_ms(r['fwd_p20_ms'])}-{common.fmt_ms(r['fwd_p80_ms'])}",
                    common.fmt_ms(r["bwd_ms"]),
                    common.fmt_ms(r["fwdbwd_ms"]),
                    f"{common.fmt_ms(r['fwdbwd_p20_ms'])}-{common.fmt_ms(r['fwdbwd_p80_ms'])}",
                    common.fmt_num(mem, 1),
                    common.fmt_num(r["tflops_fwdbwd"], 3),
                    common.fmt_num(r["gbps_fwdbwd"], 1),
                    common.fmt_ms(r["floor_fwdbwd_ms"]),
                    common.fmt_num(r["pct_floor_fwdbwd"], 1),
                    *(
                        common.fmt_num(r.get(f"x_{ref}_fwdbwd", float("nan")))
                        for ref in ("reference", "compile", "sdpa", "padded")
                    ),
                ]
            )
        print(common.fmt_table(header, table, right))
    notes: dict = {}
    for r in rows:
        if r.get("status") in ("skipped", "error"):
            notes.setdefault((r["status"], r["backend"], r["reason"]), set()).add(f"{r['family']}/{r['mechanism']}")
    if notes:
        print("\nnot measured:")
        for (status, backend, reason), what in sorted(notes.items()):
            print(f"  {status}: {backend} ({', '.join(sorted(what))}): {reason}")
    eager_summary(rows)
    print(
        "\nratios x_* = that row's time / this row's time (> 1: this row is faster); TFLOP/s, GB/s, floor, "
        "%floor and the ratios are for forward+backward; all modes are in the results files."
    )


def eager_summary(rows: list[dict]) -> None:
    ok = [r for r in rows if r.get("status") == "ok" and r["backend"] == "eager"]
    lines = []
    for r in ok:
        if math.isnan(r.get("x_reference_fwdbwd", float("nan"))):
            continue
        target = ""
        if r["device_type"] == "cpu" and r["n"] >= 200 and r["lengths"] == "full":
            verdict = "meets" if r["x_reference_fwdbwd"] >= EAGER_TARGET else "MISSES"
            target = f"  ({verdict} the {EAGER_TARGET}x target at n=200 on CPU)"
        lines.append(
            f"  {r['family']:<4} {r['mechanism']:<6} B={r['batch']} H={r['heads']} n={r['n']} d_h={r['d_h']} "
            f"{r['dtype']} {r['lengths']}: fwd {r['x_reference_fwd']:.2f}x, bwd {r['x_reference_bwd']:.2f}x, "
            f"fwd+bwd {r['x_reference_fwdbwd']:.2f}x{target}"
        )
    if lines:
        print("\neager backend (A·M·Aᵀ) vs the naive reference, speedup = reference time / eager time:")
        print("\n".join(lines))


# -------------------------------------------------------------------------------------------------- main


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", default="all", help="dot, w2, calibrated or all (comma list allowed); default all")
    p.add_argument(
        "--mechanisms", default=None, help="comma list (none,simp,add,value,stoc,spatial,adversarial); default all"
    )
    p.add_argument("--backends", default=",".join(BACKENDS), help=f"comma list of {','.join(BACKENDS)}; default all")
    p.add_argument("--batch", type=int, default=None, help="B (default 256; --quick 32)")
    p.add_argument("--n", default=None, help="comma list of n (default 20,50,100,200; --quick 20,50)")
    p.add_argument("--d", default=None, help="comma list of d_model (default 50,64; --quick 64)")
    p.add_argument("--heads", default=None, help="comma list of H, d_h = d/H (default 1,2; --quick 1)")
    p.add_argument(
        "--dtype", default=None, help="comma list of fp32,bf16,fp16 (default fp32,bf16 on CUDA, fp32 on CPU)"
    )
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument(
        "--lengths-from",
        default=None,
        metavar="PATH_OR_NAME",
        help="draw per-sequence lengths from a data file or name (Beauty.txt, ml-1m.txt.gz, beauty, "
        "synthetic) and time the padded and the length-aware batch side by side",
    )
    p.add_argument(
        "--min-time",
        type=float,
        default=None,
        help="seconds of measurement per timing (CPU blocked_autorange min_run_time; CUDA do_bench rep); "
        "default 1.0 on CPU, 0.1 on CUDA, --quick 0.2 / 0.05",
    )
    p.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help="stop starting new cases after this many seconds (the rest are recorded as skipped)",
    )
    p.add_argument("--results-dir", default=str(common.DEFAULT_RESULTS_DIR), help="where attention.csv/.jsonl go")
    p.add_argument("--no-save", action="store_true", help="print only, write no results files")
    p.add_argument("--quick", action="store_true", help="small shapes and few repeats (a CPU run in a few minutes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    args.device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    if args.device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device")
    cuda = args.device.type == "cuda"
    args.batch = args.batch or (32 if args.quick else 256)
    args.n = _ints(args.n) if args.n else ([20, 50] if args.quick else [20, 50, 100, 200])
    args.d = _ints(args.d) if args.d else ([64] if args.quick else [50, 64])
    args.heads = _ints(args.heads) if args.heads else ([1] if args.quick else [1, 2])
    dtypes = _names(args.dtype) if args.dtype else (["fp32", "bf16"] if cuda else ["fp32"])
    for name in dtypes:
        if name not in common.DTYPES:
            p.error(f"--dtype: unknown {name!r}; expected fp32, bf16, fp16 or fp64")
    if not cuda and any(x in ("bf16", "fp16") for x in dtypes):
        print("note: half-precision dtypes are measured on CUDA only; dropping them on the CPU", file=sys.stderr)
        dtypes = [x for x in dtypes if x not in ("bf16", "fp16")] or ["fp32"]
    args.dtypes = dtypes
    families = list(FAMILIES) if args.family == "all" else _names(args.family)
    for fam in families:
        if fam not in FAMILIES:
            p.error(f"--family: unknown {fam!r}; expected dot, w2, calibrated or all")
    args.families = families
    known = {m for fam in FAMILIES.values() for m in fam}
    args.mechanisms = _names(args.mechanisms) if args.mechanisms else None
    for m in args.mechanisms or []:
        if m not in known:
            p.error(f"--mechanisms: unknown {m!r}; expected some of {sorted(known)}")
    args.backends = _names(args.backends)
    for b in args.backends:
        if b not in BACKENDS:
            p.error(f"--backends: unknown {b!r}; expected some of {','.join(BACKENDS)}")
    if args.min_time is None:
        args.min_time = (0.05 if cuda else 0.2) if args.quick else (0.1 if cuda else 1.0)
    return args


def build_cases(args, pool) -> list[Case]:
    cases = []
    for dtype in args.dtypes:
        for d in args.d:
            for H in args.heads:
                if d % H:
                    print(f"note: d_model={d} is not divisible by H={H}; shape skipped", file=sys.stderr)
                    continue
                for n in args.n:
                    shape = Shape(args.batch, H, n, d, dtype)
                    full = np.full(args.batch, n, dtype=np.int64)
                    modes = [("full", full)]
                    if pool is not None:
                        modes.append(("real", draw_lengths(pool, args.batch, n, args.seed)))
                    if "sdpa" in args.backends:
                        cases.append(Case("sdpa", "causal", "sdpa", shape, "full", full))
                    for fam in args.families:
                        for mech in FAMILIES[fam]:
                            if args.mechanisms is not None and mech not in args.mechanisms:
                                continue
                            for backend in args.backends:
                                if backend == "sdpa":
                                    continue
                                for mode, lengths in modes:
                                    cases.append(Case(fam, mech, backend, shape, mode, lengths))
    return cases


def main(argv=None) -> int:
    args = parse_args(argv)
    device = args.device
    torch.manual_seed(args.seed)
    pool = None
    args.lengths_source = ""
    if args.lengths_from:
        pool, args.lengths_source = sequence_lengths(args.lengths_from)
        print(
            f"lengths from {args.lengths_source}: {pool.size} sequences, mean {pool.mean():.1f}, "
            f"median {np.median(pool):.0f}, max {pool.max()}",
            file=sys.stderr,
        )
    env = common.env_info(device)
    env["run_id"] = common.run_id(env)
    cases = build_cases(args, pool)
    if not cases:
        print("nothing to run: the filters select no case", file=sys.stderr)
        return 2
    start = time.perf_counter()
    print(f"{len(cases)} cases on {env['device']}, torch {env['torch']}, triton {env['triton']}", file=sys.stderr)
    ceilings = {}
    for dtype in args.dtypes:
        ceilings[dtype] = common.measure_ceilings(device, common.DTYPES[dtype], quick=args.quick)
        c = ceilings[dtype]
        print(
            f"ceilings {dtype}: matmul {c.matmul_size}^3 {c.tflops:.3g} TFLOP/s, copy {c.copy_mib:.0f} MiB "
            f"{c.gbps:.3g} GB/s",
            file=sys.stderr,
        )
    rows = []
    interrupted = None
    common.stop_on_sigterm()  # `timeout` sends SIGTERM: print and save what was measured
    for i, case in enumerate(cases):
        elapsed = time.perf_counter() - start
        skip = interrupted or (
            f"time budget of {args.time_budget:.0f} s used up"
            if args.time_budget is not None and elapsed > args.time_budget
            else None
        )
        if skip is None:
            t0 = time.perf_counter()
            try:
                row = run_case(case, args, env, ceilings[case.shape.dtype], device, args.seed + i)
            except common.Interrupted as exc:
                skip = interrupted = f"interrupted ({exc}) before this case was measured"
        if skip is not None:
            rows.append(
                {
                    **env,
                    "family": case.family,
                    "mechanism": case.mechanism,
                    "backend": case.backend,
                    "batch": case.shape.batch,
                    "heads": case.shape.heads,
                    "n": case.shape.n,
                    "d_model": case.shape.d_model,
                    "d_h": case.shape.d_h,
                    "dtype": case.shape.dtype,
                    "lengths": case.lengths_mode,
                    "status": "skipped",
                    "reason": skip,
                }
            )
            continue
        rows.append(row)
        s = case.shape
        what = (
            f"[{i + 1}/{len(cases)}] {case.family}/{case.mechanism}/{case.backend} B={s.batch} H={s.heads} "
            f"n={s.n} d={s.d_model} {s.dtype} {case.lengths_mode}"
        )
        if row["status"] == "ok":
            print(
                f"{what}: f+b {common.fmt_ms(row['fwdbwd_ms'])} ms ({time.perf_counter() - t0:.1f} s)", file=sys.stderr
            )
        else:
            print(f"{what}: {row['status']}: {row['reason']}", file=sys.stderr)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    add_ratios(rows)
    print_table(rows, device)
    if not args.no_save:
        csv_path, jsonl_path = common.append_results(Path(args.results_dir), "attention", rows, COLUMNS)
        print(f"\n{len(rows)} rows appended to {csv_path} and {jsonl_path}")
    warning = common.contention_warning(rows)
    if warning:
        print(warning)
    errors = [r for r in rows if r.get("status") == "error"]
    print(
        f"total {time.perf_counter() - start:.0f} s; {sum(r.get('status') == 'ok' for r in rows)} measured, "
        f"{sum(r.get('status') == 'skipped' for r in rows)} skipped, {len(errors)} errors"
    )
    if interrupted:
        print(f"stopped early: {interrupted}")
    return 1 if errors or interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
