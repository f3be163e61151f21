"""Tests for awr_fast.data: readers, preprocessing, split, padding, cache, named and synthetic data.

The real-data tests read the project's shared data folder (``$AWR_FAST_DATA`` or
``<repo>/../shared/data``) and skip when it is absent. No test touches the network.
"""

import gzip
import os
from pathlib import Path

import numpy as np
import pytest

from awr_fast.data import (
    DataFormatError,
    DatasetUnavailableError,
    Sequences,
    build_dataset,
    detect_format,
    eval_arrays,
    history_csr,
    kcore_mask,
    left_pad,
    load_dataset,
    make_synthetic,
    preprocess,
    read_amazon_csv,
    read_interactions,
    resolve_source,
    sequences_from_lists,
    sort_by_time,
    synthetic_config,
    train_arrays,
    train_item_counts,
)
from awr_fast.data import dataset as dataset_mod


def _shared_data_dir() -> Path:
    env = os.environ.get("AWR_FAST_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


DATA = _shared_data_dir()


def _need(name: str) -> Path:
    path = DATA / name
    if not path.is_file():
        pytest.skip(f"shared data file {path} not available")
    return path


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _stats(inter):
    n = sum(len(v) for v in inter.values())
    items = {i for v in inter.values() for i, _ in v}
    return len(inter), len(items), n


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Never write into the user's real cache; never let a named data set hit the network."""
    monkeypatch.setenv("AWR_FAST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("AWR_FAST_OFFLINE", "1")


@pytest.fixture(scope="module")
def ml1m():
    """ML-1M (SASRec layout) read once for the whole module."""
    return read_interactions(_need("ml-1m.txt.gz"))


# ----------------------------------------------------------------------------------------------
# readers on real files


def test_ml1m_counts_and_layout(ml1m):
    assert detect_format(DATA / "ml-1m.txt.gz") == "sasrec"
    assert _stats(ml1m) == (6040, 3416, 999611)
    lens = [len(v) for v in ml1m.values()]
    assert (min(lens), max(lens)) == (18, 2277)
    assert list(ml1m)[:3] == [1, 2, 3]
    assert ml1m[1][0] == (2758, None)  # README: first line "1 2758"
    # Already 5-core and 1..N ids: preprocessing is the identity.
    seqs = preprocess(ml1m)
    assert (seqs.num_users, seqs.num_items, seqs.num_interactions) == (6040, 3416, 999611)
    assert np.array_equal(seqs.item_ids[1:], np.arange(1, 3417))
    assert np.array_equal(seqs.sequence(1), [i for i, _ in ml1m[1]])


def test_ml1m_timestamps_head_matches_order(tmp_path, ml1m):
    """The timestamped file has the same rows; stable sorting (ties included) keeps its order."""
    src = _need("ml-1m_timestamps.txt.gz")
    head = tmp_path / "head.txt.gz"
    with gzip.open(src, "rt") as fin, gzip.open(head, "wt") as fout:
        for _, line in zip(range(3000), fin):
            fout.write(line)
    inter = read_interactions(head)
    assert detect_format(head) == "sasrec"
    first_user = next(iter(inter))
    ts = [t for _, t in inter[first_user]]
    assert all(isinstance(t, int) for t in ts) and ts == sorted(ts)
    assert len(set(ts)) < len(ts)  # equal timestamps occur
    ordered = sort_by_time(inter)
    for user, lst in ordered.items():
        items = [i for i, _ in lst]
        if len(lst) == len(ml1m[user]):  # complete users only (the head cuts the last one)
            assert items == [i for i, _ in ml1m[user]]


def test_beauty_counts_and_head(tmp_path):
    path = _need("Beauty.txt")
    inter = read_interactions(path)
    assert detect_format(path) == "seq"
    assert _stats(inter) == (22363, 12101, 198502)
    assert inter[1] == [(1, None), (2, None), (3, None), (4, None), (5, None)]
    with open(path) as f:
        head = "".join(line for _, line in zip(range(50), f))
    small = read_interactions(_write(tmp_path / "beauty_head.txt", head))
    assert list(small) == list(range(1, 51))
    assert all(small[u] == inter[u] for u in small)


def test_ml100k_counts_and_time_order():
    path = _need("ml-100k_u.data")
    inter = read_interactions(path)
    assert detect_format(path) == "ml-tsv"
    assert _stats(inter) == (943, 1682, 100000)
    assert inter[196][0] == (242, 881250949)  # first line of the file
    seqs = preprocess(inter, kcore="none")
    assert (seqs.num_users, seqs.num_items, seqs.num_interactions) == (943, 1682, 100000)
    ordered = sort_by_time(inter)
    ts = [t for _, t in ordered[196]]
    assert ts == sorted(ts)
    assert np.array_equal(seqs.sequence(196), [i for i, _ in ordered[196]])  # ids 1..N kept


# ----------------------------------------------------------------------------------------------
# readers on crafted files


def test_all_layouts_read_the_same_interactions(tmp_path):
    # user 7: items 3 (t=10), 1 (t=5); user 2: item 1 (t=7)
    files = {
        "a.txt": ("7 3 10\n7 1 5\n2 1 7\n", "sasrec"),
        "ratings.dat": ("7::3::4::10\n7::1::5::5\n2::1::3::7\n", "ml-dat"),
        "u.data": ("7\t3\t4\t10\n7\t1\t5\t5\n2\t1\t3\t7\n", "ml-tsv"),
    }
    for name, (text, fmt) in files.items():
        path = _write(tmp_path / name, text)
        assert detect_format(path) == fmt
        assert read_interactions(path) == {7: [(3, 10), (1, 5)], 2: [(1, 7)]}, name


def test_gzip_is_transparent_and_content_sniffing(tmp_path):
    text = "1 5\n1 6\n2 5\n"
    plain = _write(tmp_path / "plain", text)
    gz = tmp_path / "data.bin"  # no telling suffix: gzip and layout are found from content
    with gzip.open(gz, "wt") as f:
        f.write(text)
    assert detect_format(plain) == detect_format(gz) == "sasrec"
    assert read_interactions(gz) == read_interactions(plain) == {1: [(5, None), (6, None)], 2: [(5, None)]}
    seq = _write(tmp_path / "seqs", "1 4 5 6\n2 5\n")
    assert detect_format(seq) == "seq"
    assert read_interactions(seq) == {1: [(4, None), (5, None), (6, None)], 2: [(5, None)]}
    assert detect_format(_write(tmp_path / "r", "1::2::3::4\n")) == "ml-dat"
    assert detect_format(_write(tmp_path / "spaces", "1 2 5 100\n1 3 4 90\n")) == "ml-tsv"
    with pytest.raises(
        DataFormatError,
        match=r"odd, line 1: expected a layout that the first lines tell apart, "
        r"got e\.g\. '1 2 3 4 5'; pass fmt= explicitly \(one of sasrec, ",
    ):
        detect_format(_write(tmp_path / "odd", "1 2 3 4 5\n1 3\n"))
    json_line = '{"reviewerID": "A", "asin": "B", "unixReviewTime": 1}\n'
    assert detect_format(_write(tmp_path / "j", json_line)) == "amazon-json"
    # explicit override beats detection
    assert read_interactions(seq, fmt="sequences") == read_interactions(seq)
    with pytest.raises(
        ValueError,
        match=r"^fmt: expected one of \['sasrec', 'seq', .*\] \(or an alias: \[.*\]\), "
        r"got 'parquet'$",
    ):
        read_interactions(seq, fmt="parquet")


def test_amazon_json_strict_and_python_dict(tmp_path):
    text = (
        '{"reviewerID": "AX1", "asin": "0000000001", "overall": 5.0, "unixReviewTime": 1400000000}\n'
        "{'reviewerID': 'AX2', 'asin': '0000000002', 'unixReviewTime': 1300000000}\n"
        '{"user_id": "AX1", "parent_asin": "B000000003", "asin": "X", "timestamp": 1500000000000}\n'
    )
    path = _write(tmp_path / "Beauty_5.json", text)
    assert read_interactions(path) == {
        "AX1": [("0000000001", 1400000000), ("B000000003", 1500000000000)],
        "AX2": [("0000000002", 1300000000)],
    }
    gz = tmp_path / "reviews.json.gz"
    with gzip.open(gz, "wt") as f:
        f.write(text)
    assert read_interactions(gz) == read_interactions(path)


def test_amazon_csv_header_and_order(tmp_path):
    rows = "0205616461,A39HTATAQ9V7YF,5.0,1369699200\n0558925278,A3JM6GV9MNOF9X,3.0,1355443200\n"
    no_header = _write(tmp_path / "ratings_Beauty.csv", rows)
    assert detect_format(no_header) == "amazon-csv"
    expected = {"A39HTATAQ9V7YF": [("0205616461", 1369699200)], "A3JM6GV9MNOF9X": [("0558925278", 1355443200)]}
    assert read_interactions(no_header) == expected  # item,user inferred from id shapes
    swapped = _write(
        tmp_path / "swapped.csv",
        "".join(
            ",".join([r.split(",")[1], r.split(",")[0], *r.split(",")[2:]]) for r in rows.splitlines(keepends=True)
        ),
    )
    assert read_interactions(swapped) == expected  # user,item inferred
    header = _write(tmp_path / "h.csv", "UserId,ProductId,Rating,Timestamp\n" + swapped.read_text())
    assert read_interactions(header) == expected
    assert read_amazon_csv(no_header, order="user,item") == {
        "0205616461": [("A39HTATAQ9V7YF", 1369699200)],
        "0558925278": [("A3JM6GV9MNOF9X", 1355443200)],
    }


BAD_FILES = [
    # (name, content, fmt, line, fragment of the expected message)
    ("bad_item.txt", "1 2\n1 3\n1 x\n", "sasrec", 3, "integer item id"),
    ("cols.txt", "1 2\n1 3\n1 4 99\n", "sasrec", 3, "'user item'"),
    ("one.txt", "1\n", "sasrec", 1, "'user item'"),
    (
        "dup.txt",
        "1 2 3\n2 3 4\n1 5 6\n",
        "seq",
        3,
        "expected one line per user in the 'user item1 item2 ...' layout, got user 1 again (first on line 1)",
    ),
    ("short_seq.txt", "1 2 3\n\n4\n", "seq", 3, "at least 2 fields"),
    ("ratings.dat", "1::2::3::4\n1::2::3\n", None, 2, "user::item::rating::timestamp"),
    ("u.data", "1\t2\t3\t4\n1\t2\tgood\t5\n", None, 2, "numeric rating"),
    ("r.json", '{"reviewerID": "a", "asin": "b", "unixReviewTime": 1}\n{"reviewerID": "a", \n', None, 2, "JSON object"),
    (
        "m.json",
        '{"reviewerID": "a", "asin": "b", "unixReviewTime": 1}\n{"reviewerID": "a", "unixReviewTime": 2}\n',
        None,
        2,
        "expected 'asin' in a record with 'reviewerID', got ",
    ),
    ("t.json", '{"reviewerID": "a", "asin": "b", "unixReviewTime": "soon"}\n', None, 1, "numeric timestamp"),
    ("c.csv", "0205616461,A39HTATAQ9V7YF,5.0,1369699200\n0205616461,A3,5.0\n", None, 2, "4 comma-separated"),
    ("d.csv", "0205616461,A39HTATAQ9V7YF,5.0,1369699200\n0205616461,A3,5.0,yesterday\n", None, 2, "numeric timestamp"),
]


@pytest.mark.parametrize("name,content,fmt,line,fragment", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_malformed_lines_name_file_and_line(tmp_path, name, content, fmt, line, fragment):
    path = _write(tmp_path / name, content)
    with pytest.raises(DataFormatError) as info:
        read_interactions(path, fmt=fmt)
    err = info.value
    assert isinstance(err, ValueError)
    assert err.line == line and err.path == str(path)
    assert f"{path}, line {line}:" in str(err)
    assert fragment in str(err)


def test_corrupt_encodings_and_empty_files(tmp_path):
    blob = gzip.compress(("1 2\n" * 20000).encode())
    trunc = tmp_path / "trunc.txt.gz"
    trunc.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(
        DataFormatError,
        match=r"trunc\.txt\.gz, line \d+: expected a complete gzip stream, "
        r"got a corrupt or truncated one",
    ):
        read_interactions(trunc, fmt="sasrec")
    bad_utf8 = tmp_path / "latin1.txt"
    bad_utf8.write_bytes(b"1 2\n1 3\n\xff\xfe 4\n")
    with pytest.raises(DataFormatError, match=r"latin1\.txt, line 3: expected UTF-8 text, got invalid UTF-8"):
        read_interactions(bad_utf8, fmt="sasrec")
    empty = _write(tmp_path / "empty.txt", "\n  \n")
    with pytest.raises(
        DataFormatError, match=r"empty\.txt: expected at least one interaction, got none \(empty file\?\)$"
    ):
        read_interactions(empty, fmt="sasrec")
    with pytest.raises(FileNotFoundError):
        read_interactions(tmp_path / "missing.txt")


# ----------------------------------------------------------------------------------------------
# preprocessing


def test_sort_by_time_is_stable():
    inter = {1: [(10, 5), (11, 3), (12, 5), (13, 3)], 2: [(7, None), (6, None)]}
    out = sort_by_time(inter)
    assert out == {1: [(11, 3), (13, 3), (10, 5), (12, 5)], 2: [(7, None), (6, None)]}
    assert inter[1][0] == (10, 5)  # input untouched
    with pytest.raises(
        ValueError,
        match=r"^interactions: expected timestamps on all or none of a user's interactions, "
        r"got user 1 with 1 of 2 without one$",
    ):
        sort_by_time({1: [(1, 1), (2, None)]})


def test_kcore_iterative_vs_single_pass():
    # users A..D, items x y z; thresholds 2/2. Original counts: x=3 y=3 z=1, A=2 B=2 C=1 D=2.
    inter = {
        "A": [("x", None), ("y", None)],
        "B": [("x", None), ("z", None)],
        "C": [("y", None)],
        "D": [("x", None), ("y", None)],
    }
    users = np.array([0, 0, 1, 1, 2, 3, 3])
    items = np.array([0, 1, 0, 2, 1, 0, 1])
    single = kcore_mask(users, items, user_min=2, item_min=2, mode="single")
    iterative = kcore_mask(users, items, user_min=2, item_min=2, mode="iterative")
    # single pass keeps B-x (B and x met the thresholds before filtering) although B ends with 1 item
    assert single.tolist() == [True, True, True, False, False, True, True]
    assert iterative.tolist() == [True, True, False, False, False, True, True]
    assert kcore_mask(users, items, mode="none").all()

    s = preprocess(inter, kcore="single", user_min=2, item_min=2)
    it = preprocess(inter, kcore="iterative", user_min=2, item_min=2)
    assert s.user_ids[1:].tolist() == ["A", "B", "D"] and s.lengths.tolist() == [2, 1, 2]
    assert it.user_ids[1:].tolist() == ["A", "D"] and it.lengths.tolist() == [2, 2]
    assert it.item_ids[1:].tolist() == ["x", "y"]
    with pytest.raises(
        ValueError,
        match=r"^user_min/item_min: expected thresholds that leave some interactions after "
        r"iterative k-core filtering, got none left with user_min=10, item_min=5$",
    ):
        preprocess(inter, user_min=10)


def test_iterative_kcore_reaches_a_fixed_point():
    rng = np.random.default_rng(3)
    users = rng.integers(0, 300, 4000)
    items = np.minimum(rng.zipf(1.6, 4000), 400) - 1
    keep = kcore_mask(users, items, user_min=5, item_min=5)
    uc = np.bincount(users[keep])
    ic = np.bincount(items[keep])
    assert keep.any() and uc[uc > 0].min() >= 5 and ic[ic > 0].min() >= 5


def test_remap_orders_raw_ids_and_keeps_mapping():
    inter = {10: [(300, 2), (20, 1)], 9: [(20, 5)], 100: [(7, 1)]}
    seqs = preprocess(inter, kcore="none")
    assert seqs.user_ids.tolist() == [-1, 9, 10, 100]  # numeric, not lexicographic
    assert seqs.item_ids.tolist() == [-1, 7, 20, 300]
    assert seqs.sequence(2).tolist() == [2, 3]  # user 10 sorted by time: 20 then 300
    assert seqs.indptr.dtype == seqs.items.dtype == np.int64
    strs = preprocess({"b": [("q", None)], "a": [("p", None), ("q", None)]}, kcore="none")
    assert strs.user_ids[1:].tolist() == ["a", "b"] and strs.item_ids[1:].tolist() == ["p", "q"]
    assert strs.sequence(1).tolist() == [1, 2] and strs.sequence(2).tolist() == [2]


def test_left_pad_truncates_on_the_left():
    values = np.arange(1, 11)
    out = left_pad(values, np.array([0, 3, 5, 5]), np.array([3, 10, 6, 5]), 4)
    assert out.dtype == np.int64
    assert out.tolist() == [[0, 1, 2, 3], [7, 8, 9, 10], [0, 0, 0, 6], [0, 0, 0, 0]]
    with pytest.raises(ValueError, match=r"^max_len: expected an int >= 1, got 0$"):
        left_pad(values, np.array([0]), np.array([1]), 0)


def test_leave_one_out_split_by_hand():
    seqs = sequences_from_lists([[1, 2, 3, 4, 5], [6, 7], [8, 9, 10]])
    users, inp, pos = train_arrays(seqs, 3)
    # user 1 trains on [1,2,3]; user 2 (< 3 items) on all of [6,7]; user 3's train part [8] has no pair
    assert users.tolist() == [1, 2]
    assert inp.tolist() == [[0, 1, 2], [0, 0, 6]]
    assert pos.tolist() == [[0, 2, 3], [0, 0, 7]]
    vu, vin, vt = eval_arrays(seqs, "valid", 3)
    assert vu.tolist() == [1, 3] and vin.tolist() == [[1, 2, 3], [0, 0, 8]] and vt.tolist() == [4, 9]
    tu, tin, tt = eval_arrays(seqs, "test", 3)
    assert tu.tolist() == [1, 3] and tin.tolist() == [[2, 3, 4], [0, 8, 9]] and tt.tolist() == [5, 10]
    ip, ix = history_csr(seqs, "valid")
    assert ip.tolist() == [0, 3, 4] and ix.tolist() == [1, 2, 3, 8]
    ip, ix = history_csr(seqs, "test")
    assert ip.tolist() == [0, 4, 6] and ix.tolist() == [1, 2, 3, 4, 8, 9]
    ip, ix = history_csr(seqs, "train")
    assert ip.tolist() == [0, 3, 5, 6] and ix.tolist() == [1, 2, 3, 6, 7, 8]
    with pytest.raises(
        ValueError,
        match=r"^users: expected users with >= 3 items for the valid history, got user 2 "
        r"with 2 \(fewer than 3: a train-only user\)$",
    ):
        history_csr(seqs, "valid", users=np.array([2]))
    assert train_item_counts(seqs).tolist() == [0, 1, 1, 1, 0, 0, 1, 1, 1, 0, 0]

    ds = build_dataset(seqs, max_len=3, name="hand")
    assert (ds.num_users, ds.num_items, ds.max_len) == (3, 10, 3)
    assert ds.valid_input.tolist() == vin.tolist() and ds.test_target.tolist() == [5, 10]
    mask = ds.history_mask("test", rows=np.array([1]))
    assert mask.shape == (1, 11) and mask[0].nonzero().flatten().tolist() == [8, 9]


# ----------------------------------------------------------------------------------------------
# load_dataset, cache, names


def _toy_file(tmp_path, name="toy.txt", extra=""):
    rng = np.random.default_rng(0)
    lines = [f"{u} {int(i)}" for u in range(1, 41) for i in rng.integers(1, 30, size=int(rng.integers(6, 15)))]
    return _write(tmp_path / name, "\n".join(lines) + "\n" + extra)


def _assert_same(a, b):
    for f in (
        "history_indptr",
        "history_items",
        "user_ids",
        "item_ids",
        "item_counts",
        "train_users",
        "train_input",
        "train_pos",
        "valid_users",
        "valid_input",
        "valid_target",
        "test_users",
        "test_input",
        "test_target",
    ):
        x, y = getattr(a, f), getattr(b, f)
        assert x.dtype == y.dtype and np.array_equal(x, y), f


def test_cache_hit_identical_and_keyed_by_content_and_options(tmp_path, monkeypatch):
    path = _toy_file(tmp_path)
    cache = tmp_path / "mycache"
    first = load_dataset(path, max_len=8, cache_dir=cache)
    files = sorted((cache / "preprocessed").glob("*.npz"))
    assert len(files) == 1 and not list((cache / "preprocessed").glob("*.tmp"))

    def boom(*a, **k):
        raise AssertionError("cache miss: the file was parsed again")

    monkeypatch.setattr(dataset_mod, "read_interactions", boom)
    second = load_dataset(path, max_len=8, cache_dir=cache)
    _assert_same(first, second)
    assert second.source_hash == first.source_hash == dataset_mod.file_sha256(path)
    assert load_dataset(path, max_len=4, cache_dir=cache).train_input.shape[1] == 4  # same entry, new n
    monkeypatch.undo()
    monkeypatch.setenv("AWR_FAST_CACHE", str(tmp_path / "unused"))

    load_dataset(path, max_len=8, cache_dir=cache, kcore="single")  # options are part of the key
    assert len(list((cache / "preprocessed").glob("*.npz"))) == 2
    _toy_file(tmp_path, extra="41 1\n")  # same name, new content
    changed = load_dataset(path, max_len=8, cache_dir=cache)
    assert changed.source_hash != first.source_hash
    assert len(list((cache / "preprocessed").glob("*.npz"))) == 3

    files[0].write_bytes(b"not a zip")  # a corrupt entry is rebuilt, not fatal
    _toy_file(tmp_path)
    _assert_same(load_dataset(path, max_len=8, cache_dir=cache), first)
    assert not (tmp_path / "unused").exists()


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    path = _toy_file(tmp_path)
    monkeypatch.setenv("AWR_FAST_CACHE", str(tmp_path / "envcache"))
    load_dataset(path, max_len=5)
    assert len(list((tmp_path / "envcache" / "preprocessed").glob("*.npz"))) == 1


def test_named_datasets_resolve_locally_or_fail_clearly(tmp_path, monkeypatch):
    monkeypatch.delenv("AWR_FAST_DATA", raising=False)
    with pytest.raises(DatasetUnavailableError, match="--data PATH"):
        load_dataset("ml-1m", max_len=10, download=False)
    with pytest.raises(DatasetUnavailableError, match="--data PATH"):
        load_dataset("beauty", max_len=10)  # AWR_FAST_OFFLINE=1 from the autouse fixture
    with pytest.raises(FileNotFoundError, match="neither a data file nor a known data set"):
        load_dataset(str(tmp_path / "nope.txt"), max_len=10)
    _need("ml-100k_u.data")
    monkeypatch.setenv("AWR_FAST_DATA", str(DATA))
    ds = load_dataset("ml-100k", max_len=20, download=False)
    assert ds.name == "ml-100k" and ds.options["format"] == "ml-tsv"
    assert (ds.num_users, ds.num_items, ds.num_interactions) == (943, 1349, 99287)  # 5-core drops rare items


def test_dataset_invariants_on_real_data():
    path = _need("Beauty.txt")
    n = 10
    ds = load_dataset(path, max_len=n)
    assert (ds.num_users, ds.num_items, ds.num_interactions) == (22363, 12101, 198502)
    for name in ("train_input", "train_pos", "valid_input", "test_input"):
        arr = getattr(ds, name)
        assert arr.dtype == np.int64 and arr.shape[1] == n
        assert arr.min() >= 0 and arr.max() <= ds.num_items
        nz = arr > 0
        assert np.all(nz[:, 1:] >= nz[:, :-1]), f"{name} is not left padded"
        assert nz[:, -1].all()
    assert np.array_equal(ds.train_input > 0, ds.train_pos > 0)
    shifted = ds.train_input[:, :-1] > 0  # pos is input shifted by one wherever input is not padding
    assert np.array_equal(ds.train_input[:, 1:][shifted], ds.train_pos[:, :-1][shifted])
    assert np.array_equal(ds.test_input[:, :-1], ds.valid_input[:, 1:])
    assert np.array_equal(ds.test_input[:, -1], ds.valid_target)
    assert ds.valid_target.min() >= 1 and ds.test_target.min() >= 1
    lens = np.diff(ds.history_indptr)
    assert len(ds.valid_users) == int((lens >= 3).sum())
    assert ds.item_counts[0] == 0 and ds.item_counts.sum() == int(np.where(lens >= 3, lens - 2, lens).sum())
    first = ds.sequence(1)
    assert first.tolist() == [1, 2, 3, 4, 5]
    assert ds.valid_input[0].tolist() == [0] * 7 + [1, 2, 3] and ds.valid_target[0] == 4 and ds.test_target[0] == 5


# ----------------------------------------------------------------------------------------------
# synthetic data


def _three_users():
    return sequences_from_lists([[1, 2, 3, 4, 5], [6, 7], [8, 9, 10]])


def _corrupt(indptr=(0, 2), items=(1, 2), num_users=1, num_items=2, indptr_dtype=np.int64):
    return Sequences(
        indptr=np.array(indptr, dtype=indptr_dtype),
        items=np.array(items, dtype=np.int64),
        user_ids=np.arange(num_users + 1),
        item_ids=np.arange(num_items + 1),
    )


BAD_ARGUMENTS = [
    # (id, call(tmp_path), exception, message regex)
    (
        "kcore_synthetic",
        lambda tp: load_dataset("synthetic", max_len=5, kcore="x"),
        ValueError,
        r"^kcore: expected one of \['iterative', 'single', 'none'\], got 'x'$",
    ),
    (
        "kcore_file",
        lambda tp: load_dataset(_toy_file(tp), max_len=5, kcore="x"),
        ValueError,
        r"^kcore: expected one of \['iterative', 'single', 'none'\], got 'x'$",
    ),
    (
        "synthetic_for_file",
        lambda tp: load_dataset(_toy_file(tp), max_len=5, synthetic={"seed": 1}),
        ValueError,
        r"^synthetic: expected None unless the data set is 'synthetic', got \{'seed': 1\} for '.*toy\.txt'$",
    ),
    (
        "max_len",
        lambda tp: build_dataset(_three_users(), max_len=0),
        ValueError,
        r"^max_len: expected an int >= 1, got 0$",
    ),
    (
        "csv_order",
        lambda tp: read_amazon_csv(tp / "r.csv", order="item-user"),
        ValueError,
        r"^order: expected one of \['auto', 'item,user', 'user,item'\], got 'item-user'$",
    ),
    (
        "eval_split",
        lambda tp: eval_arrays(_three_users(), "train", 3),
        ValueError,
        r"^split: expected one of \['valid', 'test'\], got 'train'$",
    ),
    (
        "history_split",
        lambda tp: history_csr(_three_users(), "all"),
        ValueError,
        r"^split: expected one of \['train', 'valid', 'test'\], got 'all'$",
    ),
    (
        "history_users",
        lambda tp: history_csr(_three_users(), "valid", users=np.array([1, 5])),
        IndexError,
        r"^users: expected user ids in 1\.\.3, got 5$",
    ),
    (
        "sequence_user",
        lambda tp: _three_users().sequence(0),
        IndexError,
        r"^user: expected a user id in 1\.\.3, got 0$",
    ),
    (
        "kcore_mode",
        lambda tp: kcore_mask([0], [0], mode="twice"),
        ValueError,
        r"^mode: expected one of \['iterative', 'single', 'none'\], got 'twice'$",
    ),
    ("item_min", lambda tp: kcore_mask([0], [0], item_min=-1), ValueError, r"^item_min: expected an int >= 0, got -1$"),
    (
        "empty_interactions",
        lambda tp: preprocess({1: []}),
        ValueError,
        r"^interactions: expected at least one interaction, got none \(1 users\)$",
    ),
    ("num_users", lambda tp: synthetic_config(num_users=0), ValueError, r"^num_users: expected an int >= 1, got 0$"),
    ("branching", lambda tp: synthetic_config(branching=0), ValueError, r"^branching: expected an int >= 1, got 0$"),
    (
        "groups",
        lambda tp: synthetic_config(num_items=16, group_size=8),
        ValueError,
        r"^num_items: expected num_items // group_size >= branching \+ 1 = 3 groups, got 16 // 8 = 2$",
    ),
    (
        "min_len",
        lambda tp: synthetic_config(min_len=5, max_len=4),
        ValueError,
        r"^min_len: expected 1 <= min_len <= max_len = 4, got 5$",
    ),
    (
        "num_clusters",
        lambda tp: synthetic_config(num_clusters=100),
        ValueError,
        r"^num_clusters: expected 1\.\.62 \(the number of groups, num_items // group_size\), got 100$",
    ),
    (
        "p_second",
        lambda tp: synthetic_config(p_second=-0.1),
        ValueError,
        r"^p_second: expected a probability >= 0, got -0\.1$",
    ),
    ("zipf_a", lambda tp: synthetic_config(zipf_a=-1), ValueError, r"^zipf_a: expected a float >= 0, got -1\.0$"),
    (
        "data_set_name",
        lambda tp: resolve_source("nope"),
        KeyError,
        r"name: expected a known data set \(one of \['ml-1m', 'ml-100k', 'beauty'\], or an alias: \[.*\]\), "
        r"got 'nope'",
    ),
    # corrupted sequences (e.g. a damaged cache file): the field at fault, what was expected, what was found
    (
        "seq_dtype",
        lambda tp: _corrupt(indptr_dtype=np.int32).validate(),
        ValueError,
        r"^indptr, items: expected int64 arrays, got int32 and int64$",
    ),
    (
        "seq_indptr",
        lambda tp: _corrupt(indptr=(0, 3)).validate(),
        ValueError,
        r"^indptr: expected a 1-d array from 0 to len\(items\)=2 that gives every user >= 1 item, "
        r"got 0\.\.3, smallest step 3$",
    ),
    (
        "seq_items",
        lambda tp: _corrupt(items=(1, 9)).validate(),
        ValueError,
        r"^items: expected item ids in 1\.\.2, got min 1, max 9$",
    ),
    (
        "seq_user_ids",
        lambda tp: Sequences(
            indptr=np.array([0, 2]), items=np.array([1, 2]), user_ids=np.arange(1), item_ids=np.arange(3)
        ).validate(),
        ValueError,
        r"^user_ids: expected num_users \+ 1 = 2 entries, got 1$",
    ),
]


@pytest.mark.parametrize("call,exc,match", [b[1:] for b in BAD_ARGUMENTS], ids=[b[0] for b in BAD_ARGUMENTS])
def test_bad_arguments_name_the_argument(tmp_path, call, exc, match):
    with pytest.raises(exc, match=match):
        call(tmp_path)


def test_synthetic_is_seeded_and_goes_through_the_pipeline():
    a = load_dataset("synthetic", max_len=50)
    b = load_dataset("synthetic", max_len=50)
    _assert_same(a, b)
    assert a.source_hash == b.source_hash
    c = load_dataset("synthetic", max_len=50, synthetic={"seed": 1})
    assert c.source_hash != a.source_hash and not np.array_equal(c.history_items, a.history_items)
    assert a.num_users == 2000 and 450 <= a.num_items <= 500
    lens = np.diff(a.history_indptr)
    assert lens.min() >= 10 and lens.max() <= 60
    raw = make_synthetic(num_users=50, num_items=40, seed=3, min_len=5, max_len=9, num_clusters=2)
    assert len(raw) == 50 and all(5 <= len(v) <= 9 for v in raw.values())
    assert all([t for _, t in v] == sorted(t for _, t in v) for v in raw.values())
    with pytest.raises(
        ValueError,
        match=r"^p_first \+ p_second \+ p_cluster: expected at most 1, "
        r"got 1\.5 \(0\.9 \+ 0\.5 \+ 0\.1\)$",
    ):
        make_synthetic(p_first=0.9, p_second=0.5)


def test_synthetic_has_sequential_signal_beyond_popularity():
    """A first-order Markov model fitted on the training part beats popularity by a wide margin
    (so a sequential model has something to learn) and the popularity skew is real."""
    ds = load_dataset("synthetic", max_len=50)
    n_items = ds.num_items
    ip, ix = ds.history_csr("train", np.arange(1, ds.num_users + 1))
    trans = np.zeros((n_items + 1, n_items + 1))
    same_user = np.repeat(np.arange(len(ip) - 1), np.diff(ip))
    nxt = same_user[1:] == same_user[:-1]
    np.add.at(trans, (ix[:-1][nxt], ix[1:][nxt]), 1.0)
    markov = trans[ds.test_input[:, -1]] + 1e-6 * ds.item_counts
    pop = np.broadcast_to(ds.item_counts.astype(float), markov.shape)

    def ndcg10(scores):
        t = scores[np.arange(len(scores)), ds.test_target][:, None]
        above = scores > t
        above[:, 0] = False
        r = above.sum(1)
        return float(np.where(r < 10, 1 / np.log2(r + 2), 0).mean())

    pop_ndcg, markov_ndcg = ndcg10(pop), ndcg10(markov)
    assert markov_ndcg > 2.5 * pop_ndcg and markov_ndcg > 0.2, (pop_ndcg, markov_ndcg)
    counts = np.sort(ds.item_counts[1:])[::-1]
    assert counts[: n_items // 10].sum() > 0.3 * counts.sum()  # top 10% of items get > 30% of interactions


def test_download_verifies_checksum_and_extracts(tmp_path, monkeypatch):
    """The download path, exercised with a file:// URL (urllib handles it; no network)."""
    import dataclasses
    import hashlib
    import zipfile

    src = _write(
        tmp_path / "ratings.dat", "".join(f"{u}::{i}::4::{u * 100 + i}\n" for u in range(1, 8) for i in range(1, 8))
    )
    archive = tmp_path / "ml-1m.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(src, "ml-1m/ratings.dat")
    sha = hashlib.sha256(archive.read_bytes()).hexdigest()
    remote = dataclasses.replace(dataset_mod.KNOWN_DATASETS["ml-1m"], url=archive.as_uri(), sha256=sha)
    monkeypatch.setitem(dataset_mod.KNOWN_DATASETS, "ml-1m", remote)
    monkeypatch.delenv("AWR_FAST_OFFLINE")
    monkeypatch.delenv("AWR_FAST_DATA", raising=False)
    cache = tmp_path / "dl"

    bad = dataclasses.replace(remote, sha256="0" * 64)
    monkeypatch.setitem(dataset_mod.KNOWN_DATASETS, "ml-1m", bad)
    with pytest.raises(DatasetUnavailableError, match="checksum mismatch"):
        load_dataset("ml-1m", max_len=5, cache_dir=cache)
    assert not list((cache / "downloads").iterdir())  # nothing half-written is left behind

    monkeypatch.setitem(dataset_mod.KNOWN_DATASETS, "ml-1m", remote)
    ds = load_dataset("ml-1m", max_len=5, cache_dir=cache)
    assert (ds.num_users, ds.num_items, ds.num_interactions) == (7, 7, 49)
    assert ds.options["format"] == "ml-dat" and ds.name == "ml-1m"
    assert (cache / "downloads" / "ml-1m_ratings.dat").read_text() == src.read_text()
    archive.unlink()  # second call is served from the cache, no fetch
    _assert_same(load_dataset("ml-1m", max_len=5, cache_dir=cache), ds)
