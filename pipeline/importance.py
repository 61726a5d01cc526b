"""Activation-aware pruning importance: Wanda for unstructured and N:M masks, Minitron's activation importance
for heads and MLP channels, and Block Influence for whole decoder blocks.

- **Wanda** (Sun et al., 2023, "A Simple and Effective Pruning Approach for Large Language Models",
  arXiv:2306.11695): the score of weight ``W_ij`` (output ``i``, input ``j``) is ``S_ij = |W_ij| · ‖X_j‖₂``, the
  norm over every calibration token of input feature ``j``; weights are compared **per output row**: each row
  loses ``floor(s · d_in)`` weights (unstructured), or each group of ``M`` consecutive inputs of a row keeps its
  ``N`` best (N:M).  Two orders of calibration (``calib_order``): ``sequential``, as Wanda's reference code
  (``prune_wanda``): block ``k``'s inputs are recorded with blocks ``0 … k-1`` already pruned, one forward pass
  per block; ``one_pass``: every layer's inputs come from the dense model in one pass.
- **Minitron activation importance** (Muralidharan et al., 2024, "Compact Language Models via Pruning and
  Knowledge Distillation", arXiv:2407.14679): a channel's importance is ``sqrt(Σ_b (mean_s |x_bsc|)²)``
  (batch = L2, sequence = mean) of the attention heads' outputs (the input of ``o_proj``) or of the MLP's
  intermediate activations (``act(gate) * up``, the input of ``down_proj``); a head's importance is the L2 norm
  of its channels' importances, and a key/value group's the L2 norm over all channels of its query heads (as
  NVIDIA ModelOpt's ``mcore_minitron`` ranks query groups).
- **Block Influence** (Men et al., 2024, ShortGPT): :func:`pipeline.calibration.block_influence`; the blocks of
  lowest influence are removed whole by :func:`drop_decoder_blocks`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

from pipeline.calibration import channel_activations, input_sq_norms
from pipeline.sparsity import PrunableWeight, _as_out_in, apply_masks, decoder_blocks, nm_mask

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency
    Conv1D = ()  # noqa: N816


# ---------------------------------------------------------------------------------------------
# Wanda


def wanda_scores(weight: torch.Tensor, in_sq_norm: torch.Tensor, in_dim: int = 1) -> torch.Tensor:
    """Wanda's score ``|W_ij| · ‖X_j‖₂`` for every entry of ``weight``, fp32, ``weight``'s shape.

    Args:
        weight: 2-D weight; ``in_dim`` indexes its input features (1 for ``nn.Linear``, 0 for ``Conv1D``).
        in_sq_norm: ``(d_in,)``: ``Σ_tokens x_j²`` of every input feature (:func:`pipeline.calibration.input_sq_norms`).

    Raises:
        ValueError: when ``in_sq_norm`` does not have one entry per input feature.
    """
    if in_sq_norm.shape != (weight.shape[in_dim],):
        raise ValueError(f"input norms of shape {tuple(in_sq_norm.shape)} do not fit a weight of shape "
                         f"{tuple(weight.shape)} with in_dim {in_dim}")
    norm = in_sq_norm.float().clamp_min(0).sqrt().to(weight.device)
    w = weight.detach().abs().float()
    return w * (norm[None, :] if in_dim == 1 else norm[:, None])


def row_mask(scores: torch.Tensor, sparsity: float, in_dim: int = 1) -> torch.Tensor:
    """Keep-mask removing, in every output row, the ``floor(sparsity · d_in)`` entries of lowest score
    (Wanda's per-output comparison group).  Returns a bool tensor of ``scores``' shape.

    Raises:
        ValueError: for ``sparsity`` outside ``[0, 1)``.
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must lie in [0, 1), got {sparsity}")
    s = _as_out_in(scores, in_dim)
    k = int(sparsity * s.shape[1])
    keep = torch.ones_like(s, dtype=torch.bool)
    if k:
        keep.scatter_(1, torch.topk(s.float(), k, dim=1, largest=False).indices, False)
    return keep if in_dim == 1 else keep.t().contiguous()


def score_module(model: nn.Module, pw: PrunableWeight) -> nn.Module:
    """The ``nn.Linear`` / ``Conv1D`` that multiplies its input by ``pw`` (for a tied weight, the alias that is
    one, e.g. ``lm_head``).

    Raises:
        ValueError: when no alias of the weight belongs to a linear layer (an embedding's input is token ids).
    """
    for name in pw.aliases:
        mod = model.get_submodule(name.rsplit(".", 1)[0])
        if isinstance(mod, nn.Linear) or (Conv1D and isinstance(mod, Conv1D)):
            return mod
    raise ValueError(f"{pw.name}: wanda needs the input activations of a linear layer, but this weight belongs to "
                     f"an embedding; --exclude it or use --importance magnitude")


def _block_index(model: nn.Module, name: str) -> int:
    """Index of the decoder block holding parameter ``name`` (``len(blocks)`` for weights outside the blocks)."""
    found = decoder_blocks(model)
    if found is None:
        return 0
    prefix, blocks = found
    m = re.match(re.escape(prefix) + r"\.(\d+)\.", name)
    return int(m.group(1)) if m else len(blocks)


def wanda_masks(
    model: nn.Module,
    selected: Mapping[str, PrunableWeight],
    blocks: torch.Tensor,
    batch_size: int,
    method: Literal["magnitude", "nm"] = "magnitude",
    sparsity: float = 0.5,
    n: int = 2,
    m: int = 4,
    order: Literal["sequential", "one_pass"] = "sequential",
) -> dict[str, torch.Tensor]:
    """Wanda keep-masks for the ``selected`` weights (:func:`pipeline.sparsity.prunable_weights`).

    ``method`` ``magnitude`` (unstructured): each output row loses ``floor(sparsity · d_in)`` weights of lowest
    score (:func:`row_mask`); ``nm``: in each group of ``m`` consecutive inputs of a row the ``n`` of highest score
    are kept.  ``order`` ``sequential`` records block ``k``'s inputs with the masks of blocks ``0 … k-1``
    applied to ``model`` (one forward pass per block, Wanda's reference order; the model is left pruned by the
    returned masks); ``one_pass`` records every input in one pass of the dense model and leaves ``model``
    unchanged.

    Raises:
        ValueError: an embedding weight in the selection (see :func:`score_module`), a bad ratio or N:M width.
    """
    modules = {k: score_module(model, pw) for k, pw in selected.items()}
    if order == "one_pass":
        groups = [list(selected)]
    elif order == "sequential":
        by_block: dict[int, list[str]] = {}
        for k in selected:
            by_block.setdefault(_block_index(model, k), []).append(k)
        groups = [by_block[i] for i in sorted(by_block)]
    else:
        raise ValueError(f"order must be 'sequential' or 'one_pass', got {order!r}")
    masks: dict[str, torch.Tensor] = {}
    for names in groups:
        norms = input_sq_norms(model, {k: modules[k] for k in names}, blocks, batch_size)
        group_masks = {}
        for k in names:
            pw = selected[k]
            s = wanda_scores(pw.param, norms[k], pw.in_dim)
            group_masks[k] = (row_mask(s, sparsity, pw.in_dim) if method == "magnitude"
                              else nm_mask(s, n, m, pw.in_dim))
        if order == "sequential":
            apply_masks(model, group_masks)
        masks.update(group_masks)
    return masks


# ---------------------------------------------------------------------------------------------
# Minitron: heads and MLP channels


def kv_group_activation_importance(o_proj_stat: torch.Tensor, heads: int, kv: int, head_dim: int) -> torch.Tensor:
    """Activation importance of each key/value group of a LLaMA attention block, shape ``(kv,)``.

    ``o_proj_stat`` is :func:`pipeline.calibration.channel_activations` of ``o_proj``'s input, shape
    ``(heads · head_dim,)``, laid out head by head; group ``g`` holds query heads ``g·r … (g+1)·r - 1``
    (``r = heads / kv``, ``repeat_kv``'s order).  The group's importance is the L2 norm of the channel
    importances ``sqrt(o_proj_stat)`` over all its ``r · head_dim`` channels, i.e. the L2 norm of its heads'
    importances.
    """
    if o_proj_stat.numel() != heads * head_dim:
        raise ValueError(f"o_proj input statistic has {o_proj_stat.numel()} channels, expected heads·head_dim = "
                         f"{heads}·{head_dim}")
    r = heads // kv
    channel = o_proj_stat.float().clamp_min(0).sqrt()
    return torch.linalg.vector_norm(channel.view(kv, r * head_dim), ord=2, dim=1)


def mlp_channel_activation_importance(down_proj_stat: torch.Tensor) -> torch.Tensor:
    """Activation importance of each MLP intermediate channel: ``sqrt`` of the ``down_proj`` input statistic."""
    return down_proj_stat.float().clamp_min(0).sqrt()


def llama_activation_importance(model: nn.Module, blocks: torch.Tensor, batch_size: int
                                ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per decoder block of a LLaMA model, ``(kv-group importance (kv,), MLP-channel importance (F,))`` from one
    calibration pass of the dense model (Minitron's aggregation; see the module docstring).  The attention output
    and MLP down projections are those :mod:`pipeline.architectures` names for the model."""
    from pipeline import architectures

    arch = architectures.of(model)
    cfg = model.config
    heads, kv, hd = arch.heads(cfg), arch.kv_heads(cfg), arch.head_dim(cfg)
    layers = arch.blocks_of(model)[1]
    modules: dict[str, nn.Module] = {}
    for i, blk in enumerate(layers):
        modules[f"{i}.o_proj"] = blk.get_submodule(arch.o)
        modules[f"{i}.down_proj"] = blk.get_submodule(arch.mlp_out)
    stats = channel_activations(model, modules, blocks, batch_size)
    return {i: (kv_group_activation_importance(stats[f"{i}.o_proj"], heads, kv, hd).cpu(),
                mlp_channel_activation_importance(stats[f"{i}.down_proj"]).cpu())
            for i in range(len(layers))}


# ---------------------------------------------------------------------------------------------
# depth


def lowest(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the ``k`` lowest ``scores`` (``torch.topk`` order for ties), ascending."""
    if k <= 0:
        return []
    return sorted(torch.topk(scores.float(), k, largest=False).indices.tolist())


def drop_decoder_blocks(model: nn.Module, drop: Sequence[int]) -> list[int]:
    """Remove the decoder blocks ``drop`` of a model in place; returns the kept blocks' original indices.

    The block list (:mod:`pipeline.architectures`: ``model.model.layers`` in LLaMA) keeps the other blocks in
    order, every attention module's ``layer_idx`` is renumbered (the key/value cache is indexed by it),
    ``config.num_hidden_layers`` and, when the config has it, ``config.layer_types`` follow.

    Raises:
        ValueError: an index out of range, or no block left.
        KeyError: an architecture missing from :mod:`pipeline.architectures`.
    """
    from pipeline import architectures

    arch = architectures.of(model)
    layers = arch.blocks_of(model)[1]
    n = len(layers)
    bad = [i for i in drop if not 0 <= i < n]
    if bad or len(set(drop)) >= n:
        raise ValueError(f"cannot remove blocks {sorted(drop)} of {n}: indices must lie in [0, {n}) and leave "
                         f"at least one block; lower --drop_layers")
    kept = [i for i in range(n) if i not in set(drop)]
    arch.set_blocks(model, nn.ModuleList([layers[i] for i in kept]))
    for new, blk in enumerate(arch.blocks_of(model)[1]):
        attn = blk.get_submodule(arch.attention)
        if hasattr(attn, "layer_idx"):
            attn.layer_idx = new
        if hasattr(blk, "layer_idx"):
            blk.layer_idx = new
    cfg: Any = model.config
    types = getattr(cfg, "layer_types", None)
    if types is not None and len(types) == n:
        cfg.layer_types = [types[i] for i in kept]
    cfg.num_hidden_layers = len(kept)
    return kept
