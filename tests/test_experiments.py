"""awr_fast.experiments: grid expansion and checks, stable ids, running a grid across sittings (skip,
resume after SIGTERM, stale files), the rows store, --dry-run estimates, the report's statistics and
figures, and the repository's grid files."""

import importlib
import io
import json
import math
import os
import re
import signal
import sys
from pathlib import Path

import numpy as np
import pytest

from awr_fast.experiments import GridError, build_report, load_study, read_rows, run_study
from awr_fast.experiments.cli import main
from awr_fast.experiments.report import load_paper_numbers
from awr_fast.experiments.runner import dry_run, run_states
from awr_fast.experiments.stats import betainc, mean_std, paired_t_test, t_two_sided_p
from awr_fast.experiments.store import RowsWarning, append_row, write_csv
from awr_fast.train import read_metrics
from awr_fast.training import load_checkpoint

train_module = importlib.import_module("awr_fast.train")
REPO = Path(__file__).resolve().parents[1]

# a tiny SASRec on a small synthetic data set: a run of 2-3 epochs takes about a second
TINY_BASE = """
[base]
dataset = "synthetic"
synthetic = { num_users = 200, num_items = 80 }
max_len = 20
d_model = 16
n_layers = 1
batch_size = 64
num_threads = 1
"""


@pytest.fixture(autouse=True, scope="module")
def _private_cache(tmp_path_factory):
    """Preprocessed-data cache in a temporary folder, not ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWR_FAST_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


def write_grid(folder: Path, name: str, body: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(body)
    return path


# ------------------------------------------------------------------------------------------------
# grid files


def test_grid_expands_in_file_order_with_stable_ids(tmp_path):
    body = (
        TINY_BASE
        + """
[[grid]]
attention = ["none", "simp"]
seed = [1, 2]

[[grid]]
model = "stosa"
attention = "stoc"
seed = [1]
n_layers = [1, 2]
"""
    )
    study = load_study(write_grid(tmp_path, "g.toml", body))
    got = [(r.config["model"], r.config["attention"], r.seed, r.config["n_layers"]) for r in study.runs]
    # first key outermost, tables in file order
    assert got == [
        ("sasrec", "none", 1, 1),
        ("sasrec", "none", 2, 1),
        ("sasrec", "simp", 1, 1),
        ("sasrec", "simp", 2, 1),
        ("stosa", "stoc", 1, 1),
        ("stosa", "stoc", 1, 2),
    ]
    assert [r.index for r in study.runs] == list(range(1, 7))
    assert re.fullmatch(r"sasrec-synthetic-none-s1-[0-9a-f]{8}", study.runs[0].run_id)
    assert re.fullmatch(r"stosa-synthetic-stoc-L2-s1-[0-9a-f]{8}", study.runs[5].run_id)  # the varied field
    assert len({r.run_id for r in study.runs}) == 6
    assert study.out_dir == tmp_path / "results" / "g"

    # the same experiments written another way (key order, int for float, execution-only fields) keep their ids
    same = """
[base]
num_threads = 2
quiet = true
backend = "reference"
batch_size = 64
n_layers = 1
d_model = 16
max_len = 20
synthetic = { num_items = 80, num_users = 200 }
dataset = "synthetic"
dropout = 0.2

