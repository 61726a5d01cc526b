"""Stage 03 of the encoder path (`make prune TASK=classify`): see :mod:`pipeline.classify_compress`.

    python scripts/prune_classifier.py --run NAME --preset encoder-tiny
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.classify_compress import PruneClassifierConfig, prune_classifier  # noqa: E402
from pipeline.cli import run_stage  # noqa: E402


def main(cfg: PruneClassifierConfig) -> dict | None:
    return prune_classifier(cfg)


if __name__ == "__main__":
    run_stage(PruneClassifierConfig, "prune", main)
