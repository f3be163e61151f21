"""Train a sequential recommender: ``python -m awr_fast.train [flags]`` or ``train(config)``.

A run directory holds::

    config.json     the TrainConfig (resolved: what was actually run)
    metrics.jsonl   one line per epoch: epoch, step, loss, grad_norm, lr, epoch_s, eval_s,
                    skipped_steps, valid ({metric: value} or null when not evaluated), improved
    best.pt         checkpoint at the best valid epoch (early stopping on valid NDCG@5)
    last.pt         checkpoint after the last finished epoch (what --resume continues from)
    final.json      test metrics at the best epoch (best.pt), valid metrics there, the
                    popularity baseline under the same protocol, timing
    tb/             TensorBoard events (--tensorboard, when tensorboard is installed)

Data parallel: ``torchrun --nproc_per_node=N -m awr_fast.train ...`` (nccl on GPUs, gloo on the
CPU). Each global batch is split over the ranks, evaluation is sharded and gathered, and only
rank 0 writes the run directory.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from .training.checkpoint import (CHECKPOINT_FORMAT, atomic_write_text, get_rng_state, load_checkpoint,
                                  save_checkpoint, set_rng_state)
from .training.config import RESUME_MUTABLE, TrainConfig, config_from_args, load_config
from .training.distributed import DistInfo, barrier, broadcast_object, cleanup, init_distributed
from .training.evaluate import SAMPLED_NEGATIVES, evaluate, evaluate_popularity, selection_key
from .training.loop import (EarlyStopping, LossModule, make_optimizer, make_scaler, progress_enabled,
                            resolve_device, seed_epoch, trailing_widths, train_epoch)
from .training.sampler import make_batch_sampler

__all__ = ["default_run_dir", "main", "print_summary", "read_metrics", "train"]

ModelBuilder = Callable[..., torch.nn.Module]


def default_run_dir(config: TrainConfig) -> Path:
    """``runs/<YYYYmmdd-HHMMSS>-<model>-<attention>`` under the current directory."""
    return Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{config.model}-{config.attention}"


def read_metrics(run_dir) -> List[Dict[str, Any]]:
    """The records of ``RUN_DIR/metrics.jsonl`` (an unfinished last line is ignored)."""
    path = Path(run_dir) / "metrics.jsonl"
    out: List[Dict[str, Any]] = []
    if not path.is_file():
        return out
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return out


def _jsonable(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else (1e308 if x > 0 else -1e308)
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def _default_builder(name: str, **kwargs) -> torch.nn.Module:
    from .models import build_model

    return build_model(name, **kwargs)


def _as_config(config: Union[TrainConfig, Mapping[str, Any], None], overrides: Dict[str, Any]) -> TrainConfig:
    if config is None:
        config = TrainConfig()
    elif isinstance(config, Mapping):
        config = TrainConfig.from_dict(dict(config))
    if overrides:
        config = config.replace(**overrides)
    config.validate()
    return config


def _check_resume(config: TrainConfig, stored: TrainConfig) -> None:
    a, b = config.to_dict(), stored.to_dict()
    diff = [k for k in a if k not in RESUME_MUTABLE and a[k] != b.get(k)]
    if diff:
        raise ValueError(f"resume: settings differ from the stored run and cannot change: {diff}")


def _log(dist: DistInfo, quiet: bool, msg: str) -> None:
    if dist.is_main and not quiet:
        print(msg, flush=True)


def _fmt_metrics(m: Optional[Dict[str, float]], keys=("ndcg@5", "ndcg@10", "recall@10")) -> str:
    if not m:
        return "-"
    return " ".join(f"{k} {m[k]:.4f}" for k in keys if k in m)


def train(config: Union[TrainConfig, Mapping[str, Any], None] = None, *, seq_dataset=None,
          model_builder: Optional[ModelBuilder] = None, **overrides) -> Dict[str, Any]:
    """Train, early-stop on valid NDCG@5, evaluate the best epoch on test; returns final.json's dict.

    Args:
        config: a :class:`~awr_fast.training.config.TrainConfig`, a dict of its fields, or None
            (defaults); ``overrides`` replace fields (``train(epochs=3, attention="add")``).
        seq_dataset: a ready :class:`~awr_fast.data.SeqDataset` (its ``max_len`` must equal
            ``config.max_len``); default: ``load_dataset(config.data or config.dataset, ...)``.
            Plots and other tools reload the data from the config, so prefer the config fields
            (``dataset``, ``data``, ``synthetic``) when the run is to be inspected later.
        model_builder: ``builder(name, **config.model_kwargs(num_items)) -> model``; default
            :func:`awr_fast.models.build_model`.

    Returns:
        The final.json content plus ``"run_dir"``. With ``config.resume`` set, the run in that
        directory continues from its ``last.pt`` (bitwise as if never interrupted, on the CPU).
    """
    config = _as_config(config, overrides)
    owns_group = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    dist = init_distributed(config.device)
    try:
        return _train(config, dist, seq_dataset, model_builder or _default_builder)
    finally:
        if owns_group:
            cleanup(dist)


def _train(config: TrainConfig, dist: DistInfo, dataset, builder: ModelBuilder) -> Dict[str, Any]:
    t_start = time.perf_counter()
    if config.num_threads:
        torch.set_num_threads(int(config.num_threads))
    device = resolve_device(config.device, dist)
    quiet = config.quiet

    # ---- run directory
    if config.resume:
        run_dir = Path(config.resume)
        stored = load_config(run_dir)
        _check_resume(config, stored)
        if not (run_dir / "last.pt").is_file():
            raise FileNotFoundError(f"--resume {run_dir}: no last.pt there")
    else:
        run_dir = Path(config.out) if config.out else default_run_dir(config)
        run_dir = Path(broadcast_object(str(run_dir), dist))
        problem = None
        if dist.is_main:
            if (run_dir / "metrics.jsonl").exists() or (run_dir / "last.pt").exists():
                problem = f"{run_dir} already holds a run; use --resume {run_dir} or another --out"
            else:
                run_dir.mkdir(parents=True, exist_ok=True)
        problem = broadcast_object(problem, dist)  # every rank stops, not only rank 0
        if problem:
            raise FileExistsError(problem)
    if dist.is_main:
        atomic_write_text(run_dir / "config.json", json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n")

    # ---- data
    if dataset is None:
        from .data import load_dataset

        dataset = load_dataset(config.data_source, max_len=config.max_len, kcore=config.kcore,
                               **({"synthetic": config.synthetic} if config.synthetic else {}))
    if dataset.max_len != config.max_len:
        raise ValueError(f"dataset max_len {dataset.max_len} != config.max_len {config.max_len}")
    _log(dist, quiet, f"data: {dataset.summary()}")
    on_device = device.type == "cuda"
    train_input = torch.from_numpy(np.ascontiguousarray(dataset.train_input))
    train_pos = torch.from_numpy(np.ascontiguousarray(dataset.train_pos))
    lengths = (dataset.train_input != 0).sum(axis=1)
    row_widths = trailing_widths(dataset.train_input, dataset.train_pos) if config.trim_padding else None
    if on_device:
        train_input, train_pos = train_input.to(device), train_pos.to(device)
    batch_sampler = make_batch_sampler(lengths, config.batch_size, config.seed,
                                       length_bucketing=config.length_bucketing, bucket_batches=config.bucket_batches)

    # ---- model, optimiser
    random.seed(config.seed)
    np.random.seed(config.seed % (2 ** 32))
    torch.manual_seed(config.seed)
    model = builder(config.model, **config.model_kwargs(dataset.num_items)).to(device)
    num_params = sum(p.numel() for p in model.parameters())
    optimizer = make_optimizer(model, config.optimizer, config.lr, config.l2, config.betas)
    scaler = make_scaler(device, config.amp)
    early = EarlyStopping(patience=config.patience)
    start_epoch, step = 1, 0
    history: List[Dict[str, Any]] = []
    if config.resume:
        ckpt = load_checkpoint(run_dir / "last.pt")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if scaler is not None and ckpt.get("scaler") is not None:
            scaler.load_state_dict(ckpt["scaler"])
        early.load_state_dict(ckpt["early_stopping"])
        early.patience = config.patience
        set_rng_state(ckpt["rng"])
        start_epoch, step = int(ckpt["epoch"]) + 1, int(ckpt["step"])
        history = [r for r in read_metrics(run_dir) if int(r["epoch"]) <= int(ckpt["epoch"])]
        if dist.is_main:  # drop records of epochs after the checkpoint (a crash between the two writes)
            atomic_write_text(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))
        _log(dist, quiet, f"resumed {run_dir} after epoch {ckpt['epoch']} (best epoch {early.best_epoch})")
    step_module: torch.nn.Module = LossModule(model)
    if dist.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        step_module = DDP(step_module, device_ids=[device.index] if device.type == "cuda" else None,
                          find_unused_parameters=config.ddp_find_unused)
    _log(dist, quiet, f"model: {config.model} attention={config.attention} d={config.d_model} "
                      f"layers={config.n_layers} heads={config.n_heads} n={config.max_len} "
                      f"params={num_params:,} device={device} world={dist.world_size} amp={config.amp}")

    eval_kw = dict(batch_size=config.eval_batch_size, exclude_history=config.exclude_history,
                   protocol=config.protocol, device=device, sampled_seed=config.seed, dist=dist,
                   trim_padding=config.trim_padding)
    key = selection_key(config.protocol)
    popularity = {split: evaluate_popularity(dataset, split, **eval_kw) for split in ("valid", "test")}
    _log(dist, quiet, f"popularity baseline: valid {_fmt_metrics(popularity['valid'])}")

    writer = None
    if config.tensorboard and dist.is_main:
        try:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(log_dir=str(run_dir / "tb"))
        except ImportError as exc:
            print(f"--tensorboard: TensorBoard is not available ({exc}); install it with "
                  f"`pip install tensorboard`. Continuing without it (metrics.jsonl has everything).",
                  file=sys.stderr, flush=True)

    # ---- epochs
    show = progress_enabled(quiet, dist)
    neg_generator = torch.Generator(device=device)
    epoch = start_epoch - 1
    for next_epoch in range(start_epoch, config.epochs + 1):
        if early.should_stop:
            break
        epoch = next_epoch
        seed_epoch(config.seed, epoch, dist.rank)
        batches = batch_sampler.batches(epoch)
        stats = train_epoch(step_module, model, train_input=train_input, train_pos=train_pos, batches=batches,
                            optimizer=optimizer, scaler=scaler, neg_generator=neg_generator,
                            seed=config.seed, epoch=epoch, device=device, amp=config.amp,
                            clip_grad=config.clip_grad, dist=dist, show_progress=show, row_widths=row_widths)
        step += stats["steps"]
        valid, improved, eval_s = None, False, 0.0
        if epoch % config.eval_every == 0 or epoch == config.epochs:
            t0 = time.perf_counter()
            valid = evaluate(model, dataset, "valid", **eval_kw)
            eval_s = time.perf_counter() - t0
            improved = early.update(valid[key], epoch)
        record = {"epoch": epoch, "step": step, "loss": stats["loss"], "grad_norm": stats["grad_norm"],
                  "lr": optimizer.param_groups[0]["lr"], "epoch_s": stats["seconds"], "eval_s": eval_s,
                  "skipped_steps": stats["skipped_steps"], "valid": valid, "improved": improved,
                  "best_epoch": early.best_epoch}
        history.append(record)
        if dist.is_main:
            with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(_jsonable(record)) + "\n")
                f.flush()
                os.fsync(f.fileno())
            ckpt = {"format": CHECKPOINT_FORMAT, "epoch": epoch, "step": step, "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler else None,
                    "rng": get_rng_state(neg_generator), "early_stopping": early.state_dict(),
                    "config": config.to_dict()}
            if improved:
                save_checkpoint(run_dir / "best.pt", ckpt)
            save_checkpoint(run_dir / "last.pt", ckpt)
            if writer is not None:
                writer.add_scalar("train/loss", stats["loss"], epoch)
                writer.add_scalar("train/grad_norm", stats["grad_norm"], epoch)
                writer.add_scalar("time/epoch_s", stats["seconds"], epoch)
                for k, v in (valid or {}).items():
                    writer.add_scalar(f"valid/{k}", v, epoch)
                writer.flush()
        _log(dist, quiet, f"epoch {epoch:3d} | loss {stats['loss']:.4f} | grad {stats['grad_norm']:.3f} | "
                          f"valid {_fmt_metrics(valid)}{' *' if improved else ''} | "
                          f"{stats['seconds']:.1f}s train, {eval_s:.1f}s eval")
    stopped_early = early.should_stop and epoch < config.epochs
    barrier(dist)

    # ---- test at the best epoch
    best_path = run_dir / "best.pt"
    if best_path.is_file():
        best = load_checkpoint(best_path)
        model.load_state_dict(best["model"])
        best_epoch = int(best["epoch"])
    else:  # no evaluation ever improved (e.g. NaN metrics): report the last state
        best_epoch = epoch
    t0 = time.perf_counter()
    test = evaluate(model, dataset, "test", **eval_kw)
    test_s = time.perf_counter() - t0
    valid_best = next((r["valid"] for r in history if r["epoch"] == best_epoch and r.get("valid")), None)
    epochs_done = history
    train_s = sum(r["epoch_s"] for r in epochs_done)
    eval_total = sum(r["eval_s"] for r in epochs_done)
    n_evals = sum(1 for r in epochs_done if r.get("valid"))
    final = {
        "model": config.model, "attention": config.attention, "dataset": getattr(dataset, "name", ""),
        "dataset_summary": dataset.summary() if hasattr(dataset, "summary") else "",
        "num_users": int(dataset.num_users), "num_items": int(dataset.num_items), "num_params": int(num_params),
        "best_epoch": best_epoch, "last_epoch": epoch, "stopped_early": bool(stopped_early),
        "selection_metric": f"valid {key}",
        "protocol": {"ranking": config.protocol, "exclude_history": config.exclude_history,
                     **({"sampled_negatives": SAMPLED_NEGATIVES} if config.protocol == "sampled100" else {})},
        "valid": valid_best, "test": test, "popularity": popularity,
        "timing": {"total_s": sum(r["epoch_s"] + r["eval_s"] for r in epochs_done) + test_s,
                   "this_session_s": time.perf_counter() - t_start,
                   "train_s": train_s, "eval_s": eval_total,
                   "mean_epoch_s": train_s / len(epochs_done) if epochs_done else None,
                   "mean_eval_s": eval_total / n_evals if n_evals else None, "test_eval_s": test_s,
                   "epochs": len(epochs_done), "device": str(device), "world_size": dist.world_size,
                   "amp": config.amp},
    }
    if dist.is_main:
        atomic_write_text(run_dir / "final.json", json.dumps(_jsonable(final), indent=2) + "\n")
        if writer is not None:
            for k, v in test.items():
                writer.add_scalar(f"test/{k}", v, best_epoch)
            writer.close()
        print_summary(final, run_dir)
    final["run_dir"] = str(run_dir)
    return final


def print_summary(final: Dict[str, Any], run_dir=None, file=None) -> None:
    """The end-of-run table: model, best epoch, valid/test NDCG@10 and Recall@10, and the
    popularity baseline's NDCG@10 beside them."""
    file = file or sys.stdout
    pre = "sampled_" if final["protocol"]["ranking"] == "sampled100" else ""
    label = "sampled-100" if pre else "full ranking"
    if final["protocol"].get("exclude_history"):
        label += ", history excluded"
    valid, test = final.get("valid") or {}, final.get("test") or {}
    pv, pt = final["popularity"]["valid"], final["popularity"]["test"]

    def f(d, k):
        v = d.get(pre + k)
        return f"{v:.4f}" if isinstance(v, (int, float)) and v == v else "-"

    rows = [("", "model", "best epoch", "NDCG@10", "Recall@10", "popularity NDCG@10", "popularity Recall@10"),
            ("valid", f"{final['model']}/{final['attention']}", str(final["best_epoch"]), f(valid, "ndcg@10"),
             f(valid, "recall@10"), f(pv, "ndcg@10"), f(pv, "recall@10")),
            ("test", "", "", f(test, "ndcg@10"), f(test, "recall@10"), f(pt, "ndcg@10"), f(pt, "recall@10"))]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print(f"\nresults ({label}; test at the best valid epoch){' - ' + str(run_dir) if run_dir else ''}", file=file)
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip(), file=file)
    t = final.get("timing", {})
    if t.get("mean_epoch_s") is not None:
        print(f"time: {t['epochs']} epochs, {t['mean_epoch_s']:.2f}s/epoch train, "
              f"{(t.get('mean_eval_s') or 0):.2f}s/eval, total {t['total_s']:.1f}s on {t['device']}", file=file)
    file.flush()


def main(argv: Optional[Sequence[str]] = None) -> int:
    config = config_from_args(argv)
    train(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
