"""Readers for the interaction files used by sequential-recommendation papers.

Every reader returns an :data:`Interactions` mapping ``user -> [(item, timestamp_or_None), ...]``
with users in order of first appearance and each user's interactions in file order (no sorting,
no filtering, no id remapping; that is :mod:`awr_fast.data.preprocess`'s job).

Supported layouts (``fmt`` names; aliases in :data:`FORMAT_ALIASES`):

``"sasrec"``
    One interaction per line, ``user item`` or ``user item timestamp`` (whitespace separated
    integers), as in SASRec's ``data/*.txt``. The column count must be the same on every line.
``"seq"``
    One user per line, ``user item1 item2 ...`` (S3Rec / STOSA / ICLRec ``Beauty.txt``), oldest
    first, no timestamps. A user may appear on one line only.
``"ml-dat"``
    MovieLens ``ratings.dat``: ``user::item::rating::timestamp``.
``"ml-tsv"``
    MovieLens-100K ``u.data``: ``user<TAB>item<TAB>rating<TAB>timestamp`` (any whitespace accepted).
``"amazon-json"``
    Amazon reviews, one object per line with ``reviewerID``/``asin``/``unixReviewTime`` (2014/2018
    dumps) or ``user_id``/``parent_asin``/``timestamp`` (2023 dumps). The python-dict style of the
    oldest dumps (``{'reviewerID': ...}``) is accepted too.
``"amazon-csv"``
    Amazon "ratings only" files, four comma-separated columns with the rating and the timestamp
    last. The 2018 files are ``item,user,rating,timestamp``; the 2014 ``ratings_*.csv`` files are
    ``user,item,rating,timestamp``. A header row is detected and used; without one the column
    order is inferred from the id shapes (ASINs are 10 characters) and defaults to
    ``item,user``; pass ``csv_order=`` to force it.

Files are opened in binary mode and gunzipped transparently when they start with the gzip magic
bytes, whatever their name. Ratings are read, validated as numbers and dropped (all interactions
are implicit feedback, as in SASRec). Ids of the numeric layouts are ``int``; Amazon ids are
``str``. Timestamps are ``int`` (or ``float`` when written with a fraction) or ``None``.

Malformed input raises :class:`DataFormatError`, whose message names the file, the 1-based line
number and what was expected.
"""

from __future__ import annotations

import ast
import gzip
import json
import math
import os
import re
import zlib
from pathlib import Path
from typing import Dict, Hashable, Iterator, List, Optional, Tuple, Union

__all__ = [
    "DataFormatError",
    "FORMATS",
    "FORMAT_ALIASES",
    "Interactions",
    "detect_format",
    "iter_lines",
    "normalize_format",
    "open_binary",
    "read_amazon_csv",
    "read_amazon_json",
    "read_interactions",
    "read_movielens_dat",
    "read_movielens_tsv",
    "read_sasrec",
    "read_sequences",
]

PathLike = Union[str, "os.PathLike[str]"]
Timestamp = Optional[Union[int, float]]
#: ``user -> [(item, timestamp or None), ...]`` in file order.
Interactions = Dict[Hashable, List[Tuple[Hashable, Timestamp]]]

FORMATS = ("sasrec", "seq", "ml-dat", "ml-tsv", "amazon-json", "amazon-csv")
FORMAT_ALIASES = {
    "s3rec": "seq",
    "stosa": "seq",
    "iclrec": "seq",
    "sequence": "seq",
    "sequences": "seq",
    "ratings.dat": "ml-dat",
    "movielens": "ml-dat",
    "dat": "ml-dat",
    "u.data": "ml-tsv",
    "ml-100k": "ml-tsv",
    "tsv": "ml-tsv",
    "json": "amazon-json",
    "jsonl": "amazon-json",
    "csv": "amazon-csv",
}

_GZIP_MAGIC = b"\x1f\x8b"
_SNIFF_LINES = 1000


class DataFormatError(ValueError):
    """A data file is corrupt or does not match the expected layout.

    Attributes:
        path: the file (as given).
        line: 1-based line number of the offending line, or None when the problem is not tied to
            one line (e.g. an empty file).
        reason: what was wrong / what was expected.
    """

    def __init__(self, path: PathLike, line: Optional[int], reason: str):
        self.path = os.fspath(path)
        self.line = line
        self.reason = reason
        where = f"{self.path}, line {line}" if line is not None else self.path
        super().__init__(f"{where}: {reason}")