[[grid]]
attention = ["none", "simp"]
seed = [1, 2]
"""
    again = load_study(write_grid(tmp_path / "other", "g.toml", same))
    assert [r.run_id for r in again.runs] == [r.run_id for r in study.runs[:4]]
    assert again.runs[0].config["backend"] == "reference"  # kept for the run, just not hashed

    changed = load_study(write_grid(tmp_path / "lr", "g.toml", same.replace("dropout = 0.2", "lr = 1e-3")))
    assert changed.runs[0].config_hash != study.runs[0].config_hash
    as_int = load_study(write_grid(tmp_path / "int", "g.toml", same.replace("dropout = 0.2", "l2 = 0")))
    as_float = load_study(write_grid(tmp_path / "float", "g.toml", same.replace("dropout = 0.2", "l2 = 0.0")))
    assert as_int.runs[0].run_id == as_float.runs[0].run_id == study.runs[0].run_id  # l2 = 0.0 is the default

    seed_first = body.replace("[[grid]]", '[study]\norder_by = ["seed"]\n\n[[grid]]', 1)
    seed_major = load_study(write_grid(tmp_path / "order", "g.toml", seed_first))
    assert [(r.config["attention"], r.seed) for r in seed_major.runs][:4] == [
        ("none", 1),
        ("simp", 1),
        ("stoc", 1),
        ("stoc", 1),
    ]
    assert {r.run_id for r in seed_major.runs} == {r.run_id for r in study.runs}


BAD_GRIDS = [
    ("[[grid]]\nlerning_rate = [1e-3]\n", r"\[\[grid\]\] #1: lerning_rate: .*did you mean 'lr'"),
    ('[base]\nmechanism = "simp"\n[[grid]]\nseed = [1]\n', r"\[base\]: mechanism: .*did you mean 'attention'"),
    ('[study]\nnmae = "x"\n[[grid]]\nseed = [1]\n', r"\[study\]: nmae: expected one of"),
    ('[base]\nout = "somewhere"\n[[grid]]\nseed = [1]\n', r"\[base\]: out: expected no 'out'"),
    (
        '[[grid]]\nmodel = "sasrec"\nattention = ["simp", "stoc"]\n',
        r"\[\[grid\]\] #1, run 2 .*attention='stoc'.*attention: expected one of",
    ),
    ("[base]\nseed = 1\n", r"\[\[grid\]\]: expected at least one"),
    ("[[grid]]\nseed = []\n", r"seed: expected a non-empty list"),
    ("[[grid]]\nbetas = [0.9, 0.98]\n", r"betas: expected a list of alternatives, each a list"),
    ("[[grid]\nseed = [1]\n", r"not valid TOML"),
]


@pytest.mark.parametrize("body,message", BAD_GRIDS, ids=[f"bad{i}" for i in range(len(BAD_GRIDS))])
def test_bad_grid_names_the_file_and_the_key(tmp_path, body, message):
    path = write_grid(tmp_path, "bad.toml", body)
    with pytest.raises(GridError, match=message) as info:
        load_study(path)
    assert str(path) in str(info.value)


def test_cli_reports_a_bad_grid_in_one_line(tmp_path, capsys):
    path = write_grid(tmp_path, "bad.toml", "[[grid]]\nlerning_rate = [1e-3]\n")
    assert main(["run", str(path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("python -m awr_fast.experiments: error: ")
    assert "bad.toml" in err[0] and "lerning_rate" in err[0]
    assert main(["run", str(tmp_path / "missing.toml")]) == 1
    assert "missing.toml" in capsys.readouterr().err


def test_yaml_grid_matches_toml_or_says_what_is_missing(tmp_path, monkeypatch):
    toml = write_grid(tmp_path, "g.toml", '[base]\nmax_len = 20\n[[grid]]\nattention = ["none", "add"]\nseed = [1]\n')
    yaml_text = "base:\n  max_len: 20\ngrid:\n  - attention: [none, add]\n    seed: [1]\n"
    path = write_grid(tmp_path, "g.yaml", yaml_text)
    try:
        import yaml  # noqa: F401
    except ImportError:
        pass
    else:
        assert [r.run_id for r in load_study(path).runs] == [r.run_id for r in load_study(toml).runs]
    monkeypatch.setitem(sys.modules, "yaml", None)  # import yaml now fails
    with pytest.raises(GridError, match=r"g\.yaml: reading YAML needs PyYAML"):
        load_study(path)


# ------------------------------------------------------------------------------------------------
# running a grid


TWO_RUNS = TINY_BASE.replace("batch_size = 64", "batch_size = 64\nepochs = 2") + (
    '\n[[grid]]\nattention = ["none", "simp"]\nseed = [1]\n'
)


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    """A 2-run grid (SASRec none and simp, seed 1), run once: (grid path, progress output)."""
    folder = tmp_path_factory.mktemp("tiny")
    path = write_grid(folder, "tiny.toml", '[study]\nname = "tiny"\n' + TWO_RUNS)
    out = io.StringIO()
    counts = run_study(load_study(path), quiet=True, out=out)
    assert counts == {"done": 2, "skipped": 0, "failed": 0}
    return path, out.getvalue()


def test_two_run_grid_writes_two_rows(tiny_study):
    path, progress = tiny_study
    study = load_study(path)
    rows = read_rows(study.runs_file)
    assert [r["run_id"] for r in rows] == [r.run_id for r in study.runs]
    for row, run in zip(rows, study.runs):
        assert row["config_hash"] == run.config_hash and row["config"]["attention"] == run.config["attention"]
        assert row["config"]["seed"] == 1 and row["config"]["epochs"] == 2
        assert 1 <= row["best_epoch"] <= 2 and row["epochs"] == 2
        assert set(row["test"]) >= {"recall@1", "recall@5", "ndcg@5", "ndcg@10"}
        assert row["valid"]["ndcg@5"] >= 0 and row["selection_metric"] == "valid ndcg@5"
        assert row["mean_epoch_s"] > 0 and row["mean_eval_s"] > 0 and row["device"] == "cpu"
        assert row["torch"] and "triton" in row and "git_commit" in row
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", row["date"])
        assert (study.out_dir / row["run_dir"] / "final.json").is_file()
        assert row["protocol"] == {"ranking": "full", "exclude_history": False}
    assert rows[1]["backends_used"] == {"dot_refined": "eager"}  # simp on the CPU
    csv_lines = study.runs_file.with_suffix(".csv").read_text().splitlines()
    assert len(csv_lines) == 3 and "test_ndcg@10" in csv_lines[0].split(",")
    assert re.search(r"\[1/2\] sasrec-synthetic-none-s1-\w+ \.\.\. done in \d+ s, test NDCG@10 0\.\d{4}", progress)
    assert "[2/2] sasrec-synthetic-simp-s1-" in progress


def test_rerun_skips_the_done_runs(tiny_study, monkeypatch, capsys):
    path, _ = tiny_study

    def must_not_train(*args, **kwargs):
        raise AssertionError("a done run was trained again")

    monkeypatch.setattr(train_module, "train", must_not_train)
    assert main([str(path), "--quiet"]) == 0  # `run` is the default command
    out = capsys.readouterr().out
    assert "2 of 2 runs already in" in out and "0 finished now, 2 were done before" in out
    assert len(read_rows(load_study(path).runs_file)) == 2


ONE_RUN = TINY_BASE.replace("batch_size = 64", "batch_size = 64\nepochs = 3") + (
    '\n[[grid]]\nattention = ["simp"]\nseed = [4]\n'
)


def test_sigterm_mid_run_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch, capsys):
    straight = load_study(write_grid(tmp_path / "straight", "one.toml", ONE_RUN))
    run_study(straight, quiet=True, out=io.StringIO())
    (expected,) = read_rows(straight.runs_file)

    path = write_grid(tmp_path / "cut", "one.toml", ONE_RUN)
    real_save = train_module._save_epoch

    def save_then_sigterm(config, run_dir, state, record, *args):
        real_save(config, run_dir, state, record, *args)
        if record["epoch"] == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # the runner turns it into an exception here

    handler_before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(train_module, "_save_epoch", save_then_sigterm)
    assert main(["run", str(path), "--quiet"]) == 143
    assert signal.getsignal(signal.SIGTERM) is handler_before
    captured = capsys.readouterr()
    assert "interrupted" in captured.out and "run the same command again to resume" in captured.err
    study = load_study(path)
    (state,) = run_states(study)
    assert state.state == "partial" and state.epochs_done == 1 and read_rows(study.runs_file) == []
    assert load_checkpoint(state.run_dir / "last.pt")["epoch"] == 1

    # --dry-run sees the partial run and prices what is left from its measured epoch
    dry_run(study, out=(text := io.StringIO()))
    assert re.search(r"\[1/1\] partial\s+sasrec-synthetic-simp-s4-\w+\s+epoch 1/3, ~", text.getvalue())
    assert "measured in this study (same configuration, 1 run)" in text.getvalue()

    trained = []

    def save_and_count(config, run_dir, state, record, *args):
        trained.append(record["epoch"])
        real_save(config, run_dir, state, record, *args)

    monkeypatch.setattr(train_module, "_save_epoch", save_and_count)
    assert main(["run", str(path), "--quiet"]) == 0
    assert trained == [2, 3]  # continued from last.pt, not started over
    assert "resuming after epoch 1" in capsys.readouterr().out
    (row,) = read_rows(study.runs_file)
    assert row["run_id"] == expected["run_id"]
    assert row["test"] == expected["test"] and row["valid"] == expected["valid"]  # bitwise on the CPU
    assert row["best_epoch"] == expected["best_epoch"]
    assert [r["epoch"] for r in read_metrics(state.run_dir)] == [1, 2, 3]


def test_files_of_a_run_killed_before_its_first_checkpoint_are_cleared(tmp_path):
    study = load_study(write_grid(tmp_path, "one.toml", ONE_RUN.replace("epochs = 3", "epochs = 1")))
    run_dir = study.run_dir(study.runs[0])
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text('{"epoch": 1, "loss": 1.0}\n')  # written, then killed before last.pt
    assert run_states(study)[0].state == "todo"
    assert run_study(study, quiet=True, out=io.StringIO())["done"] == 1
    assert [r["epoch"] for r in read_metrics(run_dir)] == [1]


def test_truncated_last_row_is_skipped_with_a_warning(tmp_path):
    path = tmp_path / "runs.jsonl"
    append_row(path, {"run_id": "a", "config_hash": "1"})
    append_row(path, {"run_id": "b", "config_hash": "2"})
    with open(path, "a") as f:
        f.write('{"run_id": "c", "config_ha')  # a kill in the middle of a write
    with pytest.warns(RowsWarning, match=r"runs\.jsonl line 3: expected a complete JSON row"):
        assert [r["run_id"] for r in read_rows(path)] == ["a", "b"]
    append_row(path, {"run_id": "d", "config_hash": "4"})  # starts on a line of its own
    with pytest.warns(RowsWarning, match="line 3"):
        assert [r["run_id"] for r in read_rows(path)] == ["a", "b", "d"]


def test_csv_leaves_another_backbones_fields_blank(tmp_path):
    """A field only SASRec reads (its loss) is blank on an AC-SASRec row, whose config still holds the
    trainer's default; SASRec's own row keeps it."""
    rows = [
        {"run_id": "a", "config_hash": "1", "config": {"model": "acsasrec", "loss": "bce", "lr": 1e-4}},
        {"run_id": "s", "config_hash": "2", "config": {"model": "sasrec", "loss": "ce", "lr": 1e-4}},
    ]
    write_csv(tmp_path / "runs.csv", rows)
    lines = (tmp_path / "runs.csv").read_text().splitlines()
    header = lines[0].split(",")
    loss = [line.split(",")[header.index("loss")] for line in lines[1:]]
    lr = [line.split(",")[header.index("lr")] for line in lines[1:]]
    assert loss == ["", "ce"] and lr == ["0.0001", "0.0001"]


def test_dry_run_lists_done_and_todo_with_an_estimate(tiny_study, tmp_path, capsys):
    path, _ = tiny_study
    # the same study with a second seed: seed 1 is done, seed 2 is priced from seed 1's epochs
    wider = write_grid(
        path.parent,
        "wider.toml",
        '[study]\nname = "tiny"\n' + TWO_RUNS.replace("seed = [1]", "seed = [1, 2]"),
    )
    assert main(["run", str(wider), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "4 runs -> " in out and "2 done, 0 finished (row to write), 0 partial, 2 todo" in out
    assert re.search(r"\[1/4\] done\s+sasrec-synthetic-none-s1-\w+\s+test NDCG@10 0\.\d{4}", out)
    assert re.search(r"\[2/4\] todo\s+sasrec-synthetic-none-s2-\w+\s+~\d+ s \(2 epochs x", out)
    assert "estimated time left: " in out and "for 2 runs" in out
    assert "epoch times: measured in this study (same configuration, 1 run)" in out
    assert "epochs per run: mean of the finished ones (2 runs)" in out

    assert main(["run", str(wider), "--dry-run", "--only", "*simp-s2*"]) == 0
    out = capsys.readouterr().out
    assert "1 run -> " in out and "simp-s2" in out and "none-s2" not in out

    # nothing measured: the documented default for the data set, model and size
    beauty = write_grid(tmp_path, "b.toml", '[base]\ndataset = "beauty"\nn_layers = 1\n[[grid]]\nseed = [1, 2]\n')
    result = dry_run(load_study(beauty), out=(text := io.StringIO()))
    assert result["counts"]["todo"] == 2 and result["unknown"] == 0 and result["seconds"] > 0
    assert "default for beauty/sasrec (n=50, 2 layers, scaled)" in text.getvalue()
    assert "upper bound: all epochs" in text.getvalue()


# ------------------------------------------------------------------------------------------------
# the report


def _fake_rows(study, values, epoch_s):
    """runs.jsonl rows for ``study``'s runs: test ndcg@10 from ``values[(attention, seed)]``."""
    for run in study.runs:
        key = (run.config["attention"], run.seed)
        if key not in values:
            continue
        v = values[key]
        append_row(
            study.runs_file,
            {
                "run_id": run.run_id,
                "config_hash": run.config_hash,
                "config": run.config,
                "run_dir": f"runs/{run.run_id}",
                "best_epoch": 5,
                "epochs": 10,
                "selection_metric": "valid ndcg@5",
                "protocol": {"ranking": "full", "exclude_history": False},
                "test": {"ndcg@10": v, "ndcg@5": v / 2, "recall@1": v / 4, "recall@5": v},
                "valid": {"ndcg@5": v},
                "mean_epoch_s": epoch_s[run.config["attention"]],
                "mean_eval_s": 1.0,
                "device": "cpu",
            },
        )


