"""awr_fast.plots: attention heatmaps and per-epoch curves come out as readable, non-empty PNGs."""

import matplotlib
import numpy as np

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from awr_fast.plots import main, plot_runs  # noqa: E402
from awr_fast.train import train  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _private_cache(tmp_path_factory):
    """Preprocessed-data cache in a temporary folder, not ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWR_FAST_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


def _data_file(path, num_users=120, num_items=50):
    """A small "user item" file: users walk an item ring with stride 1 or 2, 10% noise."""
    rng = np.random.default_rng(0)
    lines = []
    for u in range(1, num_users + 1):
        s = [int(rng.integers(num_items))]
        for _ in range(int(rng.integers(8, 25)) - 1):
            s.append(int(rng.integers(num_items)) if rng.random() < 0.1 else (s[-1] + 1 + u % 2) % num_items)
        lines += [f"{u} {i + 1}" for i in s]
    path.write_text("\n".join(lines) + "\n")
    return path


def _run(base, data, name, model, attention):
    out = base / name
    train(
        dict(
            model=model,
            attention=attention,
            d_model=16,
            n_layers=1,
            n_heads=2,
            max_len=20,
            epochs=2,
            batch_size=32,
            lr=1e-2,
            quiet=True,
            num_threads=1,
            data=str(data),
            kcore="none",
            out=str(out),
        )
    )
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("runs")
    data = _data_file(base / "ring.txt")
    return [_run(base, data, "sasrec-simp", "sasrec", "simp"), _run(base, data, "stosa-none", "stosa", "none")]


def _check_png(path):
    assert path.is_file() and path.stat().st_size > 0, path
    img = plt.imread(path)
    assert img.ndim == 3 and img.shape[0] > 50 and img.shape[1] > 50


def test_plots_single_run_writes_into_run_dir(runs, capsys):
    assert main([str(runs[0])]) == 0
    names = {"attention-sasrec-simp.png", "valid_ndcg5.png", "grad_norm.png"}
    for name in names:
        _check_png(runs[0] / name)
    printed = capsys.readouterr().out.split()
    assert {p.rsplit("/", 1)[-1] for p in printed} == names


def test_plots_several_runs_to_out(runs, tmp_path):
    out = tmp_path / "figs"
    paths = plot_runs(runs, out, last=15)
    assert len(paths) == 4
    for p in paths:
        assert p.parent == out
        _check_png(p)
    # the model without refinement has no B panel, the refined one has A, B and P
    assert {p.name for p in paths} >= {"valid_ndcg5.png", "grad_norm.png"}


def test_plots_reports_bad_run_dir(tmp_path, capsys):
    assert main([str(tmp_path / "missing")]) == 2
    assert "not a run directory" in capsys.readouterr().err