def _show(text: str, limit: int = 80) -> str:
    text = text.rstrip("\r\n")
    return repr(text if len(text) <= limit else text[:limit] + "...")


def open_binary(path: PathLike):
    """Open ``path`` for binary reading, gunzipping it when it starts with the gzip magic bytes."""
    with open(path, "rb") as f:
        magic = f.read(2)
    return gzip.open(path, "rb") if magic == _GZIP_MAGIC else open(path, "rb")


def iter_lines(path: PathLike, limit: Optional[int] = None) -> Iterator[Tuple[int, str]]:
    """Yield ``(line_number, text)`` for the non-blank lines of a (possibly gzipped) UTF-8 file.

    Line numbers are 1-based and count blank lines. The text has its line terminator and a
    leading byte-order mark removed. A truncated/corrupt gzip stream or invalid UTF-8 raises
    :class:`DataFormatError` at the line where it is met. ``limit`` stops after that many lines.
    """
    with open_binary(path) as stream:
        lineno = 0
        it = iter(stream)
        while True:
            try:
                data = next(it)
            except StopIteration:
                break
            except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError
                raise DataFormatError(
                    path,
                    lineno + 1,
                    f"expected a complete gzip stream, got a corrupt or truncated one "
                    f"({exc.__class__.__name__}: {exc})",
                ) from exc
            lineno += 1
            if limit is not None and lineno > limit:
                break
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataFormatError(
                    path, lineno, f"expected UTF-8 text, got invalid UTF-8 ({exc.reason} at byte {exc.start})"
                ) from exc
            if lineno == 1 and text.startswith("\ufeff"):
                text = text[1:]
            text = text.rstrip("\r\n")
            if text.strip():
                yield lineno, text


# ----------------------------------------------------------------------------------------------
# field parsing helpers


def _int(tok: str, path: PathLike, lineno: int, what: str, line: str) -> int:
    try:
        return int(tok)
    except ValueError:
        raise DataFormatError(path, lineno, f"expected an integer {what}, got {tok!r} in {_show(line)}") from None


def _number(tok: str, path: PathLike, lineno: int, what: str, line: str) -> Union[int, float]:
    try:
        return int(tok)
    except ValueError:
        pass
    try:
        value = float(tok)
    except ValueError:
        raise DataFormatError(path, lineno, f"expected a numeric {what}, got {tok!r} in {_show(line)}") from None
    if not math.isfinite(value):
        raise DataFormatError(path, lineno, f"expected a finite {what}, got {tok!r} in {_show(line)}")
    return int(value) if value.is_integer() else value


def _ts(value, path: PathLike, lineno: int, line: str) -> Union[int, float]:
    """Validate a timestamp that came out of a JSON/dict record."""
    if isinstance(value, bool) or value is None:
        raise DataFormatError(path, lineno, f"expected a numeric timestamp, got {value!r} in {_show(line)}")
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            raise DataFormatError(path, lineno, f"expected a finite timestamp, got {value!r}")
        return int(value) if isinstance(value, float) and value.is_integer() else value
    return _number(str(value), path, lineno, "timestamp", line)


def _finish(path: PathLike, out: Interactions) -> Interactions:
    if not out:
        raise DataFormatError(path, None, "expected at least one interaction, got none (empty file?)")
    return out


# ----------------------------------------------------------------------------------------------
# readers


def read_sasrec(path: PathLike) -> Interactions:
    """Read the SASRec layout: ``user item`` or ``user item timestamp`` per line (integers).

    The first data line fixes whether a timestamp column is present; every line must then have
    the same number of columns.
    """
    out: Interactions = {}
    ncols = None
    for lineno, line in iter_lines(path):
        parts = line.split()
        if ncols is None:
            if len(parts) not in (2, 3):
                raise DataFormatError(
                    path,
                    lineno,
                    f"expected 'user item' or 'user item timestamp', got {len(parts)} fields in {_show(line)}",
                )
            ncols = len(parts)
        elif len(parts) != ncols:
            expected = "'user item'" if ncols == 2 else "'user item timestamp'"
            raise DataFormatError(
                path,
                lineno,
                f"expected {expected} ({ncols} fields, as on the first line), got {len(parts)} fields in {_show(line)}",
            )
        user = _int(parts[0], path, lineno, "user id", line)
        item = _int(parts[1], path, lineno, "item id", line)
        ts = _number(parts[2], path, lineno, "timestamp", line) if ncols == 3 else None
        lst = out.get(user)
        if lst is None:
            out[user] = lst = []
        lst.append((item, ts))
    return _finish(path, out)