def test_report_of_a_two_seed_paired_comparison(tmp_path):
    path = write_grid(
        tmp_path,
        "pair.toml",
        '[study]\nname = "pair"\n' + TINY_BASE + '\n[[grid]]\nattention = ["none", "simp", "add"]\nseed = [1, 2]\n',
    )
    study = load_study(path)
    values = {("none", 1): 0.10, ("none", 2): 0.12, ("simp", 1): 0.11, ("simp", 2): 0.14, ("add", 1): 0.09}
    _fake_rows(study, values, {"none": 2.0, "simp": 3.0, "add": 2.5})
    paper = tmp_path / "paper.toml"
    paper.write_text(
        '[[paper]]\nsource = "A paper, Table 9"\nshort = "paper T9"\n'
        'match = { dataset = "synthetic", attention = "none" }\n'
        'protocol = { max_len = 50, protocol = "full" }\nmetrics = { "ndcg@10" = 0.5, "hr@5" = 0.25 }\n'
        '[[paper]]\nsource = "Elsewhere"\nmatch = { dataset = "beauty" }\nmetrics = { "ndcg@10" = 0.9 }\n'
    )
    md_path, json_path = build_report(study, tmp_path / "docs", figures=False, paper_numbers=paper)
    md = md_path.read_text()
    assert md_path == tmp_path / "docs" / "pair.md" and json_path == tmp_path / "docs" / "pair.json"
    # hand-computed: none 0.10, 0.12 -> 0.1100 ± 0.0141; simp 0.11, 0.14 -> 0.1250 ± 0.0212, +13.6 %;
    # differences 0.01, 0.02: t = 0.015 / (0.00707 / sqrt 2) = 3, df 1: p = 1 - 2 atan(3) / pi = 0.2048
    assert "| none | 2 | 0.0275 ± 0.0035 | 0.1100 ± 0.0141 | 0.0550 ± 0.0071 | 0.1100 ± 0.0141 | 2 | 1.00x |" in md
    assert "0.1250 ± 0.0212 (+13.6 %)" in md and "| 1.50x |" in md
    assert "+13.6 %, p 0.205 (2 seeds)" in md
    assert "| add | 1 of 2 |" in md and "n/a (1 seed)" in md  # one seed finished: no test
    assert "| paper: paper T9 |  | - | 0.2500 | - | 0.5000 |" in md and "0.9000" not in md
    assert "n 50 (ours 20)" in md and "not stated by the source: d, heads" in md
    assert "Missing cells (1 of 6 runs not finished)" in md and "sasrec-synthetic-add-s2-" in md
    assert "Protocol: data synthetic;" in md and "ranking full (all items)" in md and "history excluded no" in md
    assert "early stopping on valid ndcg@5, patience 20" in md

    report = json.loads(json_path.read_text())
    assert len(report["rows"]) == 5 and report["runs_expected"] == 6
    simp = next(g for g in report["tables"][0]["groups"] if g["attention"] == "simp")
    paired = simp["metrics"]["ndcg@10"]["paired"]
    assert paired["n"] == 2 and paired["seeds"] == [1, 2]
    assert paired["t"] == pytest.approx(3.0)
    assert paired["p"] == pytest.approx(1 - 2 * math.atan(3) / math.pi, rel=1e-12)
    assert simp["metrics"]["ndcg@10"]["mean"] == pytest.approx(0.125)
    assert simp["metrics"]["ndcg@10"]["std"] == pytest.approx(math.sqrt(0.00045))
    assert simp["epoch_time_ratio"] == pytest.approx(1.5)
    assert [m["run_id"][:24] for m in report["missing"]] == ["sasrec-synthetic-add-s2-"]


