"""The one table printed at the end of bench/gpu_check.sh: tests passed and failed, every Triton benchmark
ratio against the issue's targets, and the kernels that spill.

    python bench/gpu_summary.py --results-dir OUT/results --tests-log OUT/gpu_tests_shards.log

Targets (issue 14, the dot family at n <= 64): Triton fwd+bwd >= 4x the eager backend, >= 2x torch.compile
of the reference, and at most 2x plain SDPA's time (x_sdpa >= 0.5). Rows at other lengths are printed
with their ratios and "-" as target. Exits 0 whatever it finds: the numbers are the point, and the
steps before it have their own status.
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

#: (reference backend, minimum of reference time / Triton time) at n <= FUSED_N
TARGETS = {"eager": 4.0, "compile": 2.0, "sdpa": 0.5}
FUSED_N = 64


def count_tests(log: Path) -> dict:
    """passed/failed/skipped/errors summed over pytest's final lines in the log (one per shard)."""
    counts: dict = defaultdict(int)
    if not log.exists():
        return counts
    for line in log.read_text(errors="replace").splitlines():
        if re.search(r"\b(passed|failed|skipped|error|errors|no tests ran)\b.* in [\d.]+s", line):
            for number, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", line):
                counts["errors" if word.startswith("error") else word] += int(number)
    return counts


def _latest(rows: list[dict]) -> list[dict]:
    """The rows of the newest run in the file (results files are appended to)."""
    if not rows:
        return rows
    last = rows[-1]["run_id"]
    return [r for r in rows if r["run_id"] == last]


def _read(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def ratio_rows(attention: list[dict]) -> list[list[str]]:
    """One line per Triton case: its fwd+bwd time and each ratio against its target."""
    ok = [r for r in attention if r.get("status") == "ok" and r.get("fwdbwd_ms")]
    times = {}
    for r in ok:
        shape = (r["batch"], r["heads"], r["n"], r["d_model"], r["dtype"])
        times[(r["family"], r["mechanism"], r["backend"], r["lengths"], shape)] = float(r["fwdbwd_ms"])
    out = []
    for r in ok:
        if r["backend"] != "triton":
            continue
        shape = (r["batch"], r["heads"], r["n"], r["d_model"], r["dtype"])
        mine = float(r["fwdbwd_ms"])
        cells = [r["mechanism"], f"B={r['batch']} H={r['heads']} n={r['n']} {r['dtype']} {r['lengths']}"]
        cells.append(common.fmt_ms(mine))
        verdicts = []
        for name, target in TARGETS.items():
            if name == "sdpa":
                ref = times.get(("sdpa", "causal", "sdpa", "full", shape))
            else:
                ref = times.get((r["family"], r["mechanism"], name, r["lengths"], shape))
            if ref is None:
                cells.append("-")
                continue
            x = ref / mine
            applies = int(r["n"]) <= FUSED_N and r["family"] == "dot"
            mark = ("ok" if x >= target else "MISS") if applies else ""
            if applies:
                verdicts.append(mark)
            cells.append(f"{x:.2f} {mark}".strip())
        cells.append("MISS" if "MISS" in verdicts else ("ok" if verdicts else "-"))
        out.append(cells)
    return out


def spill_rows(resources: list[dict]) -> list[list[str]]:
    """Every compiled kernel with a stack frame (spills) or a failed compile."""
    out = []
    for r in resources:
        stack = int(r["stack_bytes"]) if r.get("stack_bytes") not in (None, "", "-1") else 0
        if stack > 0 or r.get("status") != "ok":
            out.append([r["config"], r["kernel"], r.get("registers", ""), str(stack), r.get("status", "")])
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results-dir", type=Path, required=True)
    p.add_argument("--tests-log", type=Path, default=None)
    args = p.parse_args(argv)
    if args.tests_log is not None:
        counts = count_tests(args.tests_log)
        shown = ", ".join(f"{counts[k]} {k}" for k in ("passed", "failed", "errors", "skipped") if counts.get(k))
        print(f"tests: {shown or 'no pytest summary found in ' + str(args.tests_log)}")
    attention = _latest(_read(args.results_dir / "attention.csv"))
    lines = ratio_rows(attention)
    targets = ", ".join(f"x_{k} >= {v:g}" for k, v in TARGETS.items())
    print(f"\nTriton fwd+bwd against its targets at n <= {FUSED_N} ({targets}; x = their time / Triton's):")
    if lines:
        header = ["mechanism", "case", "triton ms", "x_eager", "x_compile", "x_sdpa", "verdict"]
        print(common.fmt_table(header, lines, [False, False, True, True, True, True, False]))
    else:
        print("no Triton rows in attention.csv")
    resources = _latest(_read(args.results_dir / "kernel_resources.csv"))
    spills = spill_rows(resources)
    print(f"\ncompiled kernels: {len(resources)}; spilling or failed: {len(spills)}")
    if spills:
        print(
            common.fmt_table(
                ["config", "kernel", "regs", "stack B", "status"], spills, [False, False, True, True, False]
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
