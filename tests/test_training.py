"""Training: convergence of every model x mechanism, exact resume, atomic checkpoints, DDP, the CLI,
evaluation against hand-computed metrics, the length-bucketing sampler."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from awr_fast.data import build_dataset, sequences_from_lists
from awr_fast.ops.dot_refined import CAUSAL_MECHANISMS
from awr_fast.ops.w2_refined import MECHANISMS as W2_MECHANISMS
from awr_fast.train import read_metrics, train
from awr_fast.training import (
    EarlyStopping,
    LengthBucketBatchSampler,
    RandomBatchSampler,
    TrainConfig,
    config_from_args,
    evaluate,
    evaluate_popularity,
    load_checkpoint,
    save_checkpoint,
    shard_batch,
)
from awr_fast.training import checkpoint as ckpt_mod
from awr_fast.training.loop import batch_width, trailing_widths
from helpers import check_subprocess

MAX_LEN = 20
TIMING_KEYS = ("epoch_s", "eval_s")


def crafted_sequences(num_users=300, num_items=50, seed=0, noise=0.1):
    """Users walk the item ring with a per-user stride (1 or 2) plus 10% uniform noise: easy for a
    sequential model (the next item follows from the last two), nearly flat for popularity."""
    rng = np.random.default_rng(seed)
    seqs = []
    for u in range(num_users):
        step = 1 + (u % 2)
        length = int(rng.integers(8, 21))
        s = [int(rng.integers(num_items))]
        for _ in range(length - 1):
            s.append(int(rng.integers(num_items)) if rng.random() < noise else (s[-1] + step) % num_items)
        seqs.append([i + 1 for i in s])
    return seqs


@pytest.fixture(autouse=True, scope="module")
def _private_cache(tmp_path_factory):
    """Preprocessed-data cache in a temporary folder, not ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWR_FAST_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def crafted():
    return build_dataset(sequences_from_lists(crafted_sequences(), 50), max_len=MAX_LEN, name="crafted")


@pytest.fixture(scope="module")
def crafted_file(tmp_path_factory):
    """The crafted sequences as a SASRec-layout "user item" file (for the CLI and torchrun)."""
    path = tmp_path_factory.mktemp("data") / "crafted.txt"
    lines = [f"{u + 1} {i}" for u, s in enumerate(crafted_sequences(num_users=120)) for i in s]
    path.write_text("\n".join(lines) + "\n")
    return path


def tiny(**kw):
    base = {
        "d_model": 32,
        "n_layers": 1,
        "n_heads": 1,
        "max_len": MAX_LEN,
        "dropout": 0.1,
        "lr": 1e-2,
        "batch_size": 32,
        "epochs": 3,
        "quiet": True,
        "num_threads": 1,
        "seed": 3,
    }
    base.update(kw)
    return base


def _records(run_dir):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in read_metrics(run_dir)]


def _subprocess_env(tmp_path):
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    env["AWR_FAST_CACHE"] = str(tmp_path / "cache")
    env["OMP_NUM_THREADS"] = "1"
    env.pop("TRITON_INTERPRET", None)
    return env


# ------------------------------------------------------------------------------------------------
# convergence: a few epochs beat popularity for every model x mechanism

COMBOS = [("sasrec", a) for a in CAUSAL_MECHANISMS] + [("stosa", a) for a in W2_MECHANISMS]


@pytest.mark.parametrize("model,attention", COMBOS, ids=[f"{m}-{a}" for m, a in COMBOS])
def test_convergence_beats_popularity(tmp_path, crafted, model, attention):
    final = train(tiny(model=model, attention=attention, out=str(tmp_path / "run")), seq_dataset=crafted)
    test, pop = final["test"], final["popularity"]["test"]
    assert test["ndcg@10"] > 2 * pop["ndcg@10"], (test, pop)
    assert test["recall@10"] > pop["recall@10"] + 0.2, (test, pop)
    assert final["protocol"] == {"ranking": "full", "exclude_history": False}


@pytest.fixture(scope="module")
def embedded():
    """The package's own synthetic dataset (what `python -m awr_fast.train` uses), at a test size."""
    from awr_fast.data.dataset import load_dataset

    return load_dataset("synthetic", max_len=30, synthetic={"num_users": 800})


