"""Compression controls of the encoder path (`make controls TASK=classify`): see pipeline/classify_controls.py.

    python scripts/controls_classifier.py --run NAME --preset encoder-cpu --control finetune|dense_plus|scratch
    deepspeed --num_gpus N scripts/controls_classifier.py --run NAME --preset encoder-gpu --control scratch
    accelerate launch --config_file ds_configs/accelerate/<file>.yaml scripts/controls_classifier.py --run NAME ...

Reads results/<run>/{01_data,02_pretrain,02b_classify,03_prune,04_distill} (the recipe comes from the 02b or 04
manifest); writes results/<run>/06_controls/<control>/ (model/, metrics.jsonl, checkpoints/, manifest.json last).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline import dist  # noqa: E402
from pipeline.classify_controls import ClassifierControlConfig, train_classifier_control  # noqa: E402
from pipeline.cli import run_stage  # noqa: E402
from pipeline.controls import control_dir  # noqa: E402


def main(cfg: ClassifierControlConfig) -> dict | None:
    """Train classifier control ``cfg.control``; return its manifest (rank 0; ``None`` on other ranks)."""
    manifest = train_classifier_control(cfg)  # every rank
    if dist.is_rank0() and manifest is not None:
        m, o = manifest["metrics"], manifest["outputs"]
        print(f"control {o['control']} ({o['description']}): val accuracy {m.get('val_accuracy', float('nan')):.4f}, "
              f"macro-F1 {m.get('val_macro_f1', float('nan')):.4f} after {m['steps']} steps ({o['budget_rule']}) "
              f"-> {control_dir(cfg.run_dir(), cfg.control)}")
    return manifest


if __name__ == "__main__":
    run_stage(ClassifierControlConfig, "controls", main)
