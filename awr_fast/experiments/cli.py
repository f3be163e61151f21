"""The command line: ``python -m awr_fast.experiments [run] GRID`` and ``... report GRID [GRID ...]``.

Input errors (a bad grid file, a missing data file, a run directory that does not match) print one
line, ``python -m awr_fast.experiments: error: <message>``, and exit 1; flag errors exit 2 (argparse).
Ctrl-C or SIGTERM during a run exits 130 or 143 and leaves that run resumable.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence

PROG = "python -m awr_fast.experiments"
COMMANDS = ("run", "report")


def _parser() -> argparse.ArgumentParser:
    from ..backends import CHOICES as BACKENDS

    p = argparse.ArgumentParser(
        prog=PROG,
        description="Run a grid of training runs across sittings (skip finished runs, resume cut-off ones) "
        "and report mean ± std over seeds with paired tests. `run` is the default command.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="{run,report}")
    run = sub.add_parser("run", help="run the grid's runs that are not done (default command)")
    run.add_argument("grid", metavar="GRID", help="grid file (TOML, or YAML with PyYAML installed)")
    run.add_argument("--dry-run", action="store_true", help="list the runs (done/partial/todo) and the time left")
    run.add_argument(
        "--probe",
        action="store_true",
        help="with --dry-run: time one epoch of each kind of run not yet measured in this study (trains!)",
    )
    run.add_argument("--only", metavar="PATTERN", default=None, help="only runs whose id matches this glob")
    run.add_argument("--max-runs", metavar="N", type=int, default=None, help="stop after N runs")
    run.add_argument("--backend", choices=BACKENDS, default=None, help="attention backend for every run")
    run.add_argument("--quiet", action="store_true", help="no trainer output; one progress line per run")
    run.add_argument("--keep-going", action="store_true", help="after a failed run, go on with the next")
    report = sub.add_parser("report", help="write docs/results/<study>.md, .json and figures")
    report.add_argument("grids", nargs="+", metavar="GRID", help="grid files (one report per study)")
    report.add_argument("--out-dir", default="docs/results", help="folder of the reports (default: docs/results)")
    report.add_argument("--paper-numbers", default=None, help="default: paper_numbers.toml beside each grid file")
    report.add_argument("--no-figures", action="store_true", help="tables only")
    report.add_argument("--no-attention", action="store_true", help="no attention maps (no model or data loaded)")
    return p


def _user_errors() -> tuple[type, ...]:
    from ..train import _user_errors as train_errors

    return (*train_errors(), ValueError)


def _format_warning(message, category, filename, lineno, line=None) -> str:
    return f"{PROG}: warning: {message}\n"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in COMMANDS and not argv[0].startswith("-"):
        argv.insert(0, "run")  # `python -m awr_fast.experiments GRID.toml` runs it
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "run" and args.max_runs is not None and args.max_runs < 1:
        parser.error(f"--max-runs: expected an int >= 1, got {args.max_runs}")
    if args.command == "run" and args.probe and not args.dry_run:
        parser.error("--probe: expected together with --dry-run")
    # warnings (a skipped runs.jsonl line) as one line in the error voice, for this command only
    previous_format, warnings.formatwarning = warnings.formatwarning, _format_warning
    try:
        return _main(args)
    finally:
        warnings.formatwarning = previous_format


def _main(args: argparse.Namespace) -> int:
    from .grid import load_study
    from .runner import Terminated, dry_run, run_study

    try:
        if args.command == "report":
            from .report import build_report

            for grid in args.grids:
                study = load_study(grid)
                md, js = build_report(
                    study,
                    args.out_dir,
                    figures=not args.no_figures,
                    attention=not args.no_attention,
                    paper_numbers=args.paper_numbers,
                )
                print(f"{study.name}: wrote {md} and {js}")
            return 0
        study = load_study(args.grid)
        if args.dry_run:
            dry_run(study, only=args.only, max_runs=args.max_runs, probe=args.probe, backend=args.backend)
            return 0
        counts = run_study(
            study,
            only=args.only,
            max_runs=args.max_runs,
            backend=args.backend,
            quiet=args.quiet,
            keep_going=args.keep_going,
        )
        print(
            f"{study.name}: {counts['done']} finished now, {counts['skipped']} were done before"
            + (f", {counts['failed']} failed" if counts["failed"] else "")
            + f"; rows in {study.runs_file}"
        )
        return 1 if counts["failed"] else 0
    except KeyboardInterrupt as exc:
        terminated = isinstance(exc, Terminated)
        print(
            f"{PROG}: {'terminated' if terminated else 'interrupted'}; the run in progress keeps its last finished "
            "epoch in its last.pt: run the same command again to resume it",
            file=sys.stderr,
            flush=True,
        )
        return 143 if terminated else 130
    except _user_errors() as exc:
        message = " ".join(str(exc).splitlines()) or type(exc).__name__
        print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
        return 1