@pytest.mark.parametrize("model,attention", COMBOS, ids=[f"{m}-{a}" for m, a in COMBOS])
def test_convergence_on_embedded_dataset(tmp_path, embedded, model, attention):
    """A few epochs on the embedded dataset beat the popularity baseline for every model x mechanism."""
    cfg = tiny(
        model=model,
        attention=attention,
        max_len=30,
        n_heads=1 if model == "sasrec" else 2,
        epochs=4,
        batch_size=64,
        out=str(tmp_path / "run"),
    )
    final = train(cfg, seq_dataset=embedded)
    test, pop = final["test"], final["popularity"]["test"]
    assert test["ndcg@10"] > 1.3 * pop["ndcg@10"], (test, pop)
    assert test["recall@10"] > pop["recall@10"] + 0.03, (test, pop)


# ------------------------------------------------------------------------------------------------
# resume


def test_resume_is_bitwise_exact(tmp_path, crafted):
    cfg = tiny(model="sasrec", attention="simp", dropout=0.3, epochs=4)
    straight = train(cfg, out=str(tmp_path / "straight"), seq_dataset=crafted)
    train({**cfg, "epochs": 2}, out=str(tmp_path / "split"), seq_dataset=crafted)
    assert [r["epoch"] for r in read_metrics(tmp_path / "split")] == [1, 2]
    resumed = train(cfg, resume=str(tmp_path / "split"), seq_dataset=crafted)

    for name in ("last.pt", "best.pt"):
        a = load_checkpoint(tmp_path / "straight" / name)
        b = load_checkpoint(tmp_path / "split" / name)
        assert a["epoch"] == b["epoch"] and a["step"] == b["step"]
        assert a["early_stopping"] == b["early_stopping"]
        assert a["model"].keys() == b["model"].keys()
        for k in a["model"]:
            assert torch.equal(a["model"][k], b["model"][k]), k
        sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
        for i in sa:
            for k in sa[i]:
                assert torch.equal(torch.as_tensor(sa[i][k]), torch.as_tensor(sb[i][k])), (i, k)
    ra, rb = _records(tmp_path / "straight"), _records(tmp_path / "split")
    assert [r["epoch"] for r in rb] == [1, 2, 3, 4]
    assert ra == rb  # losses, grad norms, valid metrics: bitwise equal floats
    assert straight["test"] == resumed["test"]
    assert straight["best_epoch"] == resumed["best_epoch"]


def test_resume_refuses_architecture_change(tmp_path, crafted):
    train(tiny(epochs=1), out=str(tmp_path / "r"), seq_dataset=crafted)
    with pytest.raises(SystemExit):
        config_from_args(["--resume", str(tmp_path / "r"), "--d-model", "64"])
    cfg = config_from_args(["--resume", str(tmp_path / "r"), "--epochs", "5"])
    assert cfg.epochs == 5 and cfg.d_model == 32 and cfg.out == str(tmp_path / "r")
    with pytest.raises(ValueError):
        train(tiny(epochs=2, d_model=16), resume=str(tmp_path / "r"), seq_dataset=crafted)


def test_refuses_to_overwrite_a_run(tmp_path, crafted):
    train(tiny(epochs=1), out=str(tmp_path / "r"), seq_dataset=crafted)
    with pytest.raises(FileExistsError):
        train(tiny(epochs=1), out=str(tmp_path / "r"), seq_dataset=crafted)


def test_early_stopping_and_best_epoch(tmp_path, crafted):
    # lr 0: the metric never improves after the first evaluation -> stop after `patience` more
    final = train(tiny(lr=0.0, epochs=10, patience=2), out=str(tmp_path / "r"), seq_dataset=crafted)
    recs = read_metrics(tmp_path / "r")
    assert [r["epoch"] for r in recs] == [1, 2, 3]
    assert final["best_epoch"] == 1 and final["stopped_early"] is True
    assert final["valid"] == recs[0]["valid"]

    es = EarlyStopping(patience=2)
    assert es.update(0.1, 1) and not es.update(0.1, 2) and not es.should_stop
    assert not es.update(float("nan"), 3) and es.should_stop
    assert not EarlyStopping(patience=0, bad_evals=100).should_stop


