"""Training configuration: one dataclass, its command-line flags, and the resume rules.

:class:`TrainConfig` holds every knob of a run; ``config.json`` in the run directory is its
``to_dict()``. The command line (:func:`build_parser`) has one flag per field; flags that are not
given keep the dataclass default, or, with ``--resume RUN_DIR``, the value stored in that run's
``config.json`` (only the fields in :data:`RESUME_MUTABLE` may then change, e.g. ``--epochs``).

Defaults are sized so that ``python -m awr_fast.train`` finishes in a few minutes on two CPU cores
with the embedded synthetic data set; the paper's settings are flags (SPEC §6: d in {64, 128},
n in {20..100}, lr in {1e-3, 1e-4}, L2 in {1e-1, 1e-2, 1e-3}, dropout in {0.3, 0.5, 0.7}).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

__all__ = ["ARCH_FIELDS", "MODELS", "RESUME_MUTABLE", "TrainConfig", "build_parser", "config_from_args",
           "load_config"]

MODELS = ("sasrec", "stosa")
ATTENTIONS = {"sasrec": ("none", "simp", "add", "value"), "stosa": ("none", "simp", "add", "value", "stoc")}
AMP_MODES = ("none", "bf16", "fp16")
OPTIMIZERS = ("adam", "adamw")

#: Fields that may differ between a run and its resumption (everything else must match).
RESUME_MUTABLE = frozenset({"epochs", "patience", "eval_every", "quiet", "tensorboard", "device", "resume",
                            "eval_batch_size", "num_threads", "backend", "out"})
#: Fields that change the parameters' shapes (checked when loading a checkpoint into a model).
ARCH_FIELDS = ("model", "attention", "d_model", "n_layers", "n_heads", "max_len", "per_head_refine",
               "refine_input", "layout", "loss")


@dataclass
class TrainConfig:
    """Every setting of a training run (see ``python -m awr_fast.train --help``)."""

    # model
    model: str = "sasrec"
    attention: str = "simp"
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 1
    max_len: int = 50
    dropout: float = 0.2
    attn_dropout: Optional[float] = None  # None: same as dropout (sasrec), 0.0 (stosa, as released)
    per_head_refine: bool = False
    refine_input: str = "probs"
    refine_scale: str = "d_h"
    backend: str = "auto"
    layout: str = "original"  # sasrec
    loss: str = "bce"  # sasrec
    num_negatives: Optional[int] = None  # sasrec: None = the model's default (1 for bce, 100 for sampled_ce)
    pvn: float = 0.005  # stosa
    stosa_compat: bool = False  # stosa
    # optimisation
    optimizer: str = "adam"
    lr: float = 5e-3  # sized for the synthetic default; the paper's grid is {1e-3, 1e-4}
    l2: float = 0.0
    betas: Tuple[float, float] = (0.9, 0.98)
    clip_grad: float = 0.0  # 0: no clipping (the global norm is still logged)
    batch_size: int = 128
    epochs: int = 30
    patience: int = 20
    seed: int = 42
    amp: str = "none"
    # data
    dataset: str = "synthetic"
    data: Optional[str] = None  # a file path; wins over dataset
    kcore: str = "iterative"
    synthetic: Dict[str, Any] = field(default_factory=dict)  # make_synthetic arguments (dataset "synthetic")
    length_bucketing: bool = True
    bucket_batches: int = 50
    trim_padding: bool = True  # drop a batch's all-padding columns: the same model function, less work
    # evaluation
    eval_every: int = 1
    eval_batch_size: int = 256
    exclude_history: bool = False
    protocol: str = "full"
    # run
    device: str = "auto"
    out: Optional[str] = None
    resume: Optional[str] = None
    tensorboard: bool = False
    quiet: bool = False
    num_threads: Optional[int] = None
    ddp_find_unused: bool = False
    extra: Dict[str, Any] = field(default_factory=dict)  # further model keyword arguments

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {self.model!r}")
        if self.attention not in ATTENTIONS[self.model]:
            raise ValueError(f"attention for {self.model} must be one of {ATTENTIONS[self.model]}, "
                             f"got {self.attention!r}")
        if self.amp not in AMP_MODES:
            raise ValueError(f"amp must be one of {AMP_MODES}, got {self.amp!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.protocol not in ("full", "sampled100"):
            raise ValueError(f"protocol must be 'full' or 'sampled100', got {self.protocol!r}")
        for name in ("d_model", "n_layers", "n_heads", "max_len", "batch_size", "epochs", "eval_every",
                     "eval_batch_size", "bucket_batches"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.patience < 0:
            raise ValueError(f"patience must be >= 0, got {self.patience}")
        if self.d_model % self.n_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must divide d_model ({self.d_model})")
        self.betas = tuple(float(b) for b in self.betas)

    # ------------------------------------------------------------------------------------------
    @property
    def data_source(self) -> str:
        return self.data if self.data else self.dataset

    def resolved_attn_dropout(self) -> float:
        if self.attn_dropout is not None:
            return float(self.attn_dropout)
        return 0.0 if self.model == "stosa" else float(self.dropout)

    def model_kwargs(self, num_items: int) -> Dict[str, Any]:
        """Keyword arguments of :func:`awr_fast.models.build_model` (besides the name)."""
        kw: Dict[str, Any] = dict(num_items=int(num_items), max_len=self.max_len, d_model=self.d_model,
                                  n_layers=self.n_layers, n_heads=self.n_heads, dropout=self.dropout,
                                  attn_dropout=self.resolved_attn_dropout(), attention=self.attention,
                                  per_head_refine=self.per_head_refine, refine_input=self.refine_input,
                                  refine_scale=self.refine_scale, backend=self.backend)
        if self.model == "sasrec":
            kw.update(layout=self.layout, loss=self.loss, num_negatives=self.num_negatives)
        else:
            kw.update(pvn=self.pvn, stosa_compat=self.stosa_compat)
        kw.update(self.extra)
        return kw

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown config keys: {unknown}")
        d = dict(d)
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        return cls(**d)

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


def load_config(run_dir) -> TrainConfig:
    """The :class:`TrainConfig` stored in ``RUN_DIR/config.json``."""
    with open(Path(run_dir) / "config.json", encoding="utf-8") as f:
        return TrainConfig.from_dict(json.load(f))


# ----------------------------------------------------------------------------------------------
# command line


def build_parser(prog: str = "python -m awr_fast.train") -> argparse.ArgumentParser:
    """The training CLI. Every flag defaults to "not given" (argparse.SUPPRESS) so that
    :func:`config_from_args` can tell given flags from defaults (needed by --resume)."""
    p = argparse.ArgumentParser(
        prog=prog, argument_default=argparse.SUPPRESS,
        description="Train SASRec / STOSA with AWRSR attention refinement; writes a run directory "
                    "(config.json, metrics.jsonl, best.pt, last.pt, final.json). Also runs under "
                    "torchrun --nproc_per_node=N for data parallelism.",
        )
    d = TrainConfig()
    BOOL = argparse.BooleanOptionalAction

    def add(group, flag, help, **kw):
        dest = flag.lstrip("-").replace("-", "_")
        default = getattr(d, dest, None)
        group.add_argument(flag, help=f"{help} (default: {default})", **kw)

    g = p.add_argument_group("model")
    add(g, "--model", "backbone", choices=MODELS)
    add(g, "--attention", "AWRSR refinement mechanism (stoc: stosa only)",
        choices=sorted({a for v in ATTENTIONS.values() for a in v}))
    add(g, "--d-model", "embedding width d", type=int)
    add(g, "--n-layers", "attention blocks", type=int)
    add(g, "--n-heads", "attention heads", type=int)
    add(g, "--max-len", "padded sequence length n", type=int)
    add(g, "--dropout", "dropout rate", type=float)
    add(g, "--attn-dropout", "attention-weight dropout (None: --dropout for sasrec, 0 for stosa)", type=float)
    add(g, "--per-head-refine", "one set of refinement matrices per head", action=BOOL)
    add(g, "--refine-input", "refinement input A: post-softmax probabilities or masked scores",
        choices=("probs", "scores"))
    add(g, "--refine-scale", "refinement scale c = 1/sqrt(d_h | d | n)", choices=("d_h", "d", "n"))
    add(g, "--backend", "attention backend: auto, reference, triton, cuda")
    add(g, "--layout", "sasrec block layout", choices=("original", "post_ln"))
    add(g, "--loss", "sasrec loss", choices=("bce", "ce", "sampled_ce"))
    add(g, "--num-negatives", "sasrec negatives per position (None: 1 for bce, 100 for sampled_ce)", type=int)
    add(g, "--pvn", "stosa positive-vs-negative loss weight", type=float)
    add(g, "--stosa-compat", "stosa: the released encoder's behaviour (mean stream not updated)", action=BOOL)

    g = p.add_argument_group("optimisation")
    add(g, "--optimizer", "Adam (L2 added to the gradient) or AdamW (decoupled decay)", choices=OPTIMIZERS)
    add(g, "--lr", "learning rate", type=float)
    add(g, "--l2", "weight decay (L2)", type=float)
    add(g, "--betas", "Adam betas", type=float, nargs=2)
    add(g, "--clip-grad", "clip the global gradient norm to this value (0: off)", type=float)
    add(g, "--batch-size", "training rows per step (global, over all processes)", type=int)
    add(g, "--epochs", "maximum epochs", type=int)
    add(g, "--patience", "early stopping: evaluations without a better valid NDCG@5", type=int)
    add(g, "--seed", "seed (model init, epoch order, negatives, dropout)", type=int)
    add(g, "--amp", "mixed precision: bf16, or fp16 with a GradScaler", choices=AMP_MODES)

    g = p.add_argument_group("data")
    add(g, "--dataset", "named data set: synthetic (embedded), ml-1m, ml-100k, beauty")
    add(g, "--data", "path of a data file (wins over --dataset)")
    add(g, "--kcore", "k-core filter", choices=("iterative", "single", "none"))
    add(g, "--length-bucketing", "group training rows of similar length into batches", action=BOOL)
    add(g, "--bucket-batches", "length bucketing pool size, in batches", type=int)
    add(g, "--trim-padding", "drop the columns that are padding in every row of a batch (training and "
        "evaluation), so the work follows the batch's longest sequence; the model computes the same function",
        action=BOOL)

    g = p.add_argument_group("evaluation")
    add(g, "--eval-every", "evaluate on valid every this many epochs", type=int)
    add(g, "--eval-batch-size", "users scored per chunk", type=int)
    add(g, "--exclude-history", "drop the user's past items from the ranking (STOSA's protocol)", action=BOOL)
    add(g, "--protocol", "full ranking, or sampled100 (target + 100 negatives; keys 'sampled_*')",
        choices=("full", "sampled100"))

    g = p.add_argument_group("run")
    add(g, "--device", "auto, cpu, cuda, cuda:1, ...")
    add(g, "--out", "run directory (default: runs/<timestamp>-<model>-<attention>)")
    add(g, "--resume", "continue the run in this directory from its last.pt")
    add(g, "--tensorboard", "also log to TensorBoard (RUN_DIR/tb), if installed", action=BOOL)
    add(g, "--quiet", "no progress bars or per-epoch lines", action=BOOL)
    add(g, "--num-threads", "torch CPU threads (default: torch's choice)", type=int)
    add(g, "--ddp-find-unused", "DDP find_unused_parameters", action=BOOL)
    return p


def _given(ns: argparse.Namespace) -> Dict[str, Any]:
    given = dict(vars(ns))
    if "betas" in given:
        given["betas"] = tuple(given["betas"])
    return given


def config_from_args(argv: Optional[Sequence[str]] = None) -> TrainConfig:
    """Parse the command line into a :class:`TrainConfig` (with --resume: the stored config plus
    the given flags, which must be in :data:`RESUME_MUTABLE`)."""
    parser = build_parser()
    given = _given(parser.parse_args(argv))
    resume = given.get("resume")
    if resume:
        base = load_config(resume).to_dict()
        changed: List[str] = [k for k, v in given.items()
                              if k not in RESUME_MUTABLE and _norm(base.get(k)) != _norm(v)]
        if changed:
            parser.error(f"--resume: these settings differ from the stored run and cannot change: "
                         f"{', '.join('--' + k.replace('_', '-') for k in changed)}")
        base.update(given)
        base["out"] = str(resume)
        return TrainConfig.from_dict(base)
    try:
        return TrainConfig(**given)
    except ValueError as exc:
        parser.error(str(exc))
        raise  # unreachable


def _norm(v):
    return list(v) if isinstance(v, tuple) else v
