"""Train a sequential recommender: ``python -m awr_fast.train [flags]`` or ``train(config)``.

A run directory holds::

    config.json     the TrainConfig (resolved: what was actually run)
    metrics.jsonl   one line per epoch: epoch, step, loss, grad_norm, lr, epoch_s, eval_s,
                    skipped_steps, valid ({metric: value} or null when not evaluated), improved,
                    best_epoch
    best.pt         checkpoint at the best valid epoch (early stopping on valid --select-metric,
                    NDCG@5 by default; with --protocol sampled100 on its sampled_ key)
    last.pt         checkpoint after the last finished epoch (what --resume continues from)
    final.json      test metrics at the best epoch (best.pt), valid metrics there, the
                    popularity baseline under the same protocol, timing, and backends_used
                    (op -> the backend(s) that ran it in this train() call, e.g.
                    {"dot_refined": "eager"}; "eager+reference" when both did)
    tb/             TensorBoard events (--tensorboard, when tensorboard is installed)

Data parallel: ``torchrun --nproc_per_node=N -m awr_fast.train ...`` (nccl on GPUs, gloo on the
CPU). Each global batch is split over the ranks, evaluation is sharded and gathered, and only
rank 0 writes the run directory.

On the command line, a bad data file, a missing path or an occupied run directory is reported as
one line on stderr (``python -m awr_fast.train: error: ...``, exit status 1); :func:`train` raises.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import backends
from .training.checkpoint import atomic_write_text, load_checkpoint, make_checkpoint, save_checkpoint, set_rng_state
from .training.config import MODEL_DEFAULTS, PROG, RESUME_MUTABLE, TrainConfig, config_from_args, load_config
from .training.distributed import (
    DistInfo,
    barrier,
    broadcast_object,
    broadcast_parameters,
    cleanup,
    init_distributed,
)
from .training.evaluate import (
    SAMPLED_NEGATIVES,
    evaluate,
    evaluate_popularity,
    headline_keys,
    metric_prefix,
    selection_key,
)
from .training.loop import (
    EarlyStopping,
    LossModule,
    make_optimizer,
    make_scaler,
    progress_enabled,
    resolve_device,
    seed_epoch,
    trailing_widths,
    train_epoch,
)
from .training.sampler import make_batch_sampler

__all__ = ["default_run_dir", "main", "print_summary", "read_metrics", "train"]


def default_run_dir(config: TrainConfig) -> Path:
    """``runs/<YYYYmmdd-HHMMSS>-<model>-<attention>`` under the current directory."""
    return Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{config.model}-{config.attention}"


def read_metrics(run_dir) -> list[dict[str, Any]]:
    """The records of ``RUN_DIR/metrics.jsonl`` (an unfinished last line is ignored)."""
    path = Path(run_dir) / "metrics.jsonl"
    out: list[dict[str, Any]] = []
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


def _as_config(config: TrainConfig | Mapping[str, Any] | None, overrides: dict[str, Any]) -> TrainConfig:
    if config is None:
        config = TrainConfig()
    elif isinstance(config, Mapping):  # a model's MODEL_DEFAULTS under the fields given
        config = TrainConfig.from_dict({**MODEL_DEFAULTS.get(config.get("model", "sasrec"), {}), **config})
    if overrides:
        config = config.replace(**overrides)
    config.validate()
    return config


def _check_resume(config: TrainConfig, stored: TrainConfig, run_dir: Path) -> None:
    a, b = config.to_dict(), stored.to_dict()
    diff = [k for k in a if k not in RESUME_MUTABLE and a[k] != b.get(k)]
    if diff:
        raise ValueError(
            f"resume: expected the settings stored in {run_dir / 'config.json'} for "
            f"{', '.join(diff)} (only {', '.join(sorted(RESUME_MUTABLE))} may change), got "
            + ", ".join(f"{k}={a[k]!r} (stored {b.get(k)!r})" for k in diff)
        )


def _log(dist: DistInfo, quiet: bool, msg: str) -> None:
    if dist.is_main and not quiet:
        print(msg, flush=True)


def _fmt_metrics(m: dict[str, float] | None, keys: Sequence[str]) -> str:
    if not m:
        return "-"
    return " ".join(f"{k} {m[k]:.4f}" for k in keys if k in m)


def _fmt_backends(used: Mapping[str, str]) -> str:
    """``dot_refined=eager, w2_scores=reference`` (what :func:`awr_fast.backends.used_backends` returned)."""
    return ", ".join(f"{op}={backend}" for op, backend in used.items()) or "none (no attention op ran)"


def train(config: TrainConfig | Mapping[str, Any] | None = None, *, seq_dataset=None, **overrides) -> dict[str, Any]:
    """Train, early-stop on valid ``select_metric`` (NDCG@5 by default; ``sampled_*`` under sampled100),
    evaluate the best epoch on test; returns final.json's dict.

    Args:
        config: a :class:`~awr_fast.training.config.TrainConfig`, a dict of its fields (a model's
            ``MODEL_DEFAULTS`` fill the fields it does not give), or None (defaults); ``overrides``
            replace fields (``train(epochs=3, attention="add")``).
        seq_dataset: a ready :class:`~awr_fast.data.SeqDataset` (its ``max_len`` must equal
            ``config.max_len``); default: ``load_dataset(config.data or config.dataset, ...)``.
            Plots and other tools reload the data from the config, so prefer the config fields
            (``dataset``, ``data``, ``synthetic``) when the run is to be inspected later.

    Returns:
        The final.json content plus ``"run_dir"``; its ``"backends_used"`` is
        :func:`awr_fast.backends.used_backends` for this call (the process-wide counter is cleared at the
        start). With ``config.resume`` set, the run in that directory continues from its ``last.pt``
        (bitwise as if never interrupted, on the CPU).

    Raises:
        What loading the data raises (``DataFormatError``, ``FileNotFoundError``, ...),
        ``FileExistsError`` when ``config.out`` already holds a run, ``ValueError`` for settings
        that cannot work; :func:`main` words these as one-line CLI errors.
    """
    config = _as_config(config, overrides)
    backends.USED.clear()  # process-wide: final.json's backends_used is this call's
    owns_group = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    dist = init_distributed(config.device)
    try:
        result = _train(config, dist, seq_dataset)
    except BaseException:
        if owns_group:  # no barrier: the other ranks may never reach it
            cleanup(dist)
        raise
    if owns_group:
        barrier(dist)  # every rank done with gloo before any tears its process group down
        cleanup(dist)
    return result


# ------------------------------------------------------------------------------------------------
# the steps of a run


@dataclass
class _Data:
    """The data set and the training arrays the epochs draw batches from."""

    dataset: Any
    train_input: torch.Tensor
    train_pos: torch.Tensor
    row_widths: np.ndarray | None
    batch_sampler: Any


@dataclass
class _State:
    """The model and everything a checkpoint carries, plus where the epochs stand."""

    model: torch.nn.Module
    step_module: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    early: EarlyStopping
    num_params: int
    start_epoch: int = 1
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    sync_grads: bool = False  # gradients averaged by the loop (a model that routes gradients, no DDP)


def _train(config: TrainConfig, dist: DistInfo, dataset) -> dict[str, Any]:
    t_start = time.perf_counter()
    if config.num_threads:
        torch.set_num_threads(int(config.num_threads))
    device = resolve_device(config.device, dist)
    run_dir = _prepare_run_dir(config, dist)
    data = _load_data(config, dist, dataset, device)
    state = _build(config, device, data.dataset.num_items)
    if config.resume:
        _resume(config, dist, run_dir, state)
    if dist.distributed:
        _wrap_ddp(config, device, state, dist)
    if config.compile:  # the step module only: checkpoints keep saving the plain model's state
        state.step_module = torch.compile(state.step_module)
        if getattr(state.model, "routes_gradients", False):
            # a RoutedLoss is backpropagated in parts, keeping the graph until the last: AOTAutograd's donated
            # buffers forbid that (its backward is compiled lazily, so the switch is process-wide)
            torch._functorch.config.donated_buffer = False
    _log(
        dist,
        config.quiet,
        f"model: {config.model} attention={config.attention} d={config.d_model} "
        f"layers={config.n_layers} heads={config.n_heads} n={config.max_len} "
        f"params={state.num_params:,} device={device} world={dist.world_size} amp={config.amp}",
    )
    eval_kw = {
        "batch_size": config.eval_batch_size,
        "exclude_history": config.exclude_history,
        "protocol": config.protocol,
        "device": device,
        "sampled_seed": config.seed,
        "dist": dist,
        "trim_padding": config.trim_padding,
    }
    popularity = {split: evaluate_popularity(data.dataset, split, **eval_kw) for split in ("valid", "test")}
    _log(
        dist,
        config.quiet,
        f"popularity baseline: valid {_fmt_metrics(popularity['valid'], headline_keys(config.protocol))}",
    )
    writer = _open_tensorboard(config, dist, run_dir)
    last_epoch, stopped_early = _run_epochs(config, dist, device, run_dir, data, state, eval_kw, writer)
    barrier(dist)
    best_epoch, test, test_s = _test_best_epoch(run_dir, state.model, data.dataset, eval_kw, last_epoch)
    final = _final_record(
        config,
        dist,
        device,
        data.dataset,
        state,
        popularity=popularity,
        test=test,
        test_s=test_s,
        best_epoch=best_epoch,
        last_epoch=last_epoch,
        stopped_early=stopped_early,
        t_start=t_start,
    )
    if dist.is_main:
        _write_final(run_dir, final, writer)
        print_summary(final, run_dir)
    final["run_dir"] = str(run_dir)
    return final


def _prepare_run_dir(config: TrainConfig, dist: DistInfo) -> Path:
    """The run directory, checked (a resumed run's config must match; a new run's folder must not hold a
    run) and holding this run's config.json."""
    if config.resume:
        run_dir = Path(config.resume)
        _check_resume(config, load_config(run_dir), run_dir)
        if not (run_dir / "last.pt").is_file():
            raise FileNotFoundError(f"resume: expected a run directory with a last.pt, got {run_dir} (no last.pt)")
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
    return run_dir


