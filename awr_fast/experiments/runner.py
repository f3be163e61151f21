"""Run a study: each run of the grid in order, with early stopping, one row per finished run.

A run's state is read from disk every time, so a study can be stopped at any point and carried over
several sittings:

* **done**: its config hash has a row in ``runs.jsonl``: skipped;
* **finished**: its run directory has a ``final.json`` but no row yet (killed between the two): the
  row is written from final.json, nothing is trained;
* **partial**: the run directory has a ``last.pt``: :func:`awr_fast.train.train` continues it on the
  same directory (``resume``), exactly as if it had never stopped (the trainer's guarantee on the CPU);
* **todo**: anything else. Files left by a run killed before its first checkpoint (a ``metrics.jsonl``
  line without ``last.pt``) are removed and the run starts afresh.

SIGTERM is turned into :class:`Terminated` (a KeyboardInterrupt) while the runner works, so Ctrl-C and
``kill`` both stop it between two atomic checkpoint writes of the trainer: the current run stays
resumable from its last finished epoch.

:func:`estimate` prices the runs still to do from measured epoch times: finished rows and partial runs
of the same study first, then (``probe=True``) one measured epoch per kind of run, else the defaults of
:data:`DEFAULT_EPOCH_SECONDS` (measured on the project's 2-core CPU machine, ``bench/results``).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Any, TextIO

from .grid import Run, Study, dataset_label
from .store import append_row, make_row, read_rows, write_csv

__all__ = [
    "DEFAULT_EPOCH_SECONDS",
    "Estimate",
    "RunState",
    "Terminated",
    "estimate",
    "run_states",
    "run_study",
    "select_runs",
    "study_environment",
]

#: Seconds per training epoch and per validation evaluation on the project's 2-core CPU machine (torch
#: 2.14, fp32, backend auto, trimmed batches), by (data set, model): (n, layers, train s, eval s).
#: Measured at d=50, 1 head, batch 128, BCE, 2 blocks (bench/results/cpu-2026-12-02-eager-backend for
#: Beauty and ML-1M, the mean of none and simp; bench/results/train.csv for the synthetic data). Other
#: sizes are scaled linearly in n and in layers: a rough guide, which measured times replace.
DEFAULT_EPOCH_SECONDS: dict[tuple[str, str], tuple[int, int, float, float]] = {
    ("beauty", "sasrec"): (50, 2, 5.4, 5.3),
    ("beauty", "stosa"): (50, 2, 12.1, 15.3),
    ("ml-1m", "sasrec"): (200, 2, 18.7, 9.4),
    ("synthetic", "sasrec"): (50, 2, 0.9, 0.13),
    ("synthetic", "stosa"): (50, 2, 2.4, 0.52),
    # AC-SASRec at the released Beauty configuration (d 64, 4 heads, batch 256, every prefix a sample),
    # measured 2026-12-03 with one thread beside other runs: epochs 1-9 took 112-190 s, evaluations 24-51 s
    ("beauty", "acsasrec"): (50, 3, 150.0, 30.0),
}
#: Training samples with --train-prefixes over those without, per data set (Beauty: 131,413 prefixes of
#: 22,363 training rows): what the per-position SASRec/STOSA defaults are scaled by for a prefix run.
PREFIX_SAMPLE_RATIO = {"beauty": 131_413 / 22_363}
#: STOSA on a data set with only a SASRec default: SASRec's seconds times STOSA's ratio on Beauty.
_STOSA_OVER_SASREC = (12.1 / 5.4, 15.3 / 5.3)
#: The fields that decide an epoch's cost (what a timing probe measures once for all runs sharing them).
_COST_FIELDS = ("model", "max_len", "n_layers", "d_model", "n_heads", "batch_size", "loss", "num_negatives")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the runner works, like Ctrl-C."""


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """While active (main thread only), SIGTERM raises :class:`Terminated`; the old handler is restored."""
    if not _main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def study_environment(study: Study) -> Iterator[None]:
    """``AWR_FAST_DATA`` set to the study's ``data_dir`` (unless already set: the environment wins), so the
    named data sets resolve to local files; restored afterwards."""
    if study.data_dir is None or os.environ.get("AWR_FAST_DATA"):
        yield
        return
    os.environ["AWR_FAST_DATA"] = str(study.data_dir.resolve())
    try:
        yield
    finally:
        os.environ.pop("AWR_FAST_DATA", None)


