"""Smoke tests of the benchmark scripts (bench/): they run end to end at the smallest shapes, exit 0, and
write result rows with the expected columns. Results go to a temporary directory (--results-dir), never
to bench/results/. The benchmarks' own pytest-benchmark cases (bench/test_bench_ops.py) are not collected
by a plain `pytest` (testpaths = ["tests"])."""

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    saved_path, had_common = list(sys.path), "common" in sys.modules
    sys.path.insert(0, str(BENCH))
    try:
        spec.loader.exec_module(module)
    finally:  # leave no trace of bench/ on the import path of the test process
        sys.path[:] = saved_path
        if not had_common:
            sys.modules.pop("common", None)
    return module


def _run(script, args, results_dir, timeout=120):
    return _run_plain(script, [*args, "--results-dir", str(results_dir)], timeout)


def _run_plain(script, args, timeout=120):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # set by conftest without CUDA; the benchmark must not use the interpreter
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    )
    return proc


def _rows(results_dir, name):
    with open(results_dir / f"{name}.csv", newline="") as f:
        reader = csv.DictReader(f)
        header, rows = reader.fieldnames, list(reader)
    with open(results_dir / f"{name}.jsonl") as f:
        records = [json.loads(line) for line in f if line.strip()]
    assert len(records) == len(rows)
    return header, rows, records


def test_attention_quick(tmp_path):
    attention = _load("attention")
    args = [
        "--quick",
        "--batch",
        "4",
        "--n",
        "20",
        "--d",
        "32",
        "--heads",
        "1",
        "--mechanisms",
        "none,simp",
        "--family",
        "dot",
        "--backends",
        "reference,eager,triton,cuda,sdpa",
        "--min-time",
        "0.02",
    ]
    proc = _run("attention.py", args, tmp_path)
    header, rows, records = _rows(tmp_path, "attention")
    assert header == attention.COLUMNS
    by = {(r["family"], r["mechanism"], r["backend"]): r for r in rows}
    for key in (
        ("sdpa", "causal", "sdpa"),
        ("dot", "none", "reference"),
        ("dot", "simp", "reference"),
        ("dot", "simp", "eager"),
    ):
        row = by[key]
        assert row["status"] == "ok", row
        for col in (
            "fwd_ms",
            "bwd_ms",
            "fwdbwd_ms",
            "fwdbwd_p20_ms",
            "fwdbwd_p80_ms",
            "tflops_fwdbwd",
            "gbps_fwdbwd",
            "floor_fwdbwd_ms",
            "peak_tflops",
            "peak_gbps",
        ):
            assert float(row[col]) > 0, (key, col, row[col])
        assert row["n"] == "20" and row["batch"] == "4" and row["d_h"] == "32"
    assert float(by[("dot", "simp", "eager")]["x_reference_fwdbwd"]) > 0
    none_eager = by[("dot", "none", "eager")]
    assert none_eager["status"] == "skipped" and "nothing to factor" in none_eager["reason"], none_eager
    for backend in ("triton", "cuda"):  # measured on a GPU, otherwise skipped with the dispatcher's reason
        row = by[("dot", "simp", backend)]
        assert row["status"] in ("ok", "skipped"), row
        assert row["status"] == "ok" or row["reason"], row
    assert {r["run_id"] for r in records} == {rows[0]["run_id"]}
    assert "x_reference" in proc.stdout and "sdpa" in proc.stdout  # the printed table

    _run(
        "attention.py", args[:-2] + ["--min-time", "0.01", "--backends", "reference", "--mechanisms", "none"], tmp_path
    )
    header2, rows2, _ = _rows(tmp_path, "attention")
    assert header2 == header and len(rows2) == len(rows) + 1  # appended, header written once