def _load_data(config: TrainConfig, dist: DistInfo, dataset, device: torch.device) -> _Data:
    """The data set (loaded from the config unless given) and the training arrays, on ``device`` for CUDA."""
    if dataset is None:
        from .data import load_dataset

        dataset = load_dataset(
            config.data_source,
            max_len=config.max_len,
            kcore=config.kcore,
            **({"synthetic": config.synthetic} if config.synthetic else {}),
        )
    if dataset.max_len != config.max_len:
        raise ValueError(
            f"seq_dataset: expected max_len {config.max_len} (config.max_len), got a dataset with "
            f"max_len {dataset.max_len}"
        )
    _log(dist, config.quiet, f"data: {dataset.summary()}")
    train_input, train_pos = dataset.train_input, dataset.train_pos
    if config.train_prefixes:  # every prefix a sample, its target at the last column
        from .data import prefix_arrays

        _, train_input, train_pos = prefix_arrays(dataset.sequences, dataset.max_len)
        _log(dist, config.quiet, f"training samples: {len(train_input):,} prefixes of the training sequences")
    lengths = (train_input != 0).sum(axis=1)
    row_widths = trailing_widths(train_input, train_pos) if config.trim_padding else None
    train_input = torch.from_numpy(np.ascontiguousarray(train_input))
    train_pos = torch.from_numpy(np.ascontiguousarray(train_pos))
    if device.type == "cuda":
        train_input, train_pos = train_input.to(device), train_pos.to(device)
    batch_sampler = make_batch_sampler(
        lengths,
        config.batch_size,
        config.seed,
        length_bucketing=config.length_bucketing,
        bucket_batches=config.bucket_batches,
    )
    return _Data(dataset, train_input, train_pos, row_widths, batch_sampler)