def test_select_metric_picks_the_best_epoch(tmp_path, crafted):
    """select_metric decides the best epoch: the epoch with the highest valid value of that metric."""
    final = train(tiny(epochs=4, patience=0, select_metric="recall@20"), out=str(tmp_path / "r"), seq_dataset=crafted)
    recs = read_metrics(tmp_path / "r")
    values = [r["valid"]["recall@20"] for r in recs]
    assert final["selection_metric"] == "valid recall@20"
    assert final["best_epoch"] == recs[values.index(max(values))]["epoch"]
    assert final["valid"]["recall@20"] == max(values)
    with pytest.raises(ValueError, match="select_metric: expected one of"):
        train(tiny(select_metric="ndcg@3"), out=str(tmp_path / "bad"), seq_dataset=crafted)


# ------------------------------------------------------------------------------------------------
# checkpoints


def test_checkpoint_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    good = {"format": 1, "epoch": 1, "w": torch.arange(5.0)}
    save_checkpoint(path, good)
    real_save = torch.save

    def crash_midway(obj, f, *a, **k):
        f.write(b"partial garbage")
        raise KeyboardInterrupt("simulated crash during save")

    monkeypatch.setattr(torch, "save", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"format": 1, "epoch": 2, "w": torch.zeros(5)})
    monkeypatch.setattr(torch, "save", real_save)
    state = load_checkpoint(path)
    assert state["epoch"] == 1 and torch.equal(state["w"], good["w"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temp file left behind

    def crash_at_replace(src, dst):
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(ckpt_mod.os, "replace", crash_at_replace)
    with pytest.raises(OSError):
        save_checkpoint(path, {"format": 1, "epoch": 3, "w": torch.ones(5)})
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_checkpoint_contents(tmp_path, crafted):
    train(tiny(epochs=1, amp="fp16"), out=str(tmp_path / "r"), seq_dataset=crafted)
    state = load_checkpoint(tmp_path / "r" / "last.pt")
    # exactly the keys the checkpoint module's docstring lists
    assert set(state) == {"format", "model", "optimizer", "scaler", "rng", "epoch", "step", "early_stopping", "config"}
    assert set(state["rng"]) >= {"python", "numpy", "torch", "cuda", "negatives"}
    assert state["rng"]["negatives"] is not None and state["scaler"] is not None
    assert set(state["early_stopping"]) == {"best_metric", "best_epoch", "bad_evals"}
    assert state["config"]["amp"] == "fp16"


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_runs(tmp_path, crafted, amp):
    final = train(tiny(epochs=1, amp=amp), out=str(tmp_path / amp), seq_dataset=crafted)
    assert math.isfinite(final["test"]["ndcg@10"])
    assert all(math.isfinite(r["loss"]) for r in read_metrics(tmp_path / amp))


# ------------------------------------------------------------------------------------------------
# evaluation on crafted scores


class TableModel(torch.nn.Module):
    """score_all(seq) = table[seq[:, -1]]: a fixed score row per last item."""

    def __init__(self, table):
        super().__init__()
        self.register_buffer("table", torch.as_tensor(table, dtype=torch.float32))

    def score_all(self, seq):
        return self.table[seq[:, -1]]


def _eval_dataset():
    # 3 users, 6 items; valid input = s[:-2] (last item 1, 2, 3), valid target = s[-2]
    seqs = [[4, 1, 2, 6], [5, 2, 3, 1], [6, 5, 3, 4, 2]]
    ds = build_dataset(sequences_from_lists(seqs, 6), max_len=4)
    assert ds.valid_target.tolist() == [2, 3, 4] and ds.valid_input[:, -1].tolist() == [1, 2, 3]
    table = torch.zeros(7, 7)
    table[:, 0] = -math.inf
    table[1, 1:] = torch.tensor([5.0, 9.0, 1.0, 2.0, 3.0, 4.0])  # user 1: target 2 first -> rank 0
    table[2, 1:] = torch.tensor([9.0, 8.0, 7.0, 6.0, 1.0, 5.0])  # user 2: target 3 -> rank 2
    table[3, 1:] = torch.tensor([6.0, 5.0, 4.0, 1.0, 3.0, 2.0])  # user 3: target 4 last -> rank 5
    return ds, TableModel(table)


def test_evaluation_matches_hand_computed():
    ds, model = _eval_dataset()
    for bs in (1, 2, 64):  # chunking must not matter
        m = evaluate(model, ds, "valid", batch_size=bs)
        # ranks 0, 2, 5
        assert m["recall@1"] == pytest.approx(1 / 3)
        assert m["recall@5"] == pytest.approx(2 / 3)
        assert m["recall@10"] == pytest.approx(1.0)
        assert m["ndcg@1"] == pytest.approx(1 / 3)
        assert m["ndcg@5"] == pytest.approx((1 + 1 / math.log2(4)) / 3)
        assert m["ndcg@10"] == pytest.approx((1 + 1 / math.log2(4) + 1 / math.log2(7)) / 3)
        assert m["mrr"] == pytest.approx((1 + 1 / 3 + 1 / 6) / 3)
        assert not any(k.startswith("sampled") for k in m)
    # exclude_history drops each user's earlier items (valid history = s[:-2]):
    # user 1 {4, 1}: rank 0; user 2 {5, 2}: items above 3 are {1, 2} -> drop 2 -> rank 1;
    # user 3 {6, 5, 3}: above 4 are {1, 2, 3, 5, 6} -> drop 3, 5, 6 -> rank 2
    m = evaluate(model, ds, "valid", batch_size=2, exclude_history=True)
    assert m["recall@1"] == pytest.approx(1 / 3)
    assert m["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)
    assert m["ndcg@5"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(4)) / 3)


def test_sampled_protocol_is_labelled():
    seqs = crafted_sequences(num_users=40, num_items=150)
    ds = build_dataset(sequences_from_lists(seqs, 150), max_len=MAX_LEN)
    table = torch.zeros(151, 151)
    table[:, 0] = -math.inf
    perfect = TableModel(table)  # all items tie: the optimistic rule puts every target first
    m = evaluate(perfect, ds, "valid", protocol="sampled100", batch_size=16)
    assert m["sampled_recall@1"] == 1.0 and m["recall@1"] == 1.0
    assert {k for k in m if k.startswith("sampled_")} == {"sampled_" + k for k in m if not k.startswith("sampled_")}
    pop = evaluate_popularity(ds, "valid", protocol="sampled100")
    assert pop["sampled_recall@20"] >= pop["recall@20"]  # 100 negatives are easier than all items
    again = evaluate_popularity(ds, "valid", protocol="sampled100", batch_size=7)
    assert again == evaluate_popularity(ds, "valid", protocol="sampled100", batch_size=7)  # deterministic


def test_sampled_protocol_run_selects_on_sampled_ndcg(tmp_path, capsys):
    ds = build_dataset(sequences_from_lists(crafted_sequences(num_users=80, num_items=150), 150), max_len=MAX_LEN)
    final = train(tiny(epochs=1, protocol="sampled100", tensorboard=True), out=str(tmp_path / "r"), seq_dataset=ds)
    assert final["selection_metric"] == "valid sampled_ndcg@5"
    assert final["protocol"] == {"ranking": "sampled100", "exclude_history": False, "sampled_negatives": 100}
    assert "sampled_ndcg@10" in final["test"] and "sampled_ndcg@10" in final["popularity"]["test"]
    assert "sampled_ndcg@5" in read_metrics(tmp_path / "r")[0]["valid"]
    captured = capsys.readouterr()
    assert "sampled-100" in captured.out
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        assert "TensorBoard is not available" in captured.err
    else:
        assert (tmp_path / "r" / "tb").is_dir()


# ------------------------------------------------------------------------------------------------
# the batch samplers


def test_length_bucketing_covers_every_row_once_and_is_deterministic():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 51, size=1003)
    s = LengthBucketBatchSampler(lengths, 64, seed=7, bucket_batches=4)
    for epoch in (1, 2, 3):
        batches = s.batches(epoch)
        assert len(batches) == len(s)
        flat = np.concatenate(batches)
        assert np.array_equal(np.sort(flat), np.arange(1003))  # every row exactly once
        assert all(len(b) <= 64 for b in batches)
        assert [b.tolist() for b in batches] == [b.tolist() for b in s.batches(epoch)]
        again = LengthBucketBatchSampler(lengths, 64, seed=7, bucket_batches=4)
        assert [b.tolist() for b in batches] == [b.tolist() for b in again.batches(epoch)]
    assert [b.tolist() for b in s.batches(1)] != [b.tolist() for b in s.batches(2)]
    other_seed = LengthBucketBatchSampler(lengths, 64, 8, bucket_batches=4)
    assert [b.tolist() for b in s.batches(1)] != [b.tolist() for b in other_seed.batches(1)]
    # batches are tighter in length than random ones: padded work (sum of batch max) drops
    work = sum(lengths[b].max() * len(b) for b in s.batches(1))
    plain = RandomBatchSampler(len(lengths), 64, seed=7)
    flat = np.concatenate(plain.batches(1))
    assert np.array_equal(np.sort(flat), np.arange(1003)) and len(plain.batches(1)) == len(plain)
    work_plain = sum(lengths[b].max() * len(b) for b in plain.batches(1))
    assert work < 0.8 * work_plain


def test_trailing_widths():
    inputs = np.array([[0, 0, 3, 4], [0, 0, 0, 0], [1, 2, 3, 4], [0, 0, 0, 5]])
    targets = np.array([[0, 2, 4, 5], [0, 0, 0, 0], [2, 3, 4, 5], [0, 0, 0, 6]])
    assert trailing_widths(inputs).tolist() == [2, 0, 4, 1]
    assert trailing_widths(inputs, targets).tolist() == [3, 0, 4, 1]  # a target may start a column earlier
    assert batch_width(trailing_widths(inputs), np.array([0, 3]), 4) == 2
    assert batch_width(trailing_widths(inputs), np.array([1]), 4) == 1  # never 0 columns
    assert batch_width(None, np.array([0]), 4) == 4


@pytest.mark.parametrize("model,attention", [("sasrec", "simp"), ("stosa", "value")])
def test_trim_padding_trains_the_same_model(tmp_path, crafted, model, attention):
    """Dropping a batch's all-padding columns changes the work, not the function: without randomness in
    the step (no dropout; CE needs no negatives) two epochs give the same losses, gradient norms, valid
    metrics and parameters, with bucketed batches whose widths are well below max_len."""
    kwargs = {"model": model, "attention": attention, "dropout": 0.0, "epochs": 2, "patience": 0}
    if model == "sasrec":
        kwargs["loss"] = "ce"
    runs = {}
    for trim in (False, True):
        out = tmp_path / f"trim{trim}"
        train(tiny(trim_padding=trim, out=str(out), **kwargs), seq_dataset=crafted)
        runs[trim] = (read_metrics(out), load_checkpoint(out / "last.pt")["model"])
    (full_metrics, full_params), (trim_metrics, trim_params) = runs[False], runs[True]
    if model == "stosa":  # W2 BPR draws one negative per position: the draws follow the batch width
        assert full_metrics[0]["loss"] == pytest.approx(trim_metrics[0]["loss"], rel=0.2)
        return
    assert len(full_metrics) == len(trim_metrics) == 2
    for a, b in zip(full_metrics, trim_metrics):
        for key in ("loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
        for key in ("ndcg@5", "recall@10", "mrr"):
            assert b["valid"][key] == pytest.approx(a["valid"][key], rel=1e-4, abs=1e-6), key
    for name, value in full_params.items():
        if name.endswith("k_proj.bias"):  # softmax is shift-invariant: its gradient is rounding noise,
            continue  # which Adam scales up to full steps either way
        torch.testing.assert_close(trim_params[name], value, rtol=1e-3, atol=1e-5, msg=name)
    widths = trailing_widths(crafted.train_input, crafted.train_pos)
    assert widths.max() < MAX_LEN and np.median(widths) < widths.max()  # every batch was trimmed


def test_shard_batch_partitions_the_batch():
    batch = np.arange(10, 17)  # 7 rows over 3 ranks -> padded cyclically to 9
    shards = [shard_batch(batch, r, 3) for r in range(3)]
    assert [len(x) for x in shards] == [3, 3, 3]
    assert set(np.concatenate(shards).tolist()) == set(batch.tolist())
    assert shard_batch(np.array([5]), 1, 2).tolist() == [5]
    assert shard_batch(batch, 0, 1) is batch


def test_config_defaults_and_validation():
    cfg = TrainConfig()
    assert (cfg.model, cfg.attention, cfg.d_model, cfg.max_len, cfg.patience) == ("sasrec", "simp", 64, 50, 20)
    assert cfg.dataset == "synthetic" and cfg.length_bucketing
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError):
        TrainConfig(model="sasrec", attention="stoc")
    with pytest.raises(ValueError):
        TrainConfig(amp="fp8")
    assert config_from_args(["--no-length-bucketing", "--l2", "0.01"]).length_bucketing is False


# ------------------------------------------------------------------------------------------------
# command line and DDP (subprocesses)

CLI_FLAGS = [
    "--kcore",
    "none",
    "--d-model",
    "16",
    "--n-layers",
    "1",
    "--max-len",
    str(MAX_LEN),
    "--batch-size",
    "32",
    "--num-threads",
    "1",
    "--eval-batch-size",
    "64",
]


def test_cli_end_to_end(tmp_path, crafted_file):
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "awr_fast.train",
        "--epochs",
        "1",
        "--data",
        str(crafted_file),
        "--out",
        str(out),
        "--exclude-history",
        *CLI_FLAGS,
    ]
    res = subprocess.run(cmd, env=_subprocess_env(tmp_path), capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    for name in ("config.json", "metrics.jsonl", "best.pt", "last.pt", "final.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    final = json.loads((out / "final.json").read_text())
    assert final["protocol"]["exclude_history"] is True and final["best_epoch"] == 1
    assert set(final["test"]) >= {f"{m}@{k}" for m in ("recall", "ndcg") for k in (1, 5, 10, 20)} | {"mrr"}
    assert "ndcg@10" in final["popularity"]["test"] and final["timing"]["epochs"] == 1
    rec = read_metrics(out)[0]
    assert {"epoch", "loss", "valid", "grad_norm", "epoch_s", "eval_s", "lr"} <= set(rec)
    assert "popularity NDCG@10" in res.stdout and "sasrec/simp" in res.stdout
    assert json.loads((out / "config.json").read_text())["exclude_history"] is True


def test_ddp_two_process_gloo(tmp_path, crafted_file):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "awr_fast.train",
        "--epochs",
        "3",
        "--lr",
        "0.01",
        "--data",
        str(crafted_file),
        "--out",
        str(out),
        "--device",
        "cpu",
        "--quiet",
        *CLI_FLAGS,
    ]
    res = subprocess.run(cmd, env=_subprocess_env(tmp_path), capture_output=True, text=True, timeout=300, check=False)
    check_subprocess(res, "torchrun")
    final = json.loads((out / "final.json").read_text())
    assert final["timing"]["world_size"] == 2
    assert [r["epoch"] for r in read_metrics(out)] == [1, 2, 3]
    assert final["test"]["ndcg@10"] > 2 * final["popularity"]["test"]["ndcg@10"]
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "config.json", "final.json", "last.pt", "metrics.jsonl"]


