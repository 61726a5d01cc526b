"""Stage 05 of the encoder path (`make eval TASK=classify`): see :mod:`pipeline.classify_compress`.

    python scripts/evaluate_classifier.py --run NAME --preset encoder-tiny
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.classify_compress import EvalClassifierConfig, evaluate_classifiers  # noqa: E402
from pipeline.cli import run_stage  # noqa: E402


def main(cfg: EvalClassifierConfig) -> dict | None:
    return evaluate_classifiers(cfg)


if __name__ == "__main__":
    run_stage(EvalClassifierConfig, "eval", main)