def _build(config: TrainConfig, device: torch.device, num_items: int) -> _State:
    """Model (initialised from ``config.seed``), its :class:`LossModule`, optimiser, GradScaler and early
    stopping, fresh."""
    from .models import build_model

    random.seed(config.seed)
    np.random.seed(config.seed % (2**32))
    torch.manual_seed(config.seed)
    model = build_model(config.model, **config.model_kwargs(num_items)).to(device)
    return _State(
        model=model,
        step_module=LossModule(model),
        optimizer=make_optimizer(model, config.optimizer, config.lr, config.l2, config.betas),
        scaler=make_scaler(device, config.amp),
        early=EarlyStopping(patience=config.patience),
        num_params=sum(p.numel() for p in model.parameters()),
    )


def _resume(config: TrainConfig, dist: DistInfo, run_dir: Path, state: _State) -> None:
    """Load ``last.pt`` into ``state`` (model, optimiser, scaler, early stopping, RNG states) and keep the
    metrics.jsonl records up to its epoch."""
    ckpt = load_checkpoint(run_dir / "last.pt")
    state.model.load_state_dict(ckpt["model"])
    state.optimizer.load_state_dict(ckpt["optimizer"])
    if state.scaler is not None and ckpt.get("scaler") is not None:
        state.scaler.load_state_dict(ckpt["scaler"])
    state.early.load_state_dict(ckpt["early_stopping"])
    state.early.patience = config.patience
    set_rng_state(ckpt["rng"])
    state.start_epoch, state.step = int(ckpt["epoch"]) + 1, int(ckpt["step"])
    state.history = [r for r in read_metrics(run_dir) if int(r["epoch"]) <= int(ckpt["epoch"])]
    if dist.is_main:  # drop records of epochs after the checkpoint (a crash between the two writes)
        atomic_write_text(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in state.history))
    _log(dist, config.quiet, f"resumed {run_dir} after epoch {ckpt['epoch']} (best epoch {state.early.best_epoch})")