def test_attention_real_lengths(tmp_path):
    data = tmp_path / "seqs.txt"  # the S3Rec/STOSA layout: user item1 item2 ...
    data.write_text(
        "".join(f"{u} " + " ".join(str(1 + (u * 7 + j) % 30) for j in range(3 + u % 9)) + "\n" for u in range(1, 41))
    )
    out = tmp_path / "results"
    proc = _run(
        "attention.py",
        [
            "--quick",
            "--batch",
            "6",
            "--n",
            "20",
            "--d",
            "16",
            "--heads",
            "1",
            "--family",
            "dot",
            "--mechanisms",
            "simp",
            "--backends",
            "eager,triton",
            "--lengths-from",
            str(data),
            "--min-time",
            "0.02",
        ],
        out,
    )
    _, rows, _ = _rows(out, "attention")
    eager = {r["lengths"]: r for r in rows if r["backend"] == "eager"}
    assert set(eager) == {"full", "real"}
    assert eager["real"]["lengths_source"] == "seqs.txt"
    assert 3 <= float(eager["real"]["mean_len"]) <= 11 and float(eager["full"]["mean_len"]) == 20
    assert float(eager["real"]["x_padded_fwdbwd"]) > 0
    assert float(eager["real"]["gflop_fwd_minimal"]) < float(eager["full"]["gflop_fwd_minimal"])
    assert "real lengths from seqs.txt" in proc.stdout


def test_train_quick(tmp_path):
    pytest.importorskip("awr_fast.train")
    train = _load("train")
    proc = _run(
        "train.py",
        [
            "--quick",
            "--models",
            "sasrec",
            "--mechanisms",
            "simp",
            "--backends",
            "reference",
            "--synthetic-users",
            "200",
            "--trim-padding",
            "both",
        ],
        tmp_path,
        timeout=150,
    )
    header, rows, _ = _rows(tmp_path, "train")
    assert header == train.COLUMNS
    assert len(rows) == 2 and all(r["status"] == "ok" for r in rows), rows
    assert sorted(r["trim_padding"] for r in rows) == ["False", "True"]
    for row in rows:
        assert (row["model"], row["attention"], row["backend"]) == ("sasrec", "simp", "reference")
        for col in ("epoch1_s", "ms_per_step", "eval_s", "test_eval_s", "total_s"):
            assert float(row[col]) > 0, (col, row[col])
        assert int(row["steps_per_epoch"]) >= 1
        assert 0.0 <= float(row["test_ndcg@10"]) <= 1.0
    assert "trimmed batches vs padded to max_len" in proc.stdout and "sasrec/simp/reference: epoch" in proc.stdout


def test_flop_counts():
    common = _load("common")
    n, d = 200, 32
    full = common.attention_flops("dot", "simp", [n] * 4, 2, n, d)
    none = common.attention_flops("dot", "none", [n] * 4, 2, n, d)
    # SPEC §3b nominal count: 4 n^2 d base attention + 6 n^3 refinement, per head and sequence
    assert full["nominal"] == pytest.approx(8 * (4 * n * n * d + 6 * n**3))
    assert none["nominal"] == pytest.approx(8 * 4 * n * n * d)
    # the factored, triangular count is below the nominal one (about 1.33 n^3 instead of 6 n^3)
    assert full["minimal"] < 0.35 * full["nominal"]
    short = common.attention_flops("dot", "simp", [10] * 4, 2, n, d)
    assert short["minimal"] < 0.01 * full["minimal"] + 2.0 * n**3 + 1
    ceil = common.Ceilings(tflops=1.0, gbps=1.0, matmul_size=1, copy_mib=1)
    assert common.roofline(2e12, 1e9, ceil) == pytest.approx(2000.0)  # compute bound: 2 s
    assert common.roofline(1e9, 3e9, ceil) == pytest.approx(3000.0)  # memory bound: 3 s
    assert common.fmt_table(["name", "ms"], [["x", "1.5"]], [False, True]).splitlines() == [
        "name   ms",
        "----  ---",
        "x     1.5",
    ]


def test_bench_is_not_collected_by_default():
    try:
        import tomllib
    except ImportError:  # Python < 3.11
        pytest.skip("tomllib needs Python 3.11")
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert config["tool"]["pytest"]["ini_options"]["testpaths"] == ["tests"]


def test_breakdown_quick(tmp_path):
    """bench/breakdown.py: host vs wall time per step; on the CPU only the host columns are filled."""
    out = tmp_path / "breakdown.txt"
    proc = _run_plain(
        "breakdown.py", ["--quick", "--mechanisms", "simp,value", "--backends", "eager,sdpa", "--out", str(out)]
    )
    report = out.read_text()
    assert report.strip() == proc.stdout.strip()
    rows = [line.split() for line in report.splitlines() if line.startswith(("simp ", "value ", "causal "))]
    assert {(r[0], r[1]) for r in rows} == {("simp", "eager"), ("value", "eager"), ("causal", "sdpa")}
    for r in rows:
        wall, host = float(r[4]), float(r[5])
        assert 0 < host <= wall * 1.05, r  # the host part of a step cannot exceed the whole step


