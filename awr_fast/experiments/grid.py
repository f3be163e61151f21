"""Grid files: a study's runs, expanded from TOML (or YAML) into TrainConfig dicts with stable ids.

A grid file (``experiments/*.toml``)::

    [study]
    name = "table2_beauty"          # default: the file's stem
    description = "..."             # optional, shown at the top of the report
    out = "results/table2_beauty"   # optional; default results/<name>; relative to the grid file
    data_dir = "../../shared/data"  # optional, relative to the grid file: where the named data sets
                                    # ("beauty", "ml-1m") are found; AWR_FAST_DATA wins when it is set
    order_by = ["seed"]             # optional: stable sort of the expanded runs by these fields

    [base]                          # TrainConfig fields shared by every run
    dataset = "beauty"
    max_len = 50

    [[grid]]                        # one or more: the cartesian product of the lists, first key outermost
    model = ["sasrec"]
    attention = ["none", "simp"]
    seed = [1, 2, 3]

    [report]                        # optional: what the report shows
    metrics = ["recall@1", "recall@5", "ndcg@5", "ndcg@10"]
    baseline = "none"               # the mechanism every other one is compared with

Every key is checked against :class:`~awr_fast.training.config.TrainConfig`'s fields, and every
expanded run is built as a TrainConfig once, so a typo or an impossible combination stops the
command before anything runs, with the file and the key named. A scalar in a ``[[grid]]`` table is
one value; a field whose value is itself a list (``betas``) takes a list of lists there.

A run's id is ``<model>-<dataset>-<attention>[-<other grid values>]-s<seed>-<hash>``: the readable
part names the values its ``[[grid]]`` table varies, the hash (8 hex digits of sha256) is that of
its whole TrainConfig minus the fields that only say how to execute it (:data:`EXECUTION_FIELDS`:
backend, device, threads, quiet, ...) and minus the fields left at TrainConfig's default (so a field
added later does not rename finished runs). The same experiment thus keeps its id whether it runs on the
CPU with the eager backend or on a GPU with Triton; the results store matches runs by that hash.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import itertools
import json
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..training.config import MODEL_DEFAULTS, RESUME_MUTABLE, TrainConfig

__all__ = [
    "EXECUTION_FIELDS",
    "GridError",
    "Run",
    "Study",
    "config_hash",
    "dataset_label",
    "load_study",
]

#: Fields that say how a run executes, not what it computes: left out of the config hash. These are the
#: fields a resumed run may change (RESUME_MUTABLE) except the three that change the result.
EXECUTION_FIELDS = frozenset(RESUME_MUTABLE - {"epochs", "patience", "eval_every"})
#: Fields the runner sets itself (the run directory).
RUNNER_FIELDS = frozenset({"out", "resume"})
STUDY_KEYS = frozenset({"name", "description", "out", "data_dir", "order_by"})
REPORT_KEYS = frozenset({"metrics", "baseline", "attention_user"})
TOP_LEVEL_KEYS = ("study", "base", "grid", "report")
DEFAULT_METRICS = ("recall@1", "recall@5", "ndcg@5", "ndcg@10")
#: Short forms of the fields that most often vary, for the readable part of run ids.
_ID_ABBREVIATIONS = {"n_layers": "L", "max_len": "n", "d_model": "d", "n_heads": "h", "loss": ""}
#: The readable part always names these (model, dataset, attention, seed), so they are not repeated.
_ID_FIXED = frozenset({"model", "dataset", "data", "attention", "seed"})
#: Names people reach for that TrainConfig spells differently.
_KNOWN_ALIASES = {
    "mechanism": "attention",
    "layers": "n_layers",
    "num_layers": "n_layers",
    "heads": "n_heads",
    "num_heads": "n_heads",
    "n": "max_len",
    "max_seq_length": "max_len",
    "d": "d_model",
    "hidden_size": "d_model",
    "learning_rate": "lr",
    "weight_decay": "l2",
    "seeds": "seed",
}
_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


class GridError(ValueError):
    """A grid file that cannot be expanded; the message names the file and the key."""


@dataclass(frozen=True)
class Run:
    """One expanded run of a study."""

    index: int  #: 1-based position in the study (the order the runner takes)
    run_id: str
    config_hash: str
    config: dict[str, Any]  #: TrainConfig.to_dict() as the grid gives it (out and resume unset)
    table: int  #: the [[grid]] table it came from, 1-based

    @property
    def seed(self) -> int:
        return int(self.config["seed"])


@dataclass
class Study:
    """A grid file, expanded."""

    name: str
    path: Path
    out_dir: Path
    runs: list[Run]
    description: str = ""
    data_dir: Path | None = None
    report: dict[str, Any] = field(default_factory=dict)
    duplicates: int = 0  #: expanded runs dropped because an earlier one had the same config hash

    @property
    def runs_file(self) -> Path:
        return self.out_dir / "runs.jsonl"

    def run_dir(self, run: Run) -> Path:
        """``<out>/runs/<run id>``; a folder of another name ending in the same hash (a run whose readable
        part changed when the grid was edited) is taken instead, so that its checkpoint is not lost."""
        preferred = self.out_dir / "runs" / run.run_id
        if not preferred.exists() and (self.out_dir / "runs").is_dir():
            for other in sorted((self.out_dir / "runs").glob(f"*-{run.config_hash}")):
                if other.is_dir():
                    return other
        return preferred

    def train_config(self, run: Run, **overrides) -> TrainConfig:
        return TrainConfig.from_dict({**run.config, **overrides})


def config_hash(config: dict[str, Any]) -> str:
    """8 hex digits of the sha256 of ``config`` (a TrainConfig dict) without :data:`EXECUTION_FIELDS` and
    without the fields at TrainConfig's default: a field added to TrainConfig later (at a default that
    keeps the old behaviour) leaves every finished run's id as it was."""
    defaults = TrainConfig().to_dict()
    identity = {
        k: v for k, v in config.items() if k not in EXECUTION_FIELDS and (k not in defaults or v != defaults[k])
    }
    text = json.dumps(identity, sort_keys=True, default=list, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:8]