def _wrap_ddp(config: TrainConfig, device: torch.device, state: _State, dist: DistInfo) -> None:
    """Under torchrun: the loss module wrapped in DistributedDataParallel (after a resume, so that the
    broadcast at construction carries the resumed parameters). A model whose loss routes its parts'
    gradients into different parameters (AC-SASRec: two backward passes per step, which DDP's reducer
    does not allow) is not wrapped: rank 0's parameters are broadcast and the loop averages the gradients
    itself (the same mean DDP takes)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    if getattr(state.model, "routes_gradients", False):
        broadcast_parameters(state.model, dist)
        state.sync_grads = True
        return

    state.step_module = DDP(
        state.step_module,
        device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=config.ddp_find_unused,
    )


def _open_tensorboard(config: TrainConfig, dist: DistInfo, run_dir: Path):
    """A TensorBoard SummaryWriter on rank 0 with --tensorboard, or None (with a note when not installed)."""
    if not (config.tensorboard and dist.is_main):
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(log_dir=str(run_dir / "tb"))
    except ImportError as exc:
        print(
            f"--tensorboard: TensorBoard is not available ({exc}); install it with "
            f"`pip install tensorboard`. Continuing without it (metrics.jsonl has everything).",
            file=sys.stderr,
            flush=True,
        )
        return None


def _run_epochs(
    config: TrainConfig,
    dist: DistInfo,
    device: torch.device,
    run_dir: Path,
    data: _Data,
    state: _State,
    eval_kw: dict[str, Any],
    writer,
) -> tuple[int, bool]:
    """Epochs ``state.start_epoch ..`` until ``config.epochs`` or early stopping; each is evaluated (every
    ``eval_every``), recorded, checkpointed and logged. Returns (last epoch run, stopped early)."""
    show = progress_enabled(config.quiet, dist)
    neg_generator = torch.Generator(device=device)
    key = selection_key(config.protocol, config.select_metric)
    epoch = state.start_epoch - 1
    for next_epoch in range(state.start_epoch, config.epochs + 1):
        if state.early.should_stop:
            break
        epoch = next_epoch
        seed_epoch(config.seed, epoch, dist.rank)
        stats = train_epoch(
            state.step_module,
            state.model,
            train_input=data.train_input,
            train_pos=data.train_pos,
            batches=data.batch_sampler.batches(epoch),
            optimizer=state.optimizer,
            scaler=state.scaler,
            neg_generator=neg_generator,
            seed=config.seed,
            epoch=epoch,
            device=device,
            amp=config.amp,
            clip_grad=config.clip_grad,
            dist=dist,
            show_progress=show,
            row_widths=data.row_widths,
            sync_grads=state.sync_grads,
        )
        state.step += stats["steps"]
        valid, improved, eval_s = None, False, 0.0
        if epoch % config.eval_every == 0 or epoch == config.epochs:
            t0 = time.perf_counter()
            valid = evaluate(state.model, data.dataset, "valid", **eval_kw)
            eval_s = time.perf_counter() - t0
            improved = state.early.update(valid[key], epoch)
        record = {
            "epoch": epoch,
            "step": state.step,
            "loss": stats["loss"],
            "grad_norm": stats["grad_norm"],
            "lr": state.optimizer.param_groups[0]["lr"],
            "epoch_s": stats["seconds"],
            "eval_s": eval_s,
            "skipped_steps": stats["skipped_steps"],
            "valid": valid,
            "improved": improved,
            "best_epoch": state.early.best_epoch,
        }
        state.history.append(record)
        if dist.is_main:
            _save_epoch(config, run_dir, state, record, neg_generator, writer)
        _log(
            dist,
            config.quiet,
            f"epoch {epoch:3d} | loss {stats['loss']:.4f} | grad {stats['grad_norm']:.3f} | "
            f"valid {_fmt_metrics(valid, headline_keys(config.protocol))}"
            f"{' *' if improved else ''} | "
            f"{stats['seconds']:.1f}s train, {eval_s:.1f}s eval",
        )
        if epoch == state.start_epoch:
            _log(dist, config.quiet, f"attention backend: {_fmt_backends(backends.used_backends())}")
    return epoch, state.early.should_stop and epoch < config.epochs


def _save_epoch(
    config: TrainConfig, run_dir: Path, state: _State, record: dict[str, Any], neg_generator: torch.Generator, writer
) -> None:
    """Rank 0, after an epoch: append its metrics.jsonl record, write last.pt (and best.pt when it
    improved), log it to TensorBoard."""
    with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(_jsonable(record)) + "\n")
        f.flush()
        os.fsync(f.fileno())
    ckpt = make_checkpoint(
        epoch=record["epoch"],
        step=record["step"],
        model=state.model,
        optimizer=state.optimizer,
        scaler=state.scaler,
        negatives=neg_generator,
        early_stopping=state.early,
        config=config,
    )
    if record["improved"]:
        save_checkpoint(run_dir / "best.pt", ckpt)
    save_checkpoint(run_dir / "last.pt", ckpt)
    if writer is not None:
        epoch = record["epoch"]
        writer.add_scalar("train/loss", record["loss"], epoch)
        writer.add_scalar("train/grad_norm", record["grad_norm"], epoch)
        writer.add_scalar("time/epoch_s", record["epoch_s"], epoch)
        for k, v in (record["valid"] or {}).items():
            writer.add_scalar(f"valid/{k}", v, epoch)
        writer.flush()


def _test_best_epoch(
    run_dir: Path, model: torch.nn.Module, dataset, eval_kw: dict[str, Any], last_epoch: int
) -> tuple[int, dict[str, float], float]:
    """Load best.pt into ``model`` and evaluate it on test: (best epoch, test metrics, seconds). Without a
    best.pt (no evaluation ever improved, e.g. NaN metrics) the last state is tested."""
    best_path = run_dir / "best.pt"
    if best_path.is_file():
        best = load_checkpoint(best_path)
        model.load_state_dict(best["model"])
        best_epoch = int(best["epoch"])
    else:
        best_epoch = last_epoch
    t0 = time.perf_counter()
    test = evaluate(model, dataset, "test", **eval_kw)
    return best_epoch, test, time.perf_counter() - t0


def _final_record(
    config: TrainConfig,
    dist: DistInfo,
    device: torch.device,
    dataset,
    state: _State,
    *,
    popularity: dict[str, dict[str, float]],
    test: dict[str, float],
    test_s: float,
    best_epoch: int,
    last_epoch: int,
    stopped_early: bool,
    t_start: float,
) -> dict[str, Any]:
    """final.json's content."""
    history = state.history
    valid_best = next((r["valid"] for r in history if r["epoch"] == best_epoch and r.get("valid")), None)
    train_s = sum(r["epoch_s"] for r in history)
    eval_total = sum(r["eval_s"] for r in history)
    n_evals = sum(1 for r in history if r.get("valid"))
    return {
        "model": config.model,
        "attention": config.attention,
        "dataset": getattr(dataset, "name", ""),
        "dataset_summary": dataset.summary() if hasattr(dataset, "summary") else "",
        "num_users": int(dataset.num_users),
        "num_items": int(dataset.num_items),
        "num_params": int(state.num_params),
        "best_epoch": best_epoch,
        "last_epoch": last_epoch,
        "stopped_early": bool(stopped_early),
        "selection_metric": f"valid {selection_key(config.protocol, config.select_metric)}",
        "protocol": {
            "ranking": config.protocol,
            "exclude_history": config.exclude_history,
            **({"sampled_negatives": SAMPLED_NEGATIVES} if config.protocol == "sampled100" else {}),
        },
        "valid": valid_best,
        "test": test,
        "popularity": popularity,
        "timing": {
            "total_s": sum(r["epoch_s"] + r["eval_s"] for r in history) + test_s,
            "this_session_s": time.perf_counter() - t_start,
            "train_s": train_s,
            "eval_s": eval_total,
            "mean_epoch_s": train_s / len(history) if history else None,
            "mean_eval_s": eval_total / n_evals if n_evals else None,
            "test_eval_s": test_s,
            "epochs": len(history),
            "device": str(device),
            "world_size": dist.world_size,
            "amp": config.amp,
        },
        "backends_used": backends.used_backends(),
    }