def test_report_of_a_real_run_has_figures_and_says_one_seed(tiny_study, tmp_path):
    path, _ = tiny_study
    md_path, json_path = build_report(load_study(path), tmp_path / "docs")
    md = md_path.read_text()
    assert "## synthetic / sasrec" in md and "n/a (1 seed)" in md and "Missing cells" not in md
    assert "Protocol: data synthetic (synthetic: 200 users" in md and "n 20; d 16; heads 1; layers 1" in md
    figures = json.loads(json_path.read_text())["figures"]
    names = sorted(Path(f).name for f in figures)
    assert names == [
        "attention-synthetic-sasrec-none.png",
        "attention-synthetic-sasrec-simp.png",
        "grad-norm-synthetic-sasrec.png",
        "valid-synthetic-sasrec.png",
    ]
    for f in figures:
        data = Path(f).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
        assert f"(tiny/{Path(f).name})" in md  # linked from the page, relative to it

    assert main(["report", str(path), "--out-dir", str(tmp_path / "cli"), "--no-figures"]) == 0
    assert "| simp | 1 |" in (tmp_path / "cli" / "tiny.md").read_text()
    assert len(json.loads((tmp_path / "cli" / "tiny.json").read_text())["rows"]) == 2


def test_report_draws_attention_from_saved_maps_without_checkpoints(tiny_study, tmp_path):
    """Checkpoints are not committed: a later sitting's report draws the maps the runner saved."""
    import shutil

    from awr_fast.plots import ATTENTION_FILE, load_attention_maps

    path, _ = tiny_study
    study = load_study(path)
    copy = tmp_path / "grid"
    shutil.copytree(path.parent, copy)
    study = load_study(copy / path.name)
    for run in study.runs:
        run_dir = study.run_dir(run)
        maps = load_attention_maps(run_dir / ATTENTION_FILE)
        assert maps["P"].ndim == 3 and maps["P"].shape[1:] == maps["masked"].shape
        p = maps["P"][0]
        visible = ~maps["masked"]
        rows = p.sum(axis=1)[visible.any(axis=1)]  # the window's share of each row: positive, at most one
        assert rows.size and (rows > 0).all() and (rows <= 1 + 1e-5).all()
        assert np.abs(p[np.triu(np.ones_like(visible), 1)]).max() < 1e-6  # no weight on the future
        assert ("B" in maps) == (run.config["attention"] != "none")
        for ckpt in run_dir.glob("*.pt"):
            ckpt.unlink()
    md_path, json_path = build_report(study, tmp_path / "docs")
    names = sorted(Path(f).name for f in json.loads(json_path.read_text())["figures"])
    assert "attention-synthetic-sasrec-none.png" in names and "attention-synthetic-sasrec-simp.png" in names
    assert "Attention maps of the last layer" in md_path.read_text()


