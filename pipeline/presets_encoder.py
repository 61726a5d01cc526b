"""Presets of the encoder path (``make ... TASK=classify``): sections ``data``, ``pretrain`` (masked LM, a
``BertForMaskedLM``) and ``classify`` (fine-tuning on genre-labelled passages).

- ``encoder-tiny``: seconds per stage; for tests (a 2-layer BERT of width 64).
- ``encoder-cpu``: the default of ``make all TASK=classify``; the whole encoder pipeline in minutes on 2 idle CPU
  cores (a 2-layer BERT of width 128 over 128-token blocks, about 1.0M parameters with the 4k vocabulary; 600
  masked-LM steps of 16 blocks, 300 classification steps over up to 200 passages a play: the smallest setting
  measured to beat the majority class on the held-out plays, see results/bench/NOTES.md), fp32
  (bf16 is emulated on CPUs without bf16 instructions, like this machine's AMD EPYC with AVX2 only).
- ``encoder-gpu``: one or more GPUs, fp16 (8 layers, width 512, 8 heads, MLP 2048: BERT-medium's shape of
  Turc et al., 2019, "Well-Read Students Learn Better"; about 33.7M parameters with the 16k vocabulary).

Optimiser settings follow BERT (Devlin et al., 2019): AdamW with betas (0.9, 0.999), weight decay 0.01, linear
warmup; fine-tuning at a lower learning rate than pretraining.
"""

from __future__ import annotations

ENCODER_PRESETS: dict[str, dict[str, dict]] = {
    "encoder-tiny": {
        "data": {"vocab_size": 512, "seq_len": 64, "val_fraction": 0.02, "task": "classify"},
        "pretrain": {
            "model": {"n_layer": 2, "d_model": 64, "n_head": 4, "d_ff": 128, "dropout": 0.0},
            "micro_batch_size": 8, "grad_accum": 1, "max_steps": 30, "lr": 2e-3, "warmup_steps": 5,
            "eval_interval": 15, "save_interval": 15, "log_interval": 5, "precision": "fp32", "eval_batch_size": 32,
        },
        "classify": {
            "micro_batch_size": 8, "max_steps": 20, "lr": 1e-3, "warmup_steps": 2, "eval_interval": 10,
            "save_interval": 10, "log_interval": 5, "precision": "fp32", "max_passages_per_group": 12,
            "eval_batch_size": 32,
        },
        "prune": {"sparsity": 0.5},
        "distill": {"micro_batch_size": 8, "max_steps": 16, "lr": 1e-3, "warmup_steps": 2, "eval_interval": 8,
                    "save_interval": 8, "log_interval": 4, "precision": "fp32", "eval_batch_size": 32},
        "eval": {"batch_sizes": [1, 8], "repeats": 3},
    },
    "encoder-cpu": {
        "data": {"vocab_size": 4096, "seq_len": 128, "val_fraction": 0.05, "task": "classify"},
        "pretrain": {
            "model": {"n_layer": 2, "d_model": 128, "n_head": 4, "d_ff": 512, "dropout": 0.1},
            "micro_batch_size": 16, "grad_accum": 1, "max_steps": 600, "lr": 1e-3, "warmup_steps": 30,
            "eval_interval": 200, "save_interval": 600, "log_interval": 20, "eval_batch_size": 64, "precision": "fp32",
        },
        "classify": {
            "micro_batch_size": 16, "max_steps": 300, "lr": 5e-4, "warmup_steps": 10, "eval_interval": 100,
            "save_interval": 300, "log_interval": 10, "max_passages_per_group": 200, "eval_batch_size": 64,
            "precision": "fp32",
        },
        "prune": {"sparsity": 0.5},
        "distill": {"micro_batch_size": 16, "max_steps": 60, "lr": 3e-4, "warmup_steps": 6, "eval_interval": 60,
                    "save_interval": 60, "log_interval": 10, "eval_batch_size": 64, "precision": "fp32"},
        "eval": {"batch_sizes": [1, 16], "repeats": 5},
    },
    "encoder-gpu": {
        "data": {"vocab_size": 16384, "seq_len": 128, "val_fraction": 0.05, "task": "classify"},
        "pretrain": {
            "model": {"n_layer": 8, "d_model": 512, "n_head": 8, "d_ff": 2048, "dropout": 0.1},
            "micro_batch_size": 128, "grad_accum": 1, "max_steps": 2000, "lr": 5e-4, "warmup_steps": 100,
            "eval_interval": 500, "save_interval": 500, "log_interval": 50, "eval_batch_size": 256,
        },
        "classify": {
            "micro_batch_size": 32, "max_steps": 600, "lr": 5e-5, "warmup_steps": 60, "eval_interval": 200,
            "save_interval": 300, "log_interval": 25, "eval_batch_size": 256,
        },
        "prune": {"sparsity": 0.5},
        "distill": {"micro_batch_size": 32, "max_steps": 400, "lr": 5e-5, "warmup_steps": 40, "eval_interval": 200,
                    "save_interval": 200, "log_interval": 25, "eval_batch_size": 256},
        "eval": {"batch_sizes": [1, 64], "repeats": 20},
    },
}
