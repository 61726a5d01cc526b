"""Calibration data for activation-aware pruning: blocks of the training split and forward hooks that record
activation statistics.

Calibration reads the **training** split only (``<run>/01_data/train-*.bin``, the shards the stage-01 manifest
lists under ``train_shards``); the validation split, on which pruning is measured, is never opened here.
Blocks are ``seq_len`` tokens long, drawn without replacement from the non-overlapping blocks of the training
tokens with a seeded generator, as Wanda draws its 128 calibration segments from C4's training split (Sun et al.,
2023) and Minitron its 1024 calibration samples (Muralidharan et al., 2024).

Statistics gathered here, each in one pass over the blocks with ``torch.no_grad``, in fp32:

- :func:`input_sq_norms`: per input feature ``j`` of a linear layer, ``Σ_tokens x_j²`` (Wanda's ``‖X_j‖₂²``);
- :func:`channel_activations`: per channel ``c`` of a module's input, ``Σ_b (mean_s |x_bsc|)²`` over calibration
  sequences ``b`` and their positions ``s`` (Minitron's batch = L2, sequence = mean aggregation, before the
  square root), as NVIDIA ModelOpt's ``mcore_minitron`` collects it;
- :func:`block_influence`: per decoder block, ``1 - mean_tokens cos(x_in, x_out)`` (ShortGPT's Block
  Influence, Men et al., 2024, arXiv:2403.03853).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

#: the only split calibration reads
CALIBRATION_SPLIT = "train"


def train_block_count(data_manifest: Mapping, seq_len: int) -> int:
    """Non-overlapping blocks of ``seq_len`` tokens in the training split, from the stage-01 manifest's
    ``metrics.train_tokens`` (no shard is opened); ``-1`` when the manifest does not record it."""
    n = data_manifest.get("metrics", {}).get("train_tokens")
    return -1 if n is None else int(n) // seq_len


def calibration_blocks(data_dir: str | Path, data_manifest: Mapping, n_blocks: int, seq_len: int,
                       seed: int = 0) -> torch.Tensor:
    """``n_blocks`` blocks of ``seq_len`` training tokens, drawn without replacement (seeded), in drawn order.

    Only the shards listed under ``outputs.train_shards`` are opened (memory-mapped); the validation shards are
    not touched.  Block ``i`` of the training tokens is ``tokens[i·seq_len : (i+1)·seq_len]``.

    Args:
        data_dir: the stage-01 folder (``results/<run>/01_data``).
        data_manifest: its manifest (``outputs.train_shards``, ``outputs.dtype``).
        n_blocks: blocks wanted (at least 1).
        seq_len: tokens per block.
        seed: seed of the draw.

    Returns:
        an ``int64`` tensor of shape ``(n_blocks, seq_len)``.

    Raises:
        ValueError: ``n_blocks < 1``, or the training split holds fewer than ``n_blocks`` blocks (the message
            names the count and ``--calib_blocks``).
        FileNotFoundError: no training shard is listed.
    """
    from pipeline.tokens import load_tokens

    if n_blocks < 1:
        raise ValueError(f"calib_blocks must be at least 1, got {n_blocks}")
    tokens = load_tokens(data_dir, CALIBRATION_SPLIT, dict(data_manifest))
    available = len(tokens) // seq_len
    if available < n_blocks:
        raise ValueError(f"the training split holds {available} blocks of seq_len={seq_len}, fewer than "
                         f"calib_blocks={n_blocks}; lower --calib_blocks to at most {available}")
    gen = torch.Generator().manual_seed(seed)
    picks = torch.randperm(available, generator=gen)[:n_blocks].tolist()
    import numpy as np

    return torch.stack([torch.from_numpy(np.asarray(tokens[i * seq_len:(i + 1) * seq_len], dtype=np.int64))
                        for i in picks])


def _batches(blocks: torch.Tensor, batch_size: int, device: torch.device | str) -> Iterator[torch.Tensor]:
    for a in range(0, len(blocks), batch_size):
        yield blocks[a:a + batch_size].to(device)


@torch.no_grad()
def run_blocks(model: nn.Module, blocks: torch.Tensor, batch_size: int) -> None:
    """Forward ``blocks`` through ``model`` (``batch_size`` at a time, no cache, no gradients)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for x in _batches(blocks, batch_size, device):
            model(input_ids=x, use_cache=False)
    finally:
        model.train(was_training)


@contextmanager
def _input_hooks(modules: Mapping[str, nn.Module], fn: Callable[[str, torch.Tensor], None]):
    """Forward pre-hooks calling ``fn(name, input)`` with each module's first positional input."""
    handles = []
    try:
        for name, mod in modules.items():
            handles.append(mod.register_forward_pre_hook(lambda m, args, _n=name: fn(_n, args[0].detach())))
        yield
    finally:
        for h in handles:
            h.remove()


