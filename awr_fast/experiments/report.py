"""The report of a study: ``docs/results/<study>.md``, ``<study>.json`` (every row) and figures.

Runs are put in tables by (data set, model). Within a table, a *configuration* is everything but the
seed; the fields that differ between the table's runs (``n_layers`` in a layers study, ``loss`` in
the baseline check) become columns, and every other field is stated once in the table's protocol
line. For each configuration:

* the mean ± sample standard deviation over seeds of the test metrics (``[report] metrics`` of the
  grid; ``hr@k`` is read as ``recall@k``, the same number with one target per user), the number of
  seeds, and the relative change of the mean against the baseline mechanism (``none``) at the same
  configuration;
* a paired t-test against the baseline across the seeds both have (two-sided; the p-value as it
  comes, with the number of seeds it rests on, "n/a (1 seed)" below two);
* mean seconds per training epoch and the ratio to the baseline's;
* the published numbers of ``paper_numbers.toml`` whose ``match`` fits the configuration, with the
  protocol fields where the source differs from ours (or does not say).

Figures (``docs/results/<study>/``): the valid selection metric per epoch, one line per run, coloured by
mechanism (the AWRSR paper's Fig. 4); the global gradient norm per epoch (Fig. 5, from metrics.jsonl);
the last layer's attention maps A, B, P of one test user for the baseline and each refined mechanism
at one configuration and seed (Fig. 3, :func:`awr_fast.plots.plot_attention`, which needs the run's
best.pt and its data). Runs that have not finished are listed as missing cells; nothing is
extrapolated.
"""

from __future__ import annotations

import datetime
import json
import math
import sys
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from .grid import EXECUTION_FIELDS, GridError, Study, dataset_label
from .runner import RunState, run_states, study_environment
from .stats import mean_std, paired_t_test
from .store import MODEL_ONLY_FIELDS, read_rows

__all__ = ["build_report", "load_paper_numbers", "metric_key", "metric_name"]

PAPER_NUMBERS_FILE = "paper_numbers.toml"
#: Protocol fields stated for every table, in this order (TrainConfig names).
PROTOCOL_FIELDS = (
    "max_len",
    "d_model",
    "n_heads",
    "n_layers",
    "lr",
    "dropout",
    "l2",
    "optimizer",
    "batch_size",
    "loss",
    "num_negatives",
    "layout",
    "pvn",
    "protocol",
    "exclude_history",
    "kcore",
    "epochs",
    "eval_every",
    "patience",
)
_LABELS = {
    "max_len": "n",
    "d_model": "d",
    "n_heads": "heads",
    "n_layers": "layers",
    "l2": "L2",
    "batch_size": "batch",
    "num_negatives": "negatives",
    "exclude_history": "history excluded",
    "epochs": "max epochs",
    "protocol": "ranking",
    "eval_every": "eval every",
    "kcore": "k-core",
}
#: Paper-protocol keys that are not TrainConfig fields but are shown as given.
_PAPER_TEXT_KEYS = ("dataset_version", "early_stopping", "note")
#: The protocol fields a published number is checked against ours on (named when the source is silent).
_PAPER_CHECKED = ("max_len", "d_model", "n_heads", "n_layers", "lr", "dropout", "l2", "protocol", "exclude_history")


def metric_key(name: str) -> str:
    """A report metric name as final.json keys it: lower case, ``hr@k`` -> ``recall@k`` (one target per
    user: the hit rate is the recall)."""
    name = name.strip().lower()
    return "recall@" + name[3:] if name.startswith("hr@") else name


def metric_name(key: str) -> str:
    """``recall@5`` -> ``Recall@5``, ``ndcg@10`` -> ``NDCG@10``, ``mrr`` -> ``MRR``."""
    base, _, k = key.partition("@")
    shown = {"recall": "Recall", "ndcg": "NDCG", "mrr": "MRR"}.get(base, base)
    return f"{shown}@{k}" if k else shown


def _fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.{digits}f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:+.1f} %"


def _value_text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return "default" if value is None else str(value)


def _same(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=list)