def dataset_label(config: dict[str, Any]) -> str:
    """A short name of a config's data: the ``dataset`` name, or the data file's name up to its first dot
    (``../shared/data/ml-1m.txt.gz`` -> ``ml-1m``), lower case."""
    data = config.get("data")
    name = Path(str(data)).name.split(".")[0] if data else str(config.get("dataset", ""))
    return _slug(name.lower()) or "data"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", text).strip("-")


def _id_value(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (dict, list, tuple)):
        return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:4]
    return str(value)


def _run_id(config: dict[str, Any], varying: list[str], digest: str) -> str:
    parts = [config["model"], dataset_label(config), config["attention"]]
    for key in varying:
        if key not in _ID_FIXED:
            short = _ID_ABBREVIATIONS.get(key, key.replace("_", "") + "-")
            parts.append(short + _id_value(config[key]))
    parts.append(f"s{config['seed']}")
    return _slug("-".join(str(p) for p in parts)) + "-" + digest


# ----------------------------------------------------------------------------------------------
# reading and checking


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"grid file: expected a TOML or YAML file, got {str(path)!r} (no such file)")
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise GridError(
                f"{path}: reading YAML needs PyYAML (pip install pyyaml); or write the grid in TOML"
            ) from None
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise GridError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None
    else:
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise GridError(f"{path}: not valid TOML: {exc}") from None
    if not isinstance(data, dict):
        raise GridError(f"{path}: expected tables {list(TOP_LEVEL_KEYS)}, got a {type(data).__name__}")
    return data


def _unknown(path: Path, where: str, key: str, known) -> GridError:
    names = [*known, *_KNOWN_ALIASES] if known is _FIELDS else list(known)
    close = difflib.get_close_matches(key, names, n=1)
    suggestion = f" (did you mean {_KNOWN_ALIASES.get(close[0], close[0])!r}?)" if close else ""
    what = (
        "a TrainConfig field (python -m awr_fast.train --help lists them)"
        if known is _FIELDS
        else (f"one of {sorted(known)}")
    )
    return GridError(f"{path}: {where}: {key}: expected {what}{suggestion}, got an unknown key {key!r}")


def _check_fields(path: Path, where: str, table: Any) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise GridError(f"{path}: {where}: expected a table of TrainConfig fields, got {table!r}")
    for key in table:
        if key in RUNNER_FIELDS:
            raise GridError(
                f"{path}: {where}: {key}: expected no {key!r} (the runner sets each run's directory, "
                f"<study out>/runs/<run id>), got {table[key]!r}"
            )
        if key not in _FIELDS:
            raise _unknown(path, where, key, _FIELDS)
    return table


def _is_tuple_field(name: str) -> bool:
    hint = _HINTS[name]
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next((a for a in args if a is not type(None)), hint)
    return typing.get_origin(hint) is tuple


def _coerce(config: dict[str, Any]) -> dict[str, Any]:
    """Ints given for float fields become floats (TOML's ``dropout = 0`` and ``0.0`` are one experiment,
    so they must hash alike)."""
    out = dict(config)
    for name, value in config.items():
        hint = _HINTS[name]
        floating = hint is float or (
            typing.get_origin(hint) in (typing.Union, types.UnionType) and float in typing.get_args(hint)
        )
        if floating and isinstance(value, int) and not isinstance(value, bool):
            out[name] = float(value)
    return out


_HINTS = typing.get_type_hints(TrainConfig)