def test_compile_trains_the_same_model(tmp_path, crafted):
    """--compile wraps the training step in torch.compile (on the CPU too): without randomness in the step
    (no dropout; CE needs no negatives) an epoch gives the eager run's loss and gradient norm, and the
    checkpoint holds the plain model's parameters (no compile wrapper in their names)."""
    kwargs = {"attention": "simp", "loss": "ce", "dropout": 0.0, "epochs": 1, "patience": 0, "trim_padding": False}
    runs = {}
    for compiled in (False, True):
        out = tmp_path / f"compile{compiled}"
        train(tiny(compile=compiled, out=str(out), **kwargs), seq_dataset=crafted)
        runs[compiled] = (read_metrics(out)[0], load_checkpoint(out / "last.pt")["model"])
    (eager, eager_params), (comp, comp_params) = runs[False], runs[True]
    for key in ("loss", "grad_norm"):
        assert comp[key] == pytest.approx(eager[key], rel=1e-4, abs=1e-6), key
    assert set(comp_params) == set(eager_params)
    for name in eager_params:
        if name.endswith("k_proj.bias"):  # softmax ignores it: its gradient is rounding noise, which Adam rescales
            continue
        torch.testing.assert_close(comp_params[name], eager_params[name], rtol=1e-3, atol=1e-5, msg=name)
    assert json.loads((tmp_path / "compileTrue" / "config.json").read_text())["compile"] is True