# ------------------------------------------------------------------------------------------------
# statistics


def test_t_test_matches_known_values():
    # closed forms: df 1 is the Cauchy law, df 2 has F(t) = 1/2 + t / (2 sqrt(2 + t^2))
    assert t_two_sided_p(3.0, 1) == pytest.approx(1 - 2 * math.atan(3.0) / math.pi, rel=1e-12)
    assert t_two_sided_p(-2.0, 2) == pytest.approx(1 - 2 / math.sqrt(6), rel=1e-12)
    assert t_two_sided_p(2.228, 10) == pytest.approx(0.05, abs=2e-4)  # the textbook critical value
    assert t_two_sided_p(0.0, 5) == 1.0
    # differences 1, 2, 3: t = 2 / (1 / sqrt 3), df 2 -> p = 1 - sqrt(12) / sqrt(14)
    test = paired_t_test([2.0, 4.0, 6.0], [1.0, 2.0, 3.0])
    assert test.n == 3 and test.t == pytest.approx(2 * math.sqrt(3))
    assert test.p == pytest.approx(1 - math.sqrt(12 / 14), rel=1e-12)
    assert test.describe() == "p 0.0742 (3 seeds)"
    # I_x(2, 3) = P(Binomial(4, x) >= 2)
    assert betainc(2, 3, 0.4) == pytest.approx(1 - 0.6**4 - 4 * 0.4 * 0.6**3, rel=1e-12)
    assert betainc(1, 1, 0.3) == pytest.approx(0.3, rel=1e-12)
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0) and mean_std([5.0]) == (5.0, None)
    assert paired_t_test([0.2], [0.1]).describe() == "n/a (1 seed)"
    assert paired_t_test([0.2, 0.3], [0.1, 0.2]).p is None  # identical differences: no spread, no test
    scipy_stats = pytest.importorskip("scipy.stats")
    x, y = [0.031, 0.029, 0.035, 0.030], [0.030, 0.030, 0.031, 0.027]
    assert paired_t_test(x, y).p == pytest.approx(scipy_stats.ttest_rel(x, y).pvalue, rel=1e-9)


