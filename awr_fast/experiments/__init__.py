"""Experiment studies: grids of training runs, run across sittings, and their reports.

``python -m awr_fast.experiments run GRID.toml`` (or just ``python -m awr_fast.experiments GRID.toml``)
expands a grid file (:mod:`.grid`) into runs with stable ids and trains each with
:func:`awr_fast.train.train` (:mod:`.runner`), one row per finished run in ``<out>/runs.jsonl``
(:mod:`.store`); runs already there are skipped, a run cut off mid-way continues from its ``last.pt``.
``--dry-run`` lists what is done and what is left, with an estimated time.
``python -m awr_fast.experiments report GRID.toml ...`` writes ``docs/results/<study>.md`` and
``.json`` with mean ± std over seeds, paired t-tests against the baseline mechanism, time ratios,
published numbers beside ours and figures (:mod:`.report`, :mod:`.stats`).
"""

from .grid import GridError, Run, Study, config_hash, load_study
from .report import build_report
from .runner import dry_run, run_study
from .stats import paired_t_test
from .store import read_rows

__all__ = [
    "GridError",
    "Run",
    "Study",
    "build_report",
    "config_hash",
    "dry_run",
    "load_study",
    "paired_t_test",
    "read_rows",
    "run_study",
]