# ----------------------------------------------------------------------------------------------
# where each run stands


@dataclass
class RunState:
    run: Run
    state: str  #: "done", "finished", "partial" or "todo"
    run_dir: Path
    row: dict[str, Any] | None = None
    epochs_done: int = 0
    epoch_s: list[float] | None = None  #: per-epoch train seconds so far (partial runs)
    eval_s: list[float] | None = None


def _metrics_records(run_dir: Path) -> list[dict[str, Any]]:
    from ..train import read_metrics

    return read_metrics(run_dir)


def run_states(study: Study, rows: list[dict[str, Any]] | None = None) -> list[RunState]:
    """Where every run of ``study`` stands (see the module docstring), in study order."""
    rows = read_rows(study.runs_file) if rows is None else rows
    by_hash = {row["config_hash"]: row for row in rows}
    states = []
    for run in study.runs:
        run_dir = study.run_dir(run)
        if run.config_hash in by_hash:
            states.append(RunState(run, "done", run_dir, row=by_hash[run.config_hash]))
        elif (run_dir / "final.json").is_file():
            states.append(RunState(run, "finished", run_dir))
        elif (run_dir / "last.pt").is_file():
            records = _metrics_records(run_dir)
            states.append(
                RunState(
                    run,
                    "partial",
                    run_dir,
                    epochs_done=max((int(r["epoch"]) for r in records), default=0),
                    epoch_s=[float(r["epoch_s"]) for r in records if r.get("epoch_s") is not None],
                    eval_s=[float(r["eval_s"]) for r in records if r.get("valid")],
                )
            )
        else:
            states.append(RunState(run, "todo", run_dir))
    return states


def select_runs(states: list[RunState], only: str | None) -> list[RunState]:
    """The states whose run id matches the glob ``only`` (all without one)."""
    return [s for s in states if only is None or fnmatch(s.run.run_id, only)]


# ----------------------------------------------------------------------------------------------
# running


def _say(out: TextIO, text: str) -> None:
    print(text, file=out, flush=True)


def _clear_stale(run_dir: Path) -> None:
    """Files of a run killed before its first last.pt: the trainer would refuse the folder, and nothing in
    it can be continued."""
    for name in ("metrics.jsonl", "best.pt"):
        path = run_dir / name
        if path.is_file():
            path.unlink()


def _headline(row: dict[str, Any]) -> str:
    from ..training.evaluate import metric_prefix

    ranking = (row.get("protocol") or {}).get("ranking", "full")
    key = metric_prefix(ranking) + "ndcg@10"
    value = (row.get("test") or {}).get(key)
    shown = f"{value:.4f}" if isinstance(value, (int, float)) else "-"
    return f"test {'sampled ' if ranking != 'full' else ''}NDCG@10 {shown} (best epoch {row.get('best_epoch')})"


def _finish(study: Study, state: RunState, final: dict[str, Any], out: TextIO) -> dict[str, Any]:
    row = make_row(study, state.run, final, state.run_dir)
    append_row(study.runs_file, row)
    write_csv(study.runs_file.with_suffix(".csv"), read_rows(study.runs_file))
    _save_attention(study, state, out)
    return row


def _save_attention(study: Study, state: RunState, out: TextIO) -> None:
    """The report's attention maps of this run, kept beside its metrics: checkpoints are not committed,
    so a report drawn in a later sitting (or a fresh clone) needs these instead of best.pt."""
    from ..plots import ATTENTION_FILE, attention_maps, load_trained_model, save_attention_maps

    target = state.run_dir / ATTENTION_FILE
    if target.is_file():
        return
    try:
        model, _, dataset = load_trained_model(state.run_dir)
        save_attention_maps(attention_maps(model, dataset, user=study.report.get("attention_user")), target)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:  # no checkpoint, or its data is gone
        _say(out, f"{state.run.run_id}: attention maps not saved: {type(exc).__name__}: {' '.join(str(exc).split())}")


