"""Training: configuration, the epoch loop, evaluation, checkpoints, data parallelism, batching.

The command-line face is :mod:`awr_fast.train` (``python -m awr_fast.train``, ``train(config)``).

    config       TrainConfig, the CLI flags, resume rules
    loop         optimiser, AMP, one epoch, early stopping
    evaluate     batched full-ranking / sampled-100 evaluation, the popularity baseline
    checkpoint   atomic checkpoints with every RNG state
    distributed  torchrun process groups, rank-0 gating, reductions
    sampler      epoch order and generators from (seed, epoch), length bucketing, DDP sharding
"""

from .checkpoint import get_rng_state, load_checkpoint, save_checkpoint, set_rng_state
from .config import TrainConfig, build_parser, config_from_args, load_config
from .distributed import DistInfo, init_distributed
from .evaluate import PROTOCOLS, evaluate, evaluate_popularity, evaluate_scores, selection_key
from .loop import EarlyStopping, LossModule, autocast, make_optimizer, make_scaler, train_epoch
from .sampler import (
    LengthBucketBatchSampler,
    RandomBatchSampler,
    epoch_generator,
    epoch_seed,
    make_batch_sampler,
    shard_batch,
)

__all__ = [
    "PROTOCOLS",
    "DistInfo",
    "EarlyStopping",
    "LengthBucketBatchSampler",
    "LossModule",
    "RandomBatchSampler",
    "TrainConfig",
    "autocast",
    "build_parser",
    "config_from_args",
    "epoch_generator",
    "epoch_seed",
    "evaluate",
    "evaluate_popularity",
    "evaluate_scores",
    "get_rng_state",
    "init_distributed",
    "load_checkpoint",
    "load_config",
    "make_batch_sampler",
    "make_optimizer",
    "make_scaler",
    "save_checkpoint",
    "selection_key",
    "set_rng_state",
    "shard_batch",
    "train_epoch",
]
