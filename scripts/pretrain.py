"""Stage 02: pretrain a decoder LM from scratch on the stage-01 shards with DeepSpeed ZeRO.

    python scripts/pretrain.py --run NAME --preset tiny                                   # one process
    deepspeed --num_gpus 2 scripts/pretrain.py --run NAME --preset 124m --ds_config ds_configs/zero3_fp16.json
    accelerate launch --config_file ds_configs/accelerate/zero2_fp16.yaml scripts/pretrain.py --run NAME

Reads ``results/<run>/01_data`` (its manifest, never a guess), builds the model (or loads ``--init_from``),
trains with :class:`pipeline.train.Trainer` (resuming from the newest complete checkpoint with
``--resume auto``), exports ``02_pretrain/model`` (safetensors + tokenizer) and writes ``manifest.json`` last.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline import dist  # noqa: E402
from pipeline.budget import training_budget  # noqa: E402
from pipeline.checkpoint import CheckpointError  # noqa: E402
from pipeline.cli import run_stage  # noqa: E402
from pipeline.config import config_hash, to_dict  # noqa: E402
from pipeline.engine import FP16HealthError, device_type  # noqa: E402
from pipeline.manifest import StageError, require_stage, stage_dir, write_manifest  # noqa: E402
from pipeline.model import build_model, load_model  # noqa: E402
from pipeline.stage_output import StageOutput  # noqa: E402
from pipeline.train import TrainConfig, TrainData, Trainer  # noqa: E402


def main(cfg: TrainConfig) -> dict | None:
    """Run stage 02 and return its manifest (rank 0; ``None`` on other ranks).

    Raises:
        StageError: stage 01 missing, an output of another configuration without ``--overwrite``, an
            unusable checkpoint, or an fp16 run that cannot go on (loss scale at its minimum).
        ConfigError / ValueError: a bad DeepSpeed template, model shape, or too little data.
    """
    t0 = time.time()
    data_manifest = require_stage(cfg.run_dir(), "data", cfg.run, cfg.preset)
    out = stage_dir(cfg.run_dir(), "pretrain")
    chash = config_hash(cfg)
    StageOutput(out).check(chash, cfg.overwrite, "pretrain")
    data = TrainData.from_manifest(data_manifest)
    d = data_manifest["outputs"]
    if cfg.init_from:
        model = load_model(cfg.init_from, vocab_size=int(d["vocab_size"]))
        max_pos = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", 0)
        if max_pos < data.seq_len:
            raise ValueError(f"--init_from {cfg.init_from}: the model takes {max_pos} positions, the data's seq_len is "
                             f"{data.seq_len}; remake stage 01 with --seq_len {max_pos} or less")
    else:
        model = build_model(cfg.model, int(d["vocab_size"]), data.seq_len, d.get("bos_id"), d.get("eos_id"),
                            d.get("pad_id"), seed=cfg.seed)
    t_train = time.time()
    try:
        r = Trainer(cfg, model, stage="pretrain", out_dir=out, tb_dir=cfg.tb_root() / "pretrain", data=data).fit()
    except (FP16HealthError, CheckpointError) as e:
        raise StageError(str(e)) from None
    t_train = time.time() - t_train
    outputs = {
        "model_dir": "model",
        "tokenizer_dir": "model",
        "config_hash": chash,
        "arch": type(model).__name__,
        "n_params": r.n_params,
        "world_size": r.world_size,
        "launcher": r.launcher,
        "backend": r.backend,
        "precision": r.precision,
        "precision_requested": cfg.precision,
        "precision_note": r.precision_note,
        "zero_stage": r.zero_stage,
        "ds_config": cfg.ds_config,
        "ds_config_resolved": Path(r.ds_config_resolved).name,
        "checkpoints": "checkpoints",
        "resumed_from": r.resumed_from,
        "lr_changed_from": r.lr_changed_from,  # the checkpoint's --lr when resumed with another one
        "init_from": cfg.init_from or None,
    }
    metrics = {
        "val_loss": r.val_loss,
        "val_ppl": r.val_ppl,
        "steps": r.steps,
        "tokens_seen": r.tokens_seen,
        "skipped_steps": r.skipped_steps,
        "final_loss_scale": r.loss_scale,
        "final_train_loss": r.history["loss"][-1] if r.history["loss"] else None,
        "tokens_per_s": r.tokens_per_s,
        "mfu": r.mfu,
        # what the model cost (pipeline.budget) and the data regime it trained in (pipeline.regime)
        "budget": training_budget(r.steps, r.tokens_seen, t_train, r.world_size, device_type()),
        "regime": r.regime,
    }
    manifest = write_manifest(out, "pretrain", to_dict(cfg), outputs, metrics, inputs={"data": data.data_dir},
                              seed=cfg.seed, wall_time_s=time.time() - t0)
    if dist.is_rank0():
        print(f"pretrain: val/loss {r.val_loss:.4f} (ppl {r.val_ppl:.2f}) after {r.steps} steps, "
              f"{r.skipped_steps} skipped, precision {r.precision}, world size {r.world_size} -> {out / 'model'}")
        g = r.regime
        if g:
            print(f"pretrain: data regime {g['tokens_per_param']:.3g} tokens per parameter (compute-optimal ~20), "
                  f"{g['epochs']:.3g} epochs over the training split"
                  + "".join(f"\nwarning: {w}" for w in g["warnings"]))
    return manifest



if __name__ == "__main__":
    run_stage(TrainConfig, "pretrain", main)