def run_study(
    study: Study,
    *,
    only: str | None = None,
    max_runs: int | None = None,
    backend: str | None = None,
    quiet: bool = False,
    keep_going: bool = False,
    out: TextIO | None = None,
) -> dict[str, int]:
    """Run the study's runs that are not done, in study order (see the module docstring).

    Args:
        only: a glob on run ids; the other runs are left alone.
        max_runs: stop after this many runs trained (or finished from final.json) in this call.
        backend: the attention backend for every run (not part of the run's identity).
        quiet: the trainer's output off (its progress bars, epoch lines and summary); the runner's
            progress lines stay.
        keep_going: after a run fails, report it and go on with the next (default: stop).

    Returns:
        Counts: ``{"done": finished this call, "skipped": already done, "failed": ...}``.

    Raises:
        KeyboardInterrupt (:class:`Terminated` for SIGTERM): the current run stays resumable.
        Whatever :func:`awr_fast.train.train` raises, unless ``keep_going``.
    """
    from .. import train as train_module

    out = out or sys.stdout
    states = select_runs(run_states(study), only)
    total = len(study.runs)
    counts = {"done": 0, "skipped": 0, "failed": 0}
    skipped = [s for s in states if s.state == "done"]
    counts["skipped"] = len(skipped)
    if skipped:
        _say(out, f"{study.name}: {len(skipped)} of {len(states)} runs already in {study.runs_file}; skipping them")
    with terminate_as_interrupt(), study_environment(study):
        for state in states:
            if state.state == "done":
                continue
            if max_runs is not None and counts["done"] + counts["failed"] >= max_runs:
                _say(out, f"{study.name}: stopping after --max-runs {max_runs}")
                break
            tag = f"[{state.run.index}/{total}] {state.run.run_id}"
            if state.state == "finished":  # killed after final.json, before its row
                final = json.loads((state.run_dir / "final.json").read_text(encoding="utf-8"))
                row = _finish(study, state, final, out)
                counts["done"] += 1
                _say(out, f"{tag} ... finished earlier; row written from final.json, {_headline(row)}")
                continue
            overrides: dict[str, Any] = {"out": str(state.run_dir), "quiet": quiet or bool(state.run.config["quiet"])}
            if backend is not None:
                overrides["backend"] = backend
            if state.state == "partial":
                overrides["resume"] = str(state.run_dir)
                _say(out, f"{tag} ... resuming after epoch {state.epochs_done}")
            else:
                _clear_stale(state.run_dir)
                _say(out, f"{tag} ... start")
            t0 = time.perf_counter()
            try:
                config = study.train_config(state.run, **overrides)
                with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
                    final = train_module.train(config)
            except KeyboardInterrupt:
                _say(out, f"{tag} ... interrupted after {time.perf_counter() - t0:.0f} s")
                raise
            except Exception as exc:
                counts["failed"] += 1
                _say(out, f"{tag} ... failed: {type(exc).__name__}: {' '.join(str(exc).split())}")
                if not keep_going:
                    raise
                continue
            row = _finish(study, state, final, out)
            counts["done"] += 1
            _say(out, f"{tag} ... done in {time.perf_counter() - t0:.0f} s, {_headline(row)}")
    return counts


# ----------------------------------------------------------------------------------------------
# estimates


@dataclass
class Estimate:
    """What a run still costs: seconds, and how that was priced."""

    seconds: float | None
    epochs: float
    epoch_s: float | None
    eval_s: float | None
    source: str  #: where the epoch times come from
    epochs_source: str  #: where the number of epochs comes from


def _cost_key(config: dict[str, Any]) -> tuple:
    return (dataset_label(config), *(config.get(k) for k in _COST_FIELDS))


def _group_key(config: dict[str, Any]) -> str:
    from .grid import EXECUTION_FIELDS

    return json.dumps(
        {k: v for k, v in config.items() if k not in EXECUTION_FIELDS and k != "seed"}, sort_keys=True, default=list
    )


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return sum(values) / len(values) if values else None


