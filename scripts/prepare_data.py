"""Stage 01: read the corpus, split it by document, train the tokenizer, write token shards.

    python scripts/prepare_data.py --run NAME --preset cpu [--data PATH ...] [--vocab_size N] [--overwrite]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline import dist  # noqa: E402
from pipeline.cli import run_stage  # noqa: E402
from pipeline.data import DataConfig, prepare  # noqa: E402


def main(cfg: DataConfig) -> dict | None:
    if not dist.is_rank0():
        return None  # one process makes the data; other ranks of a launcher (or srun tasks) have nothing to do
    manifest = prepare(cfg)
    m = manifest["metrics"]
    print(
        f"data: {m['train_documents']} train / {m['val_documents']} val documents, "
        f"{m['train_tokens']:,} train / {m['val_tokens']:,} val tokens, vocabulary {manifest['outputs']['vocab_size']} "
        f"-> {Path(cfg.run_dir()) / '01_data'}"
    )
    return manifest


if __name__ == "__main__":
    run_stage(DataConfig, "data", main)
