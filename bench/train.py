"""Trainer benchmark: epoch time, eval time and peak memory of SASRec and STOSA x mechanisms x backends.

    python bench/train.py                          # synthetic data, 2 epochs, every mechanism
    python bench/train.py --quick                  # a small CPU run
    python bench/train.py --data /path/ml-1m.txt.gz --max-len 200 --epochs 1 --backends reference,eager
    python bench/train.py --data Beauty.txt --max-len 50 --trim-padding both   # padded vs trimmed batches

Each configuration runs awr_fast.train.train(config) in this process (a fresh temporary run directory,
deleted afterwards unless --keep-runs) and reads its metrics.jsonl and final.json. Reported per run:
the first epoch (which includes Triton JIT / warm-up), the mean of the later epochs, ms per training
step, the mean valid evaluation and the test evaluation, the peak memory (CUDA: max_memory_allocated
over the run, above what was allocated before it; CPU: peak resident set size above the size at the
start, sampled every 5 ms) and the test NDCG@10 (a sanity check that backends agree). With
--trim-padding both, every configuration runs with the batches padded to max_len and trimmed to their
longest sequence (the trainer's default), and a last table gives the speedups. Rows are appended
to bench/results/train.csv and .jsonl. A backend that cannot run a configuration is listed as skipped
with the dispatcher's reason; the "ran" column says which backend ran the attention (for "auto": eager
for the refined mechanisms on the CPU, the reference for plain attention).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

try:
    import awr_fast  # noqa: F401
except ImportError:  # not installed: use the checkout's package (its Triton kernels then report as unavailable)
    sys.path.insert(1, str(common.REPO_ROOT))

from awr_fast.backends import CHOICES as BACKEND_CHOICES  # noqa: E402
from awr_fast.ops import dot_refined, w2_refined  # noqa: E402

MECHANISMS = {"sasrec": dot_refined.CAUSAL_MECHANISMS, "stosa": w2_refined.MECHANISMS}
QUICK_SYNTHETIC = {"num_users": 1000, "num_items": 300}
ROW_TAG = "@@bench-train-row "

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
    "model",
    "attention",
    "backend",
    "dataset",
    "num_users",
    "num_items",
    "max_len",
    "d_model",
    "n_layers",
    "n_heads",
    "batch_size",
    "amp",
    "epochs",
    "status",
    "reason",
    "steps_per_epoch",
    "epoch1_s",
    "epoch_s_later",
    "ms_per_step",
    "ms_per_step_later",
    "eval_s",
    "test_eval_s",
    "total_s",
    "mem_kind",
    "peak_mem_mib",
    "test_ndcg@10",
    "test_recall@10",
    "loss_last",
    "other_cpu",
    "trim_padding",
    "backend_ran",
]
TRIM_CHOICES = {"on": (True,), "off": (False,), "both": (False, True)}


class PeakRSS:
    """Peak resident set size of this process while active, sampled from /proc/self/statm."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.peak, self.start = interval, 0, 0
        self._stop = threading.Event()
        try:
            import os

            self._page = os.sysconf("SC_PAGE_SIZE")
            self.available = Path("/proc/self/statm").exists()
        except (ValueError, OSError, AttributeError):
            self.available = False

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            self._stop.wait(self.interval)

    def __enter__(self):
        if self.available:
            self.start = self.peak = self._rss()
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.available:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._rss())

    @property
    def increase_mib(self) -> float:
        return (self.peak - self.start) / common.MIB if self.available else float("nan")


