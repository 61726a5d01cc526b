"""The run report: ``results/<run>/report.md`` with its plots, from what the stages wrote.

    python scripts/report.py --run NAME [--results_dir results]

Reads the manifests of ``01_data`` .. ``05_eval`` (05 required) and the ``metrics.jsonl`` logs of the
training stages; writes ``results/<run>/report.md`` and ``results/<run>/plots/*.png``.  Measures nothing.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline import dist
from pipeline.cli import run_stage
from pipeline.config import ConfigError
from pipeline.report import ReportConfig, build_report


def main(cfg: ReportConfig) -> Path | None:
    """Build the report of run ``cfg.run``; return its path (``None`` on ranks other than 0).

    Raises:
        StageError: stage 05 missing or incomplete (the message names ``make eval``).
    """
    problems = cfg.validate()
    if problems:
        raise ConfigError(problems)
    if not dist.is_rank0():
        return None  # only rank 0 writes
    path = build_report(cfg.run_dir())
    print(f"report: {path}")
    return path


if __name__ == "__main__":
    run_stage(ReportConfig, "report", main)