def _resolved(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with the defaults the model fills in made explicit (SASRec's negatives per position), so
    that the protocol line and the comparison with a paper say 1, not "default"."""
    from ..models.sasrec import DEFAULT_SAMPLED_CE_NEGATIVES

    out = dict(config)
    if config.get("model") == "sasrec" and config.get("num_negatives") is None:
        out["num_negatives"] = {"bce": 1, "sampled_ce": DEFAULT_SAMPLED_CE_NEGATIVES}.get(config.get("loss"), "none")
    return out


# ----------------------------------------------------------------------------------------------
# paper numbers


def load_paper_numbers(path) -> list[dict[str, Any]]:
    """The ``[[paper]]`` entries of a paper-numbers file: ``source``, ``short``, ``match`` (config fields;
    ``dataset`` is matched against the data set's short name), ``protocol``, ``metrics``. A missing file
    has none."""
    path = Path(path)
    if not path.is_file():
        return []
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise GridError(f"{path}: not valid TOML: {exc}") from None
    entries = data.get("paper", [])
    for i, entry in enumerate(entries, 1):
        for key in ("source", "match"):
            if key not in entry:
                raise GridError(f"{path}: [[paper]] #{i}: {key}: expected a value, got none")
        entry.setdefault("short", entry["source"])
        entry["metrics"] = {metric_key(k): float(v) for k, v in entry.get("metrics", {}).items()}
        entry.setdefault("protocol", {})
    return entries


def _matches(entry: dict[str, Any], config: dict[str, Any]) -> bool:
    for key, want in entry["match"].items():
        have = dataset_label(config) if key == "dataset" else config.get(key)
        if _same(have) != _same(want):
            return False
    return True


def _protocol_differences(entry: dict[str, Any], ours: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(fields where the source differs from ours, our protocol fields the source does not state)."""
    theirs = entry["protocol"]
    different = [
        f"{_LABELS.get(k, k)} {_value_text(v)} (ours {_value_text(ours.get(k))})"
        for k, v in theirs.items()
        if k not in _PAPER_TEXT_KEYS and k in ours and _same(v) != _same(ours.get(k))
    ]
    unstated = [_LABELS.get(k, k) for k in _PAPER_CHECKED if k not in theirs]
    return different, unstated


# ----------------------------------------------------------------------------------------------
# tables


@dataclass
class Group:
    """One configuration (all seeds) of a table."""

    label: tuple  #: the values of the table's varying fields
    attention: str
    states: list[RunState] = field(default_factory=list)

    @property
    def rows(self) -> list[dict[str, Any]]:
        return [s.row for s in self.states if s.row]

    @property
    def config(self) -> dict[str, Any]:
        return self.states[0].run.config

    def values(self, key: str) -> dict[int, float]:
        """seed -> test metric ``key`` over the finished runs."""
        out = {}
        for row in self.rows:
            value = (row.get("test") or {}).get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                out[int(row["config"]["seed"])] = float(value)
        return out

    def mean_epoch_s(self) -> float | None:
        times = [r["mean_epoch_s"] for r in self.rows if r.get("mean_epoch_s") is not None]
        return sum(times) / len(times) if times else None

    def mean_eval_s(self) -> float | None:
        times = [r["mean_eval_s"] for r in self.rows if r.get("mean_eval_s") is not None]
        return sum(times) / len(times) if times else None


@dataclass
class Table:
    dataset: str
    model: str
    states: list[RunState]
    varying: list[str] = field(default_factory=list)
    groups: list[Group] = field(default_factory=list)

    @property
    def slug(self) -> str:
        return f"{self.dataset}-{self.model}"


def _tables(states: list[RunState]) -> list[Table]:
    tables: dict[tuple[str, str], Table] = {}
    for s in states:
        key = (dataset_label(s.run.config), s.run.config["model"])
        tables.setdefault(key, Table(key[0], key[1], []))
        tables[key].states.append(s)
    for table in tables.values():
        fields = [k for k in table.states[0].run.config if k not in EXECUTION_FIELDS and k not in ("seed", "attention")]
        resolved = [_resolved(s.run.config) for s in table.states]
        table.varying = [k for k in fields if len({_same(c.get(k)) for c in resolved}) > 1]
        groups: dict[tuple, Group] = {}
        for s, config in zip(table.states, resolved):
            label = tuple(_same(config.get(k)) for k in table.varying)
            key = (label, s.run.config["attention"])
            groups.setdefault(key, Group(label, s.run.config["attention"]))
            groups[key].states.append(s)
        table.groups = list(groups.values())
    return list(tables.values())


def _protocol(table: Table) -> dict[str, Any]:
    """The table's protocol: every PROTOCOL_FIELDS value (``"varies"`` for the varying ones), the seeds,
    the data set's size and the early-stopping metric (as the trainer recorded it)."""
    first = _resolved(table.states[0].run.config)
    other = [f for model, fields in MODEL_ONLY_FIELDS.items() if model != table.model for f in fields]
    proto: dict[str, Any] = {
        k: ("varies" if k in table.varying else first.get(k)) for k in PROTOCOL_FIELDS if k not in other
    }
    proto["seeds"] = sorted({s.run.seed for s in table.states})
    rows = [s.row for s in table.states if s.row]
    proto["selection_metric"] = sorted({r.get("selection_metric") for r in rows if r.get("selection_metric")})
    if not proto["selection_metric"]:
        from ..training.evaluate import selection_key

        key = selection_key(first["protocol"], first.get("select_metric", "ndcg@5"))
        proto["selection_metric"] = [f"valid {key} (the trainer's rule; no run finished)"]
    summaries = sorted({r.get("dataset_summary") for r in rows if r.get("dataset_summary")})
    proto["dataset"] = table.dataset
    proto["dataset_summary"] = summaries
    return proto


def _protocol_line(proto: dict[str, Any]) -> str:
    parts = [
        f"data {proto['dataset']}" + (f" ({'; '.join(proto['dataset_summary'])})" if proto["dataset_summary"] else "")
    ]
    for k in (k for k in PROTOCOL_FIELDS if k in proto and k != "patience"):  # patience: with early stopping
        value = proto[k]
        if k == "protocol":
            value = {"full": "full (all items)", "sampled100": "sampled (target + 100 negatives)"}.get(value, value)
        parts.append(f"{_LABELS.get(k, k)} {_value_text(value)}")
    parts.append(f"seeds {', '.join(map(str, proto['seeds']))}")
    parts.append(f"early stopping on {', '.join(proto['selection_metric'])}, patience {_value_text(proto['patience'])}")
    parts.append("test metrics at the best valid epoch")
    return "Protocol: " + "; ".join(parts) + "."


def _metric_keys(study: Study, table: Table) -> list[str]:
    from ..training.evaluate import metric_prefix

    prefix = metric_prefix(table.states[0].run.config["protocol"])
    return [prefix + metric_key(m) for m in study.report["metrics"]]


def _metric_headers(study: Study, table: Table) -> list[str]:
    """Column names as the grid wrote them: ``HR@10`` stays HR@10 (its value is Recall@10's)."""
    sampled = table.states[0].run.config["protocol"] != "full"
    names = [
        m.strip().upper() if m.strip().lower().startswith("hr@") else metric_name(m.lower())
        for m in study.report["metrics"]
    ]
    return [("sampled " if sampled else "") + n for n in names]


def _label_cells(table: Table, group: Group) -> list[str]:
    return [_value_text(json.loads(v)) for v in group.label]


def _seed_text(group: Group) -> str:
    done = sorted(int(r["config"]["seed"]) for r in group.rows)
    expected = sorted(s.run.seed for s in group.states)
    return f"{len(done)}" if len(done) == len(expected) else f"{len(done)} of {len(expected)}"


def _group_summary(group: Group, keys: list[str], baseline: Group | None) -> dict[str, Any]:
    out: dict[str, Any] = {"attention": group.attention, "seeds_done": sorted(group.values(keys[0]) if keys else [])}
    out["seeds_expected"] = sorted(s.run.seed for s in group.states)
    out["metrics"] = {}
    for key in keys:
        values = group.values(key)
        entry: dict[str, Any] = {"values": {str(k): v for k, v in sorted(values.items())}}
        if values:
            entry["mean"], entry["std"] = mean_std(list(values.values()))
        entry["n"] = len(values)
        if baseline is not None and baseline is not group:
            base_values = baseline.values(key)
            if values and base_values:
                base_mean = mean_std(list(base_values.values()))[0]
                entry["rel_change"] = (entry["mean"] - base_mean) / base_mean if base_mean else None
            seeds = sorted(set(values) & set(base_values))
            test = paired_t_test([values[s] for s in seeds], [base_values[s] for s in seeds])
            paired_base = sum(base_values[s] for s in seeds) / len(seeds) if seeds else None
            entry["paired"] = {
                "seeds": seeds,
                "n": test.n,
                "mean_diff": test.mean_diff,
                "rel_change": (test.mean_diff / paired_base) if seeds and paired_base else None,
                "t": test.t,
                "p": test.p,
                "text": test.describe(),
            }
        out["metrics"][key] = entry
    out["mean_epoch_s"], out["mean_eval_s"] = group.mean_epoch_s(), group.mean_eval_s()
    if baseline is not None and out["mean_epoch_s"] and baseline.mean_epoch_s():
        out["epoch_time_ratio"] = out["mean_epoch_s"] / baseline.mean_epoch_s()
    if baseline is not None and out["mean_eval_s"] and baseline.mean_eval_s():
        out["eval_time_ratio"] = out["mean_eval_s"] / baseline.mean_eval_s()
    best = [float(r["best_epoch"]) for r in group.rows if r.get("best_epoch") is not None]
    out["best_epoch"] = mean_std(best) if best else None
    return out


def _cell(entry: dict[str, Any], with_change: bool) -> str:
    if "mean" not in entry:
        return "missing"
    text = _fmt(entry["mean"]) + (f" ± {_fmt(entry['std'])}" if entry.get("std") is not None else "")
    if with_change and entry.get("rel_change") is not None:
        text += f" ({_pct(entry['rel_change'])})"
    return text


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(str(c).replace("|", "/") for c in row) + " |" for row in rows]
    return lines


# ----------------------------------------------------------------------------------------------
# figures


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _curve_figure(table: Table, path: Path, key: str, ylabel: str, title: str, *, valid: bool, logy=False) -> bool:
    """One panel per configuration label, one line per finished run, coloured by mechanism, dashed by
    seed. False when no run has a point."""
    from ..train import read_metrics

    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    labels = list(dict.fromkeys(g.label for g in table.groups))
    mechanisms = list(dict.fromkeys(g.attention for g in table.groups))
    colours = {m: f"C{i % 10}" for i, m in enumerate(mechanisms)}
    styles = ["-", "--", ":", "-."]
    cols = min(len(labels), 4)
    rows_n = -(-len(labels) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(5.2 * cols, 3.8 * rows_n), squeeze=False)
    drawn = False
    for i, label in enumerate(labels):
        ax = axes[i // cols][i % cols]
        for group in (g for g in table.groups if g.label == label):
            for j, s in enumerate(sorted((s for s in group.states if s.row), key=lambda s: s.run.seed)):
                xs, ys = [], []
                for record in read_metrics(s.run_dir):
                    value = (record.get("valid") or {}).get(key) if valid else record.get(key)
                    if isinstance(value, (int, float)) and math.isfinite(value):
                        xs.append(record["epoch"])
                        ys.append(value)
                if xs:
                    drawn = True
                    ax.plot(
                        xs,
                        ys,
                        color=colours[group.attention],
                        linestyle=styles[j % len(styles)],
                        linewidth=1.2,
                        label=f"{group.attention} s{s.run.seed}",
                    )
        caption = ", ".join(f"{_LABELS.get(k, k)} {_value_text(json.loads(v))}" for k, v in zip(table.varying, label))
        ax.set_title(f"{table.dataset} {table.model}" + (f", {caption}" if caption else ""), fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        if logy:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, ncol=2)
    for k in range(len(labels), rows_n * cols):
        axes[k // cols][k % cols].axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    if drawn:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
    plt.close(fig)
    return drawn


def _attention_figures(
    study: Study, table: Table, fig_dir: Path, datasets: dict[str, Any], user: int | None
) -> tuple[list[Path], str]:
    """Attention maps of the baseline and each refined mechanism at the first configuration where the
    baseline and another mechanism share a finished seed; (paths, note)."""
    from ..plots import ATTENTION_FILE, draw_attention, load_attention_maps, load_trained_model, plot_attention

    def drawable(state: RunState) -> bool:  # saved maps, or a checkpoint to compute them from
        return any((state.run_dir / name).is_file() for name in (ATTENTION_FILE, "best.pt", "last.pt"))

    def state_of(group: Group, seed: int) -> RunState:
        return next(s for s in group.states if s.row and s.run.seed == seed)

    baseline = study.report["baseline"]
    for label in dict.fromkeys(g.label for g in table.groups):
        groups = [g for g in table.groups if g.label == label]
        base = next((g for g in groups if g.attention == baseline), None)
        if base is None or not base.rows:
            continue
        others = [g for g in groups if g is not base and g.rows]
        seeds = (
            sorted(
                set.intersection(
                    {int(r["config"]["seed"]) for r in base.rows},
                    *[{int(r["config"]["seed"]) for r in g.rows} for g in others],
                )
            )
            if others
            else []
        )
        if not seeds:
            continue
        # a seed whose every run can still be drawn first; else the first, whose error is reported
        seed = next((s for s in seeds if all(drawable(state_of(g, s)) for g in [base, *others])), seeds[0])
        paths = []
        for group in [base, *others]:
            state = state_of(group, seed)
            path = fig_dir / f"attention-{table.slug}-{group.attention}.png"
            title = f"{state.run.config.get('model')}/{group.attention} seed {seed}"
            saved = state.run_dir / ATTENTION_FILE
            if saved.is_file():
                paths.append(draw_attention(load_attention_maps(saved), path, title=title))
                continue
            key = _same([state.run.config.get(k) for k in ("data", "dataset", "max_len", "kcore", "synthetic")])
            model, _, ds = load_trained_model(state.run_dir, dataset=datasets.get(key))
            datasets[key] = ds
            paths.append(plot_attention(model, ds, path, user=user, title=title))
        caption = ", ".join(f"{_LABELS.get(k, k)} {_value_text(json.loads(v))}" for k, v in zip(table.varying, label))
        return paths, f"seed {seed}" + (f", {caption}" if caption else "")
    return [], f"no configuration where {baseline!r} and another mechanism both finished a seed"


# ----------------------------------------------------------------------------------------------
# the report


def build_report(
    study: Study,
    out_dir,
    *,
    figures: bool = True,
    attention: bool = True,
    paper_numbers=None,
    log: TextIO | None = None,
) -> tuple[Path, Path]:
    """Write ``<out_dir>/<study>.md``, ``<study>.json`` and the figures under ``<out_dir>/<study>/``;
    returns the two paths. ``paper_numbers`` defaults to ``paper_numbers.toml`` beside the grid file."""
    log = log or sys.stdout
    out_dir = Path(out_dir)
    fig_dir = out_dir / study.name
    paper = load_paper_numbers(paper_numbers or study.path.parent / PAPER_NUMBERS_FILE)
    all_rows = read_rows(study.runs_file)
    states = run_states(study, all_rows)
    grid_hashes = {r.config_hash for r in study.runs}
    stray = [r for r in all_rows if r["config_hash"] not in grid_hashes]
    tables = _tables(states)
    baseline_name = study.report["baseline"]
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    finished = [s for s in states if s.row]
    md: list[str] = [f"# {study.name}", ""]
    if study.description:
        md += [study.description, ""]
    commits = sorted({s.row.get("git_commit") or "?" for s in finished})
    devices = sorted({f"{s.row.get('device')} ({s.row.get('cuda_device') or s.row.get('host_cpu')})" for s in finished})
    md += [
        f"Grid `{study.path.name}`: {len(states)} runs, {len(finished)} finished, {len(states) - len(finished)} "
        f"missing. Generated {now} from `{study.runs_file}`"
        + (f" (rows from commit {', '.join(commits)}; devices {', '.join(devices)})" if finished else "")
        + ".",
        "",
        f"Rerun: `python -m awr_fast.experiments run {study.path}`; this page: "
        f"`python -m awr_fast.experiments report {study.path}`.",
        "",
        "Statistics: mean ± sample standard deviation over seeds; changes are relative to the mean of "
        f"`{baseline_name}` at the same configuration; p-values are two-sided paired t-tests over the seeds "
        "both mechanisms finished, as computed (not corrected for the several metrics and mechanisms "
        "compared; with 2-3 seeds such a test has little power).",
        "",
    ]
    report_json: dict[str, Any] = {
        "study": study.name,
        "grid_file": str(study.path),
        "generated": now,
        "description": study.description,
        "baseline": baseline_name,
        "metrics": study.report["metrics"],
        "runs_expected": len(states),
        "runs_finished": len(finished),
        "tables": [],
        "missing": [],
        "figures": [],
        "notes": [],
    }
    datasets: dict[str, Any] = {}
    for table in tables:
        keys = _metric_keys(study, table)
        proto = _protocol(table)
        table_json: dict[str, Any] = {
            "dataset": table.dataset,
            "model": table.model,
            "varying": table.varying,
            "protocol": proto,
            "groups": [],
            "paper": [],
        }
        md += [f"## {table.dataset} / {table.model}", "", _protocol_line(proto), ""]
        label_header = [_LABELS.get(k, k) for k in table.varying]
        header = [
            *label_header,
            "mechanism",
            "seeds",
            *_metric_headers(study, table),
            "epoch s",
            f"vs {baseline_name}",
            "best epoch",
        ]
        lines, paired_lines, notes_paper = [], [], []
        for group in table.groups:
            baseline = next((g for g in table.groups if g.label == group.label and g.attention == baseline_name), None)
            summary = _group_summary(group, keys, baseline)
            summary["label"] = {k: json.loads(v) for k, v in zip(table.varying, group.label)}
            table_json["groups"].append(summary)
            ratio = summary.get("epoch_time_ratio")
            best = summary["best_epoch"]
            lines.append(
                [
                    *_label_cells(table, group),
                    group.attention,
                    _seed_text(group),
                    *(_cell(summary["metrics"][k], group is not baseline) for k in keys),
                    "-" if summary["mean_epoch_s"] is None else f"{summary['mean_epoch_s']:.3g}",
                    f"{ratio:.2f}x" if ratio else ("1.00x" if group is baseline and summary["mean_epoch_s"] else "-"),
                    "-" if not best else f"{best[0]:.0f}" + (f" ± {best[1]:.0f}" if best[1] is not None else ""),
                ]
            )
            if baseline is not None and group is not baseline:
                cells = []
                for k in keys:
                    paired = summary["metrics"][k].get("paired")
                    if not paired or not paired["seeds"]:
                        cells.append("n/a (no common seed)")
                    else:
                        cells.append(f"{_pct(paired['rel_change'])}, {paired['text']}")
                paired_lines.append([*_label_cells(table, group), group.attention, *cells])
            for entry in paper:
                if _matches(entry, group.config):
                    different, unstated = _protocol_differences(entry, _resolved(group.config))
                    lines.append(
                        [
                            *_label_cells(table, group),
                            f"paper: {entry['short']}",
                            "",
                            *(_fmt(entry["metrics"].get(metric_key(k.removeprefix("sampled_")))) for k in keys),
                            "",
                            "",
                            "",
                        ]
                    )
                    table_json["paper"].append(
                        {"group": summary["label"], "attention": group.attention, **entry, "differences": different}
                    )
                    ours_stopping = f"{', '.join(proto['selection_metric'])}, patience {proto['patience']}"
                    text_bits = [
                        f"{k.replace('_', ' ')}: {entry['protocol'][k]}"
                        + (f" (ours: {ours_stopping})" if k == "early_stopping" else "")
                        for k in _PAPER_TEXT_KEYS
                        if k in entry["protocol"]
                    ]
                    notes_paper.append(
                        f"- paper row `{entry['short']}` ({entry['source']}"
                        + (f", quoted from {entry['quoted_from']}" if entry.get("quoted_from") else "")
                        + f") beside {group.attention}: protocol differences: "
                        + ("; ".join(different) if different else "none among the fields it states")
                        + (f"; not stated by the source: {', '.join(unstated)}" if unstated else "")
                        + (f"; {'; '.join(text_bits)}" if text_bits else "")
                        + "."
                    )
        md += _md_table(header, lines) + [""]
        if paired_lines:
            md += [f"Change against `{baseline_name}` and paired t-test across seeds:", ""]
            md += _md_table([*label_header, "mechanism", *_metric_headers(study, table)], paired_lines) + [""]
        if notes_paper:
            md += notes_paper + [""]
        missing = [s for s in table.states if not s.row]
        if missing:
            md += [f"Missing cells ({len(missing)} of {len(table.states)} runs not finished):", ""]
            for s in missing:
                where = f", epoch {s.epochs_done}/{s.run.config['epochs']}" if s.state == "partial" else ""
                md.append(f"- `{s.run.run_id}` ({s.state}{where})")
                report_json["missing"].append({"run_id": s.run.run_id, "state": s.state, "epochs_done": s.epochs_done})
            md.append("")
        if figures:
            md += _table_figures(study, table, fig_dir, out_dir, proto, datasets, attention, report_json, log)
        report_json["tables"].append(table_json)
    if stray:
        note = (
            f"{len(stray)} rows of {study.runs_file} belong to no run of the grid as it is now (edited since?); "
            "they are kept in the JSON under rows_not_in_grid and left out of the tables."
        )
        md += [f"Note: {note}", ""]
        report_json["notes"].append(note)
    report_json["rows"] = [s.row for s in finished]
    report_json["rows_not_in_grid"] = stray
    out_dir.mkdir(parents=True, exist_ok=True)
    md_path, json_path = out_dir / f"{study.name}.md", out_dir / f"{study.name}.json"
    from ..atomic import atomic_write_text

    atomic_write_text(md_path, "\n".join(md).rstrip() + "\n")
    atomic_write_text(json_path, json.dumps(report_json, indent=1, sort_keys=True, default=list) + "\n")
    return md_path, json_path


def _table_figures(
    study: Study,
    table: Table,
    fig_dir: Path,
    out_dir: Path,
    proto: dict[str, Any],
    datasets: dict[str, Any],
    attention: bool,
    report_json: dict[str, Any],
    log: TextIO,
) -> list[str]:
    """The figures of one table, as markdown lines (with a note for each one that cannot be drawn)."""
    from ..training.evaluate import selection_key

    md: list[str] = []
    rel = fig_dir.relative_to(out_dir)
    config = table.states[0].run.config
    key = selection_key(config["protocol"], config.get("select_metric", "ndcg@5"))
    valid_png = fig_dir / f"valid-{table.slug}.png"
    if _curve_figure(
        table, valid_png, key, f"valid {metric_name(key)}", f"valid {metric_name(key)} per epoch", valid=True
    ):
        md += [f"![valid {metric_name(key)} per epoch]({rel / valid_png.name})", ""]
        report_json["figures"].append(str(valid_png))
    else:
        md += [f"Valid {metric_name(key)} curves: no finished run with a metrics.jsonl yet.", ""]
    grad_png = fig_dir / f"grad-norm-{table.slug}.png"
    if _curve_figure(
        table,
        grad_png,
        "grad_norm",
        "global gradient norm",
        "gradient norm per epoch (mean over steps)",
        valid=False,
        logy=True,
    ):
        md += [f"![gradient norm per epoch]({rel / grad_png.name})", ""]
        report_json["figures"].append(str(grad_png))
    else:
        md += ["Gradient norms: not available (no finished run's metrics.jsonl records grad_norm).", ""]
    if not attention:
        md += ["Attention maps: not drawn (--no-attention).", ""]
        return md
    try:
        with study_environment(study):
            paths, where = _attention_figures(study, table, fig_dir, datasets, study.report.get("attention_user"))
    except (OSError, ValueError, KeyError, RuntimeError) as exc:  # a missing checkpoint or data file
        paths, where = [], f"not drawn: {type(exc).__name__}: {' '.join(str(exc).split())}"
        print(f"report {study.name}: attention maps for {table.slug} {where}", file=log)
    if paths:
        md += [
            f"Attention maps of the last layer for one test user ({where}): A (first order), "
            "B (refined scores), P (final weights).",
            "",
        ]
        md += [f"![attention {p.stem}]({rel / p.name})" for p in paths] + [""]
        report_json["figures"] += [str(p) for p in paths]
    else:
        md += [f"Attention maps: {where}.", ""]
    return md
