"""The encoder path's report (`make report TASK=classify`): ``results/<run>/report.md`` from the stages' outputs.

    python scripts/report_classify.py --run NAME
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline import dist  # noqa: E402
from pipeline.cli import run_stage  # noqa: E402
from pipeline.report import ReportConfig  # noqa: E402
from pipeline.report_classify import build_classify_report  # noqa: E402


def main(cfg: ReportConfig) -> Path | None:
    if not dist.is_rank0():
        return None
    path = build_classify_report(cfg.run_dir())
    print(f"report: {path}")
    return path


if __name__ == "__main__":
    run_stage(ReportConfig, "report", main)
