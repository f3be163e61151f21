"""Host cost of one attention call: forward+backward at a tiny shape on the CPU, where the arithmetic is
negligible and what remains is Python (argument checks, dispatch, autograd bookkeeping, launches).

    python bench/host_overhead.py                     # every backend that runs here, none and simp
    python bench/host_overhead.py --label before      # tag the rows (e.g. an older checkout on PYTHONPATH)

For each (mechanism, backend) it times one forward+backward (the "-fwd" rows: AC-TSR's calibrated attention in
evaluation, forward only, beside SDPA's forward) through the public API (median and 20/80
quantiles over --repeats blocks of --calls calls), the same through the nn module (projections included),
and F.scaled_dot_product_attention at the same shape as the floor of any PyTorch attention call. The
"kernel" rows call the Triton backend's entry on the same CPU tensors with Triton's active driver replaced
by the sm_90 stand-in of kernel_resources.py: the kernels are compiled for the GPU and Triton's whole Python
launch path runs, but each launch is a no-op that is counted, so those rows are the host cost of a GPU
call without the GPU (the torch ops around the launches do run, on tiny CPU tensors). Every row also counts
the aten ops one call dispatches and its Triton launches. The cases are timed in interleaved rounds (one
block of each per round), and "vs SDPA" is the median over rounds of the case's time over SDPA's in the
same round: the ratio stays fair when the machine's speed drifts during the run. Rows are appended to
bench/results/host_overhead.csv and .jsonl. Backends this checkout lacks are skipped with the error they
raise, so the same script measures an older checkout for a before/after comparison.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

COLUMNS = [
    "run_id",
    "date",
    "label",
    "git_commit",
    "torch",
    "python",
    "threads",
    "path",
    "mechanism",
    "backend",
    "backend_ran",
    "batch",
    "heads",
    "n",
    "d_h",
    "calls",
    "torch_ops",
    "triton_launches",
    "us_median",
    "us_p20",
    "us_p80",
    "vs_sdpa",
    "status",
    "reason",
]
BACKENDS = ("reference", "eager", "auto")


def _block(fn, calls: int) -> float:
    """µs per call over one block of ``calls`` calls."""
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def _time_interleaved(fns: list, calls: int, repeats: int) -> np.ndarray:
    """(repeats, len(fns)) µs per call: each round times one block of every function in turn, so a slow
    spell of the machine (another process, frequency changes) lands on all of them alike and the ratios
    taken within a round stay fair."""
    for fn in fns:
        for _ in range(10):
            fn()
    return np.array([[_block(fn, calls) for fn in fns] for _ in range(repeats)])


def _cases(args):
    import awr_fast

    g = torch.Generator().manual_seed(0)
    b, h, n, d = args.batch, args.heads, args.n, args.d_h
    q, k, v = (torch.randn(b, h, n, d, generator=g).requires_grad_(True) for _ in range(3))
    w = {name: torch.randn(n, n, generator=g).requires_grad_(True) for name in ("w_rq", "w_rk")}
    mask = torch.zeros(b, n, dtype=torch.bool)
    mask[0, : n // 2] = True
    for mechanism in ("none", "simp"):
        weights = w if mechanism == "simp" else {}
        for backend in BACKENDS:

            def api_call(backend=backend, weights=weights, mechanism=mechanism):
                out = awr_fast.refined_attention(
                    q, k, v, mechanism=mechanism, key_padding_mask=mask, backend=backend, **weights
                )
                out.sum().backward()

            yield "api", mechanism, backend, api_call
        for backend in BACKENDS:
            try:
                layer = awr_fast.nn.dot.RefinedMultiheadAttention(h * d, h, n, mechanism, backend=backend)
            except ValueError as exc:
                yield "module", mechanism, backend, exc
                continue
            x = torch.randn(b, n, h * d, generator=g)

            def module_call(layer=layer, x=x):
                layer(x, key_padding_mask=mask).sum().backward()

            yield "module", mechanism, backend, module_call

    def sdpa_call():
        F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()

    yield "api", "causal", "sdpa", sdpa_call

    # AC-TSR's calibrated attention, forward only (evaluation) beside SDPA's forward ("vs SDPA" of a "-fwd"
    # row is against SDPA's forward); its Triton forward+backward is the "kernel" adversarial row below
    qa, ka = (torch.randn(b, h, n, d, generator=g) for _ in range(2))
    calibrator = {name: torch.randn(d, generator=g) for name in ("w_oq", "w_ok", "w_dq", "w_dk")}
    calibrator.update({name: torch.randn((), generator=g) for name in ("b_o", "b_d", "dist_scale")})
    adversary = dict(q_adv=qa, k_adv=ka, gate_logits=torch.randn(b, n, n, generator=g))
    adversary["noise"] = torch.randn(b, h, n, n, generator=g)

    def sdpa_fwd_call():
        with torch.no_grad():
            F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def calibrated_call(backend="reference"):
        with torch.no_grad():
            awr_fast.calibrated_attention(q, k, v, **calibrator, **adversary, key_padding_mask=mask, backend=backend)

    yield "api-fwd", "causal", "sdpa", sdpa_fwd_call
    yield "api-fwd", "adversarial", "reference", calibrated_call

    if args.no_triton:
        return
    try:  # the Triton backend on CPU tensors: its real Python launch path, each launch a counted no-op
        import kernel_resources

        kernel_resources.install_stand_in(90)
        from awr_fast.kernels import dot_refined as triton_dot
    except Exception as exc:
        yield "kernel", "simp", "triton", exc
        return
    try:
        from awr_fast.kernels import _launch
    except ImportError:  # a checkout without the direct launch
        _launch = None
    from awr_fast.kernels import calibrated as triton_calibrated

    def calibrated_kernel_call():
        with torch.no_grad():
            triton_calibrated.calibrated(q, k, v, **calibrator, **adversary, key_padding_mask=mask)

    yield "kernel-fwd", "adversarial", "triton", calibrated_kernel_call
    trained = {name: t.clone().requires_grad_(True) for name, t in {**calibrator, **adversary}.items()}
    trained["noise"] = adversary["noise"]

    def calibrated_training_call():  # forward and backward (row and column blocks), as AC-SASRec trains
        out_cal, out_att, perturb = triton_calibrated.calibrated(q, k, v, **trained, key_padding_mask=mask)
        (out_cal.sum() + out_att.sum() + perturb.sum()).backward()

    yield "kernel", "adversarial", "triton", calibrated_training_call
    for mechanism in ("none", "simp"):
        weights = w if mechanism == "simp" else {}

        def kernel_call(weights=weights, mechanism=mechanism):
            out = triton_dot.dot_refined(q, k, v, mechanism=mechanism, key_padding_mask=mask, **weights)
            out.sum().backward()

        yield "kernel", mechanism, "triton", kernel_call
        if _launch is not None and _launch._ENABLED:

            def triton_launch_path(kernel_call=kernel_call):  # the same call through fn[grid](...)
                _launch._ENABLED = False
                try:
                    kernel_call()
                finally:
                    _launch._ENABLED = True

            yield "kernel", mechanism, "triton-jit-run", triton_launch_path

    # STOSA's W2 attention on its Triton family: none and simp take the fused kernels at this n, stoc the
    # tiled ones (its row Gaussians are always written out); "vs SDPA" against plain attention's fwd+bwd
    from awr_fast.kernels import w2_refined as triton_w2

    sig_q, sig_k, sig_v = ((torch.rand(b, h, n, d, generator=g) + 0.5).requires_grad_(True) for _ in range(3))
    w_stoc = {name: torch.randn(n, n, generator=g).requires_grad_(True) for name in ("w_mu", "w_sigma")}
    for mechanism in ("none", "simp", "stoc"):
        weights = {"none": {}, "simp": w, "stoc": w_stoc}[mechanism]

        def w2_call(weights=weights, mechanism=mechanism):
            mu, sig = triton_w2.w2_refined(
                q, sig_q, k, sig_k, v, sig_v, mechanism=mechanism, key_padding_mask=mask, **weights
            )
            (mu.sum() + sig.sum()).backward()

        yield "kernel-w2", mechanism, "triton", w2_call


class _CountOps(TorchDispatchMode):
    """Counts the aten ops a call runs (what reaches the dispatcher: every op a GPU would launch or fuse)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def _counts(fn) -> tuple[int, int]:
    """(aten ops, Triton launches) of one call."""
    try:
        from kernel_resources import _Launcher
    except Exception:
        _Launcher = None
    launches = _Launcher.launches if _Launcher else 0
    with _CountOps() as mode:
        fn()
    return mode.count, (_Launcher.launches - launches) if _Launcher else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--label", default="", help="free text stored with every row (e.g. before, after)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=1)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--d-h", type=int, default=8)
    p.add_argument("--calls", type=int, default=200, help="calls per timed block")
    p.add_argument("--repeats", type=int, default=15, help="timed blocks (median and 20/80 quantiles over them)")
    p.add_argument(
        "--results-dir", type=Path, default=common.DEFAULT_RESULTS_DIR, help="where host_overhead.csv/.jsonl go"
    )
    p.add_argument("--no-save", action="store_true", help="print only")
    p.add_argument("--no-triton", action="store_true", help="skip the Triton rows (sm_90 stand-in driver)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # the host path is single-threaded; more threads only add noise here
    import awr_fast
    import awr_fast.nn.dot  # noqa: F401

    env = common.env_info(torch.device("cpu"))
    rid = common.run_id(env)
    rows, timed = [], []
    for path, mechanism, backend, fn in _cases(args):
        row = {
            "run_id": rid,
            "date": env["date"],
            "label": args.label,
            "git_commit": env["git_commit"],
            "torch": env["torch"],
            "python": env["python"],
            "threads": 1,
            "path": path,
            "mechanism": mechanism,
            "backend": backend,
            "batch": args.batch,
            "heads": args.heads,
            "n": args.n,
            "d_h": args.d_h,
            "calls": args.calls,
        }
        if isinstance(fn, Exception):
            rows.append({**row, "status": "skipped", "reason": common.describe(fn)})
            continue
        used = getattr(getattr(awr_fast, "backends", None), "USED", None)
        if used is not None:
            used.clear()
        try:
            fn()
            row["torch_ops"], row["triton_launches"] = _counts(fn)
        except (ValueError, RuntimeError) as exc:
            rows.append({**row, "status": "skipped", "reason": common.describe(exc)})
            continue
        direct = backend if backend in ("sdpa", "triton", "triton-jit-run") else ""  # called without the dispatcher
        row["backend_ran"] = "+".join(sorted({b for (_, b) in used})) if used else direct
        rows.append(row)
        timed.append((row, fn))
    t = _time_interleaved([fn for _, fn in timed], args.calls, args.repeats)
    sdpa = next((i for i, (r, _) in enumerate(timed) if r["backend"] == "sdpa" and r["path"] == "api"), None)
    sdpa_fwd = next((i for i, (r, _) in enumerate(timed) if r["backend"] == "sdpa" and r["path"] == "api-fwd"), None)
    for i, (row, _) in enumerate(timed):
        base = sdpa_fwd if row["path"].endswith("-fwd") else sdpa
        row.update(
            us_median=float(np.median(t[:, i])),
            us_p20=float(np.quantile(t[:, i], 0.2)),
            us_p80=float(np.quantile(t[:, i], 0.8)),
            vs_sdpa=float(np.median(t[:, i] / t[:, base])) if base is not None else None,
            status="ok",
        )
    header = [
        "path",
        "mechanism",
        "backend",
        "ran",
        "us/call (fwd+bwd; -fwd rows: fwd)",
        "p20-p80",
        "vs SDPA",
        "aten ops",
        "launches",
    ]
    table = [
        [
            r["path"],
            r["mechanism"],
            r["backend"],
            r.get("backend_ran", ""),
            f"{r['us_median']:.0f}" if r["status"] == "ok" else r["status"],
            f"{r['us_p20']:.0f}-{r['us_p80']:.0f}" if r["status"] == "ok" else r["reason"][:60],
            f"{r['vs_sdpa']:.2f}x" if r.get("vs_sdpa") is not None else "",
            str(r.get("torch_ops", "")),
            str(r.get("triton_launches", "")),
        ]
        for r in rows
    ]
    print(
        f"host cost of one forward+backward, B={args.batch} H={args.heads} n={args.n} d_h={args.d_h}, CPU, "
        f"1 thread, {env['git_commit']} {args.label}"
    )
    print(common.fmt_table(header, table, [False] * 4 + [True] * 5))
    if not args.no_save:
        csv_path, _ = common.append_results(args.results_dir, "host_overhead", rows, COLUMNS)
        print(f"appended {len(rows)} rows to {csv_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