def read_sequences(path: PathLike) -> Interactions:
    """Read the S3Rec/STOSA layout: ``user item1 item2 ...`` per line (integers, oldest first).

    Timestamps are ``None``. A user id repeated on a later line is an error (the layout has one
    line per user, so a repeat means a corrupt or concatenated file).
    """
    out: Interactions = {}
    first_line: Dict[int, int] = {}
    for lineno, line in iter_lines(path):
        parts = line.split()
        if len(parts) < 2:
            raise DataFormatError(
                path, lineno, f"expected 'user item1 item2 ...' (at least 2 fields), got {_show(line)}"
            )
        user = _int(parts[0], path, lineno, "user id", line)
        if user in out:
            raise DataFormatError(
                path,
                lineno,
                f"expected one line per user in the 'user item1 item2 ...' layout, "
                f"got user {user} again (first on line {first_line[user]})",
            )
        try:
            items = [int(t) for t in parts[1:]]
        except ValueError:
            bad = next(t for t in parts[1:] if not _is_int(t))
            raise DataFormatError(path, lineno, f"expected an integer item id, got {bad!r} in {_show(line)}") from None
        out[user] = [(item, None) for item in items]
        first_line[user] = lineno
    return _finish(path, out)


def _is_int(tok: str) -> bool:
    try:
        int(tok)
        return True
    except ValueError:
        return False


def _read_movielens(path: PathLike, sep: Optional[str], layout: str) -> Interactions:
    out: Interactions = {}
    for lineno, line in iter_lines(path):
        parts = line.split(sep) if sep is not None else line.split()
        if len(parts) != 4:
            raise DataFormatError(
                path, lineno, f"expected {layout} (4 fields), got {len(parts)} fields in {_show(line)}"
            )
        user = _int(parts[0].strip(), path, lineno, "user id", line)
        item = _int(parts[1].strip(), path, lineno, "item id", line)
        _number(parts[2].strip(), path, lineno, "rating", line)
        ts = _number(parts[3].strip(), path, lineno, "timestamp", line)
        lst = out.get(user)
        if lst is None:
            out[user] = lst = []
        lst.append((item, ts))
    return _finish(path, out)


def read_movielens_dat(path: PathLike) -> Interactions:
    """Read MovieLens ``ratings.dat`` (ML-1M/10M): ``user::item::rating::timestamp``."""
    return _read_movielens(path, "::", "'user::item::rating::timestamp'")


def read_movielens_tsv(path: PathLike) -> Interactions:
    """Read MovieLens-100K ``u.data``: ``user item rating timestamp``, tab (or whitespace) separated."""
    return _read_movielens(path, None, "'user<TAB>item<TAB>rating<TAB>timestamp'")


_JSON_KEYS = (  # (user key, item keys in preference order, timestamp key)
    ("reviewerID", ("asin",), "unixReviewTime"),
    ("user_id", ("parent_asin", "asin"), "timestamp"),
)


def read_amazon_json(path: PathLike) -> Interactions:
    """Read Amazon reviews, one JSON object (or python dict literal) per line.

    Uses ``reviewerID``/``asin``/``unixReviewTime`` (2014 and 2018 dumps) or, when there is no
    ``reviewerID``, ``user_id``/``parent_asin`` (else ``asin``)/``timestamp`` (2023 dumps, whose
    timestamps are in milliseconds; only their order matters here). Ids are returned as ``str``.
    """
    out: Interactions = {}
    for lineno, line in iter_lines(path):
        try:
            obj = json.loads(line)
        except ValueError:
            try:
                obj = ast.literal_eval(line.strip())
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                raise DataFormatError(
                    path, lineno, f"expected one JSON object (or python dict) per line, got {_show(line)}"
                ) from None
        if not isinstance(obj, dict):
            raise DataFormatError(path, lineno, f"expected a JSON object, got {type(obj).__name__} in {_show(line)}")
        for ukey, ikeys, tkey in _JSON_KEYS:
            if ukey in obj:
                break
        else:
            raise DataFormatError(path, lineno, f"expected a 'reviewerID' (or 'user_id') field, got {_show(line)}")
        ikey = next((k for k in ikeys if k in obj), None)
        if ikey is None or tkey not in obj:
            missing = [k for k in (ikeys[0] if ikey is None else None, tkey if tkey not in obj else None) if k]
            raise DataFormatError(
                path,
                lineno,
                f"expected {' and '.join(repr(m) for m in missing)} in a record with '{ukey}', got {_show(line)}",
            )
        user, item = obj[ukey], obj[ikey]
        if (
            not isinstance(user, (str, int))
            or not isinstance(item, (str, int))
            or isinstance(user, bool)
            or isinstance(item, bool)
        ):
            raise DataFormatError(path, lineno, f"expected string ids in '{ukey}'/'{ikey}', got {user!r}/{item!r}")
        ts = _ts(obj[tkey], path, lineno, line)
        lst = out.get(str(user))
        if lst is None:
            out[str(user)] = lst = []
        lst.append((str(item), ts))
    return _finish(path, out)