# ------------------------------------------------------------------------------------------------
# the repository's grid files


def test_repository_grid_files(tmp_path):
    grids = {p.stem: load_study(p) for p in (REPO / "experiments").glob("*.toml") if p.stem != "paper_numbers"}
    assert {k: len(s.runs) for k, s in grids.items()} == {
        "table2_beauty": 27,
        "table2_ml1m": 17,
        "table3_beauty": 16,
        "baseline_ml1m": 2,
        "acsasrec_beauty": 2,
    }
    for study in grids.values():
        assert all(r.config["backend"] == "auto" and r.config["protocol"] == "full" for r in study.runs)
        assert study.data_dir == REPO / "experiments" / "../../shared/data"

    beauty = grids["table2_beauty"].runs
    assert {r.config["dataset"] for r in beauty} == {"beauty"} and {r.config["max_len"] for r in beauty} == {50}
    assert {r.config["n_layers"] for r in beauty} == {1} and {r.config["patience"] for r in beauty} == {20}
    assert max(r.index for r in beauty if r.seed == 1) < min(r.index for r in beauty if r.seed == 2)
    assert sorted({(r.config["model"], r.config["attention"]) for r in beauty if r.seed == 3}) == sorted(
        [("sasrec", a) for a in ("none", "simp", "add", "value")]
        + [("stosa", a) for a in ("none", "simp", "add", "value", "stoc")]
    )
    ml1m = grids["table2_ml1m"].runs
    assert {r.config["max_len"] for r in ml1m} == {100}
    assert sorted(r.seed for r in ml1m if r.config["model"] == "stosa") == [1] * 5
    assert sorted({r.config["n_layers"] for r in grids["table3_beauty"].runs}) == [1, 2, 3, 4]
    ce, bce = grids["baseline_ml1m"].runs
    assert (ce.config["loss"], bce.config["loss"]) == ("ce", "bce")
    for run in (ce, bce):
        c = run.config
        assert (c["max_len"], c["d_model"], c["n_layers"], c["n_heads"]) == (200, 64, 2, 1)
        assert (c["dropout"], c["lr"], c["batch_size"], c["patience"]) == (0.1, 1e-3, 128, 10)
        assert c["exclude_history"] is True and c["attention"] == "none"

    for study in grids.values():  # every run has an estimate without touching any data
        study.out_dir = tmp_path / study.name
        result = dry_run(study, out=io.StringIO())
        assert result["unknown"] == 0 and result["seconds"] > 0

    ac, sasrec = sorted(grids["acsasrec_beauty"].runs, key=lambda r: r.config["model"])
    for run in (ac, sasrec):  # the released AC-TSR configuration and protocol, for both models
        c = run.config
        assert (c["n_layers"], c["n_heads"], c["d_model"], c["max_len"], c["batch_size"]) == (3, 4, 64, 50, 256)
        assert (c["lr"], c["dropout"], c["train_prefixes"], c["exclude_history"]) == (1e-4, 0.5, True, True)
    assert (ac.config["model"], sasrec.config["layout"], sasrec.config["loss"]) == ("acsasrec", "post_ln", "ce")

    paper = load_paper_numbers(REPO / "experiments" / "paper_numbers.toml")
    by_short = {p["short"]: p for p in paper}
    assert by_short["Klenitskiy & Vasilev, CE"]["metrics"] == {"ndcg@10": 0.1821, "recall@10": 0.3152}
    assert by_short["Klenitskiy & Vasilev, BCE"]["metrics"] == {"ndcg@10": 0.1341, "recall@10": 0.25}
