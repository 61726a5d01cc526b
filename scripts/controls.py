"""Compression controls: train one control model of a run (see pipeline/controls.py), evaluated by stage 05.

    python scripts/controls.py --run NAME --preset cpu --control dense_plus|finetune|scratch|scratch_full
    deepspeed --num_gpus N scripts/controls.py --run NAME --preset 124m --control scratch_full
    accelerate launch --config_file ds_configs/accelerate/<file>.yaml scripts/controls.py --run NAME --control ...

Reads results/<run>/{01_data,02_pretrain,03_prune,04_distill} (the recipe comes from the 02 or 04 manifest);
writes results/<run>/06_controls/<control>/ (model/, metrics.jsonl, checkpoints/, manifest.json last).
`make controls` runs every control, each its own make target.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline import dist  # noqa: E402
from pipeline.cli import run_stage  # noqa: E402
from pipeline.controls import ControlConfig, control_dir, train_control  # noqa: E402


def main(cfg: ControlConfig) -> dict | None:
    """Train control ``cfg.control``; return its manifest (rank 0; ``None`` on other ranks).

    Raises:
        StageError: an upstream stage missing (naming its make target), or an output of other options without
            ``--overwrite``.
    """
    manifest = train_control(cfg)  # every rank
    if dist.is_rank0() and manifest is not None:
        m, o = manifest["metrics"], manifest["outputs"]
        b = m["budget"]
        print(f"control {o['control']} ({o['description']}): val/ppl {m['val_ppl']:.2f} after {m['steps']} steps "
              f"({o['budget_rule']}; {b['cumulative']['tokens']:,} tokens in all) -> {control_dir(cfg.run_dir(), cfg.control)}")
    return manifest



if __name__ == "__main__":
    run_stage(ControlConfig, "controls", main)
