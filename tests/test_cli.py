"""The training command line and the trainer's report: flags derived from TrainConfig, one error voice,
one-line CLI errors for bad input, the metrics the progress lines show, which backend ran the attention."""

import argparse
import dataclasses
import inspect
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from awr_fast import backends
from awr_fast.data.readers import DataFormatError
from awr_fast.data.synthetic import make_synthetic
from awr_fast.ops import dot_refined as dot_spec
from awr_fast.ops import w2_refined as w2_spec
from awr_fast.train import main, print_summary, read_metrics, train
from awr_fast.training import RandomBatchSampler, TrainConfig, build_parser, config_from_args, load_checkpoint
from awr_fast.training.checkpoint import save_checkpoint
from awr_fast.training.config import cli_fields
from awr_fast.training.evaluate import headline_keys, selection_key
from awr_fast.training.loop import LossModule, autocast, make_optimizer
from awr_fast.training.sampler import LengthBucketBatchSampler

MAX_LEN = 20
PROG = "python -m awr_fast.train"

#: The flags of the hand-written parser this one replaced, by group: the derived CLI must offer the same.
LEGACY_GROUPS = {
    "model": [
        "--model",
        "--attention",
        "--d-model",
        "--n-layers",
        "--n-heads",
        "--max-len",
        "--dropout",
        "--attn-dropout",
        "--per-head-refine",
        "--refine-input",
        "--refine-scale",
        "--backend",
        "--layout",
        "--loss",
        "--num-negatives",
        "--pvn",
        "--stosa-compat",
        "--inner-size",
        "--mask-loss-weight",
        "--adversarial",
        "--position-embedding",
    ],
    "optimisation": [
        "--optimizer",
        "--lr",
        "--l2",
        "--betas",
        "--clip-grad",
        "--batch-size",
        "--epochs",
        "--patience",
        "--seed",
        "--amp",
    ],
    "data": [
        "--dataset",
        "--data",
        "--kcore",
        "--length-bucketing",
        "--bucket-batches",
        "--trim-padding",
        "--train-prefixes",
    ],
    "evaluation": ["--eval-every", "--eval-batch-size", "--exclude-history", "--protocol", "--select-metric"],
    "run": [
        "--device",
        "--out",
        "--resume",
        "--tensorboard",
        "--quiet",
        "--num-threads",
        "--ddp-find-unused",
        "--compile",
    ],
}
BOOL_FLAGS = {
    "--per-head-refine",
    "--stosa-compat",
    "--adversarial",
    "--position-embedding",
    "--length-bucketing",
    "--train-prefixes",
    "--trim-padding",
    "--exclude-history",
    "--tensorboard",
    "--quiet",
    "--ddp-find-unused",
    "--compile",
}
ERROR_VOICE = re.compile(r"^[A-Za-z_]+: expected .+, got .+")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Preprocessed-data cache in the test's folder, not ~/.cache."""
    monkeypatch.setenv("AWR_FAST_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    """The embedded synthetic data set at a test size, as a SASRec-layout "user item" file."""
    path = tmp_path_factory.mktemp("data") / "synthetic.txt"
    lines = [
        f"{user} {item}" for user, events in make_synthetic(num_users=150, num_items=120).items() for item, _ in events
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


TINY = [
    "--d-model",
    "16",
    "--n-layers",
    "1",
    "--max-len",
    str(MAX_LEN),
    "--batch-size",
    "64",
    "--epochs",
    "1",
    "--num-threads",
    "1",
    "--eval-batch-size",
    "64",
    "--kcore",
    "none",
    "--device",
    "cpu",
]


def _actions(parser):
    return [a for a in parser._actions if a.dest != "help"]


# ------------------------------------------------------------------------------------------------
# the CLI is derived from the dataclass


def test_cli_flags_are_the_dataclass_fields():
    parser = build_parser()
    dests = [a.dest for a in _actions(parser)]
    fields = [f.name for f in dataclasses.fields(TrainConfig)]
    assert dests == [f for f in fields if f != "synthetic"]  # one flag per field, in field order
    assert [f.name for f in cli_fields()] == dests
    flags = {a.dest: a.option_strings[0] for a in _actions(parser)}
    assert all(flag == "--" + dest.replace("_", "-") for dest, flag in flags.items())
    # the same flags, in the same groups, as the hand-written parser had
    groups = {
        g.title: [a.option_strings[0] for a in g._group_actions]
        for g in parser._action_groups
        if g._group_actions and g.title in LEGACY_GROUPS
    }
    assert groups == LEGACY_GROUPS
    for action in _actions(parser):
        field = TrainConfig.__dataclass_fields__[action.dest]
        assert action.help.startswith(field.metadata["help"]) and "(default: " in action.help, action.dest
        assert action.default is argparse.SUPPRESS  # not given = keep the dataclass (or stored) value
        assert (action.option_strings[0] in BOOL_FLAGS) == (
            "--no-" + action.option_strings[0][2:] in action.option_strings
        )


def test_cli_help_shows_the_defaults_and_spec_choices():
    by_dest = {a.dest: a for a in _actions(build_parser())}
    assert by_dest["d_model"].help == "embedding width d (default: 64)"
    assert by_dest["betas"].help == "Adam betas (default: 0.9 0.98)"  # as typed on the command line
    assert by_dest["out"].help == "run directory (default: runs/<timestamp>-<model>-<attention>)"
    assert by_dest["data"].help == "path of a data file (wins over --dataset) (default: None)"
    assert tuple(by_dest["backend"].choices) == backends.CHOICES == ("auto", "cuda", "triton", "eager", "reference")
    assert "eager" in by_dest["backend"].help
    assert tuple(by_dest["attention"].choices) == tuple(dict.fromkeys(dot_spec.CAUSAL_MECHANISMS + w2_spec.MECHANISMS))
    assert tuple(by_dest["refine_scale"].choices) == dot_spec.REFINE_SCALES
    assert "stoc: stosa only" in by_dest["attention"].help
    res = subprocess.run(
        [sys.executable, "-m", "awr_fast.train", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(),
        check=False,
    )
    assert res.returncode == 0 and "--backend {auto,cuda,triton,eager,reference}" in res.stdout


def test_cli_parses_types_and_bools():
    cfg = config_from_args(
        [
            "--no-trim-padding",
            "--per-head-refine",
            "--betas",
            "0.8",
            "0.95",
            "--lr",
            "1e-3",
            "--n-heads",
            "2",
            "--attn-dropout",
            "0.1",
            "--backend",
            "eager",
        ]
    )
    assert cfg.trim_padding is False and cfg.per_head_refine is True
    assert cfg.betas == (0.8, 0.95) and cfg.lr == 1e-3 and cfg.n_heads == 2 and cfg.attn_dropout == 0.1
    assert cfg.backend == "eager" and cfg.length_bucketing is True  # not given: the dataclass default
    with pytest.raises(SystemExit):
        config_from_args(["--backend", "fast"])


def test_cli_config_errors_name_the_flag(capsys):
    with pytest.raises(SystemExit) as exc:
        config_from_args(["--n-heads", "3"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"{PROG}: error: --n-heads: expected a divisor of d_model=64, got 3" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 2  # usage line + error line
    with pytest.raises(SystemExit):
        config_from_args(["--resume", "/nonexistent/run"])
    assert "--resume: expected a run directory" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# one error voice


def _raises(fn):
    with pytest.raises(ValueError) as exc:
        fn()
    return str(exc.value)


def test_value_errors_read_name_expected_got(tmp_path):
    not_a_checkpoint = tmp_path / "x.pt"
    save_checkpoint(not_a_checkpoint, {"epoch": 1})
    cases = {
        "model": lambda: TrainConfig(model="gru"),
        "attention": lambda: TrainConfig(model="sasrec", attention="stoc"),
        "backend": lambda: TrainConfig(backend="fast"),
        "amp": lambda: TrainConfig(amp="fp8"),
        "protocol": lambda: TrainConfig(protocol="sampled50"),
        "d_model": lambda: TrainConfig(d_model=0),
        "patience": lambda: TrainConfig(patience=-1),
        "n_heads": lambda: TrainConfig(d_model=64, n_heads=3),
        "dropout": lambda: TrainConfig(dropout=1.0),
        "num_negatives": lambda: TrainConfig(num_negatives=0),
        "config": lambda: TrainConfig.from_dict({"epochs": 1, "extra": {"loss": "ce"}}),
        "batch_size": lambda: RandomBatchSampler(10, 0, seed=1),
        "bucket_batches": lambda: LengthBucketBatchSampler([1, 2], 4, seed=1, bucket_batches=0),
        "optimizer": lambda: make_optimizer(torch.nn.Linear(2, 2), "sgd", 0.1, 0.0),
        "path": lambda: load_checkpoint(not_a_checkpoint),
    }
    cases["protocol "] = lambda: selection_key("sampled50")
    cases["amp "] = lambda: autocast(torch.device("cpu"), "fp8")
    for name, fn in cases.items():
        message = _raises(fn)
        assert ERROR_VOICE.match(message), (name, message)
        assert message.startswith(name.strip() + ": "), (name, message)


def test_dead_options_are_gone():
    assert "model_builder" not in inspect.signature(train).parameters
    assert "extra" not in TrainConfig.__dataclass_fields__
    assert "extra" not in TrainConfig().model_kwargs(10)
    # config.json of older runs holds "extra": {} and still loads
    legacy = {**TrainConfig(epochs=3).to_dict(), "extra": {}}
    assert TrainConfig.from_dict(legacy) == TrainConfig(epochs=3)


def test_loss_module_passes_the_generator_to_model_loss():
    calls = []

    class Model(torch.nn.Module):
        def loss(self, seq, pos, neg=None, *, generator=None):
            calls.append((seq, pos, neg, generator))
            return torch.zeros(())

    seq, pos, gen = torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.long), torch.Generator()
    LossModule(Model())(seq, pos, gen)
    assert len(calls) == 1 and calls[0][0] is seq and calls[0][1] is pos and calls[0][2] is None
    assert calls[0][3] is gen

    class NoGenerator(torch.nn.Module):  # no signature inspection any more: a loss must take generator=
        def loss(self, seq, pos, neg=None):
            return torch.zeros(())

    with pytest.raises(TypeError):
        LossModule(NoGenerator())(seq, pos, gen)


# ------------------------------------------------------------------------------------------------
# bad input: one line on stderr, a non-zero exit status; train() still raises


def _env():
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    env["OMP_NUM_THREADS"] = "1"
    return env


def _bad_file(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_text("1 1\n1 2\n1 x\n2 1\n")
    return path


def test_bad_data_line_is_a_one_line_cli_error(tmp_path):
    bad = _bad_file(tmp_path)
    env = {**_env(), "AWR_FAST_CACHE": str(tmp_path / "cache")}
    res = subprocess.run(
        [sys.executable, "-m", "awr_fast.train", "--data", str(bad), "--out", str(tmp_path / "r"), *TINY],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert res.returncode == 1, res.stderr[-2000:]
    lines = res.stderr.strip().splitlines()
    assert lines == [f"{PROG}: error: {bad}, line 3: expected an integer item id, got 'x' in '1 x'"], res.stderr
    assert "Traceback" not in res.stderr
    with pytest.raises(DataFormatError):  # the library keeps raising
        train(data=str(bad), out=str(tmp_path / "lib"), max_len=MAX_LEN, quiet=True)


def test_missing_path_and_occupied_run_are_one_line_errors(tmp_path, capsys):
    missing = tmp_path / "nowhere.txt"
    assert main(["--data", str(missing), "--out", str(tmp_path / "r1"), *TINY]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"{PROG}: error: '{missing}' is neither a data file nor a known data set")
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    with pytest.raises(FileNotFoundError):
        train(data=str(missing), out=str(tmp_path / "r2"), quiet=True)

    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "metrics.jsonl").write_text("")
    assert main(["--out", str(occupied), *TINY]) == 1
    err = capsys.readouterr().err
    assert err.strip() == f"{PROG}: error: {occupied} already holds a run; use --resume {occupied} or another --out"


# ------------------------------------------------------------------------------------------------
# what the progress lines and the summary say


def _epoch_lines(out):
    return [line for line in out.splitlines() if line.startswith("epoch ")]


@pytest.mark.parametrize("protocol", ["sampled100", "full"])
def test_epoch_line_shows_the_selection_metrics(tmp_path, capsys, data_file, protocol):
    run = tmp_path / "r"
    assert main(["--data", str(data_file), "--out", str(run), "--protocol", protocol, *TINY, "--epochs", "2"]) == 0
    out = capsys.readouterr().out
    lines = _epoch_lines(out)
    records = read_metrics(run)
    assert len(lines) == len(records) == 2
    keys = headline_keys(protocol)
    assert keys[0] == selection_key(protocol)
    for line, record in zip(lines, records):
        shown = dict(re.findall(r"(\S+@\d+) (\d\.\d{4})", line))
        assert list(shown) == list(keys), line
        for key, value in shown.items():
            assert value == f"{record['valid'][key]:.4f}", (key, line)
    popularity_line = next(line for line in out.splitlines() if line.startswith("popularity baseline"))
    assert list(dict(re.findall(r"(\S+@\d+) (\d\.\d{4})", popularity_line))) == list(keys)
    if protocol == "sampled100":  # the full-ranking values differ from the sampled ones the line shows
        assert records[0]["valid"]["ndcg@5"] != records[0]["valid"]["sampled_ndcg@5"]
        assert not re.search(r"(?<!sampled_)ndcg@", "\n".join(lines))


def test_backends_used_is_reported(tmp_path, capsys, data_file):
    backends.USED[("dot_refined", "reference")] += 3  # left over from earlier work in this process
    run = tmp_path / "r"
    assert main(["--data", str(data_file), "--out", str(run), "--attention", "simp", *TINY]) == 0
    out = capsys.readouterr().out
    final = json.loads((run / "final.json").read_text())
    assert final["backends_used"] == {"dot_refined": "eager"}  # this run's record: the counter was cleared
    lines = out.splitlines()
    first_epoch = next(i for i, line in enumerate(lines) if line.startswith("epoch "))
    assert lines[first_epoch + 1] == "attention backend: dot_refined=eager"
    assert lines[-1] == "attention backend: dot_refined=eager"  # the summary's last line

    # a chosen backend is what runs; STOSA also scores with the w2_scores op
    result = train(
        data=str(data_file),
        out=str(tmp_path / "s"),
        model="stosa",
        attention="stoc",
        backend="reference",
        d_model=16,
        n_layers=1,
        n_heads=1,
        max_len=MAX_LEN,
        epochs=1,
        batch_size=64,
        kcore="none",
        num_threads=1,
        quiet=True,
    )
    assert result["backends_used"] == {"w2_refined": "reference", "w2_scores": "reference"}


def test_print_summary_of_an_older_final_json():
    final = {
        "model": "sasrec",
        "attention": "simp",
        "best_epoch": 2,
        "protocol": {"ranking": "sampled100", "exclude_history": True},
        "valid": {"sampled_ndcg@10": 0.25, "ndcg@10": 0.01},
        "test": {"sampled_ndcg@10": 0.2},
        "popularity": {"valid": {}, "test": {}},
        "timing": {},
    }

    out = io.StringIO()
    print_summary(final, file=out)
    text = out.getvalue()
    assert "sampled-100, history excluded" in text and "0.2500" in text and "0.0100" not in text
    assert "attention backend" not in text  # not recorded there: no line rather than a wrong one
