"""The resource gate: every Triton kernel of the default configurations compiled for sm_90, and the dot and
W2 families' fused ones for sm_80, on this CPU machine (bench/kernel_resources.py's stand-in driver), held to
the spill and shared-memory budget of bench/kernel_resources.py (FUSED_KERNELS, TILED_STACK_BUDGET,
KNOWN_SPILLS).

The compile takes several minutes on 2 cores (six processes side by side); Triton's disk cache makes a
second run fast, but nothing here depends on it."""

import csv
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
MECHANISMS = ("none", "simp", "add", "value")
DTYPES = ("fp32", "bf16")


def _resources():
    spec = importlib.util.spec_from_file_location("_bench_kernel_resources_gate", BENCH / "kernel_resources.py")
    module = importlib.util.module_from_spec(spec)
    saved = list(sys.path)
    had_common = "common" in sys.modules
    sys.path.insert(0, str(BENCH))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = saved
        if not had_common:
            sys.modules.pop("common", None)
    return module


def _row(**over):
    row = {
        "config": "sm_90 n=50 fp32 simp mask",
        "arch": "90",
        "dtype": "fp32",
        "mechanism": "simp",
        "kernel": "_fused_fwd",
        "stack_bytes": "0",
        "status": "ok",
        "reason": "",
    }
    return {**row, **over}


def test_gate_rules():
    gate = _resources()
    assert gate.gate_violations([_row()]) == []
    assert len(gate.gate_violations([_row(stack_bytes="8")])) == 1  # a fused kernel may not spill at all
    budget = gate.TILED_STACK_BUDGET
    assert gate.gate_violations([_row(kernel="_flash_fwd", stack_bytes=str(budget))]) == []
    assert len(gate.gate_violations([_row(kernel="_flash_fwd", stack_bytes=str(budget + 8))])) == 1
    bad = gate.gate_violations([_row(status="out_of_shared_memory", reason="needs 180224 B")])
    assert len(bad) == 1 and "out_of_shared_memory" in bad[0]
    (arch, dtype, mechanism, kernel), ceiling = next(iter(gate.KNOWN_SPILLS.items()))
    known = _row(arch=str(arch), dtype=dtype, mechanism=mechanism, kernel=kernel, stack_bytes=str(ceiling))
    assert gate.gate_violations([known]) == []
    assert len(gate.gate_violations([{**known, "stack_bytes": str(ceiling + 8)}])) == 1
    for (arch, _, _, kernel), ceiling in gate.KNOWN_SPILLS.items():  # the exceptions stay exceptional
        assert arch in gate.ARCHS and 0 < ceiling <= (4096 if arch == 90 else 8192), (kernel, ceiling)


