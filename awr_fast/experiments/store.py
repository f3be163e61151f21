"""A study's results store: ``<out>/runs.jsonl`` (one row per finished run) and ``runs.csv`` beside it.

Rows are appended one line at a time, flushed and fsynced, so a kill leaves at most one partial last
line; :func:`read_rows` skips such a line with a warning (and an append after it starts on a new
line), so a study carried across sittings never loses a finished row. ``runs.csv`` is rewritten
whole (atomically) from ``runs.jsonl`` after each append: it is a view, the JSON lines are the record.
"""

from __future__ import annotations

import csv
import datetime
import io
import json
import os
import platform
import subprocess
import sys
import warnings
from collections.abc import Iterable
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_text
from .grid import Run, Study, dataset_label

__all__ = ["RowsWarning", "append_row", "environment", "make_row", "read_rows", "write_csv"]

#: Config fields shown as their own CSV columns (the full config stays in runs.jsonl).
CSV_CONFIG_FIELDS = (
    "model",
    "attention",
    "seed",
    "n_layers",
    "max_len",
    "d_model",
    "n_heads",
    "dropout",
    "lr",
    "l2",
    "optimizer",
    "batch_size",
    "loss",
    "epochs",
    "patience",
    "protocol",
    "exclude_history",
)
#: Config fields that only one backbone has; another model's row leaves them blank (its config still holds
#: the trainer's default, which that model never reads).
MODEL_ONLY_FIELDS = {"sasrec": ("loss", "num_negatives", "layout"), "stosa": ("pvn",)}


def _not_read_by(model: str | None) -> set[str]:
    return {f for owner, fields in MODEL_ONLY_FIELDS.items() if owner != model for f in fields}


class RowsWarning(UserWarning):
    """A line of runs.jsonl that is not a complete row (skipped)."""


def read_rows(path) -> list[dict[str, Any]]:
    """The rows of a runs.jsonl; lines that are not a complete JSON row (a write cut off by a kill) are
    skipped with a :class:`RowsWarning`. A missing file has no rows."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict) or "config_hash" not in row:
            warnings.warn(
                f"{path} line {number}: expected a complete JSON row, got {line[:60]!r}"
                f"{'...' if len(line) > 60 else ''} (a write cut off by a kill?); skipped",
                RowsWarning,
                stacklevel=2,
            )
            continue
        rows.append(row)
    return rows


def append_row(path, row: dict[str, Any]) -> None:
    """Append ``row`` as one JSON line (flushed and fsynced). After a partial last line (no newline), the
    row starts on a line of its own so that it stays readable."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(row, sort_keys=True) + "\n"
    with open(path, "a+b") as f:
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                text = "\n" + text
        f.seek(0, os.SEEK_END)
        f.write(text.encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())


def _flat(prefix: str, metrics: dict[str, Any] | None) -> dict[str, Any]:
    return {f"{prefix}{k}": v for k, v in (metrics or {}).items()}


def write_csv(path, rows: Iterable[dict[str, Any]]) -> None:
    """``runs.csv``: one line per row, the main config fields, every valid/test metric and the timings."""
    flat = []
    for row in rows:
        config = row.get("config", {})
        item = {"run_id": row.get("run_id"), "config_hash": row.get("config_hash"), "date": row.get("date")}
        item["dataset"] = dataset_label(config)
        unread = _not_read_by(config.get("model"))
        item.update({k: None if k in unread else config.get(k) for k in CSV_CONFIG_FIELDS})
        for key in ("best_epoch", "epochs", "stopped_early", "mean_epoch_s", "mean_eval_s", "total_s", "device"):
            item[key] = row.get(key)
        item.update(_flat("valid_", row.get("valid")))
        item.update(_flat("test_", row.get("test")))
        item["backends_used"] = ";".join(f"{k}={v}" for k, v in (row.get("backends_used") or {}).items())
        for key in ("torch", "triton", "git_commit"):
            item[key] = row.get(key)
        flat.append(item)
    columns: list[str] = []
    for item in flat:
        columns += [c for c in item if c not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(flat)
    atomic_write_text(path, buffer.getvalue())


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@lru_cache(maxsize=1)
def environment() -> dict[str, Any]:
    """Versions, commit and machine of this process (computed once): torch, triton, python, awr_fast,
    ``git_commit`` (``+dirty`` when tracked files differ from it), the CPU and the CUDA device."""
    import torch

    commit = _git("rev-parse", "HEAD")
    if commit and _git("status", "--porcelain", "--untracked-files=no"):
        commit += "+dirty"
    return {
        "torch": torch.__version__,
        "triton": _version("triton"),
        "python": platform.python_version(),
        "awr_fast": _version("awr_fast"),
        "git_commit": commit,
        "host_cpu": _cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "platform": sys.platform,
    }


def make_row(study: Study, run: Run, final: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """The runs.jsonl row of a finished run, from its final.json and config.json (what actually ran)."""
    config_path = run_dir / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else dict(run.config)
    timing = final.get("timing") or {}
    try:
        relative = str(run_dir.relative_to(study.out_dir))
    except ValueError:
        relative = str(run_dir)
    return {
        "study": study.name,
        "run_id": run.run_id,
        "config_hash": run.config_hash,
        "config": config,
        "run_dir": relative,
        "best_epoch": final.get("best_epoch"),
        "last_epoch": final.get("last_epoch"),
        "epochs": timing.get("epochs"),
        "stopped_early": final.get("stopped_early"),
        "selection_metric": final.get("selection_metric"),
        "protocol": final.get("protocol"),
        "valid": final.get("valid"),
        "test": final.get("test"),
        "popularity": final.get("popularity"),
        "mean_epoch_s": timing.get("mean_epoch_s"),
        "mean_eval_s": timing.get("mean_eval_s"),
        "test_eval_s": timing.get("test_eval_s"),
        "total_s": timing.get("total_s"),
        "device": timing.get("device"),
        "amp": timing.get("amp"),
        "backends_used": final.get("backends_used"),
        "dataset": final.get("dataset"),
        "dataset_summary": final.get("dataset_summary"),
        "num_users": final.get("num_users"),
        "num_items": final.get("num_items"),
        "num_params": final.get("num_params"),
        **environment(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
