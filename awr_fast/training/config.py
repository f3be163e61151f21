"""Training configuration: one dataclass, its command-line flags, and the resume rules.

:class:`TrainConfig` holds every knob of a run; ``config.json`` in the run directory is its
``to_dict()``. Each field carries its CLI face in ``field(metadata=...)`` (group, help text,
choices, the flag when it is not ``--field-name``), and :func:`build_parser` derives one flag per
field from that and the field's type (bool fields get ``--x/--no-x``). The choices come from the
specs: attention mechanisms from :mod:`awr_fast.ops.dot_refined` / :mod:`awr_fast.ops.w2_refined`,
backends from :data:`awr_fast.backends.CHOICES`. Flags that are not given keep the dataclass
default, or, with ``--resume RUN_DIR``, the value stored in that run's ``config.json`` (only the
fields in :data:`RESUME_MUTABLE` may then change, e.g. ``--epochs``).

Defaults are sized so that ``python -m awr_fast.train`` finishes in a few minutes on two CPU cores
with the embedded synthetic data set; the paper's settings are flags (SPEC §6: d in {64, 128},
n in {20..100}, lr in {1e-3, 1e-4}, L2 in {1e-1, 1e-2, 1e-3}, dropout in {0.3, 0.5, 0.7}).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import numbers
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..backends import CHOICES as BACKENDS
from ..data.dataset import KNOWN_DATASETS
from ..data.preprocess import KCORE_MODES
from ..models.acsasrec import ACSASREC_ATTENTIONS, DEFAULT_MASK_LOSS_WEIGHT
from ..models.sasrec import SASREC_LAYOUTS, SASREC_LOSSES
from ..ops import dot_refined as dot_spec
from ..ops import w2_refined as w2_spec
from .evaluate import PROTOCOLS, SELECT_METRICS

__all__ = [
    "MODELS",
    "MODEL_DEFAULTS",
    "PROG",
    "RESUME_MUTABLE",
    "TrainConfig",
    "build_parser",
    "cli_fields",
    "config_from_args",
    "flag_of",
    "load_config",
]

#: The command line's program name (argparse usage and error lines).
PROG = "python -m awr_fast.train"
MODELS = ("sasrec", "stosa", "acsasrec")
#: The attention mechanisms each model offers (the op specs' causal mechanisms).
ATTENTIONS = {"sasrec": dot_spec.CAUSAL_MECHANISMS, "stosa": w2_spec.MECHANISMS, "acsasrec": ACSASREC_ATTENTIONS}
#: Per-model defaults that differ from TrainConfig's (which are sized for SASRec on the synthetic data):
#: a new run of that model takes them for every field not given. AC-SASRec: the released Beauty
#: configuration and protocol (RecBole: every prefix a sample, full ranking without the history).
MODEL_DEFAULTS = {
    "acsasrec": {
        "attention": "none",
        "d_model": 64,
        "n_layers": 3,
        "n_heads": 4,
        "max_len": 50,
        "dropout": 0.5,
        "attn_dropout": 0.5,
        "lr": 1e-4,
        "batch_size": 256,
        "train_prefixes": True,
        "exclude_history": True,
    },
}
ALL_ATTENTIONS = tuple(dict.fromkeys(a for mechanisms in ATTENTIONS.values() for a in mechanisms))
STOSA_ONLY = tuple(a for a in ATTENTIONS["stosa"] if a not in ATTENTIONS["sasrec"])
AMP_MODES = ("none", "bf16", "fp16")
OPTIMIZERS = ("adam", "adamw")

#: Fields that may differ between a run and its resumption (everything else must match).
RESUME_MUTABLE = frozenset(
    {
        "epochs",
        "patience",
        "eval_every",
        "quiet",
        "tensorboard",
        "compile",
        "device",
        "resume",
        "eval_batch_size",
        "num_threads",
        "backend",
        "out",
    }
)
#: Integer fields that must be >= 1.
_POSITIVE = (
    "d_model",
    "n_layers",
    "n_heads",
    "max_len",
    "batch_size",
    "epochs",
    "eval_every",
    "eval_batch_size",
    "bucket_batches",
)


def _option(group: str):
    """A maker of dataclass fields of the CLI group ``group``. The field's metadata says how
    :func:`build_parser` shows it: ``help``, ``choices`` (also checked by ``validate``), ``flag`` (when it
    is not ``--field-name``), ``default_text`` (shown instead of the default value) and ``cli=False`` for
    fields without a flag."""

    def option(
        default: Any,
        help: str,
        *,
        choices=None,
        flag: str | None = None,
        default_text: str | None = None,
        cli: bool = True,
    ):
        metadata = {
            "group": group,
            "help": help,
            "choices": tuple(choices) if choices is not None else None,
            "flag": flag,
            "default_text": default_text,
            "cli": cli,
        }
        return field(default=default, metadata=metadata)

    return option


_model, _optimisation, _data, _evaluation, _run = (
    _option(g) for g in ("model", "optimisation", "data", "evaluation", "run")
)


@dataclass
class TrainConfig:
    """Every setting of a training run (see ``python -m awr_fast.train --help``)."""

    # model
    model: str = _model(
        "sasrec",
        "model; acsasrec's defaults are the released AC-TSR Beauty configuration (3 layers, 4 heads, d 64, "
        "dropout 0.5, lr 1e-4, batch 256, n 50, prefixes, history excluded) wherever a flag is not given",
        choices=MODELS,
    )
    attention: str = _model(
        "simp", f"AWRSR refinement mechanism ({', '.join(STOSA_ONLY)}: stosa only)", choices=ALL_ATTENTIONS
    )
    d_model: int = _model(64, "embedding width d")
    n_layers: int = _model(2, "attention blocks")
    n_heads: int = _model(1, "attention heads")
    max_len: int = _model(50, "padded sequence length n")
    dropout: float = _model(0.2, "dropout rate")
    attn_dropout: float | None = _model(
        None, "attention-weight dropout", default_text="--dropout for sasrec, 0 for stosa as released"
    )
    per_head_refine: bool = _model(False, "one set of refinement matrices per head")
    refine_input: str = _model(
        "probs", "refinement input A: post-softmax probabilities or masked scores", choices=dot_spec.REFINE_INPUTS
    )
    refine_scale: str = _model("d_h", "refinement scale c = 1/sqrt(d_h | d | n)", choices=dot_spec.REFINE_SCALES)
    backend: str = _model(
        "auto",
        "attention backend; auto runs the first of "
        + ", ".join(BACKENDS[1:])
        + " that takes the inputs (cuda and triton only for CUDA tensors)",
        choices=BACKENDS,
    )
    layout: str = _model("original", "sasrec block layout", choices=SASREC_LAYOUTS)
    loss: str = _model("bce", "sasrec loss", choices=SASREC_LOSSES)
    num_negatives: int | None = _model(
        None, "sasrec negatives per position", default_text="1 for bce, 100 for sampled_ce"
    )
    pvn: float = _model(0.005, "stosa positive-vs-negative loss weight")
    stosa_compat: bool = _model(False, "stosa: the released encoder's behaviour (mean stream not updated)")
    inner_size: int | None = _model(None, "acsasrec FFN inner width", default_text="2 d (128 as released)")
    mask_loss_weight: float = _model(
        DEFAULT_MASK_LOSS_WEIGHT, "acsasrec: weight lambda of mean_l ||1 - M_l||_F in the adversarial loss"
    )
    adversarial: bool = _model(True, "acsasrec: the adversarial calibrator (off: the spatial calibrator only)")
    position_embedding: bool = _model(False, "acsasrec: learned absolute positions (off as released)")
    # optimisation
    optimizer: str = _optimisation(
        "adam", "Adam (L2 added to the gradient) or AdamW (decoupled decay)", choices=OPTIMIZERS
    )
    lr: float = _optimisation(
        5e-3, "learning rate (the default is sized for the synthetic data; the paper's grid is 1e-3, 1e-4)"
    )
    l2: float = _optimisation(0.0, "weight decay (L2)")
    betas: tuple[float, float] = _optimisation((0.9, 0.98), "Adam betas")
    clip_grad: float = _optimisation(
        0.0, "clip the global gradient norm to this value (0: off; the norm is logged either way)"
    )
    batch_size: int = _optimisation(128, "training rows per step (global, over all processes)")
    epochs: int = _optimisation(30, "maximum epochs")
    patience: int = _optimisation(
        20,
        "early stopping: evaluations without a better valid --select-metric (sampled100: its sampled_ key); "
        "0: never stop early",
    )
    seed: int = _optimisation(42, "seed (model init, epoch order, negatives, dropout)")
    amp: str = _optimisation("none", "mixed precision: bf16, or fp16 with a GradScaler", choices=AMP_MODES)
    # data
    dataset: str = _data("synthetic", "named data set: synthetic (embedded), " + ", ".join(KNOWN_DATASETS))
    data: str | None = _data(None, "path of a data file (wins over --dataset)")
    kcore: str = _data("iterative", "k-core filter", choices=KCORE_MODES)
    synthetic: dict[str, Any] = field(
        default_factory=dict,
        metadata={"cli": False, "help": "make_synthetic arguments (dataset 'synthetic'); not a flag"},
    )
    length_bucketing: bool = _data(True, "group training rows of similar length into batches")
    bucket_batches: int = _data(50, "length bucketing pool size, in batches")
    trim_padding: bool = _data(
        True,
        "drop the columns that are padding in every row of a batch (training and "
        "evaluation), so the work follows the batch's longest sequence; the model "
        "computes the same function",
    )
    train_prefixes: bool = _data(
        False,
        "train on every prefix of each training sequence with its loss at the last position (RecBole's "
        "augmentation, AC-TSR's protocol) instead of the loss at every position of each sequence",
        default_text="True for acsasrec, else False",
    )
    # evaluation
    eval_every: int = _evaluation(1, "evaluate on valid every this many epochs")
    eval_batch_size: int = _evaluation(256, "users scored per chunk")
    exclude_history: bool = _evaluation(False, "drop the user's past items from the ranking (STOSA's protocol)")
    protocol: str = _evaluation(
        "full",
        "full ranking, or sampled100 (target + 100 negatives; keys 'sampled_*', which then select the best epoch)",
        choices=PROTOCOLS,
    )
    select_metric: str = _evaluation(
        "ndcg@5",
        "the valid metric that selects the best epoch and drives early stopping (the paper's: ndcg@5)",
        choices=SELECT_METRICS,
    )
    # run
    device: str = _run("auto", "auto, cpu, cuda, cuda:1, ...")
    out: str | None = _run(None, "run directory", default_text="runs/<timestamp>-<model>-<attention>")
    resume: str | None = _run(None, "continue the run in this directory from its last.pt")
    tensorboard: bool = _run(False, "also log to TensorBoard (RUN_DIR/tb), if installed")
    quiet: bool = _run(False, "no progress bars or per-epoch lines")
    num_threads: int | None = _run(None, "torch CPU threads", default_text="torch's choice")
    ddp_find_unused: bool = _run(False, "DDP find_unused_parameters")
    compile: bool = _run(
        False,
        "torch.compile the training step (model and loss; evaluation stays eager): a first step that compiles "
        "for a minute or more, faster steps after",
    )

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Check every field; a ValueError names the field: ``"name: expected ..., got ..."``."""
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices is not None and value not in choices:
                raise ValueError(f"{f.name}: expected one of {list(choices)}, got {value!r}")
        if self.attention not in ATTENTIONS[self.model]:
            raise ValueError(
                f"attention: expected one of {list(ATTENTIONS[self.model])} for model {self.model!r}, "
                f"got {self.attention!r}"
            )
        for name in _POSITIVE:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
        if isinstance(self.patience, bool) or not isinstance(self.patience, numbers.Integral) or self.patience < 0:
            raise ValueError(f"patience: expected an int >= 0, got {self.patience!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"n_heads: expected a divisor of d_model={self.d_model}, got {self.n_heads}")
        for name in ("dropout", "attn_dropout"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value < 1.0
            ):
                raise ValueError(f"{name}: expected a probability in [0, 1), got {value!r}")
        if isinstance(self.mask_loss_weight, bool) or not isinstance(self.mask_loss_weight, numbers.Real):
            raise ValueError(f"mask_loss_weight: expected a weight >= 0, got {self.mask_loss_weight!r}")
        if self.mask_loss_weight < 0:
            raise ValueError(f"mask_loss_weight: expected a weight >= 0, got {self.mask_loss_weight!r}")
        for name in ("num_negatives", "num_threads", "inner_size"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1):
                raise ValueError(f"{name}: expected None or an int >= 1, got {value!r}")
        if len(tuple(self.betas)) != 2:
            raise ValueError(f"betas: expected two floats, got {self.betas!r}")
        self.betas = tuple(float(b) for b in self.betas)

    # ------------------------------------------------------------------------------------------
    @property
    def data_source(self) -> str:
        return self.data if self.data else self.dataset

    def resolved_attn_dropout(self) -> float:
        if self.attn_dropout is not None:
            return float(self.attn_dropout)
        return 0.0 if self.model == "stosa" else float(self.dropout)

    def model_kwargs(self, num_items: int) -> dict[str, Any]:
        """Keyword arguments of :func:`awr_fast.models.build_model` (besides the name)."""
        kw: dict[str, Any] = {
            "num_items": int(num_items),
            "max_len": self.max_len,
            "d_model": self.d_model,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "dropout": self.dropout,
            "attn_dropout": self.resolved_attn_dropout(),
            "attention": self.attention,
            "per_head_refine": self.per_head_refine,
            "refine_input": self.refine_input,
            "refine_scale": self.refine_scale,
            "backend": self.backend,
        }
        if self.model == "sasrec":
            kw.update(layout=self.layout, loss=self.loss, num_negatives=self.num_negatives)
        elif self.model == "stosa":
            kw.update(pvn=self.pvn, stosa_compat=self.stosa_compat)
        else:
            kw.update(
                inner_size=self.inner_size,
                mask_loss_weight=self.mask_loss_weight,
                adversarial=self.adversarial,
                position_embedding=self.position_embedding,
            )
        return kw

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        d = dict(d)
        if d.get("extra") == {}:  # config.json of runs written before the field was removed
            del d["extra"]
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"config: expected only TrainConfig fields, got unknown keys {unknown}")
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        return cls(**d)

    @classmethod
    def for_model(cls, model: str = "sasrec", **fields) -> TrainConfig:
        """A config of ``model`` with its MODEL_DEFAULTS for every field not in ``fields``."""
        return cls(**{**MODEL_DEFAULTS.get(model, {}), **fields, "model": model})

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)


