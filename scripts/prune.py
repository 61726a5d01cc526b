"""Stage 03: prune the stage-02 model (magnitude, N:M or structured width) and measure it before recovery.

    python scripts/prune.py --run NAME [--preset cpu] --method magnitude [--sparsity 0.5] [--scope layer|global]
    python scripts/prune.py --run NAME --method nm [--n 2 --m 4]
    python scripts/prune.py --run NAME --method structured [--sparsity 0.5 | --head_ratio R --mlp_ratio R]
    python scripts/prune.py --run NAME --method magnitude|nm --importance wanda [--calib_blocks 128]
    python scripts/prune.py --run NAME --method structured --importance activation [--drop_layers K]

Reads ``results/<run>/02_pretrain`` (the model, tokenizer beside it) and ``01_data`` (validation tokens, and
for ``--importance wanda|activation`` or ``--drop_layers`` calibration blocks of the training split only);
writes ``results/<run>/03_prune/``: ``model/`` (safetensors + tokenizer), ``masks.safetensors`` (magnitude
and nm; 1 = kept), ``metrics.jsonl`` and, last, ``manifest.json``; TensorBoard scalars ``prune/sparsity/<layer>``,
``prune/sparsity_linear_weights``, ``prune/sparsity_all_params``, ``prune/params``, ``val/loss``, ``val/ppl`` under ``results/<run>/tb/prune/``.  Everything is checked before
anything is written; the outputs are made in temporary folders beside the final ones and renamed into place
at the end, so a failed run leaves an earlier output as it was.  One process does the work: under a
distributed launcher every rank computes the same and rank 0 alone writes.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from pipeline import dist
from pipeline.budget import budget_of, training_budget
from pipeline.calibration import CALIBRATION_SPLIT, calibration_blocks, train_block_count
from pipeline.cli import run_stage
from pipeline.config import ConfigError, config_hash, to_dict
from pipeline.evaluate import validation_loss
from pipeline.manifest import StageError, require_stage, stage_dir, write_manifest
from pipeline.metrics import MetricsLogger
from pipeline.model import count_params
from pipeline.prune import PruneConfig, check_model, method_manifest_fields, prune_model, target_sparsity
from pipeline.sparsity import count_mask_violations, load_export_state_dict, save_masks
from pipeline.stage_output import StageOutput
from pipeline.tokens import load_tokens


def load_pretrained(pretrain_manifest: dict, device: str):
    """The stage-02 model (fp32, eval mode, on ``device``) and its tokenizer.

    Raises:
        StageError: when the model directory the manifest names cannot be loaded.
    """
    from transformers import AutoTokenizer

    model_dir = Path(pretrain_manifest["_dir"]) / pretrain_manifest["outputs"]["model_dir"]
    from pipeline.integrity import ModelFileError, UnsafeFileError, load_causal_lm

    try:
        model = load_causal_lm(model_dir, dtype=torch.float32, attn_implementation="sdpa")
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (ModelFileError, UnsafeFileError) as e:
        raise StageError(str(e)) from None
    except (OSError, ValueError) as e:
        raise StageError(f"cannot load the stage-02 model from {model_dir} ({e}); re-run `make pretrain`") from None
    return model.to(device).eval(), tokenizer, model_dir


def export_violations(model_dir: Path, masks: dict[str, torch.Tensor]) -> int:
    """Entries of the saved ``*.safetensors`` in ``model_dir`` that are non-zero where ``masks`` says pruned."""
    return sum(count_mask_violations(load_export_state_dict(model_dir), masks).values())


def main(cfg: PruneConfig) -> dict | None:
    """Run stage 03 and return its manifest (rank 0; ``None`` on other ranks).

    Raises:
        ConfigError: every problem of the configuration with this model at once (method, ratios, N:M
            widths, architecture, too few validation tokens).
        StageError: stage 02 or 01 missing (naming ``make pretrain`` / ``make data``), or an output of another
            configuration without ``--overwrite``.
    """
    t0 = time.time()
    problems = cfg.validate()
    if problems:
        raise ConfigError(problems)
    torch.manual_seed(cfg.seed)

    # -- inputs: the stage-02 model and the stage-01 validation tokens --------------------------
    pretrain = require_stage(cfg.run_dir(), "pretrain", cfg.run, cfg.preset)
    data = require_stage(cfg.run_dir(), "data", cfg.run, cfg.preset)
    from pipeline.manifest import check_same_tokenizer

    check_same_tokenizer({"stage-01": Path(data["_dir"]) / data["outputs"]["tokenizer_dir"],
                          "pretrained model's": Path(pretrain["_dir"]) / pretrain["outputs"]["model_dir"]},
                         f"re-run `make pretrain RUN={cfg.run}`")
    out = stage_dir(cfg.run_dir(), "prune")
    chash = config_hash(cfg)
    output = StageOutput(out, cfg.tb_root() / "prune")
    output.check(chash, cfg.overwrite, "prune")
    model, tokenizer, model_dir = load_pretrained(pretrain, cfg.resolved_device())
    seq_len = int(data["outputs"]["seq_len"])
    val = load_tokens(data["_dir"], "val", data)
    if cfg.eval_tokens:
        val = val[: cfg.eval_tokens]

    # -- every problem with this model, before anything is written ------------------------------
    problems = check_model(cfg, model)
    if len(val) < seq_len + 1:
        problems.append(f"{len(val)} validation tokens make no block of seq_len={seq_len} + 1; raise --eval_tokens "
                        f"(0 = whole split) or remake stage 01 with a larger val_fraction")
    calib_available = train_block_count(data, seq_len) if cfg.needs_calibration() else -1
    if 0 <= calib_available < cfg.calib_blocks:
        problems.append(f"the training split holds {calib_available} blocks of seq_len={seq_len}, fewer than "
                        f"--calib_blocks {cfg.calib_blocks}; lower --calib_blocks to at most {calib_available}")
    if problems:
        raise ConfigError(problems)

    # -- calibration blocks: the training split only ----------------------------------------------
    calib, calibration = None, None
    if cfg.needs_calibration():
        try:
            calib = calibration_blocks(data["_dir"], data, cfg.calib_blocks, seq_len, cfg.seed)
        except ValueError as e:
            raise ConfigError([str(e)]) from None
        calibration = {"split": CALIBRATION_SPLIT, "shards": list(data["outputs"][f"{CALIBRATION_SPLIT}_shards"]),
                       "blocks": int(calib.shape[0]), "seq_len": seq_len, "tokens": int(calib.numel()),
                       "seed": cfg.seed, "order": cfg.calib_order if cfg.importance == "wanda" else "one_pass"}

    # -- prune, measuring before and after -------------------------------------------------------
    dense_loss, dense_ppl = validation_loss(model, val, seq_len, cfg.eval_batch_size)
    params_before = count_params(model, exclude_position_embeddings=False)
    result = prune_model(model, cfg, calib)
    val_loss, val_ppl = validation_loss(model, val, seq_len, cfg.eval_batch_size)
    params_after = count_params(model, exclude_position_embeddings=False)
    nonzero = sum(int(torch.count_nonzero(p)) for p in model.parameters())  # unique: tied weights once
    masks = result["masks"]

    outputs = {
        "model_dir": "model",
        "tokenizer_dir": "model",
        "method": cfg.method,
        "masks": "masks.safetensors" if masks is not None else None,
        "sparsity": result["sparsity"],
        "target_sparsity": target_sparsity(cfg),
        **method_manifest_fields(cfg),  # scope, n, m (None where the method has no such setting)
        "structure": result["plan"],
        "importance": cfg.importance,
        "calibration": calibration,
        "depth": result.get("depth"),
        "layer_sparsity": result["layer_sparsity"],
        "params_before": params_before,
        "params_after": params_after,
        "nonzero_params": nonzero,
        "arch": type(model).__name__,
        "source_model": str(model_dir),
        "config_hash": chash,
    }
    metrics = {
        "val_loss": val_loss,
        "val_ppl": val_ppl,
        "dense_val_loss": dense_loss,
        "dense_val_ppl": dense_ppl,
        "pretrain_val_loss": pretrain.get("metrics", {}).get("val_loss"),
        "sparsity": result["sparsity"],
        "params_before": params_before,
        "params_after": params_after,
        "nonzero_params": nonzero,
        "eval_tokens": (len(val) - 1) // seq_len * seq_len,
        # pruning trains nothing: the pruned model carries the dense model's training budget (pipeline.budget)
        "budget": training_budget(0, 0, 0.0, 1, cfg.resolved_device(), parent=budget_of(pretrain),
                                  parent_name="pretrain"),
    }
    if not dist.is_rank0():
        return None

    # -- write into temporary folders, rename them into place, then the manifest (last) ---------
    with output.staging() as staged:
        tmp, tb_tmp = staged.dir, staged.tb_dir
        model.save_pretrained(tmp / "model")
        tokenizer.save_pretrained(tmp / "model")
        if masks is not None:
            save_masks(masks, tmp / "masks.safetensors")
            bad = export_violations(tmp / "model", masks)
            if bad:
                raise RuntimeError(f"{bad} pruned weights are non-zero in the saved model; nothing was replaced")
        scalars = {f"prune/sparsity/{k.removesuffix('.weight')}": v for k, v in result["layer_sparsity"].items()}
        # two different quantities, two names: zeros among the pruned linear weights (the method's target) and
        # zeros among all parameters (embeddings and norms included: the report's "all parameters" column)
        scalars.update({"prune/sparsity_linear_weights": result["sparsity"],
                        "prune/sparsity_all_params": 1.0 - nonzero / params_after, "prune/params": params_after,
                        "prune/params_before": params_before, "prune/nonzero_params": nonzero,
                        "prune/dense_val_loss": dense_loss, "prune/dense_val_ppl": dense_ppl,
                        "val/loss": val_loss, "val/ppl": val_ppl})
        with MetricsLogger(tmp / "metrics.jsonl", tb_tmp) as log:
            log.log(0, scalars)
        manifest = staged.publish(lambda d: write_manifest(
            d, "prune", to_dict(cfg), outputs, metrics, inputs={"data": data["_dir"], "pretrain": pretrain["_dir"]},
            seed=cfg.seed, wall_time_s=time.time() - t0))
    dropped = f", layers dropped {result['depth']['dropped']}" if result.get("depth") else ""
    print(f"prune: {cfg.method} ({cfg.importance}{dropped}) sparsity {result['sparsity']:.4f}, params {params_before} -> {params_after} "
          f"({nonzero} non-zero), val/ppl {dense_ppl:.2f} -> {val_ppl:.2f} -> {out}")
    return manifest


if __name__ == "__main__":
    run_stage(PruneConfig, "prune", main)
