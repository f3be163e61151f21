"""Where the time of one forward+backward goes: host (Python, dispatch, launches) versus device kernels.

    python bench/breakdown.py                                  # GPU: simp, n=50 and 200, triton/eager/sdpa
    python bench/breakdown.py --mechanisms simp,value --n 50 --backends triton --lengths-from Beauty.txt
    python bench/breakdown.py --quick                          # CPU smoke run (host side only)

For each case it reports, per forward+backward step:
  wall ms      elapsed time per step over many steps with one synchronisation at the end
  host ms      time until the Python calls return (the work enqueued, not finished): when it is close to
               wall, the step is host-bound and faster kernels will not help; fewer launches will
  gpu ms       sum of the device kernel times (torch.profiler, CUDA only)
  launches     device kernels per step (CUDA only)
and the kernels taking the most device time. The numbers of bench/attention.py are medians of CUDA-event
intervals; these are plain means, meant to explain them, not to replace them. Nothing is written to
bench/results/ unless --out is given (a text file).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import attention  # noqa: E402

import common  # noqa: E402

BACKENDS = attention.BACKENDS


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", default="dot", choices=tuple(attention.FAMILIES))
    p.add_argument("--mechanisms", default="simp", help="comma list (default simp)")
    p.add_argument("--backends", default="triton,eager,sdpa", help=f"comma list of {','.join(BACKENDS)}")
    p.add_argument("--batch", type=int, default=None, help="B (default 256; --quick 4)")
    p.add_argument("--n", default=None, help="comma list of n (default 50,200; --quick 20)")
    p.add_argument("--d", type=int, default=None, help="d_model (default 64; --quick 32)")
    p.add_argument("--heads", type=int, default=1)
    p.add_argument("--dtype", default=None, help="fp32, bf16 or fp16 (default bf16 on CUDA, fp32 on CPU)")
    p.add_argument(
        "--lengths-from",
        default=None,
        metavar="PATH_OR_NAME",
        help="draw left-padding lengths from a data file (as bench/attention.py)",
    )
    p.add_argument("--steps", type=int, default=None, help="timed steps per case (default 50; --quick 3)")
    p.add_argument("--top", type=int, default=8, help="kernels listed per case")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None, help="also write the report to this text file")
    args = p.parse_args(argv)
    args.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = args.device.type == "cuda"
    args.batch = args.batch or (4 if args.quick else 256)
    args.n = attention._ints(args.n) if args.n else ([20] if args.quick else [50, 200])
    args.d = args.d or (32 if args.quick else 64)
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    if args.dtype not in common.DTYPES:
        p.error(f"--dtype: unknown {args.dtype!r}; expected fp32, bf16 or fp16")
    args.steps = args.steps or (3 if args.quick else 50)
    args.mechanisms = attention._names(args.mechanisms)
    for m in args.mechanisms:
        if m not in attention.FAMILIES[args.family]:
            p.error(f"--mechanisms: {m!r} is not a {args.family} mechanism {attention.FAMILIES[args.family]}")
    args.backends = attention._names(args.backends)
    for b in args.backends:
        if b not in BACKENDS:
            p.error(f"--backends: unknown {b!r}; expected some of {','.join(BACKENDS)}")
    if args.d % args.heads:
        p.error(f"--d {args.d} is not divisible by --heads {args.heads}")
    return args


def make_step(family, mechanism, backend, shape, lengths, device, seed):
    """A fwd+bwd closure for one case (the same inputs and callables as bench/attention.py)."""
    masked = lengths is not None
    fam, mech = ("sdpa", "causal") if backend == "sdpa" else (family, mechanism)
    fn = attention.make_callable(fam, mech, backend, shape, masked)
    mask = attention.padding_mask(lengths, shape.n, device) if masked and backend != "sdpa" else None
    inputs = attention.make_inputs(fam, mech, shape, device, mask, seed)
    leaves = list(inputs.leaves.values())
    kwargs = {**inputs.leaves, **inputs.consts}
    outs = attention.outputs_of(fn(**kwargs))
    grads = [torch.randn_like(o) for o in outs]

    def step():
        return torch.autograd.grad(attention.outputs_of(fn(**kwargs)), leaves, grads, allow_unused=True)

    return step


def measure(step, device, steps: int) -> dict:
    for _ in range(3):  # JIT, compilation, allocator warm-up
        step()
    common.synchronize(device)
    host = 0.0
    t0 = time.perf_counter()
    for _ in range(steps):
        h0 = time.perf_counter()
        step()
        host += time.perf_counter() - h0
    common.synchronize(device)
    wall = time.perf_counter() - t0
    result = {
        "wall_ms": 1e3 * wall / steps,
        "host_ms": 1e3 * host / steps,
        "gpu_ms": float("nan"),
        "launches": float("nan"),
        "kernels": [],
    }
    if device.type != "cuda":
        return result
    from torch.profiler import ProfilerActivity, profile

    prof_steps = min(steps, 10)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(prof_steps):
            step()
        torch.cuda.synchronize(device)
    per_kernel: dict = defaultdict(lambda: [0.0, 0])
    for event in prof.events():
        if getattr(event, "device_type", None) != torch.autograd.DeviceType.CUDA:
            continue
        entry = per_kernel[event.name]
        entry[0] += event.device_time_total if hasattr(event, "device_time_total") else event.cuda_time_total
        entry[1] += 1
    total_us = sum(v[0] for v in per_kernel.values())
    result["gpu_ms"] = total_us / 1e3 / prof_steps
    result["launches"] = sum(v[1] for v in per_kernel.values()) / prof_steps
    result["kernels"] = sorted(
        ((name, us / 1e3 / prof_steps, count / prof_steps) for name, (us, count) in per_kernel.items()),
        key=lambda x: -x[1],
    )
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    device = args.device
    env = common.env_info(device)
    lines = [
        f"breakdown on {env['device']}, torch {env['torch']}, triton {env['triton']}, commit {env['git_commit']}, "
        f"{env['date']}; {args.steps} steps per case, {args.dtype}"
    ]
    pool = None
    if args.lengths_from:
        pool, source = attention.sequence_lengths(args.lengths_from)
        lines.append(f"lengths from {source}: mean {pool.mean():.1f}")
    header = ["mechanism", "backend", "lens", "n", "wall ms", "host ms", "host/wall", "gpu ms", "launches"]
    table, details = [], []
    for n in args.n:
        shape = attention.Shape(args.batch, args.heads, n, args.d, args.dtype)
        modes = [("full", None)]
        if pool is not None:
            modes.append(("real", attention.draw_lengths(pool, args.batch, n, 0)))
        for mechanism in args.mechanisms:
            for backend in args.backends:
                for mode, lengths in modes:
                    if backend == "sdpa" and (mode == "real" or mechanism != args.mechanisms[0]):
                        continue  # one baseline row per n
                    label = f"{mechanism}/{backend} n={n} {mode}"
                    try:
                        step = make_step(args.family, mechanism, backend, shape, lengths, device, seed=n)
                        r = measure(step, device, args.steps)
                    except (attention.Skip, Exception) as exc:  # report and go on
                        lines.append(f"{label}: not measured ({common.describe(exc, 300)})")
                        continue
                    print(
                        f"{label}: wall {r['wall_ms']:.3f} ms, host {r['host_ms']:.3f} ms, gpu {r['gpu_ms']:.3f} ms, "
                        f"launches {r['launches']}",
                        file=sys.stderr,
                        flush=True,
                    )  # progress, if cut short
                    table.append(
                        [
                            mechanism if backend != "sdpa" else "causal",
                            backend,
                            mode,
                            str(n),
                            common.fmt_ms(r["wall_ms"]),
                            common.fmt_ms(r["host_ms"]),
                            common.fmt_num(r["host_ms"] / r["wall_ms"]),
                            common.fmt_ms(r["gpu_ms"]),
                            common.fmt_num(r["launches"], 1),
                        ]
                    )
                    if r["kernels"]:
                        details.append(f"\n{label}: top kernels (ms per step, launches per step)")
                        for name, ms, count in r["kernels"][: args.top]:
                            details.append(f"  {ms:8.4f} ms  x{count:4.1f}  {name[:110]}")
    lines.append(common.fmt_table(header, table, [False] * 3 + [True] * 6))
    lines.extend(details)
    report = "\n".join(lines)
    print(report)
    if args.out:
        Path(args.out).write_text(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
