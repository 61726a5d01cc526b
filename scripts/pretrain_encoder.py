"""Stage 02 of the encoder path: pretrain a BERT-style encoder with the masked-LM objective, DeepSpeed ZeRO.

    python scripts/pretrain_encoder.py --run NAME --preset encoder-tiny                  # one process
    deepspeed --num_gpus 2 scripts/pretrain_encoder.py --run NAME --preset encoder-gpu
    accelerate launch --config_file ds_configs/accelerate/zero2.yaml scripts/pretrain_encoder.py --run NAME ...

Reads ``results/<run>/01_data`` (made with ``--task classify``: its tokenizer has [CLS]/[SEP]/[MASK]), builds
a ``BertForMaskedLM`` of the preset's shape, trains it with :class:`pipeline.train.Trainer` and the masked-LM
loss of :mod:`pipeline.encoder` (BERT's 15% / 80-10-10 rule), validates on a fixed seeded masking of the
validation split (masked-LM loss and accuracy), exports ``02_pretrain/model`` and writes ``manifest.json`` last.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline import dist  # noqa: E402
from pipeline.checkpoint import CheckpointError  # noqa: E402
from pipeline.cli import run_stage  # noqa: E402
from pipeline.config import config_hash, to_dict  # noqa: E402
from pipeline.encoder import EncoderTrainConfig, MLMSpec, build_encoder, make_mlm_eval, make_mlm_loss  # noqa: E402
from pipeline.engine import FP16HealthError  # noqa: E402
from pipeline.manifest import StageError, require_stage, stage_dir, write_manifest  # noqa: E402
from pipeline.stage_output import StageOutput  # noqa: E402
from pipeline.train import TrainData, Trainer  # noqa: E402


def main(cfg: EncoderTrainConfig) -> dict | None:
    """Run stage 02 of the encoder path and return its manifest (rank 0; ``None`` on other ranks).

    Raises:
        StageError: stage 01 missing or made for the decoder (no [MASK] token), an output of another
            configuration without ``--overwrite``, an unusable checkpoint, an fp16 run that cannot go on.
        ConfigError / ValueError: a bad DeepSpeed template, model shape, or too little data.
    """
    from transformers import AutoTokenizer

    t0 = time.time()
    data_manifest = require_stage(cfg.run_dir(), "data", cfg.run)
    d = data_manifest["outputs"]
    if d.get("task") != "classify":
        raise StageError(f"{data_manifest['_dir']} was made for the decoder (its tokenizer has no [CLS]/[SEP]/[MASK]); "
                         f"remake it with `make data TASK=classify RUN={cfg.run}` (scripts/prepare_data.py --task "
                         f"classify)")
    out = stage_dir(cfg.run_dir(), "pretrain")
    chash = config_hash(cfg)
    StageOutput(out).check(chash, cfg.overwrite, "pretrain")
    data = TrainData.from_manifest(data_manifest)
    tokenizer = AutoTokenizer.from_pretrained(data.tokenizer_dir)
    vocab = int(d["vocab_size"])
    spec = MLMSpec.from_tokenizer(tokenizer, vocab, mlm_probability=cfg.mlm_probability,
                                  mask_replace_prob=cfg.mask_replace_prob, random_replace_prob=cfg.random_replace_prob)
    model = build_encoder(cfg.model, vocab, data.seq_len, d.get("pad_id"), seed=cfg.seed)
    try:
        r = Trainer(cfg, model, stage="pretrain", out_dir=out, tb_dir=cfg.tb_root() / "pretrain", data=data,
                    loss_fn=make_mlm_loss(spec), eval_fn=make_mlm_eval(spec, cfg.seed)).fit()
    except (FP16HealthError, CheckpointError) as e:
        raise StageError(str(e)) from None
    outputs = {
        "model_dir": "model", "tokenizer_dir": "model", "config_hash": chash, "arch": type(model).__name__,
        "task": "classify", "objective": "masked-lm", "n_params": r.n_params, "world_size": r.world_size,
        "launcher": r.launcher, "backend": r.backend, "precision": r.precision,
        "precision_requested": cfg.precision, "precision_note": r.precision_note, "zero_stage": r.zero_stage,
        "ds_config": cfg.ds_config, "ds_config_resolved": Path(r.ds_config_resolved).name,
        "checkpoints": "checkpoints", "resumed_from": r.resumed_from,
    }
    metrics = {
        "val_loss": r.val_loss, "val_mlm_accuracy": r.val_metrics.get("val/mlm_accuracy"),
        "val_mlm_ppl": r.val_metrics.get("val/mlm_ppl"), "val_mlm_tokens": r.val_metrics.get("val/mlm_tokens"),
        "steps": r.steps, "tokens_seen": r.tokens_seen, "skipped_steps": r.skipped_steps,
        "final_loss_scale": r.loss_scale,
        "final_train_loss": r.history["loss"][-1] if r.history["loss"] else None,
        "tokens_per_s": r.tokens_per_s, "mfu": r.mfu,
    }
    manifest = write_manifest(out, "pretrain", to_dict(cfg), outputs, metrics, inputs={"data": data.data_dir},
                              seed=cfg.seed, wall_time_s=time.time() - t0)
    if dist.is_rank0():
        print(f"pretrain (masked LM): val/loss {r.val_loss:.4f}, val/mlm_accuracy "
              f"{r.val_metrics.get('val/mlm_accuracy', float('nan')):.4f} after {r.steps} steps, precision "
              f"{r.precision}, world size {r.world_size} -> {out / 'model'}")
    return manifest



if __name__ == "__main__":
    run_stage(EncoderTrainConfig, "pretrain", main)
