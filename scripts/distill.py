"""Stage 04: distil the dense stage-02 teacher into the pruned stage-03 student, pruned weights kept at zero.

    python scripts/distill.py --run NAME --preset cpu [--alpha 0.5] [--temperature 2] [--overwrite]
    deepspeed --num_gpus N scripts/distill.py --run NAME --preset 124m --ds_config ds_configs/zero2_fp16.json
    accelerate launch --config_file ds_configs/accelerate/<file>.yaml scripts/distill.py --run NAME ...

Reads results/<run>/{01_data,02_pretrain,03_prune}; writes results/<run>/04_distill (manifest last).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline import dist  # noqa: E402
from pipeline.cli import run_stage  # noqa: E402
from pipeline.distill import DistillConfig, distill  # noqa: E402


def main(cfg: DistillConfig) -> dict | None:
    manifest = distill(cfg)  # every rank
    if dist.is_rank0() and manifest is not None:
        m, o = manifest["metrics"], manifest["outputs"]
        sparsity = f", sparsity {o['sparsity']:.1%} kept exactly in the export" if o.get("sparsity_checked") else ""
        print(f"distill ({o['method']}): val/ppl {m.get('student_val_ppl_before', float('nan')):.2f} after pruning -> "
              f"{m['val_ppl']:.2f} after {m['steps']} steps (teacher {m.get('teacher_val_ppl', float('nan')):.2f})"
              f"{sparsity} -> {Path(cfg.run_dir()) / '04_distill'}")
    return manifest


if __name__ == "__main__":
    run_stage(DistillConfig, "distill", main)
