"""STOSA's full-ranking W2 item scoring against its yardstick, in one run: the squared W2 distances of B
sequence Gaussians to every item Gaussian (`awr_fast.w2_scores`: two GEMMs plus norms) per backend,
forward and forward+backward, the fused top-k of the Triton and CUDA backends (`w2_topk` of
kernels.w2_scores and awr_fast.cuda.w2_scores, with each row's history excluded, never writing the
(B, |V|) scores) beside torch.topk over the reference's
scores, and one (B x d) @ (d x |V|) matmul in the same dtype.

    python bench/w2_scoring.py                        # B=256, |V|=60000, d=64, bf16 (GPU; the issue's shape)
    python bench/w2_scoring.py --quick                # a small CPU shape: reference, compile and the matmul

Columns: the median and 20/80 quantiles in ms, x_matmul (this time / the matmul's; the target for the
scores forward is <= 1.5), the roofline floor (FLOPs of the two GEMMs, bytes of the inputs and the float32
(B, |V|) output, or (B, k) for top-k, against the matmul and copy ceilings measured in the same run) and
the compiled-kernel note of the backend. Rows are appended to bench/results/w2_scoring.csv and .jsonl.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

COLUMNS = [
    "run_id",
    "date",
    "git_commit",
    "device",
    "torch",
    "triton",
    "op",
    "backend",
    "batch",
    "items",
    "d",
    "k",
    "dtype",
    "status",
    "reason",
    "ms",
    "p20_ms",
    "p80_ms",
    "x_matmul",
    "floor_ms",
    "gflops",
    "mbytes",
]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _inputs(batch, items, d, dtype, device, history, grad=False):
    g = torch.Generator().manual_seed(0)

    def make(*shape, positive=False):
        x = torch.rand(*shape, generator=g) + 0.5 if positive else torch.randn(*shape, generator=g)
        return x.to(device=device, dtype=dtype).requires_grad_(grad)

    tensors = (make(batch, d), make(batch, d, positive=True), make(items, d), make(items, d, positive=True))
    # each row's history: `history` item ids (-1 padded rows are allowed by w2_topk; here all are real)
    seen = torch.randint(1, items, (batch, history), generator=g).to(device)
    return tensors, seen


def cases(args, device, dtype):
    """(op, backend, k, fn or the exception that stops it)."""
    import awr_fast

    batch, items, d = args.batch, args.items, args.d
    plain, seen = _inputs(batch, items, d, dtype, device, args.history)
    leaves, _ = _inputs(batch, items, d, dtype, device, args.history, grad=True)
    a = plain[0]
    b = plain[2].t().contiguous()
    yield "matmul", "torch", 0, lambda: a @ b
    reference = None
    for backend in args.backends:
        if backend == "compile":
            from awr_fast.reference.w2_scores import w2_scores as ref_op

            compiled = torch.compile(ref_op, dynamic=False)
            yield "scores", "compile", 0, lambda: compiled(*plain)
            continue

        def scores(backend=backend):
            return awr_fast.w2_scores(*plain, backend=backend)

        def scores_fwd_bwd(backend=backend):
            awr_fast.w2_scores(*leaves, backend=backend).sum().backward()

        try:
            with torch.no_grad():
                scores()
        except Exception as exc:  # a backend that cannot run here: recorded with its reason
            yield "scores", backend, 0, exc
            continue
        if backend == "reference":
            reference = scores
        yield "scores", backend, 0, scores
        yield "scores_fwd_bwd", backend, 0, scores_fwd_bwd
    k = args.k
    if reference is not None:

        def reference_topk():
            s = reference().float()
            s.scatter_(1, seen, float("inf"))  # the history excluded, as w2_topk's exclude
            return torch.topk(s, k, dim=1, largest=False)

        yield "topk", "reference+torch.topk", k, reference_topk
    for backend, module in (("triton", "awr_fast.kernels.w2_scores"), ("cuda", "awr_fast.cuda.w2_scores")):
        if backend not in args.backends:
            continue
        try:
            w2_topk = importlib.import_module(module).w2_topk
            w2_topk(*plain, k, seen)
            yield "topk", backend, k, lambda w2_topk=w2_topk: w2_topk(*plain, k, seen)
        except Exception as exc:
            yield "topk", backend, k, exc


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a small shape (CPU): B=32, |V|=4000")
    p.add_argument("--batch", type=int, default=None, help="default 256 (--quick 32)")
    p.add_argument("--items", type=int, default=None, help="default 60000 (--quick 4000)")
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--k", type=int, default=10, help="top-k of the fused evaluation")
    p.add_argument("--history", type=int, default=20, help="items excluded per row in the top-k rows")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default bf16 on a GPU, fp32 on the CPU")
    p.add_argument(
        "--backends",
        default=None,
        help="comma list of reference, compile, triton, cuda (default: all on a GPU; reference,compile on CPU)",
    )
    p.add_argument("--min-time", type=float, default=None, help="seconds of measurement per case")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--results-dir", type=Path, default=common.DEFAULT_RESULTS_DIR)
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    args.batch = args.batch or (32 if args.quick else 256)
    args.items = args.items or (4000 if args.quick else 60000)
    dtype = DTYPES[args.dtype or ("bf16" if gpu else "fp32")]
    default_backends = "reference,compile,triton,cuda" if gpu else "reference,compile"
    args.backends = (args.backends or default_backends).split(",")
    for name in args.backends:
        if name not in ("reference", "compile", "triton", "cuda"):
            p.error(f"--backends: expected some of reference, compile, triton, cuda, got {name!r}")
    if not 1 <= args.k <= args.items:
        p.error(f"--k: expected 1 <= k <= --items ({args.items}), got {args.k}")
    min_time = args.min_time if args.min_time is not None else (0.2 if args.quick else 0.5)
    env = common.env_info(device)
    rid = common.run_id(env)
    ceilings = common.measure_ceilings(device, dtype, quick=args.quick or not gpu)
    batch, items, d = args.batch, args.items, args.d
    size = torch.finfo(dtype).bits // 8
    inputs_bytes = 2 * (batch + items) * d * size
    rows, matmul_ms = [], None
    print(
        f"W2 scoring B={batch} |V|={items} d={d} {common.DTYPE_NAMES[dtype]} on {env['device']}; ceilings "
        f"{ceilings.tflops:.1f} TFLOP/s, {ceilings.gbps:.0f} GB/s",
        flush=True,
    )
    for op, backend, k, fn in cases(args, device, dtype):
        row = {
            "run_id": rid,
            "date": env["date"],
            "git_commit": env["git_commit"],
            "device": env["device"],
            "torch": env["torch"],
            "triton": env["triton"],
            "op": op,
            "backend": backend,
            "batch": batch,
            "items": items,
            "d": d,
            "k": k,
            "dtype": str(dtype).replace("torch.", ""),
        }
        if isinstance(fn, Exception):
            rows.append({**row, "status": "skipped", "reason": common.describe(fn)})
            print(f"  {op:<15} {backend:<22} skipped: {common.describe(fn, 120)}", flush=True)
            continue
        # FLOPs: the matmul 2 B V d; the scores two such GEMMs (fwd), four more backward
        gemms = {"matmul": 1, "scores": 2, "scores_fwd_bwd": 6, "topk": 2}[op]
        flops = 2.0 * batch * items * d * gemms
        out_bytes = batch * items * (size if op == "matmul" else 4) if op != "topk" else batch * k * 12
        nbytes = inputs_bytes + out_bytes * (3 if op == "scores_fwd_bwd" else 1)
        start = time.perf_counter()
        try:
            t = common.time_fn(fn, device, min_time=min_time)
        except Exception as exc:
            rows.append({**row, "status": "error", "reason": common.describe(exc)})
            print(f"  {op:<15} {backend:<22} error: {common.describe(exc, 120)}", flush=True)
            continue
        if op == "matmul":
            matmul_ms = t.median
        floor = common.roofline(flops, nbytes, ceilings)
        row.update(
            status="ok",
            reason="",
            ms=t.median,
            p20_ms=t.p20,
            p80_ms=t.p80,
            x_matmul=t.median / matmul_ms if matmul_ms else float("nan"),
            floor_ms=floor,
            gflops=flops / 1e9,
            mbytes=nbytes / 1e6,
        )
        rows.append(row)
        print(
            f"  {op:<15} {backend:<22} {t.median:9.3f} ms  ({t.p20:.3f}-{t.p80:.3f})  x_matmul "
            f"{row['x_matmul']:6.2f}  floor {floor:.3f} ms  [{time.perf_counter() - start:.1f} s]",
            flush=True,
        )
    if not args.no_save:
        csv_path, _ = common.append_results(args.results_dir, "w2_scoring", rows, COLUMNS)
        print(f"appended {len(rows)} rows to {csv_path}")
    return 0 if all(r["status"] != "error" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