def _study_table(path: Path, data: dict[str, Any]) -> dict[str, Any]:
    study = data.get("study", {})
    if not isinstance(study, dict):
        raise GridError(f"{path}: [study]: expected a table, got {study!r}")
    for key in study:
        if key not in STUDY_KEYS:
            raise _unknown(path, "[study]", key, STUDY_KEYS)
    return study


def _report_table(path: Path, data: dict[str, Any]) -> dict[str, Any]:
    report = data.get("report", {})
    if not isinstance(report, dict):
        raise GridError(f"{path}: [report]: expected a table, got {report!r}")
    for key in report:
        if key not in REPORT_KEYS:
            raise _unknown(path, "[report]", key, REPORT_KEYS)
    metrics = report.get("metrics", list(DEFAULT_METRICS))
    if not (isinstance(metrics, list) and metrics and all(isinstance(m, str) for m in metrics)):
        raise GridError(f"{path}: [report]: metrics: expected a non-empty list of metric names, got {metrics!r}")
    return {"metrics": metrics, "baseline": str(report.get("baseline", "none")), **report}


def load_study(path) -> Study:
    """Read, check and expand a grid file (see the module docstring).

    Raises:
        FileNotFoundError: no such file.
        GridError: a malformed file, an unknown key, or a run whose TrainConfig cannot be built.
    """
    path = Path(path)
    data = _read(path)
    for key in data:
        if key not in TOP_LEVEL_KEYS:
            raise _unknown(path, "top level", key, TOP_LEVEL_KEYS)
    study = _study_table(path, data)
    report = _report_table(path, data)
    base = _check_fields(path, "[base]", data.get("base", {}))
    tables = data.get("grid")
    if isinstance(tables, dict):
        tables = [tables]
    if not tables or not isinstance(tables, list):
        raise GridError(f"{path}: [[grid]]: expected at least one [[grid]] table of value lists, got {tables!r}")

    expanded: list[tuple[dict[str, Any], int, list[str]]] = []
    for t, table in enumerate(tables, 1):
        where = f"[[grid]] #{t}"
        _check_fields(path, where, table)
        keys, alternatives = list(table), []
        for key in keys:
            values = table[key]
            if not isinstance(values, list):
                values = [values]
            elif _is_tuple_field(key) and values and not isinstance(values[0], list):
                raise GridError(
                    f"{path}: {where}: {key}: expected a list of alternatives, each a list "
                    f"(e.g. {key} = [{values!r}]), got {values!r}"
                )
            if not values:
                raise GridError(f"{path}: {where}: {key}: expected a non-empty list of values, got []")
            alternatives.append(values)
        varying = [k for k, values in zip(keys, alternatives) if len(values) > 1]
        for combo in itertools.product(*alternatives):
            expanded.append(({**base, **dict(zip(keys, combo))}, t, varying))

    order_by = study.get("order_by", [])
    if not isinstance(order_by, list) or any(k not in _FIELDS for k in order_by):
        raise GridError(f"{path}: [study]: order_by: expected a list of TrainConfig fields, got {order_by!r}")
    runs: list[Run] = []
    seen: set[str] = set()
    duplicates = 0
    built = []
    for number, (given, t, varying) in enumerate(expanded, 1):
        try:
            coerced = _coerce(given)  # a model's MODEL_DEFAULTS under the fields the grid gives
            config = TrainConfig.from_dict({**MODEL_DEFAULTS.get(coerced.get("model"), {}), **coerced}).to_dict()
        except (ValueError, TypeError) as exc:
            shown = ", ".join(f"{k}={v!r}" for k, v in given.items() if k in _ID_FIXED or k in varying)
            raise GridError(f"{path}: [[grid]] #{t}, run {number} ({shown}): {exc}") from None
        built.append((config, t, varying))
    # sorted() is stable: the file order survives within equal order_by values
    built.sort(key=lambda item: tuple(_sort_value(item[0][k]) for k in order_by))
    for config, t, varying in built:
        digest = config_hash(config)
        if digest in seen:
            duplicates += 1
            continue
        seen.add(digest)
        runs.append(Run(len(runs) + 1, _run_id(config, varying, digest), digest, config, t))

    name = str(study.get("name", path.stem))
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise GridError(f"{path}: [study]: name: expected letters, digits, '_', '.', '-', got {name!r}")
    out_dir = path.parent / str(study.get("out", Path("results") / name))
    data_dir = path.parent / str(study["data_dir"]) if study.get("data_dir") else None
    return Study(
        name=name,
        path=path,
        out_dir=out_dir,
        runs=runs,
        description=str(study.get("description", "")).strip(),
        data_dir=data_dir,
        report=report,
        duplicates=duplicates,
    )


def _sort_value(value: Any):
    # None sorts first; mixed types sort by their text, never raise
    return (value is not None, str(type(value)), value if isinstance(value, (int, float, str)) else str(value))
