"""Decoder LMs built from ``transformers`` configs, and the FLOP arithmetic behind MFU.

The default architecture is LLaMA (``LlamaForCausalLM``: RoPE, SwiGLU MLP, RMSNorm, optional
grouped-query attention; Touvron et al., 2023); GPT-2 (``GPT2LMHeadModel``; Radford et al., 2019) is the
alternative.  Both use PyTorch's scaled-dot-product attention (``attn_implementation="sdpa"``) and, by
default, tie the output projection to the token embedding.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pipeline.config import doc


@dataclass
class ModelConfig:
    """Shape of the decoder (nested in the stage configs as ``model.*``; CLI ``--model.n_layer 4``)."""

    arch: Literal["llama", "gpt2"] = doc("Architecture: 'llama' (RoPE, SwiGLU, RMSNorm) or 'gpt2'.", "llama")
    n_layer: int = doc("Number of transformer blocks.", 4)
    d_model: int = doc("Hidden size (embedding width).", 256)
    n_head: int = doc("Attention heads (query heads); must divide d_model.", 4)
    n_kv_head: int = doc("Key/value heads for grouped-query attention (llama only); must divide n_head.", 4)
    d_ff: int = doc("MLP inner width (SwiGLU width for llama, GELU MLP width for gpt2).", 768)
    rope_theta: float = doc("RoPE base frequency (llama only).", 10000.0)
    max_position: int = doc("Longest sequence the model accepts; 0 = the stage-01 seq_len.", 0)
    tie_embeddings: bool = doc("Share the token embedding with the output projection (lm_head).", True)
    dropout: float = doc("Dropout probability (attention and residual); 0 for pretraining at this scale.", 0.0)

    def validate(self, prefix: str = "model.") -> list[str]:
        """Every problem with the shape, as messages naming the ``--model.*`` option to change."""
        p = []
        for name in ("n_layer", "d_model", "n_head", "n_kv_head", "d_ff"):
            if getattr(self, name) < 1:
                p.append(f"{prefix}{name} must be positive, got {getattr(self, name)}")
        if self.n_head >= 1 and self.d_model % self.n_head:
            p.append(f"{prefix}d_model ({self.d_model}) must be divisible by {prefix}n_head ({self.n_head})")
        if self.n_kv_head >= 1 and self.n_head % self.n_kv_head:
            p.append(f"{prefix}n_head ({self.n_head}) must be divisible by {prefix}n_kv_head ({self.n_kv_head})")
        if self.arch == "gpt2" and self.n_kv_head != self.n_head:
            p.append(f"{prefix}n_kv_head must equal {prefix}n_head for arch gpt2 (no grouped-query attention)")
        if self.arch == "llama" and self.n_head >= 1 and (self.d_model // self.n_head) % 2:
            p.append(f"head size d_model/n_head = {self.d_model // self.n_head} must be even for RoPE")
        if not 0.0 <= self.dropout < 1.0:
            p.append(f"{prefix}dropout must be in [0, 1), got {self.dropout}")
        if self.max_position < 0:
            p.append(f"{prefix}max_position must be >= 0 (0 = seq_len), got {self.max_position}")
        if self.rope_theta <= 0:
            p.append(f"{prefix}rope_theta must be positive, got {self.rope_theta}")
        return p


def hf_config(mcfg: ModelConfig, vocab_size: int, seq_len: int, bos_id: int | None = None,
              eos_id: int | None = None, pad_id: int | None = None):
    """The ``transformers`` config (``LlamaConfig`` or ``GPT2Config``) for ``mcfg``.

    Args:
        vocab_size: rows of the embedding (the stage-01 tokenizer's ``len(tokenizer)``).
        seq_len: training block length; the default for ``max_position``.
        bos_id, eos_id, pad_id: special token ids recorded in the config (used by ``generate``).

    Raises:
        ValueError: when ``mcfg`` is invalid (the message lists every problem) or ``max_position < seq_len``.
    """
    problems = mcfg.validate()
    max_pos = mcfg.max_position or seq_len
    if max_pos < seq_len:
        problems.append(f"model.max_position ({max_pos}) is shorter than seq_len ({seq_len})")
    if vocab_size < 1:
        problems.append(f"vocab_size must be positive, got {vocab_size}")
    if problems:
        raise ValueError("invalid model configuration: " + "; ".join(problems))
    common = dict(vocab_size=vocab_size, bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id,
                  tie_word_embeddings=mcfg.tie_embeddings)
    if mcfg.arch == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(
            hidden_size=mcfg.d_model, intermediate_size=mcfg.d_ff, num_hidden_layers=mcfg.n_layer,
            num_attention_heads=mcfg.n_head, num_key_value_heads=mcfg.n_kv_head, max_position_embeddings=max_pos,
            rope_theta=mcfg.rope_theta, attention_dropout=mcfg.dropout, hidden_act="silu", rms_norm_eps=1e-5,
            initializer_range=0.02, use_cache=True, **common,
        )
    from transformers import GPT2Config

    return GPT2Config(
        n_embd=mcfg.d_model, n_layer=mcfg.n_layer, n_head=mcfg.n_head, n_inner=mcfg.d_ff, n_positions=max_pos,
        resid_pdrop=mcfg.dropout, embd_pdrop=mcfg.dropout, attn_pdrop=mcfg.dropout, activation_function="gelu_new",
        initializer_range=0.02, use_cache=True, **common,
    )


def build_model(mcfg: ModelConfig, vocab_size: int, seq_len: int, bos_id: int | None = None,
                eos_id: int | None = None, pad_id: int | None = None, seed: int | None = None):
    """A freshly initialised causal LM (fp32, on CPU) with SDPA attention.

    Args: as :func:`hf_config`; ``seed``: when given, ``torch.manual_seed(seed)`` right before the
    initialisation, so every rank builds the same weights.

    Returns:
        ``LlamaForCausalLM`` or ``GPT2LMHeadModel``; with ``tie_embeddings`` ``lm_head.weight`` *is* the
        token embedding (one tensor).

    Raises:
        ValueError: for an invalid shape (see :func:`hf_config`).
    """
    import torch
    from transformers import AutoModelForCausalLM

    config = hf_config(mcfg, vocab_size, seq_len, bos_id, eos_id, pad_id)
    if seed is not None:
        torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)


def load_model(model_dir: str | Path, vocab_size: int | None = None):
    """Load a Hugging Face causal LM (``--init_from``) in fp32 with SDPA attention.

    Raises:
        ValueError: when the directory holds no model, or its vocabulary differs from ``vocab_size``.
    """
    import torch

    d = Path(model_dir)
    if not (d / "config.json").is_file():
        raise ValueError(f"--init_from {d}: no Hugging Face model there (config.json missing); pass a model "
                         f"directory such as results/<run>/02_pretrain/model")
    from pipeline.integrity import ModelFileError, UnsafeFileError, load_causal_lm

    try:
        model = load_causal_lm(d, attn_implementation="sdpa", dtype=torch.float32)
    except (ModelFileError, UnsafeFileError) as e:
        raise ValueError(f"--init_from {d}: {e}") from None
    if vocab_size is not None and model.config.vocab_size != vocab_size:
        raise ValueError(f"--init_from {d}: the model's vocabulary ({model.config.vocab_size}) differs from the "
                         f"stage-01 tokenizer's ({vocab_size}); use a model trained on this run's data")
    return model


def count_params(model, exclude_position_embeddings: bool = True) -> int:
    """Distinct parameters (tied tensors counted once); learned position embeddings (GPT-2 ``wpe``) left out.

    This is the ``N`` of :func:`flops_per_token` (as nanoGPT's ``get_num_params``): the token embedding
    stays in because, tied to ``lm_head``, it is used in a matrix product for every token.
    Under ZeRO-3 the partitioned parameters report their full size through ``ds_numel``.
    """
    seen, n = set(), 0
    for name, p in model.named_parameters(remove_duplicate=True):
        if id(p) in seen:
            continue
        seen.add(id(p))
        if exclude_position_embeddings and name.endswith("wpe.weight"):
            continue
        n += int(getattr(p, "ds_numel", p.numel()))
    return n


def flops_per_token(n_params: int, n_layer: int, d_model: int, seq_len: int) -> int:
    """Training FLOPs per token, forward and backward: ``6N + 12·L·d·T``.

    ``6N`` counts the matrix products with the weights (2 for the forward, 4 for the backward), and
    ``12·L·d·T`` the attention scores and their weighted sum (Chowdhery et al., 2022, PaLM, appendix B;
    the same estimate as nanoGPT's ``estimate_mfu``).  Units: FLOPs per token.
    """
    return 6 * int(n_params) + 12 * int(n_layer) * int(d_model) * int(seq_len)


#: Dense (no sparsity) 16-bit tensor-core peak in TFLOP/s by GPU name, from the vendors' data sheets.
#: Looked up by the first key found in ``torch.cuda.get_device_name()`` (longest keys first).
PEAK_TFLOPS_16BIT = {
    "H200": 989.0,      # H200 SXM, BF16/FP16 dense
    "H100 PCIe": 756.0,
    "H100": 989.0,      # H100 SXM, BF16/FP16 dense
    "GH200": 989.0,
    "B200": 2250.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "A10G": 125.0,
    "A10": 125.0,
    "L4": 121.0,
    "V100": 125.0,
    "T4": 65.0,
    "RTX 4090": 165.0,
    "RTX 3090": 71.0,
}


def peak_tflops_for(device_name: str | None) -> float | None:
    """Peak 16-bit dense TFLOP/s of one device named ``device_name`` (``None`` when not in the table)."""
    if not device_name:
        return None
    for key in sorted(PEAK_TFLOPS_16BIT, key=len, reverse=True):
        if key in device_name:
            return PEAK_TFLOPS_16BIT[key]
    return None


def mfu(tokens_per_s: float, flops_per_tok: float, peak_tflops_per_device: float, n_devices: int) -> float:
    """Model FLOPs utilisation: achieved FLOP/s over the peak of all devices (a fraction, 0..1).

    ``tokens_per_s`` is the whole job's throughput; source: PaLM (Chowdhery et al., 2022), appendix B.
    """
    return tokens_per_s * flops_per_tok / (peak_tflops_per_device * 1e12 * n_devices)