_CSV_USER_NAMES = {"user", "userid", "user_id", "reviewerid", "reviewer_id", "buyer", "customer", "customerid"}
_CSV_ITEM_NAMES = {"item", "itemid", "item_id", "asin", "parent_asin", "productid", "product_id", "product", "movieid"}
_CSV_RATING_NAMES = {"rating", "ratings", "score", "overall", "stars"}
_CSV_TIME_NAMES = {"timestamp", "time", "unixreviewtime", "unix_review_time", "date", "ts"}
_ASIN = re.compile(r"^[0-9A-Z]{10}$")


def _csv_split(line: str):
    if '"' in line:
        import csv

        return next(csv.reader([line]))
    return line.split(",")


def _infer_csv_order(rows) -> str:
    """Guess ``item,user`` vs ``user,item`` for headerless Amazon csv from the id shapes."""
    if not rows:
        return "item,user"
    asin0 = all(_ASIN.match(r[0].strip()) for r in rows)
    asin1 = all(_ASIN.match(r[1].strip()) for r in rows)
    if asin1 and not asin0:
        return "user,item"
    return "item,user"


def read_amazon_csv(path: PathLike, order: str = "auto") -> Interactions:
    """Read Amazon "ratings only" csv: four columns, rating and timestamp last.

    Args:
        path: the file (optionally gzipped).
        order: ``"item,user"`` (2018 files), ``"user,item"`` (2014 ``ratings_*.csv``) or
            ``"auto"``: a header row names the columns (``user``/``UserId``/``reviewerID``,
            ``item``/``ProductId``/``asin``, ``rating``, ``timestamp``); without a header, the
            first two columns are told apart by shape over the first 1000 rows (ASINs are 10
            upper-case alphanumerics) and ``item,user`` is assumed when that does not decide.
    """
    if order not in ("auto", "item,user", "user,item"):
        raise ValueError(f"order: expected one of ['auto', 'item,user', 'user,item'], got {order!r}")
    # Pass 1 (cheap, bounded): header detection and column order.
    head = [(n, _csv_split(t)) for n, t in iter_lines(path, limit=_SNIFF_LINES)]
    if not head:
        raise DataFormatError(path, None, "expected at least one interaction, got none (empty file?)")
    first_no, first = head[0]
    header = len(first) == 4 and not _is_number(first[3].strip())
    cols = {"user": 0, "item": 1, "rating": 2, "time": 3}
    if header:
        names = [c.strip().strip('"').lower() for c in first]
        found = {}
        for idx, name in enumerate(names):
            for key, vocab in (
                ("user", _CSV_USER_NAMES),
                ("item", _CSV_ITEM_NAMES),
                ("rating", _CSV_RATING_NAMES),
                ("time", _CSV_TIME_NAMES),
            ):
                if name in vocab:
                    found[key] = idx
        if set(found) != {"user", "item", "rating", "time"}:
            raise DataFormatError(
                path, first_no, f"expected a header naming user, item, rating and timestamp columns, got {first!r}"
            )
        cols = found
    else:
        resolved = order if order != "auto" else _infer_csv_order([r for _, r in head if len(r) == 4])
        if resolved == "item,user":
            cols = {"item": 0, "user": 1, "rating": 2, "time": 3}
    expected = (
        "'" + ",".join(k if k != "time" else "timestamp" for k, _ in sorted(cols.items(), key=lambda kv: kv[1])) + "'"
    )

    out: Interactions = {}
    for lineno, line in iter_lines(path):
        if header and lineno == first_no:
            continue
        parts = _csv_split(line)
        if len(parts) != 4:
            raise DataFormatError(
                path,
                lineno,
                f"expected {expected} (4 comma-separated fields), got {len(parts)} fields in {_show(line)}",
            )
        user = parts[cols["user"]].strip()
        item = parts[cols["item"]].strip()
        if not user or not item:
            raise DataFormatError(path, lineno, f"expected non-empty user and item ids, got {_show(line)}")
        _number(parts[cols["rating"]].strip(), path, lineno, "rating", line)
        ts = _number(parts[cols["time"]].strip(), path, lineno, "timestamp", line)
        lst = out.get(user)
        if lst is None:
            out[user] = lst = []
        lst.append((item, ts))
    return _finish(path, out)