def load_config(run_dir) -> TrainConfig:
    """The :class:`TrainConfig` stored in ``RUN_DIR/config.json``."""
    with open(Path(run_dir) / "config.json", encoding="utf-8") as f:
        return TrainConfig.from_dict(json.load(f))


# ----------------------------------------------------------------------------------------------
# command line


def flag_of(f: dataclasses.Field) -> str:
    """The command-line flag of a TrainConfig field (``--field-name`` unless its metadata names another)."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def cli_fields() -> list[dataclasses.Field]:
    """The TrainConfig fields that have a flag, in declaration order."""
    return [f for f in dataclasses.fields(TrainConfig) if f.metadata.get("cli", True)]


def _argparse_kwargs(f: dataclasses.Field, hint: Any) -> dict[str, Any]:
    """``type`` / ``nargs`` / ``action`` / ``choices`` for a field, from its annotation and metadata."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:  # X | None
        hint = next(a for a in args if a is not type(None))
    if hint is bool:
        return {"action": argparse.BooleanOptionalAction}
    kw: dict[str, Any] = {}
    if typing.get_origin(hint) is tuple:
        items = typing.get_args(hint)
        kw.update(type=items[0], nargs=len(items))
    elif hint in (int, float):
        kw["type"] = hint
    elif hint is not str:
        raise TypeError(
            f"{f.name}: expected a field type the CLI can parse (bool, int, float, str, a tuple of "
            f"them, or Optional of one), got {hint!r}; give it metadata cli=False"
        )
    if f.metadata.get("choices") is not None:
        kw["choices"] = f.metadata["choices"]
    return kw


