"""Figures of training runs: ``python -m awr_fast.plots RUN_DIR [RUN_DIR ...] [--out DIR]``.

For every run (from its best.pt, or last.pt when there is no best.pt yet):

* ``attention-<model>-<attention>.png``: the last layer's attention of one test user over the last
  15 positions (like Fig. 3 of the AWRSR paper): the first-order weights A, the refined
  second-order scores B (when the model refines) and the final weights P, one row per head
  (at most 4); entries that are masked (future or padding) are left blank.

Over all the runs given:

* ``valid_ndcg5.png``: validation NDCG@5 per epoch, one line per run (Fig. 4);
* ``grad_norm.png``: global gradient norm per epoch (mean over the epoch's steps), one line per
  run (Fig. 5).

Files go to ``--out`` when given, else the per-run figure into each run directory and the
comparison figures into the first run directory. Matplotlib runs with the Agg backend.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

__all__ = [
    "ATTENTION_FILE",
    "attention_maps",
    "draw_attention",
    "load_attention_maps",
    "load_trained_model",
    "main",
    "plot_attention",
    "plot_curves",
    "plot_runs",
    "save_attention_maps",
]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _config(run_dir: Path) -> Dict[str, Any]:
    with open(run_dir / "config.json", encoding="utf-8") as f:
        return json.load(f)


def _label(run_dir: Path, cfg: Dict[str, Any]) -> str:
    return f"{cfg.get('model', '?')}/{cfg.get('attention', '?')} ({run_dir.name})"


def load_trained_model(run_dir, *, which: str = "best", dataset=None, device="cpu"):
    """(model in eval mode, TrainConfig, SeqDataset) of a run, from ``best.pt`` (``which="best"``,
    falling back to ``last.pt``) or ``last.pt``."""
    from .data import load_dataset
    from .models import build_model
    from .training.checkpoint import load_checkpoint
    from .training.config import load_config

    run_dir = Path(run_dir)
    config = load_config(run_dir)
    path = run_dir / f"{which}.pt"
    if not path.is_file():
        path = run_dir / "last.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} has no best.pt or last.pt")
    if dataset is None:
        dataset = load_dataset(
            config.data_source,
            max_len=config.max_len,
            kcore=config.kcore,
            **({"synthetic": config.synthetic} if config.synthetic else {}),
        )
    model = build_model(config.model, **config.model_kwargs(dataset.num_items))
    model.load_state_dict(load_checkpoint(path)["model"])
    return model.to(device).eval(), config, dataset


def _pick_user(dataset, last: int, user: Optional[int]) -> int:
    """Row in the test split: the given user id, else the first user with >= ``last`` items."""
    if user is not None:
        rows = np.nonzero(dataset.test_users == int(user))[0]
        if rows.size == 0:
            raise ValueError(
                f"user: expected the id of a user in the test split ({len(dataset.test_users)} users), got {user}"
            )
        return int(rows[0])
    lengths = (dataset.test_input != 0).sum(axis=1)
    long_enough = np.nonzero(lengths >= last)[0]
    return int(long_enough[0]) if long_enough.size else int(np.argmax(lengths))


ATTENTION_FILE = "attention.npz"  # a finished run's maps of one user: the report draws from it, no checkpoint needed
_CAPTIONS = {"A": "A (first-order weights)", "B": "B (refined scores)", "P": "P (final weights)"}


def attention_maps(model, dataset, *, last: int = 15, user: Optional[int] = None) -> Dict[str, Any]:
    """The last layer's A, B (if refined) and P of one test user's last ``last`` positions, as numpy:
    ``{"A": (heads, last, last), ..., "masked": (last, last) bool, "items": (last,), "user": ()}``."""
    row = _pick_user(dataset, last, user)
    seq = torch.from_numpy(np.ascontiguousarray(dataset.test_input[row : row + 1]))
    device = next(model.parameters()).device
    model.eval()
    with torch.no_grad():
        maps = model.attention_maps(seq.to(device))
    n = seq.shape[1]
    last = min(last, n)
    lo = n - last
    kpm = maps.get("key_padding_mask")
    kpm = (seq == 0) if kpm is None else kpm.cpu()
    i = torch.arange(n)
    masked = (i[None, :] > i[:, None]) | kpm[0][None, :] | kpm[0][:, None]  # future, padding key or query
    out: Dict[str, Any] = {
        name: maps[name][0, :, lo:, lo:].float().cpu().numpy() for name in ("A", "B", "P") if maps.get(name) is not None
    }
    out["masked"] = masked[lo:, lo:].numpy()
    out["items"] = seq[0, lo:].numpy()
    out["user"] = np.asarray(int(dataset.test_users[row]))
    return out


def save_attention_maps(maps: Dict[str, Any], path) -> Path:
    """Write :func:`attention_maps`'s result to ``path`` (.npz) atomically."""
    from .atomic import atomic_write_bytes

    buffer = io.BytesIO()
    np.savez_compressed(buffer, **maps)
    path = Path(path)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def load_attention_maps(path) -> Dict[str, Any]:
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def draw_attention(maps: Dict[str, Any], path, *, title: str = "", max_heads: int = 4) -> Path:
    """Heatmaps of :func:`attention_maps`'s panels, one row per head (at most ``max_heads``); masked
    entries blank; returns the PNG path."""
    plt = _pyplot()
    masked = np.asarray(maps["masked"], dtype=bool)
    last = masked.shape[0]
    panels = [(name, maps[name]) for name in ("A", "B", "P") if name in maps]
    heads = min(int(panels[0][1].shape[0]), max_heads)
    fig, axes = plt.subplots(heads, len(panels), figsize=(4.2 * len(panels), 3.8 * heads), squeeze=False)
    ticks = [str(int(it)) if it else "" for it in maps["items"]]
    for h in range(heads):
        for c, (name, value) in enumerate(panels):
            ax = axes[h][c]
            m = np.asarray(value[h], dtype=np.float32)
            data = np.ma.masked_array(m, mask=masked | ~np.isfinite(m))
            im = ax.imshow(data, cmap="viridis", interpolation="nearest")
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
            ax.set_title(f"{_CAPTIONS[name]}, head {h}" if heads > 1 else _CAPTIONS[name], fontsize=9)
            ax.set_xticks(range(last))
            ax.set_yticks(range(last))
            ax.set_xticklabels(ticks, rotation=90, fontsize=6)
            ax.set_yticklabels(ticks, fontsize=6)
            ax.set_xlabel("key (item id)", fontsize=8)
            ax.set_ylabel("query (item id)", fontsize=8)
    fig.suptitle(f"{title} user {int(maps['user'])}, last {last} positions".strip(), fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_attention(
    model, dataset, path, *, last: int = 15, user: Optional[int] = None, title: str = "", max_heads: int = 4
) -> Path:
    """Heatmaps of A, B (if refined) and P of the last layer for one test user's last ``last``
    positions; returns the PNG path."""
    maps = attention_maps(model, dataset, last=last, user=user)
    return draw_attention(maps, path, title=title, max_heads=max_heads)


def _series(run_dir: Path, key: str):
    from .train import read_metrics

    xs, ys = [], []
    for r in read_metrics(run_dir):
        if key.startswith("valid/"):
            v = (r.get("valid") or {}).get(key.split("/", 1)[1])
        else:
            v = r.get(key)
        if isinstance(v, (int, float)) and v == v:
            xs.append(r["epoch"])
            ys.append(v)
    return xs, ys


def plot_curves(run_dirs: Sequence, path, key: str, ylabel: str, title: str, *, logy: bool = False) -> Path:
    """One line per run of ``key`` ("valid/<metric>" or a metrics.jsonl field) against the epoch."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for rd in map(Path, run_dirs):
        xs, ys = _series(rd, key)
        if xs:
            ax.plot(xs, ys, marker="o" if len(xs) < 40 else None, markersize=3, label=_label(rd, _config(rd)))
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_runs(
    run_dirs: Sequence, out=None, *, last: int = 15, user: Optional[int] = None, attention: bool = True
) -> List[Path]:
    """All figures for ``run_dirs`` (see the module docstring); returns the PNG paths."""
    run_dirs = [Path(r) for r in run_dirs]
    if not run_dirs:
        raise ValueError("run_dirs: expected at least one run directory, got none")
    for rd in run_dirs:
        if not (rd / "config.json").is_file():
            raise FileNotFoundError(f"{rd} is not a run directory (no config.json)")
    out = Path(out) if out is not None else None
    written: List[Path] = []
    datasets: Dict[str, Any] = {}
    if attention:
        for rd in run_dirs:
            cfg = _config(rd)
            key = json.dumps(
                [cfg.get("data") or cfg.get("dataset"), cfg.get("max_len"), cfg.get("kcore"), cfg.get("synthetic")],
                sort_keys=True,
            )
            model, config, ds = load_trained_model(rd, dataset=datasets.get(key))
            datasets[key] = ds
            target = (out or rd) / f"attention-{config.model}-{config.attention}.png"
            if out is not None and len(run_dirs) > 1:
                target = out / f"attention-{config.model}-{config.attention}-{rd.name}.png"
            written.append(
                plot_attention(model, ds, target, last=last, user=user, title=f"{config.model}/{config.attention}")
            )
    dest = out or run_dirs[0]
    pre = ""
    cfg0 = _config(run_dirs[0])
    if cfg0.get("protocol") == "sampled100":
        pre = "sampled_"
    written.append(
        plot_curves(
            run_dirs,
            dest / "valid_ndcg5.png",
            f"valid/{pre}ndcg@5",
            f"valid {pre}NDCG@5",
            "Validation NDCG@5 per epoch",
        )
    )
    written.append(
        plot_curves(
            run_dirs,
            dest / "grad_norm.png",
            "grad_norm",
            "global gradient norm",
            "Gradient norm per epoch (mean over steps)",
        )
    )
    return written


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m awr_fast.plots",
        description="Attention heatmaps, validation NDCG@5 and gradient-norm curves of runs.",
    )
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories written by awr_fast.train")
    p.add_argument("--out", default=None, help="folder for the PNG files (default: the run directories)")
    p.add_argument("--last", type=int, default=15, help="positions shown in the attention heatmaps (default: 15)")
    p.add_argument(
        "--user",
        type=int,
        default=None,
        help="test user id for the heatmaps (default: the first with at least --last items)",
    )
    p.add_argument("--no-attention", action="store_true", help="skip the heatmaps (no model or data needed)")
    args = p.parse_args(argv)
    try:
        paths = plot_runs(args.runs, args.out, last=args.last, user=args.user, attention=not args.no_attention)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