def _is_number(tok: str) -> bool:
    try:
        float(tok)
        return True
    except ValueError:
        return False


# ----------------------------------------------------------------------------------------------
# format detection and dispatch


def normalize_format(fmt: str) -> str:
    """Map a format name or alias (case-insensitive) to one of :data:`FORMATS`."""
    key = fmt.strip().lower()
    key = FORMAT_ALIASES.get(key, key)
    if key not in FORMATS:
        raise ValueError(f"fmt: expected one of {list(FORMATS)} (or an alias: {sorted(FORMAT_ALIASES)}), got {fmt!r}")
    return key


def detect_format(path: PathLike) -> str:
    """Guess the layout of ``path`` from its name, then from its first lines.

    Name rules (after dropping ``.gz``): ``*.dat`` -> ml-dat, ``*.data`` -> ml-tsv,
    ``*.json``/``*.jsonl`` -> amazon-json, ``*.csv`` -> amazon-csv. Otherwise the first
    1000 non-blank lines decide: ``{`` -> amazon-json, ``::`` -> ml-dat, a comma -> amazon-csv,
    four tab-separated fields -> ml-tsv. Whitespace-separated columns: every line 2 columns, or
    every line 3 columns with some user on more than one line -> sasrec; every line 4 columns with
    a repeated user -> ml-tsv; no user repeated -> seq (that layout has one line per user).
    A 3-column file where no user repeats is therefore read as sequences; pass ``fmt="sasrec"`` if
    it is ``user item timestamp`` with one interaction per user. Undecidable content raises
    :class:`DataFormatError`.
    """
    name = os.path.basename(os.fspath(path)).lower()
    if name.endswith(".gz"):
        name = name[:-3]
    for suffix, fmt in (
        (".dat", "ml-dat"),
        (".data", "ml-tsv"),
        (".json", "amazon-json"),
        (".jsonl", "amazon-json"),
        (".csv", "amazon-csv"),
    ):
        if name.endswith(suffix):
            return fmt
    lines = list(iter_lines(path, limit=_SNIFF_LINES))
    if not lines:
        raise DataFormatError(path, None, "expected at least one interaction, got none (empty file?)")
    first_no, first = lines[0]
    stripped = first.lstrip()
    if stripped.startswith("{"):
        return "amazon-json"
    if "::" in first:
        return "ml-dat"
    if "," in first:
        return "amazon-csv"
    if len(first.split("\t")) == 4:
        return "ml-tsv"
    counts = set()
    users = set()
    repeated = False
    for _, line in lines:
        parts = line.split()
        counts.add(len(parts))
        if parts:
            repeated = repeated or parts[0] in users
            users.add(parts[0])
    if min(counts) >= 2:
        if counts == {2} or (counts == {3} and repeated):
            return "sasrec"
        if counts == {4} and repeated:
            return "ml-tsv"
        if not repeated:
            return "seq"
    raise DataFormatError(
        path,
        first_no,
        f"expected a layout that the first lines tell apart, got e.g. "
        f"{_show(first)}; pass fmt= explicitly (one of {', '.join(FORMATS)})",
    )


_READERS = {
    "sasrec": read_sasrec,
    "seq": read_sequences,
    "ml-dat": read_movielens_dat,
    "ml-tsv": read_movielens_tsv,
    "amazon-json": read_amazon_json,
}


def read_interactions(path: PathLike, fmt: Optional[str] = None, *, csv_order: str = "auto") -> Interactions:
    """Read any supported file into ``user -> [(item, timestamp or None), ...]`` (file order).

    Args:
        path: file path; gzip is detected from the content.
        fmt: one of :data:`FORMATS` (or an alias); ``None`` auto-detects via :func:`detect_format`.
        csv_order: column order for headerless Amazon csv (see :func:`read_amazon_csv`).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        DataFormatError: the content does not match the layout.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"no such data file: {os.fspath(path)}")
    resolved = normalize_format(fmt) if fmt is not None else detect_format(path)
    if resolved == "amazon-csv":
        return read_amazon_csv(path, order=csv_order)
    return _READERS[resolved](path)