def _help(f: dataclasses.Field) -> str:
    shown = f.metadata.get("default_text")
    if shown is None:
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = " ".join(str(v) for v in default) if isinstance(default, tuple) else str(default)
    return f"{f.metadata['help']} (default: {shown})"


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    """The training CLI, one flag per :func:`cli_fields` field, grouped as the dataclass is (its
    metadata gives the help text and choices). Every flag defaults to "not given" (argparse.SUPPRESS)
    so that :func:`config_from_args` can tell given flags from defaults (needed by --resume)."""
    p = argparse.ArgumentParser(
        prog=prog,
        usage="%(prog)s [options]  (all listed below, by group)",
        argument_default=argparse.SUPPRESS,
        description="Train SASRec / STOSA with AWRSR attention refinement; writes a run directory "
        "(config.json, metrics.jsonl, best.pt, last.pt, final.json). Also runs under "
        "torchrun --nproc_per_node=N for data parallelism.",
    )
    hints = typing.get_type_hints(TrainConfig)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in cli_fields():
        group = f.metadata["group"]
        if group not in groups:
            groups[group] = p.add_argument_group(group)
        groups[group].add_argument(flag_of(f), dest=f.name, help=_help(f), **_argparse_kwargs(f, hints[f.name]))
    return p


def _given(ns: argparse.Namespace) -> dict[str, Any]:
    given = dict(vars(ns))
    if "betas" in given:
        given["betas"] = tuple(given["betas"])
    return given