def _write_final(run_dir: Path, final: dict[str, Any], writer) -> None:
    """Rank 0: final.json, and the test metrics to TensorBoard (then closed)."""
    atomic_write_text(run_dir / "final.json", json.dumps(_jsonable(final), indent=2) + "\n")
    if writer is not None:
        for k, v in final["test"].items():
            writer.add_scalar(f"test/{k}", v, final["best_epoch"])
        writer.close()


def print_summary(final: dict[str, Any], run_dir=None, file=None) -> None:
    """The end-of-run table: model, best epoch, valid/test NDCG@10 and Recall@10 (the sampled-100 ones
    under that protocol), the popularity baseline's beside them, the timing and the attention backends."""
    file = file or sys.stdout
    pre = metric_prefix(final["protocol"]["ranking"])
    label = "sampled-100" if pre else "full ranking"
    if final["protocol"].get("exclude_history"):
        label += ", history excluded"
    valid, test = final.get("valid") or {}, final.get("test") or {}
    pv, pt = final["popularity"]["valid"], final["popularity"]["test"]

    def f(d, k):
        v = d.get(pre + k)
        return f"{v:.4f}" if isinstance(v, (int, float)) and not math.isnan(v) else "-"

    rows = [
        ("", "model", "best epoch", "NDCG@10", "Recall@10", "popularity NDCG@10", "popularity Recall@10"),
        (
            "valid",
            f"{final['model']}/{final['attention']}",
            str(final["best_epoch"]),
            f(valid, "ndcg@10"),
            f(valid, "recall@10"),
            f(pv, "ndcg@10"),
            f(pv, "recall@10"),
        ),
        ("test", "", "", f(test, "ndcg@10"), f(test, "recall@10"), f(pt, "ndcg@10"), f(pt, "recall@10")),
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print(f"\nresults ({label}; test at the best valid epoch){' - ' + str(run_dir) if run_dir else ''}", file=file)
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip(), file=file)
    t = final.get("timing", {})
    if t.get("mean_epoch_s") is not None:
        print(
            f"time: {t['epochs']} epoch{'s' if t['epochs'] != 1 else ''}, {t['mean_epoch_s']:.2f}s/epoch train, "
            f"{(t.get('mean_eval_s') or 0):.2f}s/eval, total {t['total_s']:.1f}s on {t['device']}",
            file=file,
        )
    if "backends_used" in final:  # absent from final.json files written before it was recorded
        print(f"attention backend: {_fmt_backends(final['backends_used'])}", file=file)
    file.flush()


def _user_errors() -> tuple[type, ...]:
    """The exceptions of :func:`train` that are about its input (data, paths, run directory, an explicit
    backend that cannot run), which :func:`main` reports as one line instead of a traceback."""
    from .backends import UnsupportedInputError
    from .data.dataset import DatasetUnavailableError
    from .data.readers import DataFormatError

    return (DataFormatError, DatasetUnavailableError, FileNotFoundError, FileExistsError, UnsupportedInputError)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: 0 on success; flag errors exit 2 (argparse), input errors print
    ``python -m awr_fast.train: error: <message>`` on stderr and return 1."""
    config = config_from_args(argv)
    try:
        train(config)
    except _user_errors() as exc:
        message = " ".join(str(exc).splitlines()) or type(exc).__name__
        print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
