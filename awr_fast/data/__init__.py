"""Data loading for sequential recommendation: readers, preprocessing, synthetic data, data sets.

Typical use::

    from awr_fast.data import load_dataset
    ds = load_dataset("ml-1m", max_len=200)      # or "synthetic", "beauty", or a file path
    ds.train_input, ds.train_pos                   # (R, n) int64, left padded with 0
    ds.valid_input, ds.valid_target                # (V, n), (V,)
    ds.history_mask("valid", rows)                 # bool (len(rows), num_items + 1) for exclude_history

Ids are 1-based; 0 is padding everywhere. See :mod:`awr_fast.data.preprocess` for the split and
padding conventions and :mod:`awr_fast.data.readers` for the file layouts.
"""

from .dataset import (
    CACHE_ENV,
    DATA_ENV,
    KNOWN_DATASETS,
    DatasetUnavailableError,
    SeqDataset,
    build_dataset,
    default_cache_dir,
    file_sha256,
    load_dataset,
    load_sequences,
    resolve_source,
)
from .preprocess import (
    KCORE_MODES,
    Sequences,
    eval_arrays,
    history_csr,
    kcore_mask,
    left_pad,
    prefix_arrays,
    preprocess,
    sequences_from_lists,
    sort_by_time,
    train_arrays,
    train_item_counts,
    train_lengths,
)
from .readers import (
    FORMATS,
    DataFormatError,
    Interactions,
    detect_format,
    read_amazon_csv,
    read_amazon_json,
    read_interactions,
    read_movielens_dat,
    read_movielens_tsv,
    read_sasrec,
    read_sequences,
)
from .synthetic import make_synthetic, synthetic_config, synthetic_hash

__all__ = [
    "CACHE_ENV",
    "DATA_ENV",
    "FORMATS",
    "KCORE_MODES",
    "KNOWN_DATASETS",
    "DataFormatError",
    "DatasetUnavailableError",
    "Interactions",
    "SeqDataset",
    "Sequences",
    "build_dataset",
    "default_cache_dir",
    "detect_format",
    "eval_arrays",
    "file_sha256",
    "history_csr",
    "kcore_mask",
    "left_pad",
    "load_dataset",
    "load_sequences",
    "make_synthetic",
    "prefix_arrays",
    "preprocess",
    "read_amazon_csv",
    "read_amazon_json",
    "read_interactions",
    "read_movielens_dat",
    "read_movielens_tsv",
    "read_sasrec",
    "read_sequences",
    "resolve_source",
    "sequences_from_lists",
    "sort_by_time",
    "synthetic_config",
    "synthetic_hash",
    "train_arrays",
    "train_item_counts",
    "train_lengths",
]