def test_host_overhead(tmp_path):
    """bench/host_overhead.py: one row per (path, mechanism, backend); on the CPU "auto" runs eager for simp
    and the reference for none, and every timed row is positive."""
    host = _load("host_overhead")
    _run("host_overhead.py", ["--calls", "3", "--repeats", "2", "--label", "smoke"], tmp_path, timeout=900)
    header, rows, _ = _rows(tmp_path, "host_overhead")
    assert header == host.COLUMNS
    by = {(r["path"], r["mechanism"], r["backend"]): r for r in rows}
    assert by[("api", "simp", "auto")]["backend_ran"] == "eager"
    assert by[("api", "none", "auto")]["backend_ran"] == "reference"
    assert by[("api", "none", "eager")]["status"] == "skipped"
    assert "nothing to factor" in by[("api", "none", "eager")]["reason"]
    assert by[("api", "causal", "sdpa")]["status"] == "ok"
    assert int(by[("api", "simp", "eager")]["torch_ops"]) > int(by[("api", "causal", "sdpa")]["torch_ops"]) > 0
    kernel = by[("kernel", "simp", "triton")]  # compiled for sm_90 by the stand-in driver, launches counted
    # fused: one forward; backward one kernel and one for the refinement weights' gradients (_weight_grads)
    assert kernel["status"] == "ok" and kernel["triton_launches"] == "3", kernel
    assert by[("kernel", "none", "triton")]["triton_launches"] == "2"  # no weights: the fused pair only
    assert by[("kernel-w2", "simp", "triton")]["triton_launches"] == "3"  # the W2 family's fused kernels alike
    calibrated = by[("kernel", "adversarial", "triton")]  # fused forward; row- and column-block backward
    assert calibrated["status"] == "ok" and calibrated["triton_launches"] == "3", calibrated
    stoc = by[("kernel-w2", "stoc", "triton")]  # tiled: A, B of the row Gaussians, outputs; and their backward
    assert stoc["status"] == "ok" and int(stoc["triton_launches"]) == 3 + 6, stoc
    for r in rows:
        assert r["label"] == "smoke"
        if r["status"] == "ok":
            assert 0 < float(r["us_p20"]) <= float(r["us_median"]) <= float(r["us_p80"]), r


def test_kernel_resources_compiles_for_sm90_without_a_gpu(tmp_path):
    """bench/kernel_resources.py: the stand-in driver lets Triton compile the fused kernels for sm_90 on this
    CPU machine; every row carries the compiler's registers, stack (spill) bytes and shared memory."""
    pytest.importorskip("triton")
    resources = _load("kernel_resources")
    _run(
        "kernel_resources.py",
        ["--arch", "90", "--n", "50", "--dtypes", "bf16", "--mechanisms", "none"],
        tmp_path,
        timeout=600,
    )
    header, rows, _ = _rows(tmp_path, "kernel_resources")
    assert header == resources.COLUMNS
    assert {r["kernel"] for r in rows} == {"_fused_fwd", "_fused_bwd"}
    for r in rows:
        assert r["status"] == "ok" and r["arch"] == "90", r
        assert 0 < int(r["registers"]) <= 255 and int(r["stack_bytes"]) >= 0 and int(r["local_bytes"]) >= 0, r
        assert 0 < int(r["shared_bytes"]) <= int(r["max_shared_bytes"]), r
    assert "| sm_90 | 50 | bf16 | none |" in (tmp_path / "kernel_resources.md").read_text()