def _default_seconds(config: dict[str, Any]) -> tuple[float, float, str] | None:
    data, model = dataset_label(config), config["model"]
    entry = DEFAULT_EPOCH_SECONDS.get((data, model))
    note = ""
    if entry is None and model == "stosa" and (data, "sasrec") in DEFAULT_EPOCH_SECONDS:
        n, layers, train_s, eval_s = DEFAULT_EPOCH_SECONDS[(data, "sasrec")]
        entry = (n, layers, train_s * _STOSA_OVER_SASREC[0], eval_s * _STOSA_OVER_SASREC[1])
        note = ", sasrec's times x STOSA/SASRec on beauty"
    if entry is None:
        return None
    n, layers, train_s, eval_s = entry
    scale = (config["max_len"] / n) * (config["n_layers"] / layers)
    if config.get("train_prefixes") and model != "acsasrec" and data in PREFIX_SAMPLE_RATIO:
        train_s *= PREFIX_SAMPLE_RATIO[data]  # the defaults were measured on one row per user
        note += f", x{PREFIX_SAMPLE_RATIO[data]:.1f} for the prefix samples"
    return train_s * scale, eval_s * scale, f"default for {data}/{model} (n={n}, {layers} layers, scaled{note})"


def probe_epoch_seconds(study: Study, run: Run, *, backend: str | None = None) -> tuple[float, float]:
    """(train s, eval s) of one epoch of ``run``, trained in a temporary folder (nothing of the study is
    touched)."""
    from .. import train as train_module

    overrides: dict[str, Any] = {"epochs": 1, "quiet": True}
    if backend is not None:
        overrides["backend"] = backend
    # SIGTERM as an exception, so that the temporary folder is removed when a probe is stopped
    with terminate_as_interrupt(), tempfile.TemporaryDirectory(prefix="awr-probe-") as tmp, study_environment(study):
        config = study.train_config(run, out=str(Path(tmp) / "run"), **overrides)
        with contextlib.redirect_stdout(io.StringIO()):
            final = train_module.train(config)
    timing = final["timing"]
    return float(timing["mean_epoch_s"]), float(timing["mean_eval_s"] or 0.0)


def estimate(
    study: Study,
    states: list[RunState],
    *,
    probe: bool = False,
    backend: str | None = None,
    out: TextIO | None = None,
) -> dict[str, Estimate]:
    """An :class:`Estimate` per run id of ``states`` that is not done (see the module docstring)."""
    out = out or sys.stdout
    all_states = run_states(study)
    rows = [s.row for s in all_states if s.row]
    measured_group: dict[str, list[tuple[float, float]]] = {}
    measured_cost: dict[tuple, list[tuple[float, float]]] = {}
    for s in all_states:
        if s.row and s.row.get("mean_epoch_s") is not None:
            pair = (float(s.row["mean_epoch_s"]), float(s.row.get("mean_eval_s") or 0.0))
        elif s.state == "partial" and s.epoch_s:
            pair = (_mean(s.epoch_s), _mean(s.eval_s or []) or 0.0)
        else:
            continue
        measured_group.setdefault(_group_key(s.run.config), []).append(pair)
        measured_cost.setdefault(_cost_key(s.run.config), []).append(pair)
    finished_epochs: dict[tuple, list[float]] = {}
    for row in rows:
        if row.get("epochs") is not None:
            key = (dataset_label(row["config"]), row["config"].get("model"))
            finished_epochs.setdefault(key, []).append(float(row["epochs"]))

    probed: dict[tuple, tuple[float, float]] = {}
    result: dict[str, Estimate] = {}
    for s in states:
        if s.state == "done":
            continue
        config = s.run.config
        if s.state == "finished":
            result[s.run.run_id] = Estimate(0.0, 0, None, None, "finished (row only)", "-")
            continue
        group, cost = measured_group.get(_group_key(config)), measured_cost.get(_cost_key(config))
        if group:
            train_s, eval_s = _mean([p[0] for p in group]), _mean([p[1] for p in group])
            source = f"measured in this study (same configuration, {_runs(len(group))})"
        elif cost:
            train_s, eval_s = _mean([p[0] for p in cost]), _mean([p[1] for p in cost])
            source = f"measured in this study (same model size and data, {_runs(len(cost))})"
        elif probe:
            key = _cost_key(config)
            if key not in probed:
                _say(out, f"probing {s.run.run_id}: one epoch ...")
                probed[key] = probe_epoch_seconds(study, s.run, backend=backend)
                _say(out, f"  {probed[key][0]:.1f} s train, {probed[key][1]:.1f} s eval")
            train_s, eval_s = probed[key]
            source = "timing probe (one epoch, this machine)"
        else:
            default = _default_seconds(config)
            if default is None:
                result[s.run.run_id] = Estimate(
                    None,
                    config["epochs"],
                    None,
                    None,
                    f"unknown (no default for {dataset_label(config)}; --probe)",
                    "-",
                )
                continue
            train_s, eval_s, source = default
        seen = finished_epochs.get((dataset_label(config), config["model"]))
        if seen:
            epochs = min(float(config["epochs"]), sum(seen) / len(seen))
            epochs_source = f"mean of the finished ones ({_runs(len(seen))})"
        else:
            epochs, epochs_source = float(config["epochs"]), "upper bound: all epochs"
        remaining = max(epochs - s.epochs_done, 0.0)
        # each remaining epoch trains and (every eval_every) evaluates on valid; then one test evaluation
        seconds = remaining * (train_s + eval_s / config["eval_every"]) + eval_s
        result[s.run.run_id] = Estimate(seconds, remaining, train_s, eval_s, source, epochs_source)
    return result


