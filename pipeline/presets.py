"""Named presets: one dictionary per preset, one section per stage, dotted keys as in the CLI.

- ``tiny``: seconds per stage; for tests (a 2-layer LLaMA of width 64).
- ``cpu``: the default of ``make all``; the whole pipeline, controls included, sized for 15 minutes on 2 CPU
  cores (a 4-layer LLaMA of width 128, 1.38M parameters, 8 × 128 tokens a step; measured times in the README and
  ``results/bench/NOTES.md``).
- ``124m``: GPT-2-small scale for one or more GPUs (12 layers, width 768, 97.5M parameters with the
  16k-token vocabulary and tied embeddings; GPT-2's own 124M counts its 50k vocabulary).
- ``350m``: 24 layers, width 1024 (about 325M parameters with the 16k vocabulary).
- ``1b``: 20 layers, width 2048, 16 heads of 128 (about 1.06B parameters; TinyLlama-1.1B's width and MLP with
  fewer layers and full multi-head attention); for the MFU measurements of ``scripts/bench_pretrain.py``.

Model sizes follow GPT-2's small/medium shapes (Radford et al., 2019) with LLaMA's SwiGLU MLP width
of about 8/3·d rounded to a multiple of 256 (Touvron et al., 2023).
"""

from __future__ import annotations

PRESETS: dict[str, dict[str, dict]] = {
    "tiny": {
        "data": {"vocab_size": 512, "seq_len": 64, "val_fraction": 0.02},
        "pretrain": {
            "model": {"arch": "llama", "n_layer": 2, "d_model": 64, "n_head": 4, "n_kv_head": 4, "d_ff": 192},
            "micro_batch_size": 4, "grad_accum": 1, "max_steps": 30, "lr": 3e-3, "warmup_steps": 5,
            "eval_interval": 15, "save_interval": 15, "log_interval": 5, "precision": "fp32",
            "eval_batch_size": 32,
        },
        "prune": {"sparsity": 0.5},
        "distill": {"micro_batch_size": 4, "max_steps": 20, "lr": 1e-3, "warmup_steps": 2,
                    "eval_interval": 10, "save_interval": 10, "log_interval": 5, "precision": "fp32"},
        "eval": {"batch_sizes": [1, 4], "seq_lens": [64], "repeats": 3, "gen_tokens": 16},
    },
    "cpu": {
        "data": {"vocab_size": 4096, "seq_len": 128, "val_fraction": 0.05},
        "pretrain": {
            "model": {"arch": "llama", "n_layer": 4, "d_model": 128, "n_head": 4, "n_kv_head": 4, "d_ff": 384},
            "micro_batch_size": 8, "grad_accum": 1, "max_steps": 600, "lr": 2e-3, "warmup_steps": 40,
            "eval_interval": 200, "save_interval": 200, "log_interval": 20, "eval_batch_size": 64,
        },
        "prune": {"sparsity": 0.5},
        "distill": {"micro_batch_size": 8, "max_steps": 100, "lr": 5e-4, "warmup_steps": 10,
                    "eval_interval": 50, "save_interval": 50, "log_interval": 10},
        "eval": {"batch_sizes": [1, 8], "seq_lens": [128], "repeats": 5, "gen_tokens": 32},
    },
    "124m": {
        "data": {"vocab_size": 16384, "seq_len": 1024, "val_fraction": 0.05},
        "pretrain": {
            "model": {"arch": "llama", "n_layer": 12, "d_model": 768, "n_head": 12, "n_kv_head": 12, "d_ff": 2048},
            "micro_batch_size": 16, "grad_accum": 1, "max_steps": 300, "lr": 6e-4, "warmup_steps": 30,
            "eval_interval": 100, "save_interval": 100, "log_interval": 10,
        },
        "prune": {"sparsity": 0.5},
        # distillation at the pretraining LR: it won the recipe sweep of results/bench/COMPRESSION.md
        "distill": {"micro_batch_size": 16, "max_steps": 100, "lr": 6e-4, "warmup_steps": 10,
                    "eval_interval": 50, "save_interval": 50, "log_interval": 10},
        "eval": {"batch_sizes": [1, 16], "seq_lens": [1024], "repeats": 10, "gen_tokens": 64},
    },
    "350m": {
        "data": {"vocab_size": 16384, "seq_len": 1024, "val_fraction": 0.05},
        "pretrain": {
            "model": {"arch": "llama", "n_layer": 24, "d_model": 1024, "n_head": 16, "n_kv_head": 16, "d_ff": 2816},
            "micro_batch_size": 8, "grad_accum": 1, "max_steps": 300, "lr": 3e-4, "warmup_steps": 30,
            "eval_interval": 100, "save_interval": 100, "log_interval": 10,
        },
        "prune": {"sparsity": 0.5},
        "distill": {"micro_batch_size": 8, "max_steps": 100, "lr": 1e-4, "warmup_steps": 10,
                    "eval_interval": 50, "save_interval": 50, "log_interval": 10},
        "eval": {"batch_sizes": [1, 8], "seq_lens": [1024], "repeats": 10, "gen_tokens": 64},
    },
    "1b": {
        "data": {"vocab_size": 16384, "seq_len": 1024, "val_fraction": 0.05},
        "pretrain": {
            "model": {"arch": "llama", "n_layer": 20, "d_model": 2048, "n_head": 16, "n_kv_head": 16, "d_ff": 5632},
            "micro_batch_size": 8, "grad_accum": 1, "max_steps": 300, "lr": 2e-4, "warmup_steps": 30,
            "eval_interval": 100, "save_interval": 100, "log_interval": 10,
        },
        "prune": {"sparsity": 0.5},
        "distill": {"micro_batch_size": 8, "max_steps": 100, "lr": 1e-4, "warmup_steps": 10,
                    "eval_interval": 50, "save_interval": 50, "log_interval": 10},
        "eval": {"batch_sizes": [1, 8], "seq_lens": [1024], "repeats": 10, "gen_tokens": 64},
    },
}

# the encoder path's presets (make ... TASK=classify) live beside these
from pipeline.presets_encoder import ENCODER_PRESETS  # noqa: E402

PRESETS.update(ENCODER_PRESETS)
