"""`load_dataset`: named or file data sets -> preprocessed, split, padded :class:`SeqDataset`.

Names: ``"synthetic"`` (embedded generator), ``"ml-1m"``, ``"ml-100k"``, ``"beauty"``. A named
public data set resolves, in order, to (1) its local copy in the folder named by the environment
variable ``AWR_FAST_DATA`` (the project's shared data: ``ml-1m.txt.gz``, ``ml-100k_u.data``,
``Beauty.txt``), (2) a previous download in ``<cache>/downloads``, (3) a download from the
official/public URL, verified against a pinned sha256 (only when ``download=True`` and
``AWR_FAST_OFFLINE`` is not set). Anything else is treated as a path to a supported file.

Preprocessed sequences are cached as ``.npz`` under ``<cache>/preprocessed``, keyed by the sha256
of the source file plus every preprocessing option; padded arrays are rebuilt from the cached
sequences for the requested ``max_len`` (cheap, vectorised), so one cache entry serves every n.
The cache directory is the ``cache_dir`` argument, else ``$AWR_FAST_CACHE``, else
``~/.cache/awr_fast``. Files are written atomically (temp file + ``os.replace``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np

from ..atomic import atomic_write
from . import preprocess as pp
from .readers import FORMATS, PathLike, detect_format, normalize_format, read_interactions
from .synthetic import make_synthetic, synthetic_config, synthetic_hash

__all__ = [
    "CACHE_ENV",
    "DATA_ENV",
    "DatasetUnavailableError",
    "KNOWN_DATASETS",
    "PREPROCESS_VERSION",
    "SeqDataset",
    "build_dataset",
    "default_cache_dir",
    "file_sha256",
    "load_dataset",
    "load_sequences",
    "resolve_source",
]

CACHE_ENV = "AWR_FAST_CACHE"
DATA_ENV = "AWR_FAST_DATA"
OFFLINE_ENV = "AWR_FAST_OFFLINE"
#: Part of every cache key; bump when preprocessing output changes for the same inputs.
PREPROCESS_VERSION = 1
_DOWNLOAD_TIMEOUT_S = 15.0


class DatasetUnavailableError(RuntimeError):
    """A named data set is neither available locally nor downloadable (e.g. no network)."""


@dataclass(frozen=True)
class _Remote:
    url: str
    sha256: str
    size: Optional[int]
    filename: str  # name of the downloaded file in <cache>/downloads
    member: Optional[str]  # file to extract from a zip, else None
    member_name: Optional[str]  # extracted file name in <cache>/downloads
    local_names: Tuple[str, ...]  # names tried in $AWR_FAST_DATA
    description: str


KNOWN_DATASETS: Dict[str, _Remote] = {
    # Official GroupLens archives; sha256 as pinned by tensorflow/datasets
    # (tensorflow_datasets/url_checksums/movielens.txt).
    "ml-1m": _Remote(
        url="https://files.grouplens.org/datasets/movielens/ml-1m.zip",
        sha256="a6898adb50b9ca05aa231689da44c217cb524e7ebd39d264c56e2832f2c54e20",
        size=5917549,
        filename="ml-1m.zip",
        member="ml-1m/ratings.dat",
        member_name="ml-1m_ratings.dat",
        local_names=("ml-1m.txt.gz", "ml-1m.txt"),
        description="MovieLens-1M ratings (GroupLens)",
    ),
    "ml-100k": _Remote(
        url="https://files.grouplens.org/datasets/movielens/ml-100k.zip",
        sha256="50d2a982c66986937beb9ffb3aa76efe955bf3d5c6b761f4e3a7cd717c6a3229",
        size=4924029,
        filename="ml-100k.zip",
        member="ml-100k/u.data",
        member_name="ml-100k_u.data",
        local_names=("ml-100k_u.data",),
        description="MovieLens-100K u.data (GroupLens)",
    ),
    # The 5-core Amazon Beauty sequences used by S3Rec/STOSA/ICLRec, pinned to a commit.
    "beauty": _Remote(
        url="https://raw.githubusercontent.com/RUCAIBox/CIKM2020-S3Rec/"
        "2a81540ae18615d88ef88227b0c066e5b74781e5/data/Beauty.txt",
        sha256="226cce9c3105299ca0db9615d7d3fb32b3175e90da43100ae352599f0f0107b8",
        size=None,
        filename="Beauty.txt",
        member=None,
        member_name=None,
        local_names=("Beauty.txt",),
        description="Amazon Beauty 5-core sequences (RUCAIBox/CIKM2020-S3Rec)",
    ),
}
_ALIASES = {
    "movielens-1m": "ml-1m",
    "ml1m": "ml-1m",
    "movielens-100k": "ml-100k",
    "ml100k": "ml-100k",
    "amazon-beauty": "beauty",
}


# ----------------------------------------------------------------------------------------------
# the data set


@dataclass(frozen=True, eq=False, repr=False)
class SeqDataset:
    """A preprocessed, leave-one-out split sequential-recommendation data set.

    Ids: users ``1..num_users``, items ``1..num_items``; **0 is padding**. All arrays are numpy
    ``int64``. Padded arrays are ``(rows, max_len)``, **left padded** with 0 (column ``max_len-1``
    is the most recent item) and truncated on the left.

    Attributes:
        name: data set name or file name.
        source_hash: sha256 of the source file (or of the synthetic generator's arguments).
        options: preprocessing options used (format, kcore, user_min, item_min, ...).
        num_users, num_items: counts after filtering.
        max_len: n, the padded length.
        history_indptr, history_items: full chronological sequence of every user in CSR form
            (row ``u-1`` = user ``u``; valid and test items included). Use :meth:`history_csr`
            for the leak-free per-split histories that ``exclude_history`` needs.
        user_ids, item_ids: raw id of each new id, ``(N + 1,)``; entry 0 is a placeholder.
        item_counts: ``(num_items + 1,)`` training-interaction count per item (entry 0 = 0).
        train_users ``(R,)``, train_input ``(R, max_len)``, train_pos ``(R, max_len)``: SASRec
            training pairs; ``train_pos[r, j]`` is the item following ``train_input[r, j]``
            (both 0 at padded positions). Users whose training sequence has < 2 items are absent.
        valid_users ``(V,)``, valid_input ``(V, max_len)``, valid_target ``(V,)``: input = train
            sequence, target = second-to-last item; users with >= 3 items only.
        test_users ``(V,)``, test_input ``(V, max_len)``, test_target ``(V,)``: input = train
            sequence + valid item, target = last item.
    """

    name: str
    source_hash: str
    options: Dict[str, Any]
    num_users: int
    num_items: int
    max_len: int
    history_indptr: np.ndarray
    history_items: np.ndarray
    user_ids: np.ndarray
    item_ids: np.ndarray
    item_counts: np.ndarray
    train_users: np.ndarray
    train_input: np.ndarray
    train_pos: np.ndarray
    valid_users: np.ndarray
    valid_input: np.ndarray
    valid_target: np.ndarray
    test_users: np.ndarray
    test_input: np.ndarray
    test_target: np.ndarray
    _seqs: pp.Sequences = field(repr=False, compare=False, default=None)

    @property
    def sequences(self) -> pp.Sequences:
        """The underlying :class:`~awr_fast.data.preprocess.Sequences`."""
        return self._seqs

    @property
    def num_interactions(self) -> int:
        return int(self.history_items.shape[0])

    def sequence(self, user: int) -> np.ndarray:
        """User ``user``'s full chronological item sequence (1-based id)."""
        return self._seqs.sequence(user)

    def history_csr(self, split: str, users: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
        """Items seen before ``split``'s target, CSR rows aligned with ``users`` (default: the
        ``{split}_users`` array). ``"train"`` gives the training sequence (negative sampling)."""
        if users is None:
            users = {"train": self.train_users, "valid": self.valid_users, "test": self.test_users}[split]
        return pp.history_csr(self._seqs, split, users)

    def history_mask(self, split: str, rows: Optional[np.ndarray] = None, device=None):
        """torch.bool ``(len(rows), num_items + 1)``: True where the item is in the user's history
        before ``split``'s target; pass as ``exclude=`` to the metrics. ``rows`` are positions in
        ``{split}_users`` (e.g. the batch slice), default all."""
        from ..metrics import csr_exclusion_mask

        users = {"train": self.train_users, "valid": self.valid_users, "test": self.test_users}[split]
        if rows is not None:
            users = users[np.asarray(rows, dtype=np.int64)]
        indptr, indices = pp.history_csr(self._seqs, split, users)
        return csr_exclusion_mask(indptr, indices, self.num_items + 1, device=device)

    def __repr__(self) -> str:
        return f"SeqDataset({self.summary()}, source_hash={self.source_hash[:12]}..., options={self.options})"

    def summary(self) -> str:
        """One-line description (counts, lengths, split sizes)."""
        lens = np.diff(self.history_indptr)
        return (
            f"{self.name}: {self.num_users} users, {self.num_items} items, {self.num_interactions} "
            f"interactions (len {int(lens.min())}..{int(lens.max())}, mean {lens.mean():.1f}); "
            f"train rows {len(self.train_users)}, eval users {len(self.valid_users)}, n={self.max_len}"
        )


def build_dataset(
    seqs: pp.Sequences,
    *,
    max_len: int,
    name: str = "custom",
    source_hash: str = "",
    options: Optional[Dict[str, Any]] = None,
) -> SeqDataset:
    """Split and pad preprocessed :class:`~awr_fast.data.preprocess.Sequences` into a SeqDataset."""
    max_len = int(max_len)
    if max_len < 1:
        raise ValueError(f"max_len: expected an int >= 1, got {max_len}")
    tr_u, tr_in, tr_pos = pp.train_arrays(seqs, max_len)
    va_u, va_in, va_t = pp.eval_arrays(seqs, "valid", max_len)
    te_u, te_in, te_t = pp.eval_arrays(seqs, "test", max_len)
    return SeqDataset(
        name=name,
        source_hash=source_hash,
        options=dict(options or {}),
        num_users=seqs.num_users,
        num_items=seqs.num_items,
        max_len=max_len,
        history_indptr=seqs.indptr,
        history_items=seqs.items,
        user_ids=seqs.user_ids,
        item_ids=seqs.item_ids,
        item_counts=pp.train_item_counts(seqs),
        train_users=tr_u,
        train_input=tr_in,
        train_pos=tr_pos,
        valid_users=va_u,
        valid_input=va_in,
        valid_target=va_t,
        test_users=te_u,
        test_input=te_in,
        test_target=te_t,
        _seqs=seqs,
    )


# ----------------------------------------------------------------------------------------------
# hashing, cache


def default_cache_dir(cache_dir: Optional[PathLike] = None) -> Path:
    """``cache_dir`` if given, else ``$AWR_FAST_CACHE``, else ``~/.cache/awr_fast``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "awr_fast"


def file_sha256(path: PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes (as stored, i.e. of the .gz for gzipped files)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _cache_key(source_hash: str, options: Dict[str, Any]) -> str:
    blob = json.dumps(
        {"source_sha256": source_hash, "preprocess_version": PREPROCESS_VERSION, **options}, sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def _save_sequences(path: Path, seqs: pp.Sequences, meta: Dict[str, Any]) -> None:
    arrays = dict(
        indptr=seqs.indptr,
        items=seqs.items,
        user_ids=seqs.user_ids,
        item_ids=seqs.item_ids,
        meta=np.array(json.dumps(meta, sort_keys=True)),
    )
    atomic_write(path, lambda f: np.savez(f, **arrays))


def _load_sequences(path: Path, key: str) -> Optional[pp.Sequences]:
    """The cached sequences, or None if absent, unreadable or for another key."""
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            if meta.get("key") != key:
                return None
            seqs = pp.Sequences(indptr=z["indptr"], items=z["items"], user_ids=z["user_ids"], item_ids=z["item_ids"])
        seqs.validate()
        return seqs
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError):
        return None


def load_sequences(
    path: PathLike,
    *,
    fmt: Optional[str] = None,
    kcore: str = "iterative",
    user_min: int = 5,
    item_min: int = 5,
    csv_order: str = "auto",
    cache_dir: Optional[PathLike] = None,
    use_cache: bool = True,
) -> Tuple[pp.Sequences, str, Dict[str, Any]]:
    """Read and preprocess a file, through the cache.

    Returns:
        (sequences, source sha256, options dict used in the cache key)
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such data file: {path}")
    resolved = normalize_format(fmt) if fmt is not None else detect_format(path)
    options = {"format": resolved, "kcore": kcore, "user_min": int(user_min), "item_min": int(item_min)}
    if resolved == "amazon-csv":
        options["csv_order"] = csv_order
    if kcore not in pp.KCORE_MODES:
        raise ValueError(f"kcore: expected one of {list(pp.KCORE_MODES)}, got {kcore!r}")
    source_hash = file_sha256(path)
    key = _cache_key(source_hash, options)
    cache_file = default_cache_dir(cache_dir) / "preprocessed" / f"{_safe_stem(path)}-{key[:20]}.npz"
    if use_cache and cache_file.is_file():
        seqs = _load_sequences(cache_file, key)
        if seqs is not None:
            return seqs, source_hash, options
    interactions = read_interactions(path, resolved, csv_order=csv_order)
    seqs = pp.preprocess(interactions, kcore=kcore, user_min=user_min, item_min=item_min)
    if use_cache:
        meta = {
            "key": key,
            "source_sha256": source_hash,
            "source": str(path),
            **options,
            "preprocess_version": PREPROCESS_VERSION,
        }
        try:
            _save_sequences(cache_file, seqs, meta)
        except OSError:  # a read-only or full cache must not stop the run
            pass
    return seqs, source_hash, options


def _safe_stem(path: Path) -> str:
    stem = path.name
    for suffix in (".gz", ".txt", ".data", ".dat", ".csv", ".json", ".jsonl"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in stem) or "data"


# ----------------------------------------------------------------------------------------------
# named data sets


def _download(remote: _Remote, name: str, dest: Path) -> None:
    hint = (
        f"Could not obtain the '{name}' data set ({remote.description}) from {remote.url}. "
        f"Without network access, download it elsewhere (or use any supported local file) and "
        f"pass its path instead: --data PATH (or load_dataset(PATH, ...)); alternatively set "
        f"{DATA_ENV} to a folder holding {' or '.join(remote.local_names)}."
    )
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + dest.name + ".", suffix=".part", dir=dest.parent)
    h = hashlib.sha256()
    try:
        try:
            req = urllib.request.Request(remote.url, headers={"User-Agent": "awr_fast"})
            with urllib.request.urlopen(req, timeout=_DOWNLOAD_TIMEOUT_S) as resp, os.fdopen(fd, "wb") as out:
                fd = None
                for block in iter(lambda: resp.read(1 << 20), b""):
                    h.update(block)
                    out.write(block)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise DatasetUnavailableError(f"{hint} ({exc.__class__.__name__}: {exc})") from exc
        if h.hexdigest() != remote.sha256:
            raise DatasetUnavailableError(
                f"{hint} (checksum mismatch: got sha256 {h.hexdigest()}, expected {remote.sha256})"
            )
        os.replace(tmp, dest)
    finally:
        if fd is not None:
            os.close(fd)
        if os.path.exists(tmp):
            os.unlink(tmp)


def resolve_source(name: str, *, cache_dir: Optional[PathLike] = None, download: bool = True) -> Path:
    """Local path of a named public data set (see the module docstring for the search order).

    Raises:
        KeyError: unknown name.
        DatasetUnavailableError: not available locally and not downloadable.
    """
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in KNOWN_DATASETS:
        raise KeyError(
            f"name: expected a known data set (one of {list(KNOWN_DATASETS)}, or an alias: "
            f"{sorted(_ALIASES)}), got {name!r}"
        )
    remote = KNOWN_DATASETS[key]
    data_dir = os.environ.get(DATA_ENV)
    if data_dir:
        for local in remote.local_names:
            cand = Path(data_dir).expanduser() / local
            if cand.is_file():
                return cand
    downloads = default_cache_dir(cache_dir) / "downloads"
    final = downloads / (remote.member_name or remote.filename)
    if final.is_file():
        return final
    archive = downloads / remote.filename
    if not archive.is_file() or file_sha256(archive) != remote.sha256:
        if not download or os.environ.get(OFFLINE_ENV, "").strip() not in ("", "0"):
            raise DatasetUnavailableError(
                f"The '{key}' data set ({remote.description}) is not available locally and downloading "
                f"is disabled. Pass a local file instead: --data PATH (or load_dataset(PATH, ...)), or set "
                f"{DATA_ENV} to a folder holding {' or '.join(remote.local_names)}."
            )
        _download(remote, key, archive)
    if remote.member is not None:
        try:
            with zipfile.ZipFile(archive) as zf, zf.open(remote.member) as src:
                atomic_write(final, lambda f: shutil.copyfileobj(src, f, 1 << 20))
        except (KeyError, zipfile.BadZipFile) as exc:
            raise DatasetUnavailableError(f"{archive} does not contain {remote.member}: {exc}") from exc
    return final


def load_dataset(
    name_or_path: Union[str, PathLike],
    *,
    max_len: int,
    kcore: str = "iterative",
    user_min: int = 5,
    item_min: int = 5,
    cache_dir: Optional[PathLike] = None,
    fmt: Optional[str] = None,
    csv_order: str = "auto",
    download: bool = True,
    use_cache: bool = True,
    synthetic: Optional[Dict[str, Any]] = None,
) -> SeqDataset:
    """Load, preprocess (k-core, remap, leave-one-out split) and pad a data set.

    Args:
        name_or_path: ``"synthetic"``, a known name (``"ml-1m"``, ``"ml-100k"``, ``"beauty"``)
            or a path to any supported file (an existing path wins over a name).
        max_len: n, the padded sequence length.
        kcore: ``"iterative"`` (default, SPEC §6), ``"single"`` (SASRec's one pass) or ``"none"``.
        user_min, item_min: k-core thresholds (default 5 and 5).
        cache_dir: cache folder (default ``$AWR_FAST_CACHE`` or ``~/.cache/awr_fast``).
        fmt: file layout override (see :mod:`awr_fast.data.readers`), default auto-detect.
        csv_order: column order for headerless Amazon csv.
        download: allow downloading named data sets (never needed for files or ``"synthetic"``).
        use_cache: read/write the preprocessed cache (files only; synthetic data is regenerated).
        synthetic: keyword arguments for :func:`~awr_fast.data.synthetic.make_synthetic`.

    Returns:
        :class:`SeqDataset`.
    """
    options_extra: Dict[str, Any] = {}
    if isinstance(name_or_path, str) and name_or_path.lower() == "synthetic" and not Path(name_or_path).is_file():
        if kcore not in pp.KCORE_MODES:
            raise ValueError(f"kcore: expected one of {list(pp.KCORE_MODES)}, got {kcore!r}")
        cfg = synthetic_config(**(synthetic or {}))
        source_hash = synthetic_hash(**cfg)
        seqs = pp.preprocess(make_synthetic(**cfg), kcore=kcore, user_min=user_min, item_min=item_min)
        options = {
            "format": "synthetic",
            "kcore": kcore,
            "user_min": int(user_min),
            "item_min": int(item_min),
            "synthetic": cfg,
        }
        return build_dataset(seqs, max_len=max_len, name="synthetic", source_hash=source_hash, options=options)
    if synthetic:
        raise ValueError(
            f"synthetic: expected None unless the data set is 'synthetic', got {synthetic!r} "
            f"for {os.fspath(name_or_path)!r}"
        )
    path = Path(os.fspath(name_or_path)).expanduser()
    name = path.name
    if not path.is_file():
        key = str(name_or_path).lower()
        if _ALIASES.get(key, key) in KNOWN_DATASETS:
            name = _ALIASES.get(key, key)
            path = resolve_source(name, cache_dir=cache_dir, download=download)
            options_extra["resolved_from"] = name
        else:
            raise FileNotFoundError(
                f"{os.fspath(name_or_path)!r} is neither a data file nor a known data set "
                f"(synthetic, {', '.join(KNOWN_DATASETS)}); supported file layouts: "
                f"{', '.join(FORMATS)}"
            )
    seqs, source_hash, options = load_sequences(
        path,
        fmt=fmt,
        kcore=kcore,
        user_min=user_min,
        item_min=item_min,
        csv_order=csv_order,
        cache_dir=cache_dir,
        use_cache=use_cache,
    )
    options = {**options, "source": str(path), **options_extra}
    return build_dataset(seqs, max_len=max_len, name=name, source_hash=source_hash, options=options)