def test_gpu_check_dry_run(tmp_path):
    """bench/gpu_check.sh's CPU dry run: every step of the GPU script at a tiny size (tests under the
    interpreter in 2 shards, the stand-in resources step, the summary), so that the script itself cannot
    break the next GPU call."""
    pytest.importorskip("triton")
    out = tmp_path / "out"
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHON"] = sys.executable
    proc = subprocess.run(
        ["bash", str(BENCH / "gpu_check.sh"), str(out), "dry-run"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    summary = (out / "summary.txt").read_text() if (out / "summary.txt").exists() else ""
    assert proc.returncode == 0, f"exit {proc.returncode}\n{summary}\n{proc.stdout[-6000:]}\n{proc.stderr[-2000:]}"
    steps = {}
    for line in summary.splitlines():
        parts = line.split()
        if parts and parts[0] in ("install", "info", "gpu_tests", "bench_attn", "bench_w2", "breakdown", "resources"):
            steps[parts[0]] = parts[1]
    expected = ("install", "info", "gpu_tests", "bench_attn", "bench_w2", "breakdown", "resources")
    assert steps == dict.fromkeys(expected, "pass"), summary
    assert "dry-run mode" in summary
    assert "tests: " in summary and " passed" in summary and "failed" not in summary.split("tests: ")[1].split("\n")[0]
    assert "Triton fwd+bwd against its targets" in summary
    assert "compiled kernels: " in summary and "compiled kernels: 0;" not in summary
    # both shards ran (ids with brackets and spaces went through as a list, not the shell)
    shard_log = (out / "gpu_tests_shards.log").read_text()
    assert shard_log.count(" passed") >= 2, shard_log[-2000:]
    assert (out / "results" / "attention.csv").exists() and (out / "results" / "kernel_resources.csv").exists()
    assert (out / "results" / "w2_scoring.csv").exists()
    with open(out / "results" / "attention.csv", newline="") as f:
        families = {(r["family"], r["status"]) for r in csv.DictReader(f)}
    assert ("w2", "ok") in families and ("dot", "ok") in families, families  # the W2 family is benchmarked too


def test_w2_scoring(tmp_path):
    """bench/w2_scoring.py at a small CPU shape: the matmul yardstick, the reference's scores (forward and
    forward+backward) and its top-k, each with a positive time, its ratio to the matmul and a roofline floor."""
    scoring = _load("w2_scoring")
    _run(
        "w2_scoring.py",
        ["--quick", "--batch", "8", "--items", "300", "--backends", "reference", "--min-time", "0.02"],
        tmp_path,
        timeout=600,
    )
    header, rows, _ = _rows(tmp_path, "w2_scoring")
    assert header == scoring.COLUMNS
    by = {(r["op"], r["backend"]): r for r in rows}
    assert set(by) == {
        ("matmul", "torch"),
        ("scores", "reference"),
        ("scores_fwd_bwd", "reference"),
        ("topk", "reference+torch.topk"),
    }
    assert float(by[("matmul", "torch")]["x_matmul"]) == 1.0
    for r in rows:
        assert r["status"] == "ok", r
        assert 0 < float(r["p20_ms"]) <= float(r["ms"]) <= float(r["p80_ms"]), r
        assert float(r["x_matmul"]) > 0 and float(r["floor_ms"]) > 0, r
    assert int(by[("topk", "reference+torch.topk")]["k"]) == 10


def test_gpu_summary_ratios_and_test_counts(tmp_path):
    """bench/gpu_summary.py: ratios = their time / Triton's, judged against the targets at n <= 64 only;
    test counts summed over the shards' final lines."""
    summary = _load("gpu_summary")
    base = {"run_id": "r1", "status": "ok", "batch": "256", "heads": "1", "d_model": "64", "dtype": "bf16"}
    rows = []
    for n, triton_ms in (("50", "1.0"), ("200", "10.0")):
        for family, mechanism, backend, ms in (
            ("dot", "simp", "triton", triton_ms),
            ("dot", "simp", "eager", "5.0"),
            ("dot", "simp", "compile", "1.5"),
            ("sdpa", "causal", "sdpa", "0.4"),
        ):
            rows.append(
                {
                    **base,
                    "n": n,
                    "family": family,
                    "mechanism": mechanism,
                    "backend": backend,
                    "lengths": "full",
                    "fwdbwd_ms": ms,
                }
            )
    lines = summary.ratio_rows(rows)
    assert len(lines) == 2
    short, long = lines
    assert short[3] == "5.00 ok" and short[4] == "1.50 MISS" and short[5] == "0.40 MISS" and short[6] == "MISS"
    assert long[3] == "0.50" and long[6] == "-"  # n=200: printed, not judged
    log = tmp_path / "shards.log"
    log.write_text("....\n4 passed, 1 skipped in 3.2s\nF.\nFAILED tests/x.py::t - boom\n1 failed, 1 passed in 2.0s\n")
    assert dict(summary.count_tests(log)) == {"passed": 5, "skipped": 1, "failed": 1}


def test_gpu_check_rejects_an_unknown_mode(tmp_path):
    proc = subprocess.run(["bash", str(BENCH / "gpu_check.sh"), str(tmp_path), "fast"], capture_output=True, text=True)
    assert proc.returncode == 2 and "expected full, quick or dry-run" in proc.stderr