def _flags(names) -> str:
    by_name = {f.name: flag_of(f) for f in cli_fields()}
    return ", ".join(by_name.get(n, n) for n in sorted(names))


def _cli_message(message: str) -> str:
    """A TrainConfig error (``"field: ..."``) worded with the field's flag (``"--field: ..."``)."""
    name, sep, rest = message.partition(":")
    return f"{_flags([name])}:{rest}" if sep and name in {f.name for f in cli_fields()} else message


def config_from_args(argv: Sequence[str] | None = None) -> TrainConfig:
    """Parse the command line into a :class:`TrainConfig` (with --resume: the stored config plus
    the given flags, which must be in :data:`RESUME_MUTABLE`)."""
    parser = build_parser()
    given = _given(parser.parse_args(argv))
    resume = given.get("resume")
    try:
        if resume:
            if not (Path(resume) / "config.json").is_file():
                parser.error(f"--resume: expected a run directory (with config.json and last.pt), got {resume!r}")
            base = load_config(resume).to_dict()
            changed: list[str] = [
                k for k, v in given.items() if k not in RESUME_MUTABLE and _norm(base.get(k)) != _norm(v)
            ]
            if changed:
                parser.error(
                    f"--resume: expected only {_flags(RESUME_MUTABLE)} to differ from the stored run, "
                    f"got {_flags(changed)}"
                )
            base.update(given)
            base["out"] = str(resume)
            return TrainConfig.from_dict(base)
        return TrainConfig.for_model(given.pop("model", "sasrec"), **given)
    except ValueError as exc:
        parser.error(_cli_message(str(exc)))
        raise  # unreachable


def _norm(v):
    return list(v) if isinstance(v, tuple) else v