def input_sq_norms(model: nn.Module, modules: Mapping[str, nn.Module], blocks: torch.Tensor,
                   batch_size: int) -> dict[str, torch.Tensor]:
    """Per module, the squared L2 norm of every input feature over all calibration tokens.

    For a module whose input is ``x`` of shape ``(B, S, d_in)``, the result is ``Σ_{b,s} x_{bsj}²`` for every
    ``j``, shape ``(d_in,)``, fp32 on the module's device; ``sqrt`` of it is Wanda's ``‖X_j‖₂`` (Sun et al., 2023,
    eq. 1; their code keeps the mean over samples, which scales a layer's scores by one constant and does not
    change any comparison within the layer).

    Args:
        model: the causal LM, run on ``blocks``.
        modules: name -> module (``nn.Linear`` or GPT-2 ``Conv1D``: the last dimension of the input is the
            input feature) whose inputs are measured.
        blocks: ``(N, seq_len)`` token ids (:func:`calibration_blocks`).
        batch_size: blocks per forward pass.
    """
    return _summed_input_stat(model, modules, blocks, batch_size,
                              lambda x: x.float().reshape(-1, x.shape[-1]).pow(2).sum(0))


def channel_activations(model: nn.Module, modules: Mapping[str, nn.Module], blocks: torch.Tensor,
                        batch_size: int) -> dict[str, torch.Tensor]:
    """Per module, Minitron's activation statistic of every input channel before the final square root.

    For an input ``x`` of shape ``(B, S, C)``: ``Σ_b (mean_s |x_bsc|)²`` summed over all calibration sequences,
    shape ``(C,)``, fp32; its square root is the channel's importance with Minitron's aggregation
    (batch = L2, sequence = mean; Muralidharan et al., 2024, §2.2 and Table 11; NVIDIA ModelOpt's
    ``mcore_minitron`` hooks compute the same).

    Args:
        modules: name -> module whose *input* is measured (``o_proj``: the attention heads' outputs;
            ``down_proj``: ``act(gate_proj(x)) * up_proj(x)``, the MLP's intermediate activations).
    """
    return _summed_input_stat(model, modules, blocks, batch_size, lambda x: x.float().abs().mean(dim=1).pow(2).sum(0))


def _summed_input_stat(model: nn.Module, modules: Mapping[str, nn.Module], blocks: torch.Tensor, batch_size: int,
                       stat) -> dict[str, torch.Tensor]:
    """``stat(input)`` of every module's input, summed over all calibration batches; raises RuntimeError when
    the forward pass never reached a module."""
    out: dict[str, torch.Tensor] = {}

    def add(name: str, x: torch.Tensor) -> None:
        s = stat(x)
        out[name] = s if name not in out else out[name] + s

    with _input_hooks(modules, add):
        run_blocks(model, blocks, batch_size)
    missing = [n for n in modules if n not in out]
    if missing:
        raise RuntimeError(f"the calibration pass never reached {missing}; these modules are not used by forward")
    return out


@torch.no_grad()
def block_influence(model: nn.Module, blocks_module: nn.ModuleList, blocks: torch.Tensor,
                    batch_size: int) -> torch.Tensor:
    """ShortGPT's Block Influence of every decoder block: ``BI_i = 1 - mean_t cos(x_in_t, x_out_t)``.

    ``x_in`` is the hidden state entering block ``i`` and ``x_out`` the one leaving it, at every calibration
    token ``t`` (Men et al., 2024, "ShortGPT: Layers in Large Language Models are More Redundant Than You
    Expect", eq. 1).  A block that barely changes its input scores near 0 and is the first to remove.

    Returns:
        fp32 tensor of shape ``(len(blocks_module),)`` on CPU.
    """
    n = len(blocks_module)
    sums = torch.zeros(n, dtype=torch.float64)
    count = torch.zeros(n, dtype=torch.float64)
    handles = []

    def hook(i: int):
        def fn(mod, args, kwargs, output):
            x_in = args[0] if args else kwargs["hidden_states"]
            x_out = output[0] if isinstance(output, tuple) else output
            cos = torch.nn.functional.cosine_similarity(x_in.float(), x_out.float(), dim=-1)
            sums[i] += float(cos.double().sum())
            count[i] += cos.numel()
        return fn

    try:
        for i, blk in enumerate(blocks_module):
            handles.append(blk.register_forward_hook(hook(i), with_kwargs=True))
        run_blocks(model, blocks, batch_size)
    finally:
        for h in handles:
            h.remove()
    if not bool((count > 0).all()):
        raise RuntimeError("the calibration pass did not reach every decoder block")
    return (1.0 - sums / count).float()