def run_one(model: str, attention: str, backend: str, trim: bool, args, env: dict) -> dict:
    from awr_fast import UnsupportedInputError, backends
    from awr_fast.train import read_metrics, train

    overrides = dict(
        model=model,
        attention=attention,
        backend=backend,
        epochs=args.epochs,
        quiet=True,
        device=args.device,
        eval_every=1,
        patience=max(args.epochs, 1),
        seed=args.seed,
        trim_padding=trim,
    )
    for name in ("max_len", "d_model", "n_layers", "n_heads", "batch_size", "amp", "num_threads"):
        value = getattr(args, name)
        if value is not None:
            overrides[name] = value
    if args.data:
        overrides["data"] = args.data
    else:
        overrides["dataset"] = args.dataset
        if args.dataset == "synthetic":
            synthetic = dict(QUICK_SYNTHETIC) if args.quick else {}
            if args.synthetic_users:
                synthetic["num_users"] = args.synthetic_users
            if synthetic:
                overrides["synthetic"] = synthetic
    row = {
        **env,
        "model": model,
        "attention": attention,
        "backend": backend,
        "epochs": args.epochs,
        "dataset": args.data or args.dataset,
        "trim_padding": trim,
    }
    tmp = Path(tempfile.mkdtemp(prefix="awr_bench_train_"))
    run_dir = tmp / f"{model}-{attention}-{backend}"
    overrides["out"] = str(run_dir)
    cuda = str(args.device).startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
    try:
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        rss = PeakRSS()
        backends.USED.clear()
        with rss, common.OtherCpu() as other, contextlib.redirect_stdout(sys.stderr):  # its summary -> stderr
            final = train(**overrides)
        row["backend_ran"] = " ".join(f"{op}={ran}" for op, ran in backends.used_backends().items())
        row["other_cpu"] = other.cores
        if cuda:
            peak, kind = (torch.cuda.max_memory_allocated() - base) / common.MIB, "cuda_max_allocated_above_start"
        else:
            peak, kind = rss.increase_mib, "cpu_peak_rss_above_start"
        metrics = read_metrics(run_dir)
    except UnsupportedInputError as exc:
        return {**row, "status": "skipped", "reason": str(exc)}
    except Exception as exc:  # record and go on
        return {**row, "status": "error", "reason": common.describe(exc)}
    finally:
        if args.keep_runs:
            print(f"kept {run_dir}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    epoch_s = [float(r["epoch_s"]) for r in metrics]
    steps = [int(r["step"]) for r in metrics]
    per_epoch_steps = [b - a for a, b in zip([0] + steps[:-1], steps)]
    evals = [float(r["eval_s"]) for r in metrics if r.get("valid")]
    later = epoch_s[1:]
    later_steps = sum(per_epoch_steps[1:])
    timing = final.get("timing", {})
    test = final.get("test") or {}
    row.update(
        status="ok",
        reason="",
        dataset=final.get("dataset", row["dataset"]),
        num_users=final.get("num_users"),
        num_items=final.get("num_items"),
        max_len=overrides.get("max_len"),
        d_model=overrides.get("d_model"),
        n_layers=overrides.get("n_layers"),
        n_heads=overrides.get("n_heads"),
        batch_size=overrides.get("batch_size"),
        amp=overrides.get("amp"),
        steps_per_epoch=per_epoch_steps[0] if per_epoch_steps else float("nan"),
        epoch1_s=epoch_s[0] if epoch_s else float("nan"),
        epoch_s_later=sum(later) / len(later) if later else float("nan"),
        ms_per_step=1e3 * epoch_s[0] / per_epoch_steps[0] if per_epoch_steps and per_epoch_steps[0] else float("nan"),
        ms_per_step_later=1e3 * sum(later) / later_steps if later_steps else float("nan"),
        eval_s=sum(evals) / len(evals) if evals else float("nan"),
        test_eval_s=timing.get("test_eval_s", float("nan")),
        total_s=timing.get("total_s", float("nan")),
        mem_kind=kind,
        peak_mem_mib=peak,
        loss_last=metrics[-1]["loss"] if metrics else float("nan"),
        **{
            "test_ndcg@10": test.get("ndcg@10", test.get("sampled_ndcg@10", float("nan"))),
            "test_recall@10": test.get("recall@10", test.get("sampled_recall@10", float("nan"))),
        },
    )
    return row


def _fill_config_columns(row: dict) -> None:
    """The model sizes of the resolved TrainConfig for rows that did not run (skipped/error)."""
    from awr_fast.training.config import TrainConfig

    defaults = TrainConfig()
    for name in ("max_len", "d_model", "n_layers", "n_heads", "batch_size", "amp"):
        value = row.get(name)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            row[name] = getattr(defaults, name)


def print_table(rows: list[dict], cuda: bool) -> None:
    mem = "peak MiB (cuda)" if cuda else "peak RSS MiB"
    header = [
        "model",
        "attention",
        "backend",
        "ran",
        "trim",
        "steps",
        "epoch1 s",
        "later s",
        "ms/step",
        "eval s",
        "test eval s",
        mem,
        "test NDCG@10",
    ]
    right = [False] * 5 + [True] * (len(header) - 5)
    table = []
    for r in rows:
        if r["status"] != "ok":
            continue
        per_step = r["ms_per_step"] if math.isnan(r["ms_per_step_later"]) else r["ms_per_step_later"]
        ran = r.get("backend_ran", "").split("=")[-1]  # one op per model: the backend(s) that ran it
        table.append(
            [
                r["model"],
                r["attention"],
                r["backend"],
                ran,
                "on" if r.get("trim_padding") else "off",
                str(r["steps_per_epoch"]),
                common.fmt_num(r["epoch1_s"]),
                common.fmt_num(r["epoch_s_later"]),
                common.fmt_num(per_step, 1),
                common.fmt_num(r["eval_s"]),
                common.fmt_num(r["test_eval_s"]),
                common.fmt_num(r["peak_mem_mib"], 1),
                common.fmt_num(r["test_ndcg@10"], 4),
            ]
        )
    if rows:
        r0 = next((r for r in rows if r["status"] == "ok"), rows[0])
        print(
            f"\n== trainer on {r0['device']}: data {r0['dataset']}, n={r0.get('max_len')}, d={r0.get('d_model')}, "
            f"layers={r0.get('n_layers')}, heads={r0.get('n_heads')}, batch={r0.get('batch_size')}, "
            f"amp={r0.get('amp')}, {r0['epochs']} epoch(s)"
        )
    if table:
        print(common.fmt_table(header, table, right))
    for r in rows:
        if r["status"] != "ok":
            print(f"  {r['status']}: {r['model']}/{r['attention']}/{r['backend']}: {r['reason']}")
    print("ms/step: later epochs when there are any (the first includes warm-up and JIT), else the first.")
    trim_speedups(rows)


def _epoch_s(r: dict) -> float:
    return r["epoch1_s"] if math.isnan(r["epoch_s_later"]) else r["epoch_s_later"]


def trim_speedups(rows: list[dict]) -> None:
    """Epoch and eval time of the padded batches over the trimmed ones, per configuration."""
    ok = {
        (r["model"], r["attention"], r["backend"], bool(r.get("trim_padding"))): r for r in rows if r["status"] == "ok"
    }
    lines = []
    for (model, mech, backend, trim), r in ok.items():
        padded = ok.get((model, mech, backend, False))
        if not trim or padded is None:
            continue
        lines.append(
            f"  {model}/{mech}/{backend}: epoch {_epoch_s(padded) / _epoch_s(r):.2f}x, "
            f"eval {padded['eval_s'] / r['eval_s']:.2f}x"
        )
    if lines:
        print("\ntrimmed batches vs padded to max_len (speedup = padded time / trimmed time):")
        print("\n".join(lines))


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="sasrec,stosa", help="comma list of sasrec,stosa")
    p.add_argument(
        "--mechanisms",
        default=None,
        help="comma list of attention mechanisms (none,simp,add,value,stoc; stoc is STOSA only); "
        "default all (--quick: none,simp)",
    )
    p.add_argument(
        "--backends",
        default=None,
        help=f"comma list of {','.join(BACKEND_CHOICES)} "
        "(default: reference,eager on CPU, reference,eager,triton on CUDA)",
    )
    p.add_argument("--dataset", default="synthetic", help="named data set (default the embedded synthetic one)")
    p.add_argument("--data", default=None, help="path of a data file (ML-1M, Beauty.txt, ...); wins over --dataset")
    p.add_argument("--epochs", type=int, default=None, help="epochs per run (default 2; --quick 1)")
    p.add_argument("--max-len", type=int, default=None, help="n (default: the trainer's)")
    p.add_argument("--d-model", type=int, default=None)
    p.add_argument("--n-layers", type=int, default=None)
    p.add_argument("--n-heads", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--amp", default=None, choices=("none", "bf16", "fp16"))
    p.add_argument("--num-threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument(
        "--trim-padding",
        default="on",
        choices=tuple(TRIM_CHOICES),
        help="batches trimmed to their longest sequence (on, the trainer's default), padded to "
        "max_len (off), or both side by side",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"1 epoch, mechanisms none,simp, synthetic data shrunk to {QUICK_SYNTHETIC}",
    )
    p.add_argument("--synthetic-users", type=int, default=None, help="users of the synthetic data set")
    p.add_argument(
        "--isolate",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run each configuration in a fresh process (default: on the CPU, where the peak RSS "
        "of one process is only meaningful for its first run; CUDA memory statistics are exact "
        "in-process)",
    )
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # MODEL,MECHANISM,BACKEND,TRIM: child of --isolate
    p.add_argument("--keep-runs", action="store_true", help="keep the run directories (printed)")
    p.add_argument("--results-dir", default=str(common.DEFAULT_RESULTS_DIR), help="where train.csv/.jsonl go")
    p.add_argument("--no-save", action="store_true", help="print only, write no results files")
    args = p.parse_args(argv)
    args.models = _names(args.models)
    for m in args.models:
        if m not in MECHANISMS:
            p.error(f"--models: unknown {m!r}; expected sasrec or stosa")
    args.mechanisms = _names(args.mechanisms) if args.mechanisms else (["none", "simp"] if args.quick else None)
    known = {m for v in MECHANISMS.values() for m in v}
    for m in args.mechanisms or []:
        if m not in known:
            p.error(f"--mechanisms: unknown {m!r}; expected some of {sorted(known)}")
    cuda = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
    default = ["reference", "eager", "triton"] if cuda else ["reference", "eager"]
    args.backends = _names(args.backends) if args.backends else default
    for b in args.backends:
        if b not in BACKEND_CHOICES:
            p.error(f"--backends: expected some of {','.join(BACKEND_CHOICES)}, got {b!r}")
    args.epochs = args.epochs or (1 if args.quick else 2)
    args.cuda = cuda
    args.isolate = (not cuda) if args.isolate is None else args.isolate
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def run_isolated(model: str, mech: str, backend: str, trim: bool, args, env: dict) -> dict:
    """run_one in a child process (same flags plus --one); its row comes back on a tagged stdout line."""
    import json
    import subprocess

    cmd = [sys.executable, str(Path(__file__).resolve()), *args.argv, "--one", f"{model},{mech},{backend},{int(trim)}"]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)  # stderr passes through
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(ROW_TAG):
            row = json.loads(line[len(ROW_TAG) :])
            row.update({k: env[k] for k in ("run_id", "date")})
            return {k: (float("nan") if v is None else v) for k, v in row.items()}
    return {
        **env,
        "model": model,
        "attention": mech,
        "backend": backend,
        "epochs": args.epochs,
        "dataset": args.data or args.dataset,
        "trim_padding": trim,
        "status": "error",
        "reason": f"the child process exited with {proc.returncode} and reported no row",
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.one:  # the child of --isolate: one configuration, the row on stdout
        import json

        model, mech, backend, trim = args.one.split(",")
        device = torch.device("cuda" if args.cuda else "cpu")
        row = run_one(model, mech, backend, bool(int(trim)), args, common.env_info(device))
        print(
            ROW_TAG + json.dumps({k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}),
            flush=True,
        )
        return 0
    device = torch.device("cuda" if args.cuda else "cpu")
    env = common.env_info(device)
    env["run_id"] = common.run_id(env)
    configs = [
        (model, mech, backend, trim)
        for model in args.models
        for mech in MECHANISMS[model]
        if args.mechanisms is None or mech in args.mechanisms
        for backend in args.backends
        for trim in TRIM_CHOICES[args.trim_padding]
    ]
    if not configs:
        print("nothing to run: the filters select no configuration", file=sys.stderr)
        return 2
    start = time.perf_counter()
    rows = []
    interrupted = None
    common.stop_on_sigterm()  # `timeout` sends SIGTERM: print and save what was measured
    for i, (model, mech, backend, trim) in enumerate(configs):
        t0 = time.perf_counter()
        if interrupted is None:
            try:
                row = (run_isolated if args.isolate else run_one)(model, mech, backend, trim, args, env)
            except common.Interrupted as exc:
                interrupted = f"interrupted ({exc}) before this run finished"
        if interrupted is not None:
            row = {
                **env,
                "model": model,
                "attention": mech,
                "backend": backend,
                "epochs": args.epochs,
                "dataset": args.data or args.dataset,
                "trim_padding": trim,
                "status": "skipped",
                "reason": interrupted,
            }
        _fill_config_columns(row)
        rows.append(row)
        state = (
            f"epoch1 {row['epoch1_s']:.2f}s, eval {row['eval_s']:.2f}s"
            if row["status"] == "ok"
            else f"{row['status']}: {row['reason']}"
        )
        print(
            f"[{i + 1}/{len(configs)}] {model}/{mech}/{backend} trim={'on' if trim else 'off'}: {state} "
            f"({time.perf_counter() - t0:.1f} s)",
            file=sys.stderr,
        )
    print_table(rows, args.cuda)
    if not args.no_save:
        csv_path, jsonl_path = common.append_results(Path(args.results_dir), "train", rows, COLUMNS)
        print(f"\n{len(rows)} rows appended to {csv_path} and {jsonl_path}")
    warning = common.contention_warning(rows)
    if warning:
        print(warning)
    errors = sum(r["status"] == "error" for r in rows)
    print(
        f"total {time.perf_counter() - start:.0f} s; {sum(r['status'] == 'ok' for r in rows)} runs, "
        f"{sum(r['status'] == 'skipped' for r in rows)} skipped, {errors} errors"
    )
    if interrupted:
        print(f"stopped early: {interrupted}")
    return 1 if errors or interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