def _runs(n: int) -> str:
    return f"{n} run{'' if n == 1 else 's'}"


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def dry_run(
    study: Study,
    *,
    only: str | None = None,
    max_runs: int | None = None,
    probe: bool = False,
    backend: str | None = None,
    out: TextIO | None = None,
) -> dict[str, Any]:
    """Print the runs (done / finished / partial / todo) and the estimated time of what is left; returns
    ``{"counts": {...}, "seconds": total or None, "sources": [...]}``."""
    out = out or sys.stdout
    states = select_runs(run_states(study), only)
    pending = [s for s in states if s.state != "done"]
    if max_runs is not None:
        keep = {s.run.run_id for s in pending[:max_runs]}
        states = [s for s in states if s.state == "done" or s.run.run_id in keep]
    estimates = estimate(study, states, probe=probe, backend=backend, out=out)
    counts = {k: sum(1 for s in states if s.state == k) for k in ("done", "finished", "partial", "todo")}
    _say(
        out,
        f"study {study.name} ({study.path}): {_runs(len(states))} -> {study.out_dir}\n"
        f"  {counts['done']} done, {counts['finished']} finished (row to write), {counts['partial']} partial, "
        f"{counts['todo']} todo" + (f"; {study.duplicates} duplicate runs dropped" if study.duplicates else ""),
    )
    width = max((len(s.run.run_id) for s in states), default=10)
    total = len(study.runs)
    for s in states:
        head = f"  [{s.run.index:>{len(str(total))}}/{total}] {s.state:<8} {s.run.run_id:<{width}}"
        if s.state == "done":
            row = s.row or {}
            _say(out, f"{head}  {_headline(row)}, {format_duration(row.get('total_s'))}")
            continue
        e = estimates[s.run.run_id]
        where = f"epoch {s.epochs_done}/{s.run.config['epochs']}, " if s.state == "partial" else ""
        if e.epoch_s is None:
            _say(out, f"{head}  {where}~{format_duration(e.seconds)} ({e.source})")
        else:
            _say(
                out,
                f"{head}  {where}~{format_duration(e.seconds)} ({e.epochs:.0f} epochs x ({e.epoch_s:.1f} s train + "
                f"{e.eval_s:.1f} s eval))",
            )
    left = [estimates[s.run.run_id] for s in states if s.state != "done"]
    unknown = sum(1 for e in left if e.seconds is None)
    seconds = sum(e.seconds for e in left if e.seconds is not None)
    sources = sorted({e.source for e in left})
    epoch_sources = sorted({e.epochs_source for e in left if e.epochs_source != "-"})
    device = "this machine" if probe else "the 2-core CPU machine of bench/results unless measured here"
    _say(
        out,
        f"estimated time left: {format_duration(seconds)} for {_runs(len(left))}"
        + (f" ({unknown} without an estimate)" if unknown else "")
        + f", one after another on {device}",
    )
    if sources:
        _say(out, "  epoch times: " + "; ".join(sources))
    if epoch_sources:
        _say(out, "  epochs per run: " + "; ".join(epoch_sources))
    return {"counts": counts, "seconds": seconds if left else 0.0, "unknown": unknown, "sources": sources}