def test_resource_gate_default_configurations(tmp_path):
    """sm_90, fused n=50 and tiled n=200, fp32 and bf16, every mechanism, with a padding mask, for the dot and
    W2 families; the calibrated family's fused forward at n=50 and row-block forward at n=200 (every
    refinement), and its backward (row and column blocks) at both. sm_80: the dot and W2 families at n=50
    (their fused kernels, and W2's stoc kernels), every configuration within its 163 KB of shared memory."""
    pytest.importorskip("triton")
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the stand-in compiles; the interpreter would run instead
    procs = {}
    runs = [("90", 50, "dot"), ("90", 200, "dot"), ("90", "50,200", "w2"), ("90", "50,200", "calibrated")]
    runs += [("80", 50, "dot"), ("80", 50, "w2")]  # sm_80: the fused configurations (its 163 KB of shared memory)
    for arch, n, family in runs:
        mechanisms = (*MECHANISMS, "stoc") if family == "w2" else MECHANISMS
        args = ["--arch", arch, "--n", str(n), "--dtypes", ",".join(DTYPES), "--mechanisms", ",".join(mechanisms)]
        args += ["--families", family]
        key = (n if family == "dot" else family) if arch == "90" else f"{family}_sm{arch}"
        out = tmp_path / f"n{key}"
        procs[key] = subprocess.Popen(
            [sys.executable, str(BENCH / "kernel_resources.py"), *args, "--check", "--results-dir", str(out)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
    outputs = {n: p.communicate(timeout=1500)[0] for n, p in procs.items()}
    for n, p in procs.items():
        gate_lines = "\n".join(line for line in outputs[n].splitlines() if line.startswith(("GATE", "resource gate")))
        assert p.returncode == 0, f"n={n}: exit {p.returncode}\n{gate_lines}\n{outputs[n][-3000:]}"
    calibrated = list(csv.DictReader(open(tmp_path / "ncalibrated" / "kernel_resources.csv")))
    every = {(dtype, mechanism) for dtype in DTYPES for mechanism in MECHANISMS}
    assert {(r["dtype"], r["mechanism"]) for r in calibrated if r["kernel"] == "_calibrated_fwd"} == every
    assert {(r["dtype"], r["mechanism"]) for r in calibrated if r["kernel"] == "_calibrated_rows_fwd"} == every
    for kernel in ("_calibrated_rows_bwd", "_calibrated_cols_bwd"):
        trained = {(r["dtype"], r["mechanism"], r["n"]) for r in calibrated if r["kernel"] == kernel}
        assert trained == {(dtype, mechanism, n) for dtype, mechanism in every for n in ("50", "200")}, kernel
    fused = list(csv.DictReader(open(tmp_path / "n50" / "kernel_resources.csv")))
    tiled = list(csv.DictReader(open(tmp_path / "n200" / "kernel_resources.csv")))
    # every configuration compiled its kernels: the fused pair at n=50, the tiled set at n=200
    seen = {(r["dtype"], r["mechanism"], r["kernel"]) for r in fused}
    for dtype in DTYPES:
        for mechanism in MECHANISMS:
            assert {(dtype, mechanism, "_fused_fwd"), (dtype, mechanism, "_fused_bwd")} <= seen
            kernels = {r["kernel"] for r in tiled if r["dtype"] == dtype and r["mechanism"] == mechanism}
            expected = {"_flash_fwd", "_flash_bwd_dkdv", "_flash_bwd_dq"}
            if mechanism != "none":
                expected |= {"_attn_probs_fwd", "_tril_matmul", "_attn_probs_bwd"}
            assert expected <= kernels, (dtype, mechanism, kernels)
    w2 = list(csv.DictReader(open(tmp_path / "nw2" / "kernel_resources.csv")))
    for dtype in DTYPES:
        for mechanism in (*MECHANISMS, "stoc"):
            fused_w2 = {
                r["kernel"] for r in w2 if r["n"] == "50" and (r["dtype"], r["mechanism"]) == (dtype, mechanism)
            }
            tiled_w2 = {
                r["kernel"] for r in w2 if r["n"] == "200" and (r["dtype"], r["mechanism"]) == (dtype, mechanism)
            }
            expected = {"_w2_probs_fwd", "_w2_out_fwd", "_w2_out_bwd", "_w2_out_bwd_values", "_w2_probs_bwd"}
            expected.add("_w2_probs_bwd_keys")
            if mechanism == "stoc":  # tiled at every n: B is the W2 score of A's row Gaussians
                assert expected <= fused_w2, (dtype, mechanism, fused_w2)
            else:
                assert {"_w2_fused_fwd", "_w2_fused_bwd"} <= fused_w2, (dtype, mechanism, fused_w2)
            if mechanism in ("simp", "add", "value"):  # the refinement of the shared core, on the written-out A
                expected |= {"_tril_matmul", "_softmax_probs_fwd", "_softmax_probs_bwd"}
            assert expected <= tiled_w2, (dtype, mechanism, tiled_w2)
    sm80 = {}
    for family in ("dot", "w2"):
        sm80[family] = list(csv.DictReader(open(tmp_path / f"n{family}_sm80" / "kernel_resources.csv")))
    for family, kernels in (("dot", ("_fused_fwd", "_fused_bwd")), ("w2", ("_w2_fused_fwd", "_w2_fused_bwd"))):
        seen = {(r["dtype"], r["mechanism"], r["kernel"]) for r in sm80[family]}
        expected = {(dtype, mechanism, kernel) for dtype in DTYPES for mechanism in MECHANISMS for kernel in kernels}
        assert expected <= seen, (family, expected - seen)
        assert {r["arch"] for r in sm80[family]} == {"80"}
    for r in fused + tiled + calibrated + w2 + sm80["dot"] + sm80["w2"]:
        assert r["status"] == "ok" and int(r["registers"]) > 0, r
        assert 0 < int(r["shared_bytes"]) <= int(r["max_shared_bytes"]), r
